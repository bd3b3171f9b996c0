"""User-facing errors.

Every failure a user can cause (bad flags, missing data, mismatched caches, unknown run ids)
is raised as a :class:`FeatcacheError` whose message is one clear sentence. The CLI prints that
sentence and exits non-zero; it never shows a traceback for these. Programming errors keep
their normal exceptions so bugs stay visible.
"""
from __future__ import annotations


class FeatcacheError(Exception):
    """Base class: ``str(err)`` is the one sentence shown to the user."""

    exit_code: int = 2


class ConfigError(FeatcacheError):
    """A flag, grid value, preset, head or backbone name is invalid."""


class DataError(FeatcacheError):
    """The dataset folder, manifest or labels cannot support the request."""


class CacheError(FeatcacheError):
    """A cache file is missing rows, corrupt, or was written with other settings."""


class CacheLockedError(CacheError):
    """Another process is writing the same cache file."""

    exit_code = 3


class RunError(FeatcacheError):
    """A run id does not exist or a run folder is inconsistent."""


class DownloadError(FeatcacheError):
    """A download failed, was truncated, did not match its checksum or was unsafe."""
