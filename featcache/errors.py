"""User-facing errors.

Every failure a user can cause (bad flags, missing data, mismatched caches, unknown run ids)
is raised as a :class:`FeatcacheError` whose message is one clear sentence. The CLI prints that
sentence and exits non-zero; it never shows a traceback for these. Programming errors keep
their normal exceptions so bugs stay visible.
"""
from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from pathlib import Path


class FeatcacheError(Exception):
    """Base class: ``str(err)`` is the one sentence shown to the user."""

    exit_code: int = 2


class ConfigError(FeatcacheError):
    """A flag, grid value, preset, head or backbone name is invalid."""


class DataError(FeatcacheError):
    """The dataset folder, manifest or labels cannot support the request."""


class NothingClassifiedError(DataError):
    """predict skipped every image it was given (none could be read or decoded).

    ``result`` is predict's dict all the same (no predictions; every skipped image with its reason), so
    the CLI still writes --csv. Why: skipped images are rows of that CSV, yet when all were skipped no file
    was written at all, and a script reading it next failed, or read the previous call's predictions left
    in its place as if they were this call's.
    """

    def __init__(self, message: str, result: dict) -> None:
        super().__init__(message)
        self.result = result


class CacheError(FeatcacheError):
    """A cache file is missing rows, corrupt, or was written with other settings."""


class DamagedRowsError(CacheError):
    """Rows of a cache file fail their stored digest (changed after they were written).

    Why the parts: the finding (which rows, which file) holds wherever the file is read, but the advice
    (run that folder's extract again) is for the file's own folder; a caller copying rows from another
    folder's file quotes the finding alone.
    """

    def __init__(self, finding: str, advice: str) -> None:
        super().__init__(f"{finding}; {advice}")
        self.finding = finding
        self.advice = advice


class CacheWriteError(CacheError):
    """The operating system refused a write to a cache file (disk full, quota, I/O error)."""

    exit_code = 1


class CacheLockedError(CacheError):
    """Another process is writing the same cache file."""

    exit_code = 3


class RunError(FeatcacheError):
    """A run id does not exist or a run folder is inconsistent."""


class DownloadError(FeatcacheError):
    """A download failed, was truncated, did not match its checksum or was unsafe."""


class NetworkError(DownloadError):
    """The network or the disk failed a download (no connection, a transfer cut off, a folder that cannot
    be written): not a usage mistake, so exit 1 like other refusals of the world outside, not 2."""

    exit_code = 1


class WeightsDownloadError(NetworkError):
    """Keras could not download a backbone's ImageNet weights (no network, and no file in its cache).

    Why the parts: what failed and where Keras looks for the file hold for every command, but the way out
    (``--weights none``, or ``--weights PATH`` to a weights file) is extract's, fit's and run's;
    ``featcache demo`` takes only imagenet or none, so it quotes ``finding`` and ``place`` with its own.
    """

    def __init__(self, finding: str, place: str) -> None:
        super().__init__(f"{finding}; {place}, or use --weights none (random, seeded) or --weights PATH to a "
                         "weights file")
        self.finding = finding
        self.place = place


_ERRNO_RE = re.compile(r"errno = (\d+)")
_OS_PHRASES = ("No space left on device", "Disk quota exceeded", "File too large", "Read-only file system",
               "Input/output error", "Permission denied")


def os_errno(exc: BaseException) -> int | None:
    """The operating system's errno of a failed file operation: HDF5 gives it in its text as
    ``errno = 13`` (its own ``errno`` attribute is a guess, see ``os_reason``), else the exception's."""
    match = _ERRNO_RE.search(str(exc))
    return int(match.group(1)) if match else getattr(exc, "errno", None)


def os_reason(exc: BaseException) -> str:
    """The operating system's reason for a failed file operation, in a few words.

    Why: HDF5 reports a failed write as an h5py RuntimeError or OSError whose text runs over several lines
    (time, file descriptor, buffer address, offsets) and whose ``errno`` is HDF5's guess, not the system's;
    the real one is in the text as ``errno = 28``. The user needs only "No space left on device".
    """
    text = str(exc)
    match = _ERRNO_RE.search(text)
    if match:
        return os.strerror(int(match.group(1)))
    for phrase in _OS_PHRASES:
        if phrase in text:
            return phrase
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.strip().splitlines()[0][:200]
    first = text.strip().splitlines()[0].strip() if text.strip() else type(exc).__name__
    return first[:200]


def nearest_existing(path: str | os.PathLike) -> Path:
    """``path`` itself, or its nearest ancestor that exists: the folder a missing one would be made in, or
    the regular file that stands where a folder is needed. One walk for every check of an output path
    (predict's --csv checks, the CLI's "X is a file, where a folder is needed")."""
    p = Path(path)
    return next((c for c in (p, *p.parents) if c.exists()), p.parents[-1] if p.parents else p)


@contextlib.contextmanager
def naming(path: str | os.PathLike) -> Iterator[None]:
    """Give an OSError raised inside the block the ``path`` being written when it names none.

    Why: a write() that fails on a full disk raises ``OSError(28)`` without a file name, and the CLI's one
    sentence must say where the operating system refused (README, Reliability).
    """
    try:
        yield
    except OSError as exc:
        if exc.filename is not None:
            raise
        raise OSError(exc.errno, os_reason(exc), os.fspath(path)) from exc
