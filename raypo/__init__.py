"""raypo: find the best DPO variant for a model and a preference dataset."""

__version__ = "0.1.0"
