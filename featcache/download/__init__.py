"""Download the Kermany chest X-ray dataset safely and lay it out the way ``datasets.discover`` reads it.

Why this module is careful:

* The archive is large (about 1.2 GB) and links drop: a partial download is kept as
  ``<dest>/.downloads/<name>.part`` and resumed with an HTTP ``Range`` request. A server that ignores
  ``Range`` (answers 200), answers a range we did not ask for or a range of another file (its total
  size or ETag differs from the ``.part``'s) makes us restart cleanly from byte 0
  instead of splicing two different transfers together.
* A connection that closes early looks like a normal end of stream to ``http.client``; we compare the
  bytes received with ``Content-Length`` / ``Content-Range`` so a truncated file is never extracted.
* Checksums are only trusted when they are real: the table of sources carries none we could not
  verify (this code was written offline), so an unknown checksum is computed, reported and recorded
  next to the file (``<name>.sha256``) and later runs verify the cached file against that record
  (trust on first use); ``--sha256`` pins it. The record binds a fresh download too (only a new
  ``--sha256`` overrides it) and is written only after the files were extracted, so a truncated file
  or an HTML error page never becomes the trusted digest. A mismatch keeps the bad file aside as
  ``<name>.bad``.
* Archives are untrusted input: entries with absolute paths, drive letters, ``..`` components, links
  or device files are rejected (zip-slip), and zip bombs are caught from the headers before anything
  is written (entry count, total size, compression ratio). We never call ``extractall``: every file
  is written by our own code at a path we computed and checked to lie inside a fresh temporary folder.
* Files are extracted into a temporary folder inside ``dest`` (same file system), arranged into the
  Kermany layout there and then renamed into place split by split; a marker file
  (``.featcache-download.json``) says ``installing`` during the renames and ``complete`` after, so a
  run killed half-way is finished by the next run and a complete layout is never redone by accident.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from featcache.download.archive import ExtractLimits, safe_extract
from featcache.download.layout import KERMANY_LABELS, find_kermany_root, layout_kermany
from featcache.download.sources import RemoteFile, Source, get_source, parse_sha256_pins
from featcache.download.tfrecords import TFRecordFeatures, tfrecords_to_kermany
from featcache.download.transfer import (
    BLOCK_SIZE,
    DEFAULT_TIMEOUT,
    DownloadResult,
    download_file,
    fetch,
    read_json,
    sha256_with_progress,
    write_json_atomic,
    write_record,
)
from featcache.errors import ConfigError, DownloadError, NetworkError
from featcache.faults import crash_point
from featcache.progress import ProgressFn

__all__ = [
    "BLOCK_SIZE", "DEFAULT_TIMEOUT", "DOWNLOADS_DIR", "KERMANY_LABELS", "KERMANY_SPLITS", "MARKER_NAME",
    "DownloadResult", "ExtractLimits", "KermanyResult", "RemoteFile", "Source", "TFRecordFeatures",
    "download_file", "download_kermany", "fetch", "find_kermany_root", "get_source", "layout_kermany",
    "parse_sha256_pins", "safe_extract", "sha256_with_progress", "tfrecords_to_kermany",
]

DOWNLOADS_DIR = ".downloads"
MARKER_NAME = ".featcache-download.json"
TEMP_PREFIX = ".featcache-extract-"
KERMANY_SPLITS = ("train", "test", "val")


@dataclass
class KermanyResult:
    """Summary for the CLI: where things are and what was verified."""

    dest: Path
    source: str
    files: list[DownloadResult]
    counts: dict[str, dict[str, int]]
    already_present: bool = False

    @property
    def n_images(self) -> int:
        return sum(n for labels in self.counts.values() for n in labels.values())


@contextlib.contextmanager
def _dest_lock(downloads: Path) -> Iterator[None]:
    """One download per destination at a time; a second one fails at once with a clear message."""
    from filelock import FileLock, Timeout

    lock = FileLock(str(downloads / ".lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise DownloadError(f"another featcache download is writing to {downloads.parent}; wait for it to "
                            f"finish or choose another --dest.") from None
    try:
        yield
    finally:
        lock.release()


def _prepare_dest(dest: str | Path) -> Path:
    dest = Path(dest).expanduser()
    if dest.exists() and not dest.is_dir():
        raise DownloadError(f"--dest {dest} exists and is not a folder; choose a folder path.")
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise NetworkError(f"cannot create {dest} ({exc.strerror}); choose a writable --dest.") from None
    return dest.resolve()


def _owned_splits(marker: dict) -> set[str]:
    """The split folders our marker says a featcache download installed (or is installing).

    Markers written before ``owned`` existed name them only through ``counts``.
    """
    owned = marker.get("owned")
    if not isinstance(owned, list):
        owned = list(marker.get("counts", {}) or {})
    return {s for s in owned if s in KERMANY_SPLITS}


def _check_existing(dest: Path, source: str, files: Sequence[RemoteFile], pins: Mapping[str, str],
                    force: bool) -> KermanyResult | None:
    """Decide what an existing layout in ``dest`` allows: None (go on), a no-op result, or raise.

    ``--force`` replaces only split folders our marker says we installed: a ``train/`` the user made
    (their own data, another download) is never deleted, with or without it.
    """
    existing = [s for s in KERMANY_SPLITS if (dest / s).exists() or (dest / s).is_symlink()]
    if not existing:
        return None
    marker = read_json(dest / MARKER_NAME)
    interrupted = marker.get("state") == "installing"     # our own install, killed half-way
    if not force and not interrupted and marker.get("state") == "complete" and \
            marker.get("source") == source and marker.get("urls") == [f.url for f in files] and \
            all((dest / s).is_dir() for s in marker.get("counts", {})) and \
            all(marker.get("sha256", {}).get(n) == h for n, h in pins.items()):
        return KermanyResult(dest=dest, source=source, files=[], counts=marker.get("counts", {}),
                             already_present=True)
    owned = _owned_splits(marker)
    foreign = [s + "/" for s in existing if s not in owned]
    if foreign:
        raise DownloadError(f"{dest} holds {', '.join(foreign)}, which no featcache download installed; move "
                            f"them away or choose another --dest (--force replaces only folders a featcache "
                            f"download installed).")
    if not force and not interrupted:
        held = ", ".join(s + "/" for s in existing)
        raise DownloadError(f"{dest} already holds {held}; pass --force to replace them or choose "
                            f"another --dest.")
    return None


def _clean_stale(dest: Path) -> None:
    """Temporary folders left by a killed run (we hold the lock, so none is in use)."""
    for entry in dest.iterdir():
        if entry.name.startswith(TEMP_PREFIX) and entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)


def _install(stage: Path, dest: Path, trash: Path, owned_before: set[str], marker: dict) -> None:
    """Rename the staged splits into ``dest``; an old layout goes to ``trash`` first (--force).

    The marker says ``installing`` while splits are being swapped, so a run killed half-way is
    recognised as ours and finished by the next run without --force; ``complete`` comes last. Its
    ``owned`` lists the split folders --force may replace: while installing, the old layout's
    (``owned_before``, still in place until moved) and the new one's; once complete, the new one's.
    """
    new = sorted(marker["counts"])
    write_json_atomic(dest / MARKER_NAME, {**marker, "state": "installing",
                                           "owned": sorted(owned_before | set(new))})
    for split in KERMANY_SPLITS:
        old = dest / split
        if old.exists() or old.is_symlink():
            trash.mkdir(exist_ok=True)
            os.replace(old, trash / split)
    for split in sorted(p.name for p in stage.iterdir()):
        os.replace(stage / split, dest / split)
        crash_point("download.install_split")
    write_json_atomic(dest / MARKER_NAME, {**marker, "state": "complete", "owned": new})


def download_kermany(dest: str | Path, *, source: str = "mendeley", url: str | None = None,
                     sha256: str | Sequence[str] | Mapping[str, str] | None = None, force: bool = False,
                     timeout: float = DEFAULT_TIMEOUT, limits: ExtractLimits | None = None,
                     tfrecord_features: TFRecordFeatures | None = None, block_size: int = BLOCK_SIZE,
                     progress: ProgressFn | None = None) -> KermanyResult:
    """Download the Kermany chest X-rays into ``dest/{train,test[,val]}/{NORMAL,PNEUMONIA}/``.

    Downloads are cached in ``dest/.downloads`` (resumable, checksummed) and kept after
    extraction, so a rerun or ``force`` re-layout does not fetch 1.2 GB again. Without ``force``
    an existing layout is left alone: if our marker says it came from the same source the call
    is a no-op (``already_present``), otherwise it raises. ``force`` replaces only the split folders
    our marker says a featcache download installed; any other ``train/``, ``test/`` or ``val/`` raises.
    """
    src = get_source(source)
    files = src.resolve(url)
    pins = parse_sha256_pins(sha256, files)
    if src.kind == "tfrecord" and importlib.util.find_spec("tensorflow") is None:
        # Checked before anything is fetched: the records are read with TensorFlow only after the download.
        raise ConfigError("--source tfrecord needs TensorFlow to read the records and it is not installed; "
                          "install it (pip install tensorflow) or use --source mendeley.")
    dest = _prepare_dest(dest)
    # Checked before .downloads exists, so a refused run leaves nothing behind in the user's folder...
    present = _check_existing(dest, source, files, pins, force)
    if present is not None:
        return present
    downloads = dest / DOWNLOADS_DIR
    try:
        downloads.mkdir(exist_ok=True)
    except OSError as exc:
        raise NetworkError(f"cannot create {downloads} ({exc.strerror}); choose a writable --dest.") from None
    with _dest_lock(downloads):
        # ...and again under the lock: another run may have installed a layout meanwhile.
        present = _check_existing(dest, source, files, pins, force)
        if present is not None:
            return present
        owned_before = _owned_splits(read_json(dest / MARKER_NAME))
        _clean_stale(dest)
        results = [fetch(f, downloads, pinned=pins.get(f.name), timeout=timeout, block_size=block_size,
                         progress=progress) for f in files]
        tmp = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=dest))
        try:
            stage = tmp / "layout"
            if src.kind == "archive":
                safe_extract(results[0].path, tmp / "raw", limits, progress)
                counts = layout_kermany(tmp / "raw", stage)
            else:
                by_name = {r.name: r.path for r in results}
                shards = [(f.split or "train", by_name[f.name],
                           by_name.get(f.name.replace("-images.", "-paths.")))
                          for f in files if f.role == "images"]
                counts = tfrecords_to_kermany(shards, stage, tfrecord_features, limits, progress)
            for r in results:        # trust on first use only what extracted: never an HTML page
                write_record(r)
            _install(stage, dest, tmp / "old", owned_before, {
                "source": source, "urls": [f.url for f in files], "counts": counts,
                "sha256": {r.name: r.sha256 for r in results},
                "verified": {r.name: r.verified for r in results},
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            })
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return KermanyResult(dest=dest, source=source, files=results, counts=counts)
