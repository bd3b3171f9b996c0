"""featcache: frozen-CNN feature cache, cheap heads, honest reports."""

__version__ = "0.1.0"
