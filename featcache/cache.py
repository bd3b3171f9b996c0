"""The HDF5 feature cache: one file per (dataset root, backbone config), rows keyed by image content.

Why this shape
--------------
Features are a pure function of (image bytes, backbone config, view), so a row is keyed by the SHA-256 of
the image file plus the view name; labels, splits and patients live elsewhere and one file serves every
labelling of the same images. The config (dataset root, ``Backbone.describe()``, resize mode, dtype) is
hashed into the file name and stored in the attributes, so two configs never share a file.

Layout (all datasets row-aligned, length = capacity)::

    features   [N, D] <f4 | <f2   chunked, early allocation, never filled
    keys       [N] S64            hex sha256 of the image file's bytes
    views      [N] S32            "orig", "hflip", "rot+20", ...
    paths      [N] S1024          relative path, utf-8 (surrogateescape keeps non-UTF-8 names); a
                                  longer one is cut to 1,021 bytes + "…" (PATH_CUT_MARK)
    valid      [N] u1             1 = row complete; the valid rows form a prefix
    row_digest [N] S16            blake2b-8 hex of key|view|feature bytes (tamper evidence)

Plain h5py can read ``features``, ``keys``, ``views`` and ``paths``. After a clean close every row is
valid; only after a crash (until the next writer finishes) can rows with ``valid == 0`` exist at the
end: they are incomplete and must be ignored.

Crash safety
------------
Chunks are allocated when the dataset grows (``ALLOC_TIME_EARLY``) and never filled (``FILL_TIME_NEVER``),
and ``track_times`` is off, so writing rows into reserved capacity changes no HDF5 metadata: only raw
bytes at fixed offsets. ``append`` writes the rows, flushes and fsyncs, then sets ``valid`` and flushes
again. A ``kill -9`` at any moment of streaming leaves a readable file whose valid prefix is intact; at
most the chunk in flight is lost and the next writer reuses its slots. The metadata changes happen only
in ``reserve`` (one resize + flush before streaming), at creation (done in a temporary file that is
renamed into place) and in ``close`` (shrink + attributes + flush; skipped when nothing changed).

A full disk
-----------
HDF5 writes the new end-of-file address into the superblock even when writing past the old end fails, and
such a file no longer opens ("truncated"): every row in it would be lost. So ``reserve`` and ``close`` first
reserve the bytes the file will grow by (``posix_fallocate``) and refuse cleanly, file untouched, when the
disk cannot give them; the reserved rows cannot run out of blocks later either, and ``reserve`` keeps the
room ``close`` needs, so the MiB a refusal names are enough. Any refused write becomes a
``CacheWriteError`` (one sentence: the file and the system's reason) and ``close`` then only lets go of
the file, so the error a user sees is the first one, not a second from unwinding.

Concurrency
-----------
A writer holds ``<file>.lock`` (filelock): a second writer fails at once with ``CacheLockedError`` or waits
``wait`` seconds. ``writer_lock`` takes that lock before the writer opens the file (extract: before it
builds the backbone), and the writers of the file in the same thread then share it. HDF5's own file
locking is off (``locking=False``) for everyone, so readers can read while a writer streams: they read
``valid`` first and use only the valid prefix, which is never rewritten.
"""
from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import os
import re
import shlex
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from featcache.errors import (
    CacheError,
    CacheLockedError,
    CacheWriteError,
    ConfigError,
    DamagedRowsError,
    naming,
    os_errno,
    os_reason,
)
from featcache.faults import crash_point
from featcache.progress import ProgressFn, emit

FORMAT_VERSION = 1
DTYPES = {"float32": "<f4", "float16": "<f2"}
KEY_BYTES, VIEW_BYTES, PATH_BYTES, DIGEST_BYTES = 64, 32, 1024, 16
PATH_CUT_MARK = "…".encode()  # ends a path cut to the column width (U+2026, three bytes in UTF-8)
DATASETS = ("features", "keys", "views", "paths", "valid", "row_digest")
# Attributes that are not config keys; a backbone description using one of these names is prefixed.
RESERVED_ATTRS = {"featcache_format", "config_json", "config_hash", "views", "versions_json", "created",
                  "n_rows", "about", "sessions_json"}
MAX_SESSIONS = 64  # entries kept in sessions_json (an HDF5 attribute stays under its 64 KiB)
ABOUT = ("featcache feature cache: features[i] is the vector of the image whose file bytes have sha256 "
         "keys[i], under augmentation views[i] (paths[i] = its path relative to dataset_root). Use only rows "
         "with valid[i] == 1: rows with valid == 0 exist only after a writer crashed (or while one runs) and "
         "are incomplete.")
CHUNK_BYTES = 2 << 20        # ~2 MiB feature chunks: big sequential I/O, small loss on a crash
CLOSE_MARGIN = 1 << 20       # room kept past HDF5's end of file for close(): attributes, index nodes
META_CHUNK_ROWS = 4096       # rows per chunk of the 1-D datasets (keys: 256 KiB)
BLOCK_BYTES = 16 << 20       # rows read per block by verify/merge/get: memory stays flat on big files
_KEY_RE = re.compile(r"^[0-9a-f]{64}$")
_NAME_RE = re.compile(r"__(?P<hash>[0-9a-f]{12})(?:\.shard-(?P<i>\d+)-of-(?P<n>\d+))?\.h5$")


# ----------------------------------------------------------------------------------------------- config
def canonical_json(config: dict) -> str:
    """The one byte-exact spelling of a config: what the hash, the file and the comparisons use."""
    return json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def cache_config(dataset_root: Path, backbone: dict, resize: str, dtype: str) -> dict:
    """Everything that determines a row's features except the view: the cache file's identity.

    ``backbone`` is ``Backbone.describe()``; its ``name`` becomes the ``backbone`` key. Keys that would clash
    with the cache's own settings or attributes are prefixed with ``backbone_`` rather than lost.
    """
    if dtype not in DTYPES:
        raise ConfigError(f"unknown cache dtype '{dtype}'; choose one of: {', '.join(DTYPES)}")
    own = {"dataset_root", "resize", "dtype", "resize_box"}
    config: dict[str, Any] = {}
    for key, value in backbone.items():
        name = "backbone" if key == "name" and "backbone" not in backbone else key
        if name in own or name in RESERVED_ATTRS:
            name = f"backbone_{name}"
        config[name] = value
    if "backbone" not in config:
        raise ValueError("backbone description has no 'name'")
    config.update(dataset_root=str(Path(dataset_root).resolve()), resize=resize, dtype=dtype)
    if resize != "squash":  # pad and crop boxes come from the full size now (images._resize), not from a
        config["resize_box"] = "full size"  # JPEG's downscaled one: old caches hold the old rows
    return json.loads(canonical_json(config))  # tuples -> lists etc.: equal to what a reader loads


def config_hash(config: dict) -> str:
    """Full hex sha256 of the canonical JSON; the file name carries its first 12 characters."""
    return hashlib.sha256(canonical_json(config).encode("ascii")).hexdigest()


