"""A gateway for versioned ML model endpoints (KServe v2 / Open Inference Protocol)."""

__version__ = "0.1.0"
