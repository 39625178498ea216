"""Parquet reports under reports/<name>/: written atomically as results arrive, read with
`load()` into pandas."""

from raypo.reports.tables import Report, load
from raypo.reports.writer import ReportWriter

__all__ = ["Report", "ReportWriter", "load"]