def _slug(text: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")
    return slug[:60] or "x"


def cache_path(cache_dir: Path, config: dict, shard: tuple[int, int] | None = None) -> Path:
    """``<dataset-slug>__<backbone>-<pooling>-<size>__<hash12>.h5`` (``.shard-I-of-N.h5`` for a shard)."""
    backbone = str(config.get("backbone", "backbone"))
    if "/" in backbone or backbone.endswith((".keras", ".h5")):  # a saved model: use its file stem
        backbone = Path(backbone).stem
    root_name = Path(str(config.get("dataset_root", "dataset"))).name or "dataset"
    stem = (f"{_slug(root_name)}__{_slug(backbone)}-{_slug(str(config.get('pooling')))}-"
            f"{_slug(str(config.get('image_size')))}__{config_hash(config)[:12]}")
    suffix = f".shard-{shard[0]}-of-{shard[1]}.h5" if shard else ".h5"
    return Path(cache_dir) / (stem + suffix)


def parse_cache_name(path: Path) -> dict | None:
    """The hash (and shard i/n) a cache file name carries, or None when the name has none."""
    match = _NAME_RE.search(Path(path).name)
    if not match:
        return None
    shard = (int(match["i"]), int(match["n"])) if match["i"] is not None else None
    return {"hash12": match["hash"], "shard": shard}


def settings_in_name(path: Path) -> dict | None:
    """Pooling and image size from a cache file name (``<root>__<backbone>-<pooling>-<size>__<hash>``, as
    `cache_path` writes it), for the extract command that rebuilds a file too damaged to read its
    settings from: fit's own flags gave ImageNet weights' default 224 px for a 64-px cache."""
    if _NAME_RE.search(Path(path).name) is None:
        return None
    parts = Path(path).name.split("__")
    pieces = parts[-2].rsplit("-", 2) if len(parts) >= 3 else []
    if len(pieces) != 3 or not pieces[2].isdigit():
        return None
    return {"image_size": int(pieces[2]), **({"pooling": pieces[1]} if pieces[1] != "None" else {})}


def _attr_value(value: Any) -> Any:
    """How a config value is stored as a flat attribute: scalars as they are, anything else as JSON."""
    if isinstance(value, (str, bool, int, float)):
        return value
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _from_attr(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    if isinstance(value, np.generic):
        return value.item()
    return value


def _versions() -> dict:
    """Library versions without importing TensorFlow (keeps the cache commands fast)."""
    from importlib import metadata

    from featcache import __version__
    from featcache.backbones import BUILD_RULES

    out = {"python": sys.version.split()[0], "featcache": __version__, "build_rules": BUILD_RULES}
    for pkg in ("keras", "tensorflow", "jax", "h5py", "numpy", "pillow"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[pkg] = metadata.version(pkg)
    backend = os.environ.get("KERAS_BACKEND", "tensorflow")
    if "keras" in sys.modules:
        with contextlib.suppress(Exception):
            backend = sys.modules["keras"].backend.backend()
    out["backend"] = backend
    return out


def _sessions(f: Any) -> list[dict]:
    """The file's ``sessions_json``: who added rows from which row on (empty in files made before it)."""
    try:
        out = json.loads(_from_attr(f.attrs.get("sessions_json", "[]")))
    except (TypeError, ValueError):
        return []
    return [s for s in out if isinstance(s, dict)] if isinstance(out, list) else []


def _versions_attr(f: Any) -> dict:
    """The file's ``versions_json`` (its creator's library versions); {} when absent or unreadable."""
    try:
        out = json.loads(_from_attr(f.attrs.get("versions_json", "{}")))
    except (TypeError, ValueError):
        return {}
    return out if isinstance(out, dict) else {}


def _same_setup(a: dict, b: dict) -> bool:
    """Two sessions that computed rows the same way (all but where and when they started)."""
    def strip(s: dict) -> dict:
        return {k: v for k, v in s.items() if k not in ("first_row", "started")}
    return strip(a) == strip(b)


def row_digest(key: str, view: str, row: np.ndarray) -> str:
    """blake2b-8 hex of key|view|feature bytes, as stored (dtype of the file, little-endian)."""
    h = hashlib.blake2b(digest_size=8)
    h.update(key.encode("ascii", "replace"))
    h.update(b"|")
    h.update(view.encode("utf-8", "surrogateescape"))
    h.update(b"|")
    h.update(np.ascontiguousarray(row).tobytes())
    return h.hexdigest()


def _decode(values: np.ndarray) -> list[str]:
    return [v.decode("utf-8", "surrogateescape") for v in values]


def _encode_path(path: str) -> bytes:
    """UTF-8 with surrogateescape (non-UTF-8 names survive); a path longer than the column ends with
    ``PATH_CUT_MARK`` instead of its last bytes.

    Why the mark rather than a variable-length column: the fixed ``S1024`` dtype is what every existing
    cache and its checks hold, and paths are information only (rows are keyed by content), so a cut path
    loses nothing but text; before, it was cut silently and looked like a real, shorter path.
    """
    raw = path.encode("utf-8", "surrogateescape")
    if len(raw) <= PATH_BYTES:
        return raw
    end = PATH_BYTES - len(PATH_CUT_MARK)
    for _ in range(3):  # not inside a character: at most 3 continuation bytes (10xxxxxx) to give back
        if raw[end] & 0xC0 != 0x80:
            break
        end -= 1
    return raw[:end] + PATH_CUT_MARK


_CUT_MIN = PATH_BYTES - 3  # the shortest value _encode_path cuts to, mark included


def path_was_cut(stored: bytes) -> bool:
    """Whether a ``paths`` value is one ``_encode_path`` cut (a real path of 1,021 to 1,024 bytes ending in
    the mark reads as cut too: harmless, and no real file name was seen to)."""
    return len(stored) >= _CUT_MIN and stored.endswith(PATH_CUT_MARK)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM until the block is done, then deliver them. Why: the six datasets are
    resized one after another, and an interrupt between two of those calls left them with different
    lengths (rows then written past a short dataset's end vanish without an error). Only the main thread
    can swap handlers; elsewhere no KeyboardInterrupt can arrive anyway."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    old = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(ValueError, OSError):
            old[sig] = signal.signal(sig, lambda signum, _frame: caught.append(signum))
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        for sig in dict.fromkeys(caught):
            signal.raise_signal(sig)  # now, with the previous handler: KeyboardInterrupt, or the exit


def _equal_lengths(f: Any) -> int | None:
    """The shortest dataset's length when the datasets' lengths differ (a resize interrupted before
    ``_signals_deferred`` existed, or by SIGKILL), else None."""
    lengths = {int(f[name].shape[0]) for name in DATASETS if name in f}
    return min(lengths) if len(lengths) > 1 else None


def _valid_prefix(valid: np.ndarray) -> int:
    """Number of leading rows marked valid: the rows readers may use."""
    zeros = np.flatnonzero(valid != 1)
    return int(zeros[0]) if zeros.size else int(valid.shape[0])


def _blocks(n: int, rows: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, rows):
        yield start, min(n, start + rows)


def _block_rows(feature_dim: int, itemsize: int) -> int:
    return max(1, BLOCK_BYTES // max(1, feature_dim * itemsize))


def _row_blocks(f: Any, uniq: np.ndarray, n_rows: int,
                digests: bool) -> Iterator[tuple[np.ndarray, np.ndarray, list[str] | None]]:
    """(rows, raw features, stored digests or None) of the sorted unique ``uniq``, one file block at a time:
    each block reads one span of the file (few seeks) and memory stays at a block (``BLOCK_BYTES``).
    The one walk that reading rows (``CacheReader.read_rows``) and checking them (``_damaged``) share."""
    ds = f["features"]
    step = _block_rows(int(ds.shape[1]), ds.dtype.itemsize)
    pos = 0
    for _start, stop in _blocks(n_rows, step):
        if pos == uniq.size:
            return
        sel = uniq[pos:][: np.searchsorted(uniq[pos:], stop)]
        if sel.size == 0:
            continue
        lo, hi = int(sel[0]), int(sel[-1]) + 1
        stored = _decode(f["row_digest"][lo:hi][sel - lo]) if digests else None
        yield sel, ds[lo:hi][sel - lo], stored
        pos += sel.size


def _open_h5(path: Path, mode: str, **kwargs: Any):
    """Open without HDF5's own file locking: our lock file guards writers, and readers must be able to
    read while a writer streams."""
    import h5py

    _refuse_folder(path)
    with contextlib.suppress(OSError):
        if Path(path).stat().st_size == 0:  # HDF5 opened "r+" would write an empty file into it
            raise CacheError(f"cache file {path} is empty (0 bytes: an interrupted copy or a full disk?); "
                             "delete it and run the extraction again (extract replaces it itself)")
    try:
        return h5py.File(path, mode, locking=False, **kwargs)
    except (OSError, ValueError) as exc:
        refused = _access_refused(exc)
        if refused is not None and mode != "r":
            # a read-only file (a shared or backed-up cache) is not a damaged one: "delete it" would throw
            # good rows away; an OSError lets extract use a complete read-only cache and say what was refused
            raise PermissionError(refused, os.strerror(refused), os.fsdecode(path)) from exc
        if refused is not None:
            raise CacheError(f"cache file {path} cannot be read ({os.strerror(refused)}); give this user "
                             "read access to it (the file is not known to be damaged)") from exc
        cut = cut_short(path)
        if cut is not None:
            raise CacheError(f"cache file {path} is not a readable HDF5 file: {cut}; copy it again in full "
                             "from where it came, or delete it and run the extraction again") from exc
        raise CacheError(f"cache file {path} is not a readable HDF5 file (truncated or corrupt); delete it "
                         "or move it away and run the extraction again") from exc


HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def cut_short(path: Path) -> str | None:
    """Why ``path`` is unreadable ("cut short (N of the M bytes its HDF5 header gives ...)") when it is an
    HDF5 file shorter than the end of file its superblock records; None when it is not, or cannot be told.

    Why: a cache copied from the GPU machine or a backup and cut mid-way was "not a readable HDF5 file
    (truncated or corrupt)", the words for random bytes too, so nothing said that this copy, not the cache,
    was at fault, nor that copying it again in full recovers every row. HDF5 refuses a file shorter than
    its recorded end of file (its "truncated file" check); the superblock (at 0, or 512, 1024... after a
    user block) is read here with the layout of the HDF5 file format specification, versions 0 to 3.
    """
    try:
        size = os.stat(path).st_size
        with open(path, "rb") as fh:
            at = 0
            while at + len(HDF5_SIGNATURE) <= size:
                fh.seek(at)
                head = fh.read(64)  # a superblock up to its end-of-file address (8-byte offsets: 52 bytes)
                if head.startswith(HDF5_SIGNATURE):
                    break
                at = 512 if at == 0 else at * 2
            else:
                return None
    except OSError:
        return None
    inside = f"cut short inside its HDF5 header (only {size:,} bytes: an interrupted copy or download?)"
    if len(head) < 14:  # not even the version and offset size, which every layout has by byte 13
        return inside
    version = head[8]
    if version in (0, 1):
        width, eof_at = head[13], (24 if version == 0 else 28)
    elif version in (2, 3):
        width, eof_at = head[9], 12
    else:
        return None  # a future layout: HDF5's own word ("truncated or corrupt") stands
    if width not in (2, 4, 8):
        return None
    eof_at += 2 * width  # past the base address and the free-space (or superblock extension) address
    if len(head) < eof_at + width:
        return inside
    eof = int.from_bytes(head[eof_at:eof_at + width], "little")
    if eof == (1 << (8 * width)) - 1 or eof <= size:  # undefined, or the whole file is there
        return None
    return (f"cut short ({size:,} of the {eof:,} bytes its HDF5 header gives: an interrupted copy or "
            "download?)")


def _access_refused(exc: BaseException) -> int | None:
    """The errno of an open refused by permissions or a read-only file system, else None."""
    code = os_errno(exc)
    return code if code in (errno.EACCES, errno.EPERM, errno.EROFS) else None


def _refuse_folder(path: Path) -> None:
    """A folder where the cache file goes was called "truncated or corrupt" (or "does not exist")."""
    if Path(path).is_dir():
        raise CacheError(f"cache file {path} is a folder; move it away or choose another --cache-dir")


def _refuse_given_folder(path: Path, verb: str) -> None:
    """A folder given where a cache file is wanted (`cache verify`, `cache info`): what to pass instead."""
    if path.is_dir():
        raise CacheError(f"{path} is a folder, not a cache file; pass the .h5 files to {verb} "
                         f"(`featcache cache ls --cache-dir {shlex.quote(os.fsdecode(path))}` lists them)")


def _read_config(f, path: Path) -> dict:
    fmt = _from_attr(f.attrs.get("featcache_format", 0))
    if "config_json" not in f.attrs or not fmt:
        raise CacheError(f"{path} is an HDF5 file but not a featcache cache (no config attributes); "
                         "pass a file written by `featcache extract`")
    if int(fmt) > FORMAT_VERSION:
        raise CacheError(f"cache file {path} has format {fmt}, newer than this featcache understands "
                         f"({FORMAT_VERSION}); upgrade featcache")
    # Why before anything is read: a hand-made or foreign file with a cache's attributes but not all of its
    # parts (every writer of this format makes them all) failed later as "could not be read (object 'valid'
    # doesn't exist)" or "edited after extraction", and, matched by its attributes, stopped a whole
    # folder's fit; named here, the folder's scans skip it like any other non-cache
    missing = [a for a in ("config_hash",) if a not in f.attrs] + [d for d in DATASETS if d not in f]
    if missing:
        raise CacheError(f"{path} is not a cache featcache extract wrote (missing: {', '.join(missing)}); "
                         "move it out of the cache folder")
    config = json.loads(_from_attr(f.attrs["config_json"]))
    # Why: readers take config_json as the settings that computed the rows (fit matches and records them),
    # so an edited one (a "fixed" dataset_root or pooling) passed the rows off as another extraction's.
    # Every writer since format 1 stores config_hash beside config_json: one hash of a short string, and
    # no file featcache wrote is refused.
    if str(_from_attr(f.attrs.get("config_hash", ""))) != config_hash(config):
        quoted = shlex.quote(os.fsdecode(path))
        raise CacheError(f"cache file {path}: its settings (config_json) no longer match its config_hash, so "
                         "they were edited after extraction and its rows cannot be trusted to be their "
                         f"features; `featcache cache verify {quoted}` lists what differs (extract again "
                         "into another --cache-dir, or restore the file)")
    return config


def _config_diff(have: dict, want: dict) -> list[str]:
    keys = sorted(set(have) | set(want))
    return [f"{k}: file {have.get(k)!r}, requested {want.get(k)!r}"
            for k in keys if have.get(k) != want.get(k)]


def _write_error(path: Path, exc: BaseException, need: int | None = None, creating: bool = False,
                 has_rows: bool = True) -> CacheWriteError:
    if creating:
        what = f"could not create the cache file {path}"
    elif need:
        mib = -(-need * 10 // 2**20) / 10  # rounded up: freeing what it says is enough
        what = f"could not reserve {mib:,.1f} MiB{' more' if has_rows else ''} for the cache file {path}"
    else:
        what = f"could not write the cache file {path}"
    if creating or not has_rows:
        tail = "nothing was written, so free space (or fix the folder) and run the same command again"
    else:
        tail = ("the rows written before are kept, so free space (or fix the folder) and run the same "
                "command to resume")
    return CacheWriteError(f"{what}: {os_reason(exc)}; {tail}")


# ----------------------------------------------------------------------------------------------- writer
_HELD_LOCKS: dict[str, Any] = {}
"""Writer locks this process holds through ``writer_lock``, by absolute lock-file path: a CacheWriter of
that file takes the same lock again (nested) instead of a second one, which the first would refuse."""


def _take_writer_lock(path: Path, wait: float | None) -> Any:
    """Acquire ``<path>.lock``, the one-writer lock of the cache file ``path``, and return it (a filelock
    lock: release it once per acquire); CacheLockedError when another process holds it past ``wait``."""
    from filelock import FileLock, Timeout

    lock_path = str(path) + ".lock"
    lock = _HELD_LOCKS.get(os.path.abspath(lock_path))
    if lock is None:
        # filelock reports a lock file it cannot create (read-only folder, /proc) as held by someone else;
        # creating it here first lets the operating system's own reason through (the CLI prints it)
        os.close(os.open(lock_path, os.O_CREAT | os.O_RDWR, 0o644))
        lock = FileLock(lock_path)
    try:
        lock.acquire(timeout=max(0.0, wait or 0.0))
    except Timeout:
        how = (f"it was still held after --wait {wait:g}; wait longer" if wait
               else "wait for it to finish or pass --wait SECONDS")
        raise CacheLockedError(
            f"cache file {path} is being written by another featcache process; {how}.") from None
    return lock


@contextlib.contextmanager
def writer_lock(path: Path, wait: float | None = None) -> Iterator[None]:
    """Hold the writer lock of the cache file ``path`` (which need not exist yet) before any CacheWriter
    opens it; the CacheWriters of ``path`` this thread opens meanwhile take this same lock again.

    Why: extract can know its cache file before it builds the backbone (seconds to a minute, and the
    TensorFlow import); taking the lock then refuses a second extract of the same file, with the same
    message, before that wait instead of after it, and keeps the file to this process from the build on.
    OSError as CacheWriter raises it when the lock file cannot be created (a read-only folder).
    """
    lock = _take_writer_lock(Path(path), wait)
    key = os.path.abspath(str(path) + ".lock")
    nested = key in _HELD_LOCKS  # this thread holds it already: the outer block lets it go
    _HELD_LOCKS[key] = lock
    try:
        yield
    finally:
        if not nested:
            del _HELD_LOCKS[key]
        lock.release()


class CacheWriter:
    """The one writer of a cache file: holds the lock, appends complete rows, resumes after crashes."""

    def __init__(self, path: Path, config: dict, feature_dim: int, *, wait: float | None = None,
                 fsync: bool = True, versions: dict | None = None, session: dict | None = None) -> None:
        """``versions``: what a new file records as its creator's versions (merge passes its shards').
        ``session``: how this writer's rows are computed beyond the settings (extract: its batch size),
        recorded with the library versions in ``sessions_json`` when the first row is added, because both
        move the features in the last digits: a file resumed on another backend or batch size holds rows
        of two kinds, and says from which row on.
        """
        self.path = Path(path)
        self.config = json.loads(canonical_json(config))
        self.feature_dim = int(feature_dim)
        self.dtype = np.dtype(DTYPES[self.config["dtype"]])
        self._fsync = fsync
        self._f = None
        self._failed = False  # a write was refused (disk full): close() then only lets go of the file
        self._created = False  # this writer made the file (removed again if a refusal left it empty)
        self._session = {"versions": _versions(), **(session or {})}
        self._session_recorded = False
        self._session_entry: dict | None = None  # the entry this writer added to sessions_json, if any
        self.paths_cut = 0  # rows this writer added whose path was longer than the column (see _encode_path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = _take_writer_lock(self.path, wait)
        try:
            self._open(versions)
        except BaseException:
            self._release()
            raise

    # -- opening -------------------------------------------------------------------------------------
    def _open(self, versions: dict | None) -> None:
        for stale in self.path.parent.glob(glob.escape(self.path.name) + ".tmp-*"):  # crash during creation
            with contextlib.suppress(OSError):
                stale.unlink()
        with contextlib.suppress(OSError):
            if self.path.stat().st_size == 0:  # nothing to lose (an interrupted copy): build it anew,
                self.path.unlink()  # as the lock holder; "r+" made it an empty HDF5 "not a cache"
        if not self.path.exists():
            self._create(versions)
        self._f = _open_h5(self.path, "r+", rdcc_nbytes=0)  # no chunk cache: rows go straight to disk
        f = self._f
        have = _read_config(f, self.path)
        if have != self.config:
            raise CacheError(f"cache file {self.path} was written with other settings "
                             f"({'; '.join(_config_diff(have, self.config))}); use another --cache-dir or "
                             "delete that file")
        if f["features"].shape[1] != self.feature_dim:
            raise CacheError(f"cache file {self.path} holds {f['features'].shape[1]}-d features but the "
                             f"backbone gives {self.feature_dim}-d; delete the file and extract again")
        short = _equal_lengths(f)
        if short is not None:  # rows past the shortest dataset's end were never whole: cut every dataset
            with self._refusals(), _signals_deferred():  # there, and extract computes those rows again
                for name in DATASETS:
                    f[name].resize((short,) + f[name].shape[1:])
                self._flush()
        valid = f["valid"][...]
        self.n_valid = _valid_prefix(valid)
        self._first_row = self.n_valid  # this writer's rows start here (its session's first_row)
        self.capacity = int(valid.shape[0])
        # rows marked valid behind an invalid one: no writer leaves them (rows become valid in order), so a
        # flag was damaged; their slots are free from here (cleared first), and extract says how many
        self.cleared_rows = int(np.count_nonzero(valid[self.n_valid:]))
        if self.cleared_rows:
            f["valid"][self.n_valid:] = 0
            self._flush()
        keys = _decode(f["keys"][: self.n_valid])
        views = _decode(f["views"][: self.n_valid])
        self._present = set(zip(keys, views, strict=True))
        self._rows = {kv: row for row, kv in reversed(list(enumerate(zip(keys, views, strict=True))))}
        self._redo: dict[tuple[str, str], int] = {}  # (key, view) -> row of a damaged row to write again
        self._views = list(dict.fromkeys(json.loads(_from_attr(f.attrs.get("views", "[]"))) + views))

    def _create(self, versions: dict | None) -> None:
        """Build the empty file in a temporary name and rename it into place: never a half-made cache."""
        import h5py

        tmp = self.path.with_name(f"{self.path.name}.tmp-{os.getpid()}")
        with naming(tmp):  # folder not writable: still an OSError (extract may not need to write)
            f = h5py.File(tmp, "w", locking=False)
        try:
            # rows per chunk from the float32 size: a float16 file has the same chunks at half the bytes
            frows = max(1, min(65536, CHUNK_BYTES // (self.feature_dim * 4)))
            self._make(f, "features", (0, self.feature_dim), self.dtype, (frows, self.feature_dim))
            self._make(f, "keys", (0,), f"S{KEY_BYTES}", (META_CHUNK_ROWS,))
            self._make(f, "views", (0,), f"S{VIEW_BYTES}", (META_CHUNK_ROWS,))
            self._make(f, "paths", (0,), f"S{PATH_BYTES}", (META_CHUNK_ROWS // 8,))
            self._make(f, "valid", (0,), "u1", (16 * META_CHUNK_ROWS,))
            self._make(f, "row_digest", (0,), f"S{DIGEST_BYTES}", (META_CHUNK_ROWS,))
            attrs = f.attrs
            attrs["featcache_format"] = FORMAT_VERSION
            attrs["about"] = ABOUT
            attrs["config_json"] = canonical_json(self.config)
            attrs["config_hash"] = config_hash(self.config)
            for key, value in self.config.items():
                attrs[key] = _attr_value(value)
            attrs["views"] = "[]"
            attrs["versions_json"] = json.dumps(versions or _versions(), sort_keys=True)
            attrs["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
            attrs["n_rows"] = 0
            f.flush()
            f.close()
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        except (OSError, RuntimeError) as exc:  # disk full, quota, I/O error: say so, leave nothing
            with contextlib.suppress(Exception):
                f.close()
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise _write_error(self.path, exc, creating=True) from None
        except BaseException:
            with contextlib.suppress(Exception):
                f.close()
            raise
        crash_point("cache.during_create")
        os.replace(tmp, self.path)
        self._created = True
        with contextlib.suppress(OSError):  # make the rename durable
            dir_fd = os.open(self.path.parent, os.O_RDONLY)
            os.fsync(dir_fd)
            os.close(dir_fd)

    @staticmethod
    def _make(f, name: str, shape: tuple, dtype, chunks: tuple) -> None:
        from h5py import h5d, h5p

        dcpl = h5p.create(h5p.DATASET_CREATE)
        dcpl.set_alloc_time(h5d.ALLOC_TIME_EARLY)   # chunks exist before rows are written ...
        dcpl.set_fill_time(h5d.FILL_TIME_NEVER)     # ... and are never filled: writes touch no metadata
        f.create_dataset(name, shape=shape, dtype=dtype, chunks=chunks, maxshape=(None,) + shape[1:],
                         dcpl=dcpl, track_times=False)

    # -- API -----------------------------------------------------------------------------------------
    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.close()
            return
        # unwinding from an error (a full disk, say): that error is the one to report, not a second one
        # from shrinking or flushing the file here; the valid prefix on disk is what a rerun resumes from
        with contextlib.suppress(Exception):
            self.close()

    def present(self) -> set[tuple[str, str]]:
        """(key, view) pairs already complete in the file: the work a resumed run skips."""
        return set(self._present)

    def damaged(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
        """The present (key, view) pairs among ``pairs`` whose row fails its stored digest."""
        return _damaged(self._f, {self._rows[kv]: kv for kv in pairs}, self.n_valid)

    def redo(self, pairs: Sequence[tuple[str, str]]) -> None:
        """Take damaged rows out of ``present``: the next ``append`` of each writes it again in its own row.

        Why in place: a second row of the same (key, view) would be a duplicate (readers use the first,
        ``verify`` flags it). The row's features and digest change, nothing else; a crash in between
        leaves a row that fails its digest again, which the next extract computes again.
        """
        for kv in pairs:
            self._redo[kv] = self._rows[kv]
            self._present.discard(kv)

    def reserve(self, n_rows: int) -> None:
        """Make room for ``n_rows`` more rows in one resize + flush, before streaming starts."""
        need = self.n_valid + int(n_rows)
        if need <= self.capacity:  # room left by a crashed writer: only the session to record
            if n_rows > 0 and not self._session_recorded:
                self._preallocate(CLOSE_MARGIN)
                with self._refusals():
                    self._record_session()
                    self._flush()
            return
        self._preallocate(self._growth_bytes(need) + CLOSE_MARGIN)
        with self._refusals(), _signals_deferred():
            if not self._session_recorded:  # metadata changes here and in close(), never in append()
                self._record_session()
            for name in DATASETS:
                ds = self._f[name]
                ds.resize((need,) + ds.shape[1:])
            crash_point("cache.during_reserve")
            self._flush()
        # HDF5's flush cut the file at its new end of file, giving back the margin: take it again (it was
        # just freed), so close() finds its room already reserved and a full disk cannot fail it
        with contextlib.suppress(CacheWriteError):
            self._preallocate(CLOSE_MARGIN, keep_going=True)
        self.capacity = need

    def append(self, keys: Sequence[str], views: Sequence[str], paths: Sequence[str],
               features: np.ndarray) -> int:
        """Write complete rows after the valid prefix, then mark them valid; returns rows written.

        Rows whose (key, view) is already present (or repeated in this call) are skipped, so a row is
        never stored twice whatever the caller passes.
        """
        features = np.asarray(features)
        n = len(keys)
        if not (len(views) == len(paths) == n and features.shape == (n, self.feature_dim)):
            raise ValueError(f"append: {n} keys, {len(views)} views, {len(paths)} paths and features "
                             f"{features.shape}; expected matching lengths and dim {self.feature_dim}")
        take: list[int] = []
        seen: set[tuple[str, str]] = set()
        for i, (key, view) in enumerate(zip(keys, views, strict=True)):
            if not _KEY_RE.match(key):
                raise ValueError(f"append: key {key!r} is not a 64-character lowercase hex sha256")
            if not view or len(view.encode("utf-8", "surrogateescape")) > VIEW_BYTES:
                raise ValueError(f"append: view name {view!r} is empty or longer than {VIEW_BYTES} bytes")
            if (key, view) not in self._present and (key, view) not in seen:
                seen.add((key, view))
                take.append(i)
        again = [i for i in take if (keys[i], views[i]) in self._redo]
        if again:
            self._rewrite(keys, views, features, again)
            redone = set(again)
            take = [i for i in take if i not in redone]
        if not take:
            return len(again)
        k = len(take)
        if self.n_valid + k > self.capacity:  # caller did not reserve enough: grow (amortised)
            self.reserve(max(k, self.capacity // 2, 64))
        rows = np.ascontiguousarray(features[take], dtype=self.dtype)
        kk = [keys[i] for i in take]
        vv = [views[i] for i in take]
        digests = [row_digest(a, b, r) for a, b, r in zip(kk, vv, rows, strict=True)]
        lo, hi = self.n_valid, self.n_valid + k
        f = self._f
        with self._refusals():  # rows past the valid prefix are free slots: nothing before is lost
            crash_point("cache.before_data_write")
            f["features"][lo:hi] = rows
            f["keys"][lo:hi] = np.array([s.encode("ascii") for s in kk], dtype=f"S{KEY_BYTES}")
            f["views"][lo:hi] = np.array([s.encode("utf-8", "surrogateescape") for s in vv],
                                         dtype=f"S{VIEW_BYTES}")
            stored = [_encode_path(paths[i]) for i in take]
            f["paths"][lo:hi] = np.array(stored, dtype=f"S{PATH_BYTES}")
            f["row_digest"][lo:hi] = np.array([d.encode("ascii") for d in digests], dtype=f"S{DIGEST_BYTES}")
            crash_point("cache.after_data_write")
            self._flush()
            crash_point("cache.after_data_flush")
            f["valid"][lo:hi] = 1
            crash_point("cache.after_valid_write")
            self._flush()
        self.n_valid = hi
        self.paths_cut += sum(path_was_cut(b) for b in stored)
        self._present.update(zip(kk, vv, strict=True))
        self._rows.update({kv: lo + j for j, kv in enumerate(zip(kk, vv, strict=True))})
        self._views.extend(v for v in dict.fromkeys(vv) if v not in self._views)
        crash_point("cache.after_valid_flush")
        return k + len(again)

    def _rewrite(self, keys: Sequence[str], views: Sequence[str], features: np.ndarray,
                 which: list[int]) -> None:
        """Write rows taken out by ``redo`` again in their own place (features, then digest, then fsync)."""
        with self._refusals():
            for i in which:
                kv = (keys[i], views[i])
                row = self._redo.pop(kv)
                data = np.ascontiguousarray(features[i:i + 1], dtype=self.dtype)
                self._f["features"][row:row + 1] = data
                self._f["row_digest"][row] = row_digest(*kv, data[0]).encode("ascii")
                self._present.add(kv)
            self._flush()

    def close(self) -> None:
        """Shrink to the valid rows, record ``n_rows`` and ``views``, flush, release the lock.

        After a refused write (disk full) it only lets go of the file: the valid prefix already on disk is
        what a rerun resumes from, and more writes would only fail again.
        """
        f = self._f
        n = self.n_valid  # one count for every dataset, whatever a writer thread still appends
        try:
            if f is not None and not self._failed:
                with self._refusals(), _signals_deferred():
                    views = json.dumps(self._views)
                    # rows reserved that never came (every image left failed to decode): no session
                    empty = self._session_entry is not None and n == self._first_row
                    if (self.capacity != n or _from_attr(f.attrs.get("n_rows", -1)) != n
                            or _from_attr(f.attrs.get("views", "")) != views or empty):  # else nothing to do
                        self._preallocate(CLOSE_MARGIN)  # no new space if reserve() kept it for us
                        if n > self._first_row and not self._session_recorded:
                            self._record_session()
                        elif empty:
                            self._drop_own_session()
                        if self.capacity != n:
                            for name in DATASETS:
                                ds = f[name]
                                ds.resize((n,) + ds.shape[1:])
                            self.capacity = n
                        f.attrs["n_rows"] = n
                        f.attrs["views"] = views
                        crash_point("cache.during_close")
                        self._flush()
                        self._trim()
                    f.close()
        finally:
            self._f = None
            if f is not None:  # closed above, or not: never left for the garbage collector to flush
                with contextlib.suppress(Exception):
                    f.close()
                if self._failed and self._created and self.n_valid == 0:
                    with contextlib.suppress(OSError):  # refused before any row: leave no empty cache
                        self.path.unlink()
            self._release()

    @property
    def session_versions(self) -> dict:
        """The library versions (and Keras backend) this writer records for the rows it adds."""
        return dict(self._session.get("versions") or {})

    def previous_session(self) -> dict | None:
        """How the file's last rows were computed (its last session, else its creator's versions)."""
        sessions = _sessions(self._f)
        if sessions:
            return sessions[-1]
        return {"versions": _versions_attr(self._f)} if self.n_valid else None

    # -- internals -----------------------------------------------------------------------------------
    def _record_session(self) -> None:
        """Add this writer's session to ``sessions_json`` unless the last one computed rows the same way.

        Called where the file's metadata changes anyway (reserve's resize, close), never from append:
        appends touch only data chunks, the premise of the cache's crash safety."""
        sessions = _sessions(self._f)
        entry = {"first_row": int(self._first_row),
                 "started": datetime.now(timezone.utc).isoformat(timespec="seconds"), **self._session}
        if not sessions or not _same_setup(sessions[-1], entry):
            self._f.attrs["sessions_json"] = json.dumps((sessions + [entry])[-MAX_SESSIONS:], sort_keys=True)
            self._session_entry = entry
            self._sessions_before = sessions  # what _drop_own_session puts back (the cap may drop the first)
        self._session_recorded = True

    def _drop_own_session(self) -> None:
        """Take back the session entry this writer added when it added no row after all.

        Why: ``reserve`` records the session before the rows come (metadata changes only there and in
        close); when every image left to compute fails to decode, the entry would describe an empty range
        (``cache info``: "rows 10-9") and stop a later session of the file's previous setup from merging."""
        sessions = _sessions(self._f)
        if sessions and sessions[-1] == json.loads(json.dumps(self._session_entry, sort_keys=True)):
            self._f.attrs["sessions_json"] = json.dumps(self._sessions_before, sort_keys=True)
        self._session_entry = None

    @contextlib.contextmanager
    def _refusals(self) -> Iterator[None]:
        """A write HDF5 or the system refuses (disk full, quota, I/O error) becomes one CacheWriteError,
        and the writer touches the file no more (``close`` then only lets go of it)."""
        try:
            yield
        except (OSError, RuntimeError) as exc:
            self._failed = True
            raise _write_error(self.path, exc) from None

    def _growth_bytes(self, rows: int) -> int:
        """Bytes HDF5 will add to the file to hold ``rows`` rows: the new chunks (allocated early) and some
        slack for the chunk-index nodes, so the margin that ``reserve`` takes again after its flush fits in
        what the flush gave back."""
        total = 64 << 10
        for name in DATASETS:
            ds = self._f[name]
            per_chunk = ds.chunks[0]
            chunk_bytes = int(np.prod(ds.chunks)) * ds.dtype.itemsize
            new_chunks = -(-rows // per_chunk) - ds.id.get_num_chunks()
            total += max(0, new_chunks) * chunk_bytes
        return total

    def _preallocate(self, nbytes: int, keep_going: bool = False) -> None:
        """Reserve ``nbytes`` of disk past HDF5's end of file before HDF5 grows the file.

        Why: HDF5 writes the new end-of-file address into the superblock even when writing the structures
        past the old end fails (disk full, quota): the file then reads as truncated and every row in it is
        lost. Reserving the space first turns a full disk into a clean refusal here, and the rows' blocks
        cannot run out later either. Space already reserved (by ``reserve`` for ``close``) is not counted
        twice. A refusal leaves the file at its size before the call: some file systems (ext4) keep the
        blocks a failed ``posix_fallocate`` got, which would leave the disk full. ``keep_going``: a refusal
        does not mark the writer failed. Where there is no ``posix_fallocate`` (macOS) the free space is
        checked instead (not proof against a race); best effort where the file system cannot preallocate.
        """
        fd = self._f.id.get_vfd_handle()
        size = os.fstat(fd).st_size
        start = max(int(self._f.id.get_filesize()), 0)
        try:
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(fd, start, nbytes)
            elif shutil.disk_usage(self.path.parent).free < nbytes - max(size - start, 0):  # macOS: a check
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                return
            with contextlib.suppress(OSError):
                os.ftruncate(fd, size)  # give back what a partial allocation kept
            if not keep_going:
                self._failed = True  # the file is as it was; close() must not try to shrink it either
            raise _write_error(self.path, exc, max(nbytes - max(size - start, 0), 1),
                               has_rows=self.n_valid > 0) from None

    def _trim(self) -> None:
        """Give back the preallocated bytes HDF5 did not use: cut the file at HDF5's end of file (its end of
        allocated space, or the size at opening if larger), past which it keeps nothing."""
        with contextlib.suppress(OSError):
            fd = self._f.id.get_vfd_handle()
            end = int(self._f.id.get_filesize())
            if os.fstat(fd).st_size > end > 0:
                os.ftruncate(fd, end)

    def _flush(self) -> None:
        """h5py flush, then fsync: 'valid' must never reach the disk before the rows it vouches for."""
        self._f.flush()
        if self._fsync:
            with contextlib.suppress(Exception):
                os.fsync(self._f.id.get_vfd_handle())

    def _release(self) -> None:
        with contextlib.suppress(Exception):
            self._lock.release()


# ----------------------------------------------------------------------------------------------- reader
class CacheReader:
    """Read-only view of the rows that were complete when the file was opened (safe during writes)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        _refuse_folder(self.path)
        if not self.path.is_file():
            raise CacheError(f"cache file {self.path} does not exist; run `featcache extract` first, or "
                             "check the path (`featcache cache ls` lists the caches of a folder)")
        last: Exception | None = None
        for attempt in range(3):  # a writer's reserve/close flush can be caught mid-way: retry briefly
            try:
                self._f = _open_h5(self.path, "r")
                try:
                    self._load()
                    return
                except CacheError:
                    self._f.close()
                    raise
                except (OSError, KeyError, ValueError) as exc:
                    self._f.close()
                    last = exc
            except CacheError as exc:
                last = exc
            if attempt < 2:
                time.sleep(0.05 * (attempt + 1))
        if isinstance(last, CacheError):
            raise last
        raise CacheError(f"cache file {self.path} could not be read ({last}); run `featcache cache verify "
                         f"{self.path}`") from last

    def _load(self) -> None:
        f = self._f
        self.config: dict = _read_config(f, self.path)
        self.config_hash: str = str(_from_attr(f.attrs.get("config_hash", "")))
        # what extracted the rows (backend, library versions): settings alone do not pin the numbers
        self.versions: dict = _versions_attr(f)
        self.sessions: list[dict] = _sessions(f)  # who added rows from which row on (see CacheWriter)
        valid = f["valid"][...]          # read first: rows before the first 0 are complete and immutable
        short = _equal_lengths(f)  # an interrupted resize: rows past the shortest dataset are not whole
        self.n_rows: int = _valid_prefix(valid if short is None else valid[:short])
        # closed cleanly: no reserved or incomplete rows, no interrupted resize (a writer would tidy them)
        self.clean: bool = (short is None and int(valid.shape[0]) == self.n_rows
                            and _from_attr(f.attrs.get("n_rows", -1)) == self.n_rows)
        self.feature_dim: int = int(f["features"].shape[1])
        self.dtype: str = str(self.config.get("dtype", "float32"))
        keys = _decode(f["keys"][: self.n_rows])
        views = _decode(f["views"][: self.n_rows])
        self._index: dict[tuple[str, str], int] = {}
        for row, kv in enumerate(zip(keys, views, strict=True)):
            self._index.setdefault(kv, row)
        self.views: list[str] = list(dict.fromkeys(views))

    def __enter__(self) -> CacheReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the HDF5 handle."""
        with contextlib.suppress(Exception):
            self._f.close()

    def index(self) -> dict[tuple[str, str], int]:
        """(key, view) -> row, for every complete row."""
        return dict(self._index)

    def key_paths(self) -> dict[str, str]:
        """{key: the relative path its first complete row was extracted from}.

        Why: predict names the run's images a new image shares a file name with (a full-size or re-saved
        copy of a training image has other bytes, so another key)."""
        keys = _decode(self._f["keys"][: self.n_rows])
        paths = _decode(self._f["paths"][: self.n_rows])
        out: dict[str, str] = {}
        for key, path in zip(keys, paths, strict=True):
            out.setdefault(key, path)
        return out

    def has(self, keys: Sequence[str], view: str = "orig") -> np.ndarray:
        """Boolean mask: which keys have a complete row for ``view``."""
        return np.array([(k, view) in self._index for k in keys], dtype=bool)

    def get(self, keys: Sequence[str], view: str = "orig") -> np.ndarray:
        """float32 [len(keys), D] in the given order (duplicates allowed); CacheError if rows are missing.

        Every row read is checked against its stored digest (blake2b of key, view and bytes: about 1 GB/s),
        so a fit or predict never uses a row changed after it was written; ``cache verify`` lists them all.
        """
        rows = np.array([self._index.get((k, view), -1) for k in keys], dtype=np.int64)
        missing = int((rows < 0).sum())
        if missing:
            which = "" if view == "orig" else f" for view '{view}'"
            raise CacheError(f"{missing} of {len(keys)} images are not in the cache {self.path}{which}; run "
                             "`featcache extract` with the same settings first")
        return self.read_rows(rows, labels={int(r): (k, view) for r, k in zip(rows, keys, strict=True)})

    def read_rows(self, rows: np.ndarray, labels: dict[int, tuple[str, str]] | None = None) -> np.ndarray:
        """Features of the given row numbers as float32, read block by block (flat memory, few seeks).

        ``labels`` ({row: (key, view)}) turns on the digest check of every row read (DamagedRowsError on a
        mismatch).
        """
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size == 0:
            return np.empty((0, self.feature_dim), dtype=np.float32)
        if rows.min() < 0 or rows.max() >= self.n_rows:
            raise IndexError("row outside the valid rows of the cache")
        uniq, inverse = np.unique(rows, return_inverse=True)
        got = np.empty((uniq.shape[0], self.feature_dim), dtype=np.float32)
        pos = 0
        changed: list[int] = []
        for sel, raw, stored in _row_blocks(self._f, uniq, self.n_rows, digests=labels is not None):
            if labels is not None:
                changed += [int(r) for r, x, d in zip(sel, raw, stored, strict=True)
                            if row_digest(*labels[int(r)], x) != d]
            got[pos:pos + sel.size] = raw
            pos += sel.size
        if changed:
            path = _decode(self._f["paths"][changed[0]:changed[0] + 1])[0]
            quoted = shlex.quote(os.fsdecode(self.path))
            raise DamagedRowsError(
                f"{len(changed)} row(s) of cache {self.path} changed after they were written (their digests "
                f"do not match; the first is {path}); the file is damaged: `featcache cache verify {quoted}` "
                "lists the rows",
                "run the same `featcache extract` again, which computes those rows again "
                "and keeps the others (deleting the file would throw the good rows away).",
            )
        return got[inverse.reshape(-1)]

    def damaged(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
        """The (key, view) pairs among ``pairs`` whose row fails its stored digest (read block by block).

        Why: extract reuses the rows it finds; one changed after it was written (a flipped bit) must be
        computed again, not reported as cached. A 533 MB VGG16-sized file takes 0.7-0.8 s on 2 cores.
        """
        return _damaged(self._f, {self._index[kv]: kv for kv in pairs}, self.n_rows)

    def iter_blocks(self, rows_per_block: int | None = None, start: int = 0,
                    stop: int | None = None) -> Iterator[dict]:
        """Yield the complete rows (those in [start, stop)) in blocks: {"start", "keys", "views", "paths",
        "features", "digests"}."""
        f = self._f
        step = rows_per_block or _block_rows(self.feature_dim, f["features"].dtype.itemsize)
        end = self.n_rows if stop is None else min(int(stop), self.n_rows)
        for lo, hi in ((start + a, start + b) for a, b in _blocks(max(0, end - start), step)):
            yield {"start": lo, "keys": _decode(f["keys"][lo:hi]), "views": _decode(f["views"][lo:hi]),
                   "paths": _decode(f["paths"][lo:hi]), "features": f["features"][lo:hi],
                   "digests": _decode(f["row_digest"][lo:hi])}


CHECK_THREADS = 4  # blocks hashed at once by _damaged (blake2b releases the GIL): a cache hit stays quick


def _damaged(f: Any, label: dict[int, tuple[str, str]], n_rows: int) -> list[tuple[str, str]]:
    """The labels ({row: (key, view)}) of the rows of ``f`` that fail their stored digest.

    The blocks ``read_rows`` reads (``_row_blocks``), hashed in up to ``CHECK_THREADS`` threads while the
    next ones are read: memory stays flat (a few 16 MiB blocks) and the check of a 525 MB VGG16 file takes
    hashing time divided by the cores, not the sum of reading and hashing.
    """
    from concurrent.futures import ThreadPoolExecutor

    def failing(sel: np.ndarray, feats: np.ndarray, stored: list[str]) -> list[tuple[str, str]]:
        pairs = [label[int(r)] for r in sel]
        return [kv for kv, x, d in zip(pairs, feats, stored, strict=True) if row_digest(*kv, x) != d]

    rows = np.array(sorted(label), dtype=np.int64)
    out: list[tuple[str, str]] = []
    threads = max(1, min(CHECK_THREADS, os.cpu_count() or 1))
    pending: list[Any] = []
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="featcache-check") as pool:
        for sel, feats, stored in _row_blocks(f, rows, n_rows, digests=True):
            pending.append(pool.submit(failing, sel, feats, stored))
            if len(pending) > threads:
                out += pending.pop(0).result()
        for job in pending:
            out += job.result()
    return out


# ----------------------------------------------------------------------------------------------- tools
def find_caches(cache_dir: Path, *, dataset_root: Path | None = None, backbone: str | None = None,
                include_shards: bool = False, **settings: Any) -> list[Path]:
    """Cache files in ``cache_dir`` whose attributes match every given setting (None = any).

    Unreadable files are skipped (``featcache cache verify`` reports them); shard files are partial and
    only listed with ``include_shards=True``.
    """
    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir():
        return []
    want = {k: v for k, v in settings.items() if v is not None}
    if backbone is not None:
        want["backbone"] = backbone
    if dataset_root is not None:
        want["dataset_root"] = str(Path(dataset_root).resolve())
    return [path for path, config in _readable_configs(cache_dir, include_shards)
            if all(_same_setting(config.get(k), v) for k, v in want.items())]


def _readable_configs(cache_dir: Path, include_shards: bool) -> Iterator[tuple[Path, dict]]:
    """(path, config) of each cache file in ``cache_dir`` that opens as a featcache cache, by name."""
    for path in sorted(Path(cache_dir).glob("*.h5")):
        name = parse_cache_name(path)
        if name and name["shard"] and not include_shards:
            continue
        try:
            f = _open_h5(path, "r")
        except CacheError:
            continue
        with f:
            try:
                config = _read_config(f, path)
            except (CacheError, ValueError):
                continue
        yield path, config


def recorded_setups(cache_dir: Path, dataset_root: Path) -> list[tuple[dict, list[dict]]]:
    """The settings of the cache files ``cache_path`` names after ``dataset_root`` (shards included), each
    with the library versions that computed its rows: its creator's and every session's.

    Why: each of them was written with the settings a build of its backbone gave under those versions
    (a writer only adds rows to a file of its own settings), so extract can learn from them what a build
    would say without building (``extract._described_before``).
    """
    prefix = f"{_slug(Path(dataset_root).resolve().name or 'dataset')}__"
    out = []
    for path in sorted(Path(cache_dir).glob(glob.escape(prefix) + "*.h5")):
        if not parse_cache_name(path):
            continue
        try:
            with _open_h5(path, "r") as f:
                config = _read_config(f, path)
                versions = [_versions_attr(f)] + [s["versions"] for s in _sessions(f)
                                                  if isinstance(s.get("versions"), dict)]
        except (CacheError, OSError, ValueError):
            continue
        out.append((config, versions))
    return out


def find_twins(cache_dir: Path, config: dict, own: Path | None = None) -> list[Path]:
    """Caches in ``cache_dir`` with every setting of ``config`` but the dataset root: their rows are the
    features this config gives for the same image bytes. With ``own`` (the config's own file), also other
    files of the very same config: a `cache merge --out merged.h5` or a copy, whose rows extract otherwise
    computed again, and shard files (`extract --shard`; a plain extract beside them computed every row
    again instead of taking theirs, as `cache merge` would)."""
    if not Path(cache_dir).is_dir():
        return []
    want = {k: v for k, v in json.loads(canonical_json(config)).items() if k != "dataset_root"}
    mine = Path(own).resolve() if own is not None else None
    return [path for path, have in _readable_configs(cache_dir, include_shards=own is not None)
            if (have.get("dataset_root") != config.get("dataset_root")
                or (mine is not None and Path(path).resolve() != mine))
            and {k: v for k, v in have.items() if k != "dataset_root"} == want]


def unreadable_caches(cache_dir: Path, *, dataset_root: Path | None = None,
                      backbone: str | None = None) -> list[tuple[Path, CacheError | None]]:
    """Cache files (by name) in ``cache_dir`` that find_caches skips because they cannot be read, each
    with the CacheError that says why when the file is HDF5 (not a featcache cache, a newer format: the
    advice differs from "delete it"), None when it is not readable HDF5 at all.

    Why: when no cache matches, "run extract first" is the wrong advice if the matching cache is there
    but truncated or corrupt (extract itself refuses to overwrite it). The name carries the dataset
    folder and backbone slugs, so only files that can be this backbone's are opened (again).
    """
    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir():
        return []
    prefix = f"{_slug(Path(dataset_root).resolve().name)}__" if dataset_root is not None else ""
    part = f"__{_slug(backbone)}-" if backbone is not None else ""
    out = []
    for path in sorted(cache_dir.glob("*.h5")):
        if not parse_cache_name(path) or not path.name.startswith(prefix) or part not in path.name:
            continue
        try:
            with _open_h5(path, "r") as f:
                _read_config(f, path)
        except CacheError as exc:
            out.append((path, None if "not a readable HDF5 file" in str(exc) else exc))
        except ValueError:
            out.append((path, None))
    return out


FEATURE_LIMIT = 1e18
"""Largest feature magnitude a fit or predict accepts: squares of larger float32 values overflow (a
scaler's variance, a Gram matrix), and no backbone produces them, so they can only come from a damaged
cache file."""


def refuse_damaged_features(X: np.ndarray, path: Path, view: str) -> None:
    """CacheError for NaN, infinite or absurdly large features, instead of a traceback from deep in a head.

    Checked in blocks of 256 rows so that no copy of a 500 MB matrix is made; ``cache verify`` then tells
    which rows were changed after writing.
    """
    bad = 0
    for start in range(0, X.shape[0], 256):
        peak = np.abs(X[start:start + 256]).max(axis=1)  # NaN propagates through max
        bad += int(np.sum(~(peak <= FEATURE_LIMIT)))
    if bad:
        quoted = shlex.quote(os.fsdecode(path))
        raise CacheError(
            f"cache {path} holds NaN, infinite or absurdly large (> {FEATURE_LIMIT:g}) '{view}' features "
            f"in {bad} row(s); the file is damaged (`featcache cache verify {quoted}` lists the rows): "
            "delete it and run the extraction again."
        )


def _same_setting(have: Any, want: Any) -> bool:
    """Equal as stored, or equal as text (so image_size "224" from a CLI flag matches 224)."""
    return _attr_value(have) == _attr_value(want) or str(_attr_value(have)) == str(_attr_value(want))


def info(path: Path) -> dict:
    """Settings, row counts, views and size on disk of one cache file (CacheError if unreadable)."""
    path = Path(path)
    _refuse_given_folder(path, "describe")  # not "choose another --cache-dir": `cache info` has none
    with CacheReader(path) as reader:
        f = reader._f
        counts: dict[str, int] = {}
        keys: set[str] = set()
        for kv in reader._index:
            counts[kv[1]] = counts.get(kv[1], 0) + 1
            keys.add(kv[0])
        capacity = int(f["valid"].shape[0])
        n_rows_attr = int(_from_attr(f.attrs.get("n_rows", 0)))
        versions = reader.versions
        created = str(_from_attr(f.attrs.get("created", "")))
        config = reader.config
        name = parse_cache_name(path)
        paths_cut = _count_cut_paths(f["paths"], reader.n_rows)
        return {
            "path": str(path), "file": path.name, "size_bytes": path.stat().st_size,
            "config": config, "config_hash": reader.config_hash,
            "backbone": config.get("backbone"), "pooling": config.get("pooling"),
            "image_size": config.get("image_size"), "dtype": config.get("dtype"),
            "dataset_root": config.get("dataset_root"), "feature_dim": reader.feature_dim,
            "n_rows": reader.n_rows, "n_images": len(keys), "views": counts, "capacity": capacity,
            "clean": capacity == reader.n_rows and n_rows_attr == reader.n_rows,
            "shard": list(name["shard"]) if name and name["shard"] else None,
            "versions": versions, "created": created, "sessions": reader.sessions, "paths_cut": paths_cut,
        }


def _count_cut_paths(paths: Any, n_rows: int) -> int:
    """Rows whose stored path was cut to the column width, read in blocks (1 KiB a row: memory stays flat)."""
    step = max(1, BLOCK_BYTES // PATH_BYTES)
    return sum(sum(path_was_cut(b) for b in paths[lo:min(lo + step, n_rows)])
               for lo in range(0, n_rows, step))


def verify(path: Path, progress: ProgressFn | None = None) -> dict:
    """Check a cache file end to end; returns {"ok", "problems", "warnings", "n_rows", ...}.

    Never raises on corruption (a corrupt file is the answer, not an error); only a missing file raises.
    """
    path = Path(path)
    if not path.exists():
        raise CacheError(f"cache file {path} does not exist; check the path (`featcache cache ls` lists "
                         "caches)")
    _refuse_given_folder(path, "check")
    result: dict[str, Any] = {"path": str(path), "ok": False, "problems": [], "warnings": [], "n_rows": 0,
                              "capacity": 0}
    try:
        f = _open_h5(path, "r")
    except CacheError:
        cut = cut_short(path)
        result["problems"].append("empty (0 bytes)" if path.stat().st_size == 0
                                  else f"not a readable HDF5 file: {cut}" if cut
                                  else "not a readable HDF5 file (truncated or corrupt)")
        return result
    with f:
        try:
            _verify_open(f, path, result, progress)
        except Exception as exc:  # any read failure inside a damaged file is a finding, not a crash
            result["problems"].append(f"could not read the file: {type(exc).__name__}: {exc}")
    result["ok"] = not result["problems"]
    return result


def _verify_open(f, path: Path, result: dict, progress: ProgressFn | None) -> None:
    problems: list[str] = result["problems"]
    warnings: list[str] = result["warnings"]
    missing_attrs = [a for a in ("featcache_format", "config_json", "config_hash", "n_rows", "views")
                     if a not in f.attrs]
    missing_ds = [d for d in DATASETS if d not in f]
    if missing_attrs:
        problems.append(f"missing attributes: {', '.join(missing_attrs)}")
    if missing_ds:
        problems.append(f"missing datasets: {', '.join(missing_ds)}")
    if missing_ds or "config_json" not in f.attrs:
        return
    config = _verify_config(f, path, problems)
    dims = _verify_shapes(f, config, problems)
    if dims is None:
        return
    capacity, feature_dim = dims
    result["capacity"] = capacity
    valid = f["valid"][...]
    n = _valid_prefix(valid)
    result["n_rows"] = n
    if not np.isin(valid, (0, 1)).all():
        problems.append("the valid column holds values other than 0 and 1")
    if valid[n:].any():
        behind = int(np.count_nonzero(valid[n:]))  # rows, not the sum of flags (a damaged flag is not 1)
        problems.append(f"valid flags are not a prefix: {behind} rows after row {n} are marked valid behind "
                        "an incomplete row")
    n_rows_attr = _from_attr(f.attrs.get("n_rows", 0))
    if isinstance(n_rows_attr, int) and n_rows_attr > n:
        problems.append(f"attribute n_rows says {n_rows_attr} rows but only {n} rows are valid")
    elif capacity > n or n_rows_attr != n:
        warnings.append(f"file was not closed cleanly: {capacity - n} incomplete rows after the {n} valid "
                        "rows (a writer crashed or is running); the next writer reuses them")
    _verify_rows(f, n, feature_dim, result, progress)
    views_attr = f.attrs.get("views")
    with contextlib.suppress(Exception):
        listed = set(json.loads(_from_attr(views_attr)))
        missing = sorted(set(result.get("views", {})) - listed)
        if missing and not warnings:
            problems.append(f"attribute views does not list views present in the rows: {', '.join(missing)}")


def _verify_config(f, path: Path, problems: list[str]) -> dict:
    fmt = _from_attr(f.attrs.get("featcache_format", 0))
    if fmt != FORMAT_VERSION:
        problems.append(f"featcache_format is {fmt!r}, expected {FORMAT_VERSION}")
    try:
        config = json.loads(_from_attr(f.attrs["config_json"]))
    except (ValueError, TypeError):
        problems.append("config_json is not valid JSON")
        return {}
    digest = config_hash(config)
    stored = str(_from_attr(f.attrs.get("config_hash", "")))
    if stored != digest:
        problems.append("config_hash does not match config_json (the settings were edited)")
    name = parse_cache_name(path)
    if name and name["hash12"] != stored[:12]:
        problems.append(f"the file name carries hash {name['hash12']} but the file's config hash is "
                        f"{stored[:12]} (settings edited or file renamed)")
    for key, value in config.items():
        if key not in f.attrs:
            problems.append(f"attribute {key} is missing (config_json has {value!r})")
        elif _from_attr(f.attrs[key]) != _attr_value(value):
            problems.append(f"attribute {key} = {_from_attr(f.attrs[key])!r} differs from config_json "
                            f"({value!r}): attributes were edited")
    return config


def _verify_shapes(f, config: dict, problems: list[str]) -> tuple[int, int] | None:
    feats = f["features"]
    if feats.ndim != 2:
        problems.append(f"features has shape {feats.shape}, expected [rows, dim]")
        return None
    capacity = feats.shape[0]
    for name in DATASETS[1:]:
        ds = f[name]
        if ds.ndim != 1 or ds.shape[0] != capacity:
            problems.append(f"{name} has shape {ds.shape}, expected ({capacity},) like features")
            return None
    want = DTYPES.get(str(config.get("dtype")))
    if want is not None and feats.dtype != np.dtype(want):
        problems.append(f"features dtype is {feats.dtype}, config says {config.get('dtype')}")
    if "feature_dim" in config and config["feature_dim"] != feats.shape[1]:
        problems.append(f"features have {feats.shape[1]} columns, config says feature_dim "
                        f"{config['feature_dim']}")
    expected = {"keys": f"S{KEY_BYTES}", "views": f"S{VIEW_BYTES}", "paths": f"S{PATH_BYTES}",
                "valid": "u1", "row_digest": f"S{DIGEST_BYTES}"}
    for name, dt in expected.items():
        if f[name].dtype != np.dtype(dt):
            problems.append(f"{name} dtype is {f[name].dtype}, expected {dt}")
    return capacity, feats.shape[1]


def _verify_rows(f, n: int, feature_dim: int, result: dict, progress: ProgressFn | None) -> None:
    """Recompute every digest, check keys and uniqueness, block by block."""
    bad_digest: list[int] = []
    bad_keys: list[int] = []
    nonfinite = 0
    seen: dict[tuple[str, str], int] = {}
    dupes: list[tuple[int, int]] = []
    views: dict[str, int] = {}
    step = _block_rows(feature_dim, f["features"].dtype.itemsize)
    for lo, hi in _blocks(n, step):
        feats = f["features"][lo:hi]
        keys = _decode(f["keys"][lo:hi])
        vws = _decode(f["views"][lo:hi])
        digests = _decode(f["row_digest"][lo:hi])
        nonfinite += int((~np.isfinite(feats)).any(axis=1).sum()) if feats.dtype.kind == "f" else 0
        for j, (key, view, digest) in enumerate(zip(keys, vws, digests, strict=True)):
            row = lo + j
            if not _KEY_RE.match(key):
                bad_keys.append(row)
            if row_digest(key, view, feats[j]) != digest:
                bad_digest.append(row)
            first = seen.setdefault((key, view), row)
            if first != row:
                dupes.append((first, row))
            views[view] = views.get(view, 0) + 1
        emit(progress, "verify", hi, n)
    problems, warnings = result["problems"], result["warnings"]
    result["views"] = views
    result["n_images"] = len({k for k, _ in seen})
    if bad_digest:
        problems.append(f"row_digest mismatch in {len(bad_digest)} of {n} rows (first: row {bad_digest[0]}): "
                        "features, keys or views were changed after writing")
    if bad_keys:
        problems.append(f"{len(bad_keys)} keys are not 64-character hex sha256 (first: row {bad_keys[0]})")
    if dupes:
        problems.append(f"{len(dupes)} duplicate (key, view) rows (first: rows {dupes[0][0]} and "
                        f"{dupes[0][1]})")
    if nonfinite:
        warnings.append(f"{nonfinite} rows hold NaN or infinite features (check the backbone and dtype)")


def merge(shards: Sequence[Path], out: Path | None = None, *, wait: float | None = None,
          progress: ProgressFn | None = None) -> dict:
    """Combine shard files of one config into a normal cache file, one row per (key, view).

    ``out`` may be a directory (the canonical file name is used; a name not ending in .h5 that does not
    exist yet is created as one) or a file path; None means the first shard's folder. Shard rows are
    checked against their digests while copying, so a damaged shard cannot slip into the merged file.
    Writers' lock files (``*.h5.lock``) in ``shards`` are ignored: a glob such as ``cache/*.shard-*``
    catches them. A shard not closed cleanly (its extract killed) is merged as far as its rows are finished
    and listed in ``unfinished_shards``, so the caller can say the merged file may be incomplete.
    """
    shards = [Path(s) for s in shards if not str(s).endswith(".lock")]
    # a shard named twice (cache/*.h5 plus the same file by name) would wait on its own lock
    shards = list({os.path.realpath(s): s for s in reversed(shards)}.values())[::-1]
    if not shards:
        raise ConfigError("merge needs at least one shard file; pass the .shard-I-of-N.h5 files to combine")
    for shard in shards:  # before any lock: a lock file would land beside an X-ray (or create a folder)
        _check_mergeable(shard)
    with contextlib.ExitStack() as held:
        for shard in shards:  # a shard whose extract still runs is incomplete: wait for it, or refuse
            held.enter_context(_shard_lock(shard, wait))
        return _merge(shards, out, wait, progress)


def _check_mergeable(shard: Path) -> None:
    """ConfigError for a merge argument that is no HDF5 file at all (missing, a folder, an image).

    Why: `cache merge some.jpeg` took a lock file beside the image (which every later extract then
    listed as a skipped file) and answered "not a readable HDF5 file ...; delete it", about an X-ray.
    """
    import h5py

    if not shard.exists():
        raise ConfigError(f"{shard} does not exist; merge takes the .shard-I-of-N.h5 files extract --shard "
                          "wrote.")
    if not shard.is_file():
        raise ConfigError(f"{shard} is not a file; merge takes the .shard-I-of-N.h5 files extract --shard "
                          "wrote (a glob such as cache/*.shard-*-of-4.h5).")
    try:
        hdf5 = h5py.is_hdf5(str(shard))
    except OSError:
        hdf5 = True  # unreadable: the reader says why
    if not hdf5 and shard.stat().st_size > 0:
        raise ConfigError(f"{shard} is not a featcache cache file (not HDF5); merge takes the "
                          ".shard-I-of-N.h5 files extract --shard wrote.")


@contextlib.contextmanager
def _shard_lock(shard: Path, wait: float | None) -> Iterator[None]:
    """Hold a shard's writer lock while it is merged (none is taken where its folder is read-only)."""
    from filelock import FileLock, Timeout

    lock = FileLock(str(shard) + ".lock")
    try:
        lock.acquire(timeout=max(0.0, wait or 0.0))
    except Timeout:
        raise CacheLockedError(
            f"shard {shard} is still being written by its extract; merge it once that extract has finished "
            "(or pass --wait SECONDS)") from None
    except OSError:  # a shard folder we may not write to: no extract can be writing there either
        yield
        return
    try:
        yield
    finally:
        lock.release()


def _refuse_other_roots(reader: CacheReader, first: CacheReader) -> None:
    """CacheError for shards that differ only in their dataset folder, with the extract that joins them.

    Why: two machines rarely hold the data at one absolute path, and the path is part of a cache's settings,
    so `cache merge` of their shards said only "merge only shards of one extraction": the user was left to
    extract everything again. An extract of the data here into a folder holding the shards copies their
    rows (``find_twins``: the same settings for another folder), running the backbone for no image they
    hold.
    """
    def rest(config: dict) -> dict:
        return {k: v for k, v in config.items() if k != "dataset_root"}

    if rest(reader.config) != rest(first.config) or reader.feature_dim != first.feature_dim:
        return
    config = first.config
    weights = config.get("weights")
    # a saved model is recorded by a label ("saved-<stem>") and its file's SHA-256, not by its path: the
    # command printed `--backbone saved-<stem>`, which extract refuses as an unknown backbone, and left
    # out that this model's weights come from a file too (cache_config's "file" with model_file_sha256)
    saved = weights == "saved" or bool(config.get("model_file_sha256"))
    model_sha = config.get("model_file_sha256") if config.get("model_file_sha256") else (
        config.get("weights_file_sha256") if weights == "saved" else None)
    parts = ["featcache extract --data DATA",
             "--backbone MODEL" if saved else f"--backbone {shlex.quote(str(config.get('backbone')))}"]
    if weights in ("imagenet", "none"):
        parts.append(f"--weights {weights}")
    elif weights == "file":
        parts.append("--weights PATH")
    names = ([f"MODEL the saved model file (SHA-256 {str(model_sha)[:12]}...)"] if saved else []) + (
        [f"PATH the weights file (SHA-256 {str(config.get('weights_file_sha256'))[:12]}...)"]
        if weights == "file" else [])
    if config.get("layer"):
        parts.append(f"--layer {shlex.quote(str(config['layer']))}")
    parts += [f"--pooling {config.get('pooling')}", f"--image-size {config.get('image_size')}",
              f"--resize {config.get('resize')}", f"--dtype {config.get('dtype')}"]
    folders = {Path(r.path).resolve().parent for r in (reader, first)}
    folder = shlex.quote(os.fsdecode(Path(first.path).parent)) if len(folders) == 1 else "FOLDER"
    where = "" if len(folders) == 1 else "put the shards in one FOLDER and "
    raise CacheError(
        f"shard {reader.path} was extracted from the data at {reader.config.get('dataset_root')} and "
        f"{first.path} from {config.get('dataset_root')}: merge joins the shards of one data folder only; to "
        f"join these, {where}run `{' '.join(parts)} --cache-dir {folder}` with DATA the images here (all of "
        f"them){''.join(', ' + n for n in names)}: it copies the shards' rows into a cache for DATA and "
        "computes only the images no shard holds")


def _merge(shards: list[Path], out: Path | None, wait: float | None, progress: ProgressFn | None) -> dict:
    readers = [CacheReader(s) for s in shards]
    try:
        first = readers[0]
        for reader in readers[1:]:
            if reader.config != first.config:
                _refuse_other_roots(reader, first)
                diff = "; ".join(_config_diff(reader.config, first.config))
                diff = diff.replace("requested", "first shard")
                raise CacheError(f"shard {reader.path} was written with other settings than {first.path} "
                                 f"({diff}); merge only shards of one extraction")
            if reader.feature_dim != first.feature_dim:
                raise CacheError(f"shard {reader.path} has {reader.feature_dim}-d features, {first.path} has "
                                 f"{first.feature_dim}-d; merge only shards of one extraction")
        out = Path(out) if out is not None else first.path.parent
        if not out.exists() and out.suffix.lower() not in (".h5", ".hdf5"):  # a folder to create
            out.mkdir(parents=True, exist_ok=True)
        if out.is_dir():
            out = cache_path(out, first.config)
        if any(out.resolve() == s.resolve() for s in shards):
            raise ConfigError(f"the merged cache would be {out}, one of the files given to merge; pass "
                              "the shard files (.shard-I-of-N.h5), or --out a new file")
        _check_merge_out(out, first)
        total = sum(r.n_rows for r in readers)
        added = done = 0
        n_rows = 0
        # one writer session per shard session, so `cache info` and the runs that read the merged file say
        # which backend, batch size and versions computed which rows (one session for all shards kept only
        # the first shard's)
        for reader in readers:
            starts, sessions = source_sessions(reader)
            index = reader.index()
            for i, source in enumerate(sessions):
                stop = starts[i + 1] if i + 1 < len(starts) else reader.n_rows
                # which (key, view) rows the session holds, from the index: its features are streamed below,
                # never held whole (a vgg16 shard's session can be hundreds of MB)
                rows = {kv for kv, row in index.items() if starts[i] <= row < stop}
                if not rows:
                    continue
                session = {**source, "merged_from": reader.path.name}
                with CacheWriter(out, first.config, first.feature_dim, wait=wait,
                                 versions=source.get("versions") or None, session=session) as writer:
                    need = len(rows - writer.present())
                    if need:  # a session none of whose rows are new leaves no record
                        writer.reserve(need)
                    for block in reader.iter_blocks(start=starts[i], stop=stop):
                        _check_block(reader.path, block)
                        added += writer.append(block["keys"], block["views"], block["paths"],
                                               block["features"])
                        done += len(block["keys"])
                        emit(progress, "merge", done, total)
                    n_rows = writer.n_valid
        found = {parse_cache_name(s)["shard"] for s in shards if parse_cache_name(s)}
        with CacheReader(out) as merged:  # shards merged into it before count too (one merge per shard)
            names = [parse_cache_name(Path(str(s["merged_from"]))) for s in merged.sessions
                     if s.get("merged_from")]
            found |= {name["shard"] for name in names if name}
        found.discard(None)
        missing: list[int] = []
        counts = sorted({n for _, n in found})
        if len(counts) == 1:
            missing = sorted(set(range(counts[0])) - {i for i, _ in found})
        # a shard whose extract was killed (no lock holds it any more) merged "without a word": the merged
        # file is closed cleanly and lists no missing shard, yet lacks every row that extract had not written
        unfinished = [{"shard": str(r.path), "n_rows": r.n_rows} for r in readers if not r.clean]
        return {"out": str(out), "config_hash": first.config_hash, "n_rows": n_rows, "rows_added": added,
                "duplicates": total - added, "shards": [str(s) for s in shards], "n_shards": len(shards),
                "missing_shards": missing, "mixed_shard_counts": counts if len(counts) > 1 else [],
                "unfinished_shards": unfinished}
    finally:
        for reader in readers:
            reader.close()


def _check_merge_out(out: Path, first: CacheReader) -> None:
    """ConfigError for an existing ``out`` that merge must not add rows to, before any row is copied.

    Why: the writer's own refusal is worded for extract: a cache of other settings got "use another
    --cache-dir or delete that file" (merge has no --cache-dir, and deleting it throws a good cache away),
    and a file that is no cache at all (an --out typo naming a CSV) got "delete it ... and run the
    extraction again" (a truncated cache too). Either way the file is left as it is; the way out is another
    --out, and no lock file is left beside it.
    """
    import h5py

    if not out.is_file() or out.stat().st_size == 0:  # a new file, or an empty one the writer builds anew
        return
    try:
        hdf5 = h5py.is_hdf5(str(out))
    except OSError:
        return  # unreadable: the writer says why (and keeps a read-only file's reason)
    if not hdf5:
        raise ConfigError(f"--out {out} is a file but not a featcache cache; merge writes a new cache file "
                          "or adds rows to a cache of the shards' settings: pass another --out (that file "
                          "was left as it is)")
    try:
        with CacheReader(out) as have:
            config, dim = have.config, have.feature_dim
    except CacheError:  # truncated, not featcache's, edited settings: its own advice was extract's
        quoted = shlex.quote(os.fsdecode(out))
        raise ConfigError(f"--out {out} exists but cannot be read as a featcache cache (`featcache cache "
                          f"verify {quoted}` says why), so merge cannot add rows to it: pass another --out "
                          "(that file was left as it is)") from None
    if config != first.config or dim != first.feature_dim:
        diff = "; ".join(_config_diff(config, first.config)).replace("requested", "shards")
        diff = diff or f"{dim}-d features, shards {first.feature_dim}-d"
        raise ConfigError(f"--out {out} is a cache of other settings than the shards ({diff}); merge adds "
                          "rows only to a cache of the same settings: pass another --out (that file was "
                          "left as it is)")


def source_sessions(reader: CacheReader) -> tuple[list[int], list[dict]]:
    """A cache file's sessions as (first rows, settings without place and time), in row order; rows before
    its first recorded session (a file older than sessions, or past MAX_SESSIONS) get its creator's
    versions, as `cache info` shows them. What a copy (extract from a twin, merge) records per part."""
    def setup(s: dict) -> dict:  # the source's own start time kept as "extracted" (the copy gets its own)
        out = {k: v for k, v in s.items() if k not in ("first_row", "started")}
        if "started" in s and "extracted" not in out:
            out["extracted"] = s["started"]
        return out

    recorded = sorted(((s.get("first_row", 0), setup(s))
                       for s in reader.sessions if isinstance(s.get("first_row", 0), int)),  # not edited ones
                      key=lambda t: t[0])
    if not recorded or recorded[0][0] > 0:
        recorded.insert(0, (0, {"versions": reader.versions}))
    return [r for r, _ in recorded], [s for _, s in recorded]


def _check_block(path: Path, block: dict) -> None:
    rows = zip(block["keys"], block["views"], block["digests"], block["features"], strict=True)
    for j, (key, view, digest, feats) in enumerate(rows):
        if row_digest(key, view, feats) != digest:
            raise CacheError(f"shard {path} fails its integrity check at row {block['start'] + j}; run "
                             f"`featcache cache verify {path}` and re-extract that shard")
