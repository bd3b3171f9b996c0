"""Download the Kermany chest X-ray dataset safely and lay it out the way ``datasets.discover`` reads it.

Why this module is careful:

* The archive is large (about 1.2 GB) and links drop: a partial download is kept as
  ``<dest>/.downloads/<name>.part`` and resumed with an HTTP ``Range`` request. A server that ignores
  ``Range`` (answers 200) or answers a range we did not ask for makes us restart cleanly from byte 0
  instead of splicing two different transfers together.
* A connection that closes early looks like a normal end of stream to ``http.client``; we compare the
  bytes received with ``Content-Length`` / ``Content-Range`` so a truncated file is never extracted.
* Checksums are only trusted when they are real: the table of sources carries none we could not
  verify (this code was written offline), so an unknown checksum is computed, reported and recorded
  next to the file (``<name>.sha256``) and later runs verify the cached file against that record
  (trust on first use); ``--sha256`` pins it. A mismatch keeps the bad file aside as ``<name>.bad``.
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
import hashlib
import json
import os
import re
import shutil
import stat
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from http.client import HTTPException
from pathlib import Path
from urllib.parse import urlsplit

from featcache.errors import ConfigError, DownloadError
from featcache.faults import crash_point
from featcache.progress import ProgressFn, emit

BLOCK_SIZE = 1 << 18                 # 256 KiB: smooth progress, few syscalls
DEFAULT_TIMEOUT = 60.0               # seconds of socket silence before we give up (rerun resumes)
DOWNLOADS_DIR = ".downloads"
MARKER_NAME = ".featcache-download.json"
TEMP_PREFIX = ".featcache-extract-"
KERMANY_SPLITS = ("train", "test", "val")
KERMANY_LABELS = ("NORMAL", "PNEUMONIA")
_SPLIT_ALIASES = {"train": "train", "test": "test", "val": "val", "validation": "val"}
_LAYOUT_EXTENSIONS = {".jpeg", ".jpg", ".png"}
_JUNK_NAMES = {"__MACOSX", ".DS_Store", "Thumbs.db", "desktop.ini"}
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_USER_AGENT = "featcache-download/1 (Python urllib)"


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RemoteFile:
    """One file of a source: where it lives and, only when really known, its SHA-256."""

    name: str                    # file name under <dest>/.downloads/
    url: str
    sha256: str | None = None    # None = not published / not verified by us: computed and recorded
    split: str | None = None     # tfrecord shards: which split the file holds
    role: str = "archive"        # "archive" | "images" | "paths"


@dataclass(frozen=True)
class Source:
    """A named way of getting the dataset."""

    name: str
    kind: str                    # "archive" (zip / tar[.gz]) | "tfrecord"
    description: str
    files: tuple[RemoteFile, ...]

    def resolve(self, url: str | None) -> tuple[RemoteFile, ...]:
        """The files to fetch, with ``url`` overriding the default location.

        For an archive source ``url`` is the archive itself; for the TFRecord source it is the base
        folder holding ``train/images.tfrec`` and friends. A checksum from the table belongs to the
        table's URL only, so an overridden URL drops it (use ``--sha256`` to pin one).
        """
        if url is None:
            return self.files
        _check_url(url)
        if self.kind == "archive":
            name = _archive_name_from_url(url, self.files[0].name)
            return (RemoteFile(name=name, url=url, sha256=None, role="archive"),)
        base = url.rstrip("/")
        return tuple(
            RemoteFile(name=f.name, url=f"{base}/{f.split}/{f.role}.tfrec", sha256=None, split=f.split,
                       role=f.role)
            for f in self.files
        )


_MENDELEY_URL = ("https://data.mendeley.com/public-files/datasets/rscbjbr9sj/files/"
                 "f12eaf6d-6023-432f-acc9-80c9d7393433/file_downloaded")
_TFRECORD_BASE = "https://storage.googleapis.com/download.tensorflow.org/data/ChestXRay2017"

SOURCES: dict[str, Source] = {
    "mendeley": Source(
        name="mendeley",
        kind="archive",
        description="Kermany, Zhang, Goldbaum (2018), Mendeley Data v2, doi:10.17632/rscbjbr9sj.2, "
                    "ChestXRay2017.zip (CC BY 4.0): official train/test splits, original JPEGs",
        files=(RemoteFile(name="ChestXRay2017.zip", url=_MENDELEY_URL, sha256=None),),
    ),
    "tfrecord": Source(
        name="tfrecord",
        kind="tfrecord",
        description="TFRecord copy used by the TensorFlow/Keras pneumonia tutorial "
                    "(download.tensorflow.org/data/ChestXRay2017): images.tfrec + paths.tfrec per split",
        files=tuple(
            RemoteFile(name=f"{split}-{role}.tfrec", url=f"{_TFRECORD_BASE}/{split}/{role}.tfrec",
                       sha256=None, split=split, role=role)
            for split in ("train", "test") for role in ("images", "paths")
        ),
    ),
}


def get_source(name: str) -> Source:
    """The named source, or a ConfigError listing the valid names."""
    try:
        return SOURCES[name]
    except KeyError:
        raise ConfigError(f"unknown download source {name!r}; choose one of: {', '.join(SOURCES)}.") from None


def _check_url(url: str) -> None:
    """Only http(s): a ``file://`` or ``ftp://`` URL from a flag must not read arbitrary local files."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"--url must be an http:// or https:// address, got {url!r}.")


