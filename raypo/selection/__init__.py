"""Data-driven selection metrics: what the search looks at first (HT-SR alpha, ...)."""
