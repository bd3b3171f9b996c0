"""Resumable, verified HTTP download of one file.

Why careful: the archive is about 1.2 GB and links drop. A partial download is kept as ``<name>.part``
and resumed with an HTTP ``Range`` request; a server that ignores ``Range`` or answers another range makes
us restart from byte 0 instead of splicing two transfers. A connection that closes early looks like a
normal end of stream to ``http.client``, so the bytes received are compared with ``Content-Length`` /
``Content-Range``. A checksum is verified against the user's pin or the one recorded on first use, and a
mismatching file is kept aside as ``<name>.bad``.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import urllib.error
import urllib.request
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path
from urllib.parse import urlsplit

from featcache.download.sources import HEX64, RemoteFile, check_url
from featcache.errors import DownloadError, NetworkError
from featcache.faults import crash_point
from featcache.progress import ProgressFn, emit

BLOCK_SIZE = 1 << 18                 # 256 KiB: smooth progress, few syscalls
DEFAULT_TIMEOUT = 60.0               # seconds of socket silence before we give up (rerun resumes)
_USER_AGENT = "featcache-download/1 (Python urllib)"


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
    """Follow redirects only to http(s), and never from https down to plain http.

    A server must not bounce us to ``file://`` or ``ftp://``; and a downgrade would hand the rest of the
    transfer to anyone on the path, whose bytes a first download (no record yet) would then trust.
    """

    max_redirections = 10

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: D102 (stdlib signature)
        scheme = urlsplit(newurl).scheme
        if scheme not in ("http", "https"):
            raise DownloadError(f"the server redirected to a non-HTTP address ({newurl!r}); "
                                f"refusing to follow it.")
        if scheme == "http" and urlsplit(req.full_url).scheme == "https":
            raise DownloadError(f"the server redirected {req.full_url} to unencrypted {newurl}; refusing to "
                                f"follow an https-to-http downgrade (pass an https --url that does not).")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _opener() -> urllib.request.OpenerDirector:
    return urllib.request.build_opener(_SafeRedirects())


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_json_atomic(path: Path, data: dict) -> None:
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
    Last-Modified, so a changed remote file restarts instead of being spliced; a 206 whose total size,
    ETag or Last-Modified differs from the ``.part``'s restarts too, for servers that ignore
    ``If-Range``). At most two requests
    are made: the second only when the server answered a resume with a range we cannot use.
    Raises DownloadError for HTTP errors, timeouts and truncated transfers; the ``.part`` is kept
    so the next call resumes.
    """
    check_url(url)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    meta_path = path.with_name(path.name + ".part.json")
    meta = read_json(meta_path)
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
        raise NetworkError(f"the server for {path.name} answered resume requests inconsistently; "
                            f"delete {part} and rerun.")
    _finish(part, path, meta_path)
    return transferred, resumed


