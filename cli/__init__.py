"""Command-line interface (installed as featcache.cli)."""