def _archive_name_from_url(url: str, default: str) -> str:
    """Keep the URL's file name when it looks like an archive (cosmetic; format is sniffed anyway)."""
    base = os.path.basename(urlsplit(url).path)
    if re.fullmatch(r"[A-Za-z0-9._-]{1,120}", base or "") and base.lower().endswith(
            (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")) and not base.startswith("."):
        return base
    return default


def parse_sha256_pins(values: str | Sequence[str] | Mapping[str, str] | None,
                      files: Sequence[RemoteFile]) -> dict[str, str]:
    """Turn ``--sha256`` values into {file name: hex}.

    A bare hex digest pins a single-file source; ``NAME=HEX`` pins one file of a multi-file source.
    """
    if values is None:
        return {}
    if isinstance(values, Mapping):
        items = [f"{k}={v}" for k, v in values.items()]
    elif isinstance(values, str):
        items = [values]
    else:
        items = list(values)
    names = [f.name for f in files]
    pins: dict[str, str] = {}
    for item in items:
        name, sep, digest = item.rpartition("=")
        if not sep:
            if len(files) != 1:
                raise ConfigError(f"this source has {len(files)} files; pin each with --sha256 NAME=HEX "
                                  f"(names: {', '.join(names)}).")
            name = names[0]
        digest = digest.strip().lower()
        if not _HEX64.match(digest):
            raise ConfigError(f"--sha256 value {digest!r} is not a 64-character hex SHA-256 digest.")
        if name not in names:
            raise ConfigError(f"--sha256 names unknown file {name!r}; files of this source: "
                              f"{', '.join(names)}.")
        pins[name] = digest
    return pins


# --------------------------------------------------------------------------------------------
# Download with resume
# --------------------------------------------------------------------------------------------
@dataclass
class DownloadResult:
    """What happened to one remote file."""

    name: str
    url: str
    path: Path
    size: int
    sha256: str
    expected_sha256: str | None     # None: nobody told us; the computed digest was recorded instead
    verified: bool                  # matched an expected digest (table, --sha256 or earlier record)
    record_path: Path               # <name>.sha256 next to the file
    bytes_transferred: int          # bytes received in this call (less than size when resumed)
    resumed: bool
    reused: bool                    # the complete file was already cached; nothing was transferred


class _SafeRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects only to http(s): a server must not bounce us to ``file://`` or ``ftp://``."""

    max_redirections = 10

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: D102 (stdlib signature)
        if urlsplit(newurl).scheme not in ("http", "https"):
            raise DownloadError(f"the server redirected to a non-HTTP address ({newurl!r}); "
                                f"refusing to follow it.")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _opener() -> urllib.request.OpenerDirector:
    return urllib.request.build_opener(_SafeRedirects())


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _parse_content_range(value: str | None) -> tuple[int | None, int | None]:
    """``bytes START-END/TOTAL`` or ``bytes */TOTAL`` -> (start, total); Nones where absent."""
    m = re.fullmatch(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)\s*", value or "")
    if not m:
        return None, None
    start = int(m.group(1)) if m.group(1) is not None else None
    total = int(m.group(2)) if m.group(2) != "*" else None
    return start, total


def _content_length(headers) -> int | None:
    value = headers.get("Content-Length")
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _discard(part: Path, meta_path: Path) -> None:
    for p in (part, meta_path):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def _resume_message(name: str) -> str:
    return f"rerun the same command to resume the download of {name}"


def download_file(url: str, path: str | Path, *, timeout: float = DEFAULT_TIMEOUT,
                  block_size: int = BLOCK_SIZE, progress: ProgressFn | None = None) -> tuple[int, bool]:
    """Fetch ``url`` into ``path`` through ``path.part``; return (bytes transferred now, resumed?).

    Resumes an existing ``.part`` with ``Range`` (plus ``If-Range`` when the server gave an ETag or
    Last-Modified, so a changed remote file restarts instead of being spliced). At most two requests
    are made: the second only when the server answered a resume with a range we cannot use.
    Raises DownloadError for HTTP errors, timeouts and truncated transfers; the ``.part`` is kept
    so the next call resumes.
    """
    _check_url(url)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    meta_path = path.with_name(path.name + ".part.json")
    meta = _read_json(meta_path)
    if meta.get("url") not in (None, url):
        _discard(part, meta_path)          # a partial file of another URL is not ours to resume
        meta = {}
    have = part.stat().st_size if part.exists() else 0
    if have and meta.get("total") == have:
        _finish(part, path, meta_path)       # complete earlier, killed before the rename
        return 0, True
    for _attempt in range(2):
        outcome = _one_request(url, path, meta, have, timeout, block_size, progress)
        if outcome is None:                  # unusable range answer: start again from byte 0
            _discard(part, meta_path)
            meta, have = {}, 0
            continue
        transferred, resumed = outcome
        break
    else:
        raise DownloadError(f"the server for {path.name} answered resume requests inconsistently; "
                            f"delete {part} and rerun.")
    _finish(part, path, meta_path)
    return transferred, resumed


def _one_request(url: str, path: Path, meta: dict, have: int, timeout: float, block_size: int,
                 progress: ProgressFn | None) -> tuple[int, bool] | None:
    """One GET; returns (bytes written, continued the partial file?), or None when the answer
    cannot continue the partial file."""
    name = path.name
    part = path.with_name(path.name + ".part")
    meta_path = path.with_name(path.name + ".part.json")
    headers = {"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
        validator = meta.get("etag") or meta.get("last_modified")
        if validator:
            headers["If-Range"] = validator
    request = urllib.request.Request(url, headers=headers)
    try:
        response = _opener().open(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        with contextlib.closing(exc):
            if exc.code == 416 and have:
                _, total = _parse_content_range(exc.headers.get("Content-Range"))
                if total == have:            # we already hold every byte
                    _write_json_atomic(meta_path, {**meta, "url": url, "total": have})
                    return 0, True
                return None
            if exc.code in (401, 403, 429):   # e.g. an anti-bot wall: a browser download still works
                raise DownloadError(f"the server refused the download (HTTP {exc.code}) of {url}; fetch it "
                                    f"in a browser, save it as {path} and rerun (it is then checked and "
                                    f"used).") from None
            raise DownloadError(f"the server answered HTTP {exc.code} for {url}; check the URL "
                                f"or try again later.") from None
    except (urllib.error.URLError, HTTPException, OSError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise DownloadError(f"could not reach {url} ({reason}); check the network, then "
                            f"{_resume_message(name)}.") from None
    with response:
        status = getattr(response, "status", 200)
        if status == 206:
            start, total = _parse_content_range(response.headers.get("Content-Range"))
            if not have or start != have:
                return None
            mode = "ab"
        elif status == 200:
            have, total, mode = 0, _content_length(response.headers), "wb"   # Range ignored: restart
        else:
            raise DownloadError(f"the server answered HTTP {status} for {url}; check the URL or try "
                                f"again later.")
        _write_json_atomic(meta_path, {"url": url, "total": total, "etag": response.headers.get("ETag"),
                                       "last_modified": response.headers.get("Last-Modified")})
        return _stream(response, part, mode, have, total, block_size, progress, name), mode == "ab"


def _stream(response, part: Path, mode: str, have: int, total: int | None, block_size: int,
            progress: ProgressFn | None, name: str) -> int:
    """Copy the body into ``part`` block by block; detect a short body against ``total``."""
    done = have
    error: str | None = None
    with open(part, mode) as out:
        emit(progress, "download", done, total, name)
        while True:
            try:
                block = response.read(block_size)
            except (HTTPException, OSError) as exc:   # IncompleteRead, reset, socket timeout
                error = type(exc).__name__
                break
            if not block:
                break
            out.write(block)
            out.flush()                  # a killed process keeps every byte it received
            done += len(block)
            emit(progress, "download", done, total, name)
            if total is not None and done > total:
                break
            crash_point("download.block")
        out.flush()
        os.fsync(out.fileno())
    if total is not None and done > total:
        part.unlink()
        raise DownloadError(f"the server sent more bytes for {name} than it announced ({done} > {total}); "
                            f"the partial file was discarded, rerun to download it again.")
    if (total is not None and done < total) or error is not None:
        shown = f"{done} of {total}" if total is not None else f"{done}"
        why = "the connection timed out" if error in ("TimeoutError", "timeout") else \
            "the connection closed early"
        raise DownloadError(f"the transfer of {name} stopped after {shown} bytes ({why}); "
                            f"{_resume_message(name)}.")
    return done - have


def _finish(part: Path, path: Path, meta_path: Path) -> None:
    """Atomic rename of the complete ``.part``; only a complete file ever carries the final name."""
    crash_point("download.before_rename")
    os.replace(part, path)
    with contextlib.suppress(FileNotFoundError):
        meta_path.unlink()


def sha256_with_progress(path: Path, progress: ProgressFn | None = None, name: str = "") -> str:
    """Hex SHA-256 streamed in 1 MiB blocks, reporting ``hash`` progress (1 GB takes seconds)."""
    digest = hashlib.sha256()
    total = path.stat().st_size
    done = 0
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
            done += len(block)
            emit(progress, "hash", done, total, name or path.name)
    return digest.hexdigest()


def fetch(remote: RemoteFile, downloads: Path, *, pinned: str | None = None, timeout: float = DEFAULT_TIMEOUT,
          block_size: int = BLOCK_SIZE, progress: ProgressFn | None = None) -> DownloadResult:
    """Download (or reuse) one file and check its SHA-256.

    Expected digest, in order: ``pinned`` (``--sha256``), the source table, the digest recorded by
    an earlier run next to the file. A cached file that fails its check is set aside and fetched
    again once; a fresh download that fails is set aside as ``<name>.bad`` and raises.
    """
    path = downloads / remote.name
    record = downloads / f"{remote.name}.sha256"
    expected = pinned or remote.sha256
    if path.exists():
        known = expected or _read_record(record)
        actual = sha256_with_progress(path, progress, remote.name)
        if known is None or actual == known:
            return _result(remote, path, record, actual, expected or known, 0, False, True)
        os.replace(path, path.with_name(path.name + ".bad"))   # corrupt cache: keep aside, fetch again
    transferred, resumed = download_file(remote.url, path, timeout=timeout, block_size=block_size,
                                         progress=progress)
    actual = sha256_with_progress(path, progress, remote.name)
    if expected is not None and actual != expected:
        bad = path.with_name(path.name + ".bad")
        os.replace(path, bad)
        raise DownloadError(f"{remote.name} has SHA-256 {actual} but {expected} was expected; it was kept "
                            f"aside as {bad} and not extracted (check --sha256 or the URL, then rerun).")
    return _result(remote, path, record, actual, expected, transferred, resumed, False)


def _read_record(record: Path) -> str | None:
    try:
        digest = record.read_text(encoding="utf-8").split()[0].lower()
    except (OSError, IndexError):
        return None
    return digest if _HEX64.match(digest) else None


def _result(remote: RemoteFile, path: Path, record: Path, actual: str, expected: str | None,
            transferred: int, resumed: bool, reused: bool) -> DownloadResult:
    """Record the digest (sha256sum format) and build the result."""
    tmp = record.with_name(record.name + ".tmp")
    tmp.write_text(f"{actual}  {remote.name}\n", encoding="utf-8")
    os.replace(tmp, record)
    return DownloadResult(name=remote.name, url=remote.url, path=path, size=path.stat().st_size,
                          sha256=actual, expected_sha256=expected,
                          verified=expected is not None and actual == expected, record_path=record,
                          bytes_transferred=transferred, resumed=resumed, reused=reused)


# --------------------------------------------------------------------------------------------
# Safe extraction
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExtractLimits:
    """Caps checked from archive headers before any byte is written (zip-bomb guard).

    The real ChestXRay2017.zip has about 12k entries (half of them ``__MACOSX`` junk) and 1.2 GB of
    JPEGs that barely compress (ratio ~1), so these defaults leave a wide margin for honest archives.
    """

    max_entries: int = 100_000
    max_total_bytes: int = 16 * 2**30
    max_ratio: float = 100.0              # uncompressed / compressed, per entry and for the archive
    ratio_min_bytes: int = 1 << 20        # ratios of tiny entries mean nothing (a 10-byte text file)


def _entry_parts(name: str) -> tuple[str, ...]:
    """Split an archive entry name into safe components, or raise DownloadError (zip-slip guard)."""
    if "\x00" in name:
        raise DownloadError(f"archive entry {name!r} contains a NUL byte; refusing to extract the archive.")
    norm = name.replace("\\", "/")
    if norm.startswith("/"):
        raise DownloadError(f"archive entry {name!r} has an absolute path; refusing to extract the archive.")
    if re.match(r"^[A-Za-z]:", norm):
        raise DownloadError(f"archive entry {name!r} has a drive letter; refusing to extract the archive.")
    parts = tuple(p for p in norm.split("/") if p not in ("", "."))
    if ".." in parts:
        raise DownloadError(f"archive entry {name!r} climbs out with '..'; refusing to extract the archive.")
    return parts


def _is_junk(parts: tuple[str, ...]) -> bool:
    """macOS resource forks and desktop litter that ship inside the Kermany zip."""
    return any(p in _JUNK_NAMES or p.startswith("._") for p in parts)


def _inside(root: Path, target: Path) -> Path:
    """Second line of defence: the resolved target must stay under the resolved root."""
    root_r = os.path.realpath(root)
    target_r = os.path.realpath(target)
    if os.path.commonpath([root_r, target_r]) != root_r:
        raise DownloadError(f"archive entry would be written outside the extraction folder ({target}); "
                            f"refusing.")
    return target


@dataclass
class _Plan:
    """Validated entries: (parts, is_dir, size, handle) where handle is the ZipInfo / TarInfo."""

    entries: list[tuple[tuple[str, ...], bool, int, object]] = field(default_factory=list)
    total: int = 0


def _check_totals(plan: _Plan, archive_size: int, limits: ExtractLimits, name: str) -> None:
    if plan.total > limits.max_total_bytes:
        raise DownloadError(f"{name} would expand to more than {limits.max_total_bytes} bytes; refusing to "
                            f"extract a possible zip bomb.")
    if plan.total > limits.ratio_min_bytes and plan.total > limits.max_ratio * max(archive_size, 1):
        raise DownloadError(f"{name} expands {plan.total / max(archive_size, 1):.0f}x its size; refusing to "
                            f"extract a possible zip bomb.")


def _plan_zip(zf: zipfile.ZipFile, limits: ExtractLimits, name: str) -> _Plan:
    infos = zf.infolist()
    if len(infos) > limits.max_entries:
        raise DownloadError(f"{name} has {len(infos)} entries, more than the limit of {limits.max_entries}; "
                            f"refusing to extract it.")
    plan = _Plan()
    for info in infos:
        parts = _entry_parts(info.filename)
        fmt = stat.S_IFMT(info.external_attr >> 16)
        if fmt == stat.S_IFLNK:
            raise DownloadError(f"archive entry {info.filename!r} is a symbolic link; refusing to extract "
                                f"the archive.")
        if fmt not in (0, stat.S_IFREG, stat.S_IFDIR):
            raise DownloadError(f"archive entry {info.filename!r} is a device or special file; refusing to "
                                f"extract the archive.")
        if info.flag_bits & 0x1:
            raise DownloadError(f"archive entry {info.filename!r} is encrypted; featcache cannot extract it.")
        if info.is_dir():
            plan.entries.append((parts, True, 0, info))
            continue
        if info.file_size > limits.ratio_min_bytes and \
                info.file_size > limits.max_ratio * max(info.compress_size, 1):
            raise DownloadError(f"archive entry {info.filename!r} expands "
                                f"{info.file_size / max(info.compress_size, 1):.0f}x; refusing to extract "
                                f"a possible zip bomb.")
        plan.total += info.file_size
        if plan.total > limits.max_total_bytes:
            _check_totals(plan, 0, limits, name)
        plan.entries.append((parts, False, info.file_size, info))
    return plan


def _plan_tar(tf: tarfile.TarFile, limits: ExtractLimits, name: str) -> _Plan:
    plan = _Plan()
    while (member := tf.next()) is not None:    # bounded by the entry cap below
        if len(plan.entries) >= limits.max_entries:
            raise DownloadError(f"{name} has more than {limits.max_entries} entries; refusing to extract it.")
        parts = _entry_parts(member.name)
        if member.issym() or member.islnk():
            kind = "symbolic link" if member.issym() else "hard link"
            raise DownloadError(f"archive entry {member.name!r} is a {kind}; refusing to extract the "
                                f"archive.")
        if member.ischr() or member.isblk() or member.isfifo():
            raise DownloadError(f"archive entry {member.name!r} is a device or special file; refusing to "
                                f"extract the archive.")
        if member.issparse() or not (member.isreg() or member.isdir()):
            raise DownloadError(f"archive entry {member.name!r} has an unsupported type; refusing to extract "
                                f"the archive.")
        if member.isdir():
            plan.entries.append((parts, True, 0, member))
            continue
        plan.total += member.size
        if plan.total > limits.max_total_bytes:   # checked before tarfile skips (decompresses) the data
            _check_totals(plan, 0, limits, name)
        plan.entries.append((parts, False, member.size, member))
    return plan


def _check_layout(plan: _Plan, name: str) -> None:
    """Duplicate names or a file that is also a folder would silently overwrite: refuse instead."""
    files: set[tuple[str, ...]] = set()
    dirs: set[tuple[str, ...]] = set()
    for parts, is_dir, _, _ in plan.entries:
        if not parts:
            continue
        for i in range(1, len(parts)):
            dirs.add(parts[:i])
        if is_dir:
            dirs.add(parts)
        elif parts in files:
            raise DownloadError(f"{name} holds {'/'.join(parts)!r} twice; refusing to extract an ambiguous "
                                f"archive.")
        else:
            files.add(parts)
    clash = files & dirs
    if clash:
        raise DownloadError(f"{name} uses {'/'.join(sorted(clash)[0])!r} both as a file and as a folder; "
                            f"refusing to extract it.")


def _copy_capped(src, dst, size: int, name: str) -> None:
    """Copy at most ``size`` bytes: a header that lies about the size cannot grow the output."""
    written = 0
    while block := src.read(1 << 20):
        written += len(block)
        if written > size:
            raise DownloadError(f"archive entry {name!r} is larger than its header says; refusing to extract "
                                f"a possible zip bomb.")
        try:
            dst.write(block)
        except OSError as exc:
            raise DownloadError(f"cannot write {name!r} under the destination ({exc.strerror}); free some "
                                f"space or fix permissions, then rerun.") from None


def safe_extract(archive: str | Path, out_dir: str | Path, limits: ExtractLimits | None = None,
                 progress: ProgressFn | None = None) -> int:
    """Extract a zip or tar(.gz/.bz2/.xz) archive into the empty folder ``out_dir``; return files written.

    The format is sniffed from the bytes, not the name. Every entry is validated first (names,
    types, sizes); only then are regular files written, by our own code, with fresh permissions.
    ``__MACOSX`` and ``._*`` junk is validated but not written.
    """
    archive, out_dir = Path(archive), Path(out_dir)
    limits = limits or ExtractLimits()
    out_dir.mkdir(parents=True, exist_ok=True)
    size = archive.stat().st_size
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                plan = _plan_zip(zf, limits, archive.name)
                return _write_plan(plan, size, out_dir, limits, archive.name, progress,
                                   lambda info: zf.open(info))
        if tarfile.is_tarfile(archive):
            with tarfile.open(archive, "r:*") as tf:
                plan = _plan_tar(tf, limits, archive.name)
                return _write_plan(plan, size, out_dir, limits, archive.name, progress,
                                   lambda member: tf.extractfile(member))
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError, ValueError, zlib.error) as exc:
        raise DownloadError(f"{archive.name} is damaged ({type(exc).__name__}: {exc}); delete it and rerun "
                            f"to download it again.") from None
    raise DownloadError(f"{archive.name} is neither a zip nor a tar archive; check --source or --url.")


def _write_plan(plan: _Plan, archive_size: int, out_dir: Path, limits: ExtractLimits, name: str,
                progress: ProgressFn | None, opener) -> int:
    _check_totals(plan, archive_size, limits, name)
    _check_layout(plan, name)
    free = shutil.disk_usage(out_dir).free
    if plan.total > free:
        raise DownloadError(f"{name} needs {plan.total} bytes but only {free} are free next to the "
                            f"destination; free some space and rerun.")
    todo = [e for e in plan.entries if e[0] and not _is_junk(e[0]) and not e[1]]
    for i, (parts, _is_dir, size, handle) in enumerate(todo, 1):
        target = _inside(out_dir, out_dir.joinpath(*parts))
        target.parent.mkdir(parents=True, exist_ok=True)
        _inside(out_dir, target.parent)
        src = opener(handle)
        if src is None:
            raise DownloadError(f"archive entry {'/'.join(parts)!r} cannot be read; refusing to extract "
                                f"the archive.")
        with src, open(target, "xb") as dst:
            _copy_capped(src, dst, size, "/".join(parts))
        crash_point("download.extract_entry")
        emit(progress, "extract", i, len(todo), name)
    return len(todo)


# --------------------------------------------------------------------------------------------
# Kermany layout
# --------------------------------------------------------------------------------------------
def _child_dirs(folder: Path) -> dict[str, Path]:
    """Sub-folders by lower-case name (case-insensitive matching of train/NORMAL/...)."""
    out: dict[str, Path] = {}
    with contextlib.suppress(OSError):
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            if entry.is_dir(follow_symlinks=False) and not _is_junk((entry.name,)):
                out.setdefault(entry.name.lower(), Path(entry.path))
    return out


def _looks_like_root(folder: Path) -> bool:
    """A folder with split sub-folders that hold NORMAL or PNEUMONIA class folders."""
    children = _child_dirs(folder)
    for alias in _SPLIT_ALIASES:
        if alias in children:
            labels = _child_dirs(children[alias])
            if any(lbl.lower() in labels for lbl in KERMANY_LABELS):
                return True
    return False


def find_kermany_root(extracted: Path, max_depth: int = 6) -> Path:
    """The shallowest folder in the extracted tree that has the Kermany split/class structure.

    Tolerates a top-level folder (``chest_xray/``), nesting (the Kaggle copy repeats
    ``chest_xray/chest_xray/``: the shallowest wins) and ``__MACOSX``.
    """
    level = [extracted]
    for _depth in range(max_depth + 1):
        hits = [d for d in level if _looks_like_root(d)]
        if hits:
            hits.sort(key=lambda d: (d.name.lower() != "chest_xray", str(d)))
            return hits[0]
        level = [c for d in level for c in _child_dirs(d).values()]
        if not level:
            break
    raise DownloadError("the archive holds no chest_xray/{train,test}/{NORMAL,PNEUMONIA}/ folders; "
                        "check --source or --url.")


def layout_kermany(extracted: Path, stage: Path) -> dict[str, dict[str, int]]:
    """Move the images of the found root into ``stage/<split>/<LABEL>/``; return counts."""
    root = find_kermany_root(extracted)
    counts: dict[str, dict[str, int]] = {}
    for alias, split_dir in _child_dirs(root).items():
        split = _SPLIT_ALIASES.get(alias)
        if split is None:
            continue
        labels = _child_dirs(split_dir)
        for label in KERMANY_LABELS:
            src_dir = labels.get(label.lower())
            if src_dir is None:
                continue
            target_dir = stage / split / label
            n = 0
            for entry in sorted(os.scandir(src_dir), key=lambda e: e.name):
                if not entry.is_file(follow_symlinks=False) or entry.name.startswith(".") or \
                        Path(entry.name).suffix.lower() not in _LAYOUT_EXTENSIONS:
                    continue
                target_dir.mkdir(parents=True, exist_ok=True)
                target = target_dir / entry.name
                if target.exists():      # "val" and "validation" both present: keep the first copy
                    continue
                os.replace(entry.path, target)
                n += 1
            if n:
                counts.setdefault(split, {})[label] = counts.get(split, {}).get(label, 0) + n
    if not counts:
        raise DownloadError("the archive's split folders hold no .jpeg/.jpg/.png images; check --source "
                            "or --url.")
    return counts


# --------------------------------------------------------------------------------------------
# TFRecord source
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TFRecordFeatures:
    """How to read TFRecord shards that hold ``tf.train.Example`` records.

    The TensorFlow tutorial's files are NOT Examples: ``images.tfrec`` holds raw JPEG bytes per
    record and ``paths.tfrec`` the matching original paths (``.../train/NORMAL/IM-0115-0001.jpeg``);
    that format is detected from the bytes and needs none of these names. For Example shards from
    elsewhere the feature names are guesses of the common convention, hence configurable.
    """

    image: str = "image"          # bytes: the encoded JPEG/PNG
    label: str = "label"          # int64 index into ``label_names`` or bytes "NORMAL"/"PNEUMONIA"
    filename: str = "filename"    # bytes (optional): original file name or path
    label_names: tuple[str, ...] = KERMANY_LABELS


_IMAGE_MAGIC = {b"\xff\xd8\xff": ".jpeg", b"\x89PNG\r\n\x1a\n": ".png"}


def _image_ext(data: bytes) -> str | None:
    return next((ext for magic, ext in _IMAGE_MAGIC.items() if data.startswith(magic)), None)


def _safe_filename(raw: str, fallback: str, ext: str) -> str:
    """Only the last path component of an untrusted name survives; junk falls back to an index."""
    base = raw.replace("\\", "/").rsplit("/", 1)[-1].strip()
    base = "".join(ch for ch in base if ch.isprintable() and ch not in '<>:"|?*')
    if not base or base in (".", "..") or base.startswith(".") or len(base) > 200:
        base = fallback
    if Path(base).suffix.lower() not in _LAYOUT_EXTENSIONS:
        base += ext
    return base


def _label_from_path(raw: str) -> str | None:
    parts = raw.replace("\\", "/").split("/")
    return parts[-2].upper() if len(parts) >= 2 and parts[-2].upper() in KERMANY_LABELS else None


def _iter_records(path: Path) -> Iterator[bytes]:
    import tensorflow as tf  # lazy: only this source needs TensorFlow

    try:
        for record in tf.data.TFRecordDataset(str(path)):
            yield bytes(record.numpy())
    except tf.errors.OpError as exc:
        raise DownloadError(f"{path.name} is not a readable TFRecord file ({exc.message.splitlines()[0]}); "
                            f"delete it and rerun.") from None


def _example_fields(raw: bytes, features: TFRecordFeatures, name: str) -> tuple[bytes, str | None, str]:
    """(image bytes, label or None, file name or '') from a serialized tf.train.Example."""
    import tensorflow as tf

    try:
        feats = tf.train.Example.FromString(raw).features.feature
    except Exception:  # noqa: BLE001 (protobuf raises its own DecodeError type)
        raise DownloadError(f"{name} holds records that are neither images nor tf.train.Example; "
                            f"check --source or --url.") from None
    if features.image not in feats or not feats[features.image].bytes_list.value:
        raise DownloadError(f"{name}: records have no bytes feature {features.image!r} (found: "
                            f"{', '.join(sorted(feats)) or 'none'}); pass --tfrecord-image-key.")
    image = feats[features.image].bytes_list.value[0]
    fname = ""
    if features.filename in feats and feats[features.filename].bytes_list.value:
        fname = feats[features.filename].bytes_list.value[0].decode("utf-8", "replace")
    label: str | None = None
    if features.label in feats:
        f = feats[features.label]
        if f.int64_list.value and 0 <= f.int64_list.value[0] < len(features.label_names):
            label = features.label_names[f.int64_list.value[0]]
        elif f.bytes_list.value:
            label = f.bytes_list.value[0].decode("utf-8", "replace").upper()
    label = label if label in KERMANY_LABELS else _label_from_path(fname)
    return image, label, fname


def tfrecords_to_kermany(shards: Sequence[tuple[str, Path, Path | None]], stage: Path,
                         features: TFRecordFeatures | None = None, limits: ExtractLimits | None = None,
                         progress: ProgressFn | None = None) -> dict[str, dict[str, int]]:
    """Write the images of TFRecord shards as ``stage/<split>/<LABEL>/<name>.jpeg``; return counts.

    ``shards``: (split, images file, paths file or None). Raw-bytes records are paired with the
    paths file record by record (label = the path's parent folder, as in the tutorial); other
    records are parsed as ``tf.train.Example`` with ``features``. Names from the data are reduced
    to their last component, so a crafted path cannot write outside ``stage``.
    """
    features = features or TFRecordFeatures()
    limits = limits or ExtractLimits()
    counts: dict[str, dict[str, int]] = {}
    n_total = total_bytes = 0
    for split, images_file, paths_file in shards:
        paths_iter = _iter_records(paths_file) if paths_file is not None else None
        paired = False
        for index, raw in enumerate(_iter_records(images_file)):
            n_total += 1
            total_bytes += len(raw)
            if n_total > limits.max_entries or total_bytes > limits.max_total_bytes:
                raise DownloadError(f"{images_file.name} holds more records or bytes than the extraction "
                                    f"limits allow; refusing to convert it.")
            ext = _image_ext(raw)
            if ext is not None:
                path_rec = next(paths_iter, None) if paths_iter is not None else None
                if path_rec is None:
                    raise DownloadError(f"{images_file.name} has more images than its paths file; the pair "
                                        f"does not match, delete both and rerun.")
                fname = path_rec.decode("utf-8", "replace")
                image, label, paired = raw, _label_from_path(fname), True
            else:
                image, label, fname = _example_fields(raw, features, images_file.name)
                ext = _image_ext(image)
                if ext is None:
                    raise DownloadError(f"{images_file.name}: record {index} does not hold a JPEG or PNG "
                                        f"image; check --tfrecord-image-key.")
            if label is None:
                raise DownloadError(f"{images_file.name}: record {index} has no NORMAL/PNEUMONIA label "
                                    f"(path {fname!r}); check --tfrecord-label-key.")
            _write_record(stage / split / label, _safe_filename(fname, f"{split}-{index:05d}", ext), image)
            counts.setdefault(split, {})[label] = counts.get(split, {}).get(label, 0) + 1
            emit(progress, "convert", n_total, None, images_file.name)
        if paired and next(paths_iter, None) is not None:
            raise DownloadError(f"{paths_file.name} has more paths than {images_file.name} has images; "
                                f"the pair does not match, delete both and rerun.")
    if not counts:
        raise DownloadError("the TFRecord files hold no images; check --source or --url.")
    return counts


def _write_record(folder: Path, name: str, data: bytes) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / name
    stem, suffix, k = target.stem, target.suffix, 1
    while target.exists():           # two records with one name: keep both
        target = folder / f"{stem}__{k}{suffix}"
        k += 1
    _inside(folder, target).write_bytes(data)


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------
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
        (dest / DOWNLOADS_DIR).mkdir(exist_ok=True)
    except OSError as exc:
        raise DownloadError(f"cannot create {dest} ({exc.strerror}); choose a writable --dest.") from None
    return dest.resolve()


def _clean_stale(dest: Path) -> None:
    """Temporary folders left by a killed run (we hold the lock, so none is in use)."""
    for entry in dest.iterdir():
        if entry.name.startswith(TEMP_PREFIX) and entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)


def _install(stage: Path, dest: Path, trash: Path, marker: dict) -> None:
    """Rename the staged splits into ``dest``; an old layout goes to ``trash`` first (--force).

    The marker says ``installing`` while splits are being swapped, so a run killed half-way is
    recognised as ours and finished by the next run without --force; ``complete`` comes last.
    """
    _write_json_atomic(dest / MARKER_NAME, {**marker, "state": "installing"})
    for split in KERMANY_SPLITS:
        old = dest / split
        if old.exists() or old.is_symlink():
            trash.mkdir(exist_ok=True)
            os.replace(old, trash / split)
    for split in sorted(p.name for p in stage.iterdir()):
        os.replace(stage / split, dest / split)
        crash_point("download.install_split")
    _write_json_atomic(dest / MARKER_NAME, {**marker, "state": "complete"})


def download_kermany(dest: str | Path, *, source: str = "mendeley", url: str | None = None,
                     sha256: str | Sequence[str] | Mapping[str, str] | None = None, force: bool = False,
                     timeout: float = DEFAULT_TIMEOUT, limits: ExtractLimits | None = None,
                     tfrecord_features: TFRecordFeatures | None = None, block_size: int = BLOCK_SIZE,
                     progress: ProgressFn | None = None) -> KermanyResult:
    """Download the Kermany chest X-rays into ``dest/{train,test[,val]}/{NORMAL,PNEUMONIA}/``.

    Downloads are cached in ``dest/.downloads`` (resumable, checksummed) and kept after
    extraction, so a rerun or ``force`` re-layout does not fetch 1.2 GB again. Without ``force``
    an existing layout is left alone: if our marker says it came from the same source the call
    is a no-op (``already_present``), otherwise it raises.
    """
    src = get_source(source)
    files = src.resolve(url)
    pins = parse_sha256_pins(sha256, files)
    dest = _prepare_dest(dest)
    downloads = dest / DOWNLOADS_DIR
    with _dest_lock(downloads):
        existing = [s for s in KERMANY_SPLITS if (dest / s).exists() or (dest / s).is_symlink()]
        marker = _read_json(dest / MARKER_NAME)
        interrupted = marker.get("state") == "installing"     # our own install, killed half-way
        if existing and not force and not interrupted:
            if marker.get("state") == "complete" and marker.get("source") == source and \
                    marker.get("urls") == [f.url for f in files] and \
                    all((dest / s).is_dir() for s in marker.get("counts", {})) and \
                    all(marker.get("sha256", {}).get(n) == h for n, h in pins.items()):
                return KermanyResult(dest=dest, source=source, files=[], counts=marker.get("counts", {}),
                                     already_present=True)
            held = ", ".join(s + "/" for s in existing)
            raise DownloadError(f"{dest} already holds {held}; pass --force to replace them or choose "
                                f"another --dest.")
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
            _install(stage, dest, tmp / "old", {
                "source": source, "urls": [f.url for f in files], "counts": counts,
                "sha256": {r.name: r.sha256 for r in results},
                "verified": {r.name: r.verified for r in results},
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            })
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return KermanyResult(dest=dest, source=source, files=results, counts=counts)
