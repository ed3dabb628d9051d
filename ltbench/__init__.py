"""LTBench: long-tailed, multi-class, unsupervised industrial anomaly detection."""

__version__ = "0.1.0"