def _same_file(meta: dict, total: int | None, headers) -> bool:
    """Whether a 206 continues the file the ``.part`` came from: same total size, ETag, Last-Modified.

    Why: a server (or a cache in between) may ignore ``If-Range`` and answer the range of a remote file
    that changed since; appending it would splice two files. Only what both answers carry is compared.
    """
    pairs = ((meta.get("total"), total), (meta.get("etag"), headers.get("ETag")),
             (meta.get("last_modified"), headers.get("Last-Modified")))
    return all(old == new for old, new in pairs if old is not None and new is not None)


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
                    write_json_atomic(meta_path, {**meta, "url": url, "total": have})
                    return 0, True
                return None
            if exc.code == 429:               # rate limit: the server's state, not a usage error (exit 1)
                raise NetworkError(f"the server is limiting requests (HTTP 429) for {url}; wait and rerun, "
                                   f"or fetch it in a browser, save it as {path} and rerun (it is then "
                                   f"checked and used).") from None
            if exc.code >= 500:               # the server failed: like a dropped connection, exit 1
                raise NetworkError(f"the server failed (HTTP {exc.code}) for {url}; try again later, then "
                                   f"{_resume_message(name)}.") from None
            if exc.code in (401, 403):        # e.g. an anti-bot wall: a browser download still works
                raise DownloadError(f"the server refused the download (HTTP {exc.code}) of {url}; fetch it "
                                    f"in a browser, save it as {path} and rerun (it is then checked and "
                                    f"used).") from None
            raise DownloadError(f"the server answered HTTP {exc.code} for {url}; check the URL "
                                f"or try again later.") from None
    except (urllib.error.URLError, HTTPException, OSError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise NetworkError(f"could not reach {url} ({reason}); check the network, then "
                            f"{_resume_message(name)}.") from None
    with response:
        status = getattr(response, "status", 200)
        if status == 206:
            start, total = _parse_content_range(response.headers.get("Content-Range"))
            if not have or start != have or not _same_file(meta, total, response.headers):
                return None
            mode = "ab"
        elif status == 200:
            have, total, mode = 0, _content_length(response.headers), "wb"   # Range ignored: restart
        else:
            raise DownloadError(f"the server answered HTTP {status} for {url}; check the URL or try "
                                f"again later.")
        if total is not None:  # a 1.2 GB archive on a full disk failed at the end of its transfer
            free = shutil.disk_usage(part.parent).free
            if total - have > free:
                raise NetworkError(f"{name} needs {total - have:,} more bytes but only {free:,} are free in "
                                   f"{part.parent}; free some space and rerun.")
        write_json_atomic(meta_path, {"url": url, "total": total, "etag": response.headers.get("ETag"),
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
        raise NetworkError(f"the server sent more bytes for {name} than it announced ({done} > {total}); "
                            f"the partial file was discarded, rerun to download it again.")
    if (total is not None and done < total) or error is not None:
        shown = f"{done} of {total}" if total is not None else f"{done}"
        why = "the connection timed out" if error in ("TimeoutError", "timeout") else \
            "the connection closed early"
        raise NetworkError(f"the transfer of {name} stopped after {shown} bytes ({why}); "
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
    an earlier run next to the file. The record binds a fresh download as much as a cached file:
    otherwise deleting the cache (or a cache set aside as ``.bad``) would let a changed remote file
    through and overwrite the trusted digest; only a new ``--sha256`` overrides it. A cached file that
    fails its check is set aside and fetched again once; a fresh download that fails is set aside as
    ``<name>.bad`` and raises. The digest is not recorded here: the caller calls :func:`write_record`
    once the file proved usable (extracted), so a truncated file or an HTML error page never becomes
    the trusted digest. A cached file that matches its record but not ``pinned`` stays where it is and
    raises: the pin is then the likelier mistake. The URL a file came from is kept beside it
    (``<name>.url``) and a cached file from another URL is downloaded again: reusing it by name alone
    kept a failed download (an HTML page, a truncated file) in place whatever ``--url`` said. A file
    without that record (saved there by hand from a browser) is used as it is.
    """
    path = downloads / remote.name
    record = downloads / f"{remote.name}.sha256"
    origin = downloads / f"{remote.name}.url"
    recorded = _read_record(record)
    expected = pinned or remote.sha256 or recorded
    # A file fetched from another --url is downloaded again (the final rename replaces it).
    if path.exists() and _read_origin(origin) in (None, remote.url):
        actual = sha256_with_progress(path, progress, remote.name)
        if expected is None or actual == expected:
            return _result(remote, path, record, actual, expected, 0, False, True)
        if pinned and actual == recorded:
            # The cache is the file an earlier run extracted and recorded: the pin is the likelier typo.
            # Setting a good 1.2 GB download aside and fetching it again would only fail the same way.
            raise DownloadError(f"--sha256 {pinned} does not match {path}, whose SHA-256 {actual} is the one "
                                f"an earlier download recorded in {record}; nothing was moved or downloaded. "
                                f"Check the --sha256 value; if the remote file really changed, delete {path} "
                                f"and rerun with the new --sha256.")
        os.replace(path, path.with_name(path.name + ".bad"))   # corrupt cache: keep aside, fetch again
        with contextlib.suppress(FileNotFoundError):
            origin.unlink()
    # a cached file from another URL stays until the new download proves itself: a mistyped --url (a login
    # page) would otherwise replace a verified 1.2 GB archive
    side = path.with_name(path.name + ".new") if path.exists() else None
    target = side or path
    transferred, resumed = download_file(remote.url, target, timeout=timeout, block_size=block_size,
                                         progress=progress)
    actual = sha256_with_progress(target, progress, remote.name)
    if expected is not None and actual != expected:
        bad = path.with_name(path.name + ".bad")
        os.replace(target, bad)
        if side is None:
            with contextlib.suppress(FileNotFoundError):
                origin.unlink()          # no cached file now: a stale URL must not refuse a hand-placed one
        kept = (f" The file cached from {_read_origin(origin) or 'the earlier download'} stays in {path}."
                if side is not None else "")
        if not _opens_as_archive(bad):
            raise DownloadError(f"{remote.name} downloaded from {remote.url} is not a zip or tar archive (an "
                                f"HTML page or an error message?) and does not match the expected SHA-256 "
                                f"{expected}; it was kept aside as {bad} and not extracted: check the URL."
                                + kept)
        if pinned or remote.sha256:
            raise DownloadError(f"{remote.name} has SHA-256 {actual} but {expected} was expected; it was "
                                f"kept aside as {bad} and not extracted (check --sha256 or the URL, then "
                                f"rerun)." + kept)
        raise DownloadError(f"{remote.name} downloaded from {remote.url} has SHA-256 {actual}, but an "
                            f"earlier download recorded {expected} in {record}: the remote file changed or "
                            f"this transfer is damaged. It was kept aside as {bad} and not extracted; if the "
                            f"change is expected, rerun with --sha256 {actual} to trust the new file." + kept)
    if side is not None:
        os.replace(side, path)
    tmp = origin.with_name(origin.name + ".tmp")
    tmp.write_text(remote.url + "\n", encoding="utf-8")
    os.replace(tmp, origin)
    return _result(remote, path, record, actual, expected, transferred, resumed, False)


def _opens_as_archive(path: Path) -> bool:
    """Whether ``path`` starts as a zip or a tar archive: only then is "trust the new digest" advice."""
    import tarfile
    import zipfile

    try:
        return zipfile.is_zipfile(path) or tarfile.is_tarfile(path)
    except (OSError, EOFError):
        return False


def _read_origin(origin: Path) -> str | None:
    """The URL a cached file was downloaded from; None for a file placed by hand (or before this record)."""
    try:
        return origin.read_text(encoding="utf-8").strip() or None
    except OSError:
        return None


def write_record(result: DownloadResult) -> None:
    """Record the digest of a file that proved usable (sha256sum format), for later runs to check against."""
    tmp = result.record_path.with_name(result.record_path.name + ".tmp")
    tmp.write_text(f"{result.sha256}  {result.name}\n", encoding="utf-8")
    os.replace(tmp, result.record_path)


def _read_record(record: Path) -> str | None:
    try:
        digest = record.read_text(encoding="utf-8").split()[0].lower()
    except (OSError, IndexError):
        return None
    return digest if HEX64.match(digest) else None


def _result(remote: RemoteFile, path: Path, record: Path, actual: str, expected: str | None,
            transferred: int, resumed: bool, reused: bool) -> DownloadResult:
    """Build the result; ``record`` is where :func:`write_record` will put the digest."""
    return DownloadResult(name=remote.name, url=remote.url, path=path, size=path.stat().st_size,
                          sha256=actual, expected_sha256=expected,
                          verified=expected is not None and actual == expected, record_path=record,
                          bytes_transferred=transferred, resumed=resumed, reused=reused)
