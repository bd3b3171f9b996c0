"""`featcache data download kermany`: resumable, checksummed download and safe extraction.

Everything runs offline against a ThreadingHTTPServer on 127.0.0.1 (port 0) serving archives built
in tmp_path. Each server answers a bounded number of requests; every client call has a timeout.
"""
from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import re
import stat
import subprocess
import sys
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import write_xray

from featcache.datasets import discover
from featcache.download import (
    MARKER_NAME,
    ExtractLimits,
    TFRecordFeatures,
    download_file,
    download_kermany,
    safe_extract,
    tfrecords_to_kermany,
)
from featcache.errors import ConfigError, DownloadError, NetworkError

ZIP_PATH = "/ChestXRay2017.zip"
MAX_REQUESTS = 50     # a runaway client loop fails the test instead of hanging it


# ---------------------------------------------------------------------------------------------
# Local HTTP server
# ---------------------------------------------------------------------------------------------
class _State:
    """What the server serves and how it misbehaves; the handler records every request."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.files: dict[str, bytes] = {}
        self.etag = '"v1"'
        self.support_range = True
        self.honour_if_range = True              # False: a server that answers Range whatever If-Range says
        self.truncate: dict[str, int] = {}       # path -> bytes to send before closing (once)
        self.refuse = False                      # answer 403 (an anti-bot wall)
        self.fail_status: int | None = None      # answer this HTTP error status to every request
        self.requests: list[dict] = []
        self.lock = threading.Lock()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def sent(self, path: str) -> list[int]:
        return [r["sent"] for r in self.requests if r["path"] == path]


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (stdlib name)
        state: _State = self.server.state  # type: ignore[attr-defined]
        with state.lock:
            if len(state.requests) >= MAX_REQUESTS:
                self.send_error(429)
                return
            data = state.files.get(self.path)
            rng = self.headers.get("Range")
            if_range = self.headers.get("If-Range")
            entry = {"path": self.path, "range": rng, "if_range": if_range, "sent": 0, "status": 404}
            state.requests.append(entry)
            if state.fail_status is not None:
                entry["status"] = state.fail_status
                self.send_error(state.fail_status)
                return
            if data is None or state.refuse:
                self.send_error(403 if state.refuse else 404)
                return
            start, status = 0, 200
            usable = rng and state.support_range and (if_range is None or if_range == state.etag
                                                      or not state.honour_if_range)
            if usable:
                start = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1))
                if start >= len(data):
                    entry["status"] = 416
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                status = 206
            body = data[start:]
            cut = state.truncate.pop(self.path, None)
            payload = body if cut is None else body[:cut]
            entry.update(status=status, sent=len(payload))
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("ETag", state.etag)
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        self.wfile.write(payload)      # HTTP/1.0: the connection closes after this (early if cut)

    def log_message(self, *args) -> None:  # keep test output clean
        pass


@pytest.fixture
def server(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    httpd.state = _State(httpd.server_address[1])
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield httpd.state
    httpd.shutdown()
    httpd.server_close()
    thread.join(5)


# ---------------------------------------------------------------------------------------------
# Archives
# ---------------------------------------------------------------------------------------------
LAYOUT = {
    "train/NORMAL/IM-0115-0001.jpeg": 1,
    "train/NORMAL/NORMAL2-IM-1427-0001.jpeg": 2,
    "train/PNEUMONIA/person1_bacteria_1.jpeg": 3,
    "train/PNEUMONIA/person2_virus_2.jpeg": 4,
    "test/NORMAL/IM-0001-0001.jpeg": 5,
    "test/PNEUMONIA/person3_bacteria_3.jpeg": 6,
}
COUNTS = {"train": {"NORMAL": 2, "PNEUMONIA": 2}, "test": {"NORMAL": 1, "PNEUMONIA": 1}}


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, bytes]:
    """Small synthetic X-ray JPEGs keyed by their Kermany relative path."""
    root = tmp_path_factory.mktemp("imgs")
    return {rel: write_xray(root / f"{seed}.jpeg", seed, size=40).read_bytes()
            for rel, seed in LAYOUT.items()}


def make_zip(entries: list[tuple[str | zipfile.ZipInfo, bytes]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries:
            zf.writestr(name, data)
    return buf.getvalue()


def first_download(server, tmp_path: Path, images: dict[str, bytes]) -> tuple[bytes, Path]:
    """The archive served at ZIP_PATH and downloaded once into tmp_path/k: the start of the tests of what
    a later run does with its cache and record."""
    archive = make_zip(kermany_entries(images))
    server.files[ZIP_PATH] = archive
    dest = tmp_path / "k"
    download_kermany(dest, url=server.url(ZIP_PATH), timeout=10)
    return archive, dest


def kermany_entries(images: dict[str, bytes]) -> list[tuple[str, bytes]]:
    """The Mendeley zip's shape: chest_xray/<split>/<LABEL>/..., plus __MACOSX and .DS_Store junk."""
    entries = [(f"chest_xray/{rel}", data) for rel, data in images.items()]
    entries.append(("__MACOSX/chest_xray/train/NORMAL/._IM-0115-0001.jpeg", b"\x00\x05\x16\x07junk"))
    entries.append(("chest_xray/.DS_Store", b"junk"))
    entries.append(("chest_xray/train/NORMAL/._IM-0115-0001.jpeg", b"junk"))
    return entries


def make_tar(entries: list[tarfile.TarInfo | tuple[str, bytes]], mode: str = "w:gz") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tf:
        for item in entries:
            if isinstance(item, tarfile.TarInfo):
                tf.addfile(item)
            else:
                info = tarfile.TarInfo(item[0])
                info.size = len(item[1])
                tf.addfile(info, io.BytesIO(item[1]))
    return buf.getvalue()


def snapshot(root: Path, skip: Path) -> set[str]:
    """Every path under root except the tree under ``skip`` (the destination)."""
    out = set()
    for dirpath, dirnames, filenames in os.walk(root):
        if Path(dirpath) == skip or skip in Path(dirpath).parents:
            continue
        out.update(os.path.join(dirpath, n) for n in dirnames + filenames if Path(dirpath, n) != skip)
    return out


def assert_layout(dest: Path, images: dict[str, bytes]) -> None:
    found = {p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()
             and not p.relative_to(dest).parts[0].startswith(".")}
    assert found == set(images)
    for rel, data in images.items():
        assert (dest / rel).read_bytes() == data
    assert not [p for p in dest.iterdir() if p.name.startswith(".featcache-extract-")]


# ---------------------------------------------------------------------------------------------
# Happy path, checksums, reuse
# ---------------------------------------------------------------------------------------------
def test_a_valid_folder_in_an_archive_is_the_val_split(server, tmp_path, images):
    """Discovery reads train/valid/test, but the download's own alias table lacked valid/: an archive laid
    out so lost its valid/ images."""
    valid = {"valid/NORMAL/IM-0002-0001.jpeg": images["test/NORMAL/IM-0001-0001.jpeg"]}
    server.files[ZIP_PATH] = make_zip(kermany_entries({**images, **valid}))
    res = download_kermany(tmp_path / "k", url=server.url(ZIP_PATH), timeout=10)
    assert res.counts["val"]["NORMAL"] == 1
    assert (tmp_path / "k" / "val" / "NORMAL" / "IM-0002-0001.jpeg").is_file()


def test_zip_download_lays_out_kermany_and_records_checksum(server, tmp_path, images):
    archive = make_zip(kermany_entries(images))
    server.files[ZIP_PATH] = archive
    events = []
    dest = tmp_path / "kermany"
    res = download_kermany(dest, url=server.url(ZIP_PATH), timeout=10, progress=events.append)

    assert res.counts == COUNTS and res.n_images == 6
    assert_layout(dest, images)
    assert not (dest / "__MACOSX").exists()
    digest = hashlib.sha256(archive).hexdigest()
    f = res.files[0]
    assert (f.sha256, f.expected_sha256, f.verified, f.size) == (digest, None, False, len(archive))
    assert f.record_path.read_text().split() == [digest, "ChestXRay2017.zip"]
    marker = json.loads((dest / MARKER_NAME).read_text())
    assert marker["state"] == "complete" and marker["counts"] == COUNTS
    downloads = [e for e in events if e.phase == "download"]
    assert downloads[-1].done == downloads[-1].total == len(archive)
    assert {e.phase for e in events} >= {"download", "hash", "extract"}
    from featcache.datasets import discover  # the layout is what stage 1 reads

    ds = discover(dest)
    assert ds.layout == "kermany"
    assert sorted((r.split, r.label, r.path.name) for r in ds.records) == sorted(
        (rel.split("/")[0], rel.split("/")[1], rel.split("/")[2]) for rel in images)


def test_pinned_checksum_verifies_and_cached_file_is_reused(server, tmp_path, images):
    archive = make_zip(kermany_entries(images))
    server.files[ZIP_PATH] = archive
    digest = hashlib.sha256(archive).hexdigest()
    dest = tmp_path / "k"
    res = download_kermany(dest, url=server.url(ZIP_PATH), sha256=digest.upper(), timeout=10)
    assert res.files[0].verified and res.files[0].expected_sha256 == digest
    n_requests = len(server.requests)

    again = download_kermany(dest, url=server.url(ZIP_PATH), timeout=10)      # same source: no-op
    assert again.already_present and again.counts == COUNTS
    forced = download_kermany(dest, url=server.url(ZIP_PATH), force=True, timeout=10)
    assert forced.files[0].reused and forced.files[0].verified              # checked against the record
    assert len(server.requests) == n_requests                               # nothing fetched again
    assert_layout(dest, images)


def test_checksum_mismatch_keeps_file_aside_and_extracts_nothing(server, tmp_path, images):
    archive = make_zip(kermany_entries(images))
    server.files[ZIP_PATH] = archive
    dest = tmp_path / "k"
    with pytest.raises(DownloadError, match="SHA-256") as err:
        download_kermany(dest, url=server.url(ZIP_PATH), sha256="ab" * 32, timeout=10)
    assert "kept aside" in str(err.value) and "\n" not in str(err.value)
    assert (dest / ".downloads" / "ChestXRay2017.zip.bad").read_bytes() == archive
    assert not (dest / ".downloads" / "ChestXRay2017.zip").exists()
    assert not any((dest / s).exists() for s in ("train", "test", "val"))


def test_tampered_cached_download_is_fetched_again(server, tmp_path, images):
    archive, dest = first_download(server, tmp_path, images)
    cached = dest / ".downloads" / "ChestXRay2017.zip"
    cached.write_bytes(archive[:-10] + b"0123456789")            # bit rot after the first run
    res = download_kermany(dest, url=server.url(ZIP_PATH), force=True, timeout=10)
    assert not res.files[0].reused and res.files[0].sha256 == hashlib.sha256(archive).hexdigest()
    assert (dest / ".downloads" / "ChestXRay2017.zip.bad").exists()
    assert_layout(dest, images)


def test_existing_foreign_layout_is_never_replaced_even_with_force(server, tmp_path, images):
    """--force replaces only splits a featcache download installed; the user's own train/ stays."""
    server.files[ZIP_PATH] = make_zip(kermany_entries(images))
    dest = tmp_path / "k"
    mine = write_xray(dest / "train" / "NORMAL" / "mine.jpeg", 99, size=16)
    for force in (False, True):
        with pytest.raises(DownloadError, match="which no featcache download installed") as err:
            download_kermany(dest, url=server.url(ZIP_PATH), force=force, timeout=10)
        assert "train/" in str(err.value) and "\n" not in str(err.value)
    assert server.requests == []                                   # refused before any transfer
    assert mine.exists() and sorted(p.name for p in dest.iterdir()) == ["train"]   # no .downloads left


def test_force_replaces_our_splits_but_not_a_split_the_user_added(server, tmp_path, images):
    server.files[ZIP_PATH] = make_zip(kermany_entries(images))
    dest = tmp_path / "k"
    download_kermany(dest, url=server.url(ZIP_PATH), timeout=10)
    theirs = write_xray(dest / "val" / "NORMAL" / "theirs.jpeg", 98, size=16)
    with pytest.raises(DownloadError, match="val/"):
        download_kermany(dest, url=server.url(ZIP_PATH), force=True, timeout=10)
    assert theirs.exists()
    theirs.parent.parent.rename(tmp_path / "val-moved")
    res = download_kermany(dest, url=server.url(ZIP_PATH), force=True, timeout=10)
    assert res.files[0].reused and res.counts == COUNTS
    assert_layout(dest, images)
    assert json.loads((dest / MARKER_NAME).read_text())["owned"] == ["test", "train"]


def test_nested_top_folder_is_tolerated(server, tmp_path, images):
    """The Kaggle copy nests chest_xray/chest_xray/ and ships val/: the shallowest root wins."""
    entries = [(f"archive/chest_xray/{rel}", data) for rel, data in images.items()]
    extra = images["test/NORMAL/IM-0001-0001.jpeg"]
    entries.append(("archive/chest_xray/val/NORMAL/IM-0999-0001.jpeg", extra))
    entries += [(f"archive/chest_xray/chest_xray/{rel}", b"dup") for rel in images]
    server.files["/kaggle.zip"] = make_zip(entries)
    res = download_kermany(tmp_path / "k", url=server.url("/kaggle.zip"), timeout=10)
    assert res.counts == {**COUNTS, "val": {"NORMAL": 1}}
    assert (tmp_path / "k" / "train/NORMAL/IM-0115-0001.jpeg").read_bytes() == images[
        "train/NORMAL/IM-0115-0001.jpeg"]


# ---------------------------------------------------------------------------------------------
# Resume and truncation
# ---------------------------------------------------------------------------------------------
def test_truncated_transfer_errors_then_rerun_resumes_with_range(server, tmp_path, images):
    archive = make_zip(kermany_entries(images))
    server.files[ZIP_PATH] = archive
    server.truncate[ZIP_PATH] = 3000
    dest = tmp_path / "k"
    with pytest.raises(DownloadError, match="rerun the same command to resume") as err:
        download_kermany(dest, url=server.url(ZIP_PATH), timeout=10)
    assert f"3000 of {len(archive)} bytes" in str(err.value)
    part = dest / ".downloads" / "ChestXRay2017.zip.part"
    assert part.stat().st_size == 3000
    assert not (dest / "train").exists()

    res = download_kermany(dest, url=server.url(ZIP_PATH), timeout=10)
    last = server.requests[-1]
    assert last["range"] == "bytes=3000-" and last["status"] == 206
    assert last["sent"] == len(archive) - 3000 < len(archive)
    assert res.files[0].resumed and res.files[0].bytes_transferred == len(archive) - 3000
    assert res.files[0].sha256 == hashlib.sha256(archive).hexdigest()
    assert not part.exists()
    assert_layout(dest, images)


def test_server_ignoring_range_restarts_cleanly(server, tmp_path):
    data = os.urandom(20_000)
    server.files["/blob.zip"] = data
    server.support_range = False
    target = tmp_path / "dl" / "blob.zip"
    target.parent.mkdir()
    (target.parent / "blob.zip.part").write_bytes(b"X" * 5000)      # stale bytes that must not survive
    transferred, resumed = download_file(server.url("/blob.zip"), target, timeout=10)
    assert server.requests[-1]["range"] == "bytes=5000-" and server.requests[-1]["status"] == 200
    assert transferred == len(data) and not resumed
    assert target.read_bytes() == data


def test_changed_remote_file_is_not_spliced(server, tmp_path):
    """If-Range with the old ETag: the server sends the new file whole instead of a range."""
    old, new = os.urandom(20_000), os.urandom(21_000)
    server.files["/f.zip"] = old
    server.truncate["/f.zip"] = 7000
    target = tmp_path / "f.zip"
    with pytest.raises(DownloadError, match="resume"):
        download_file(server.url("/f.zip"), target, timeout=10)
    server.files["/f.zip"], server.etag = new, '"v2"'
    download_file(server.url("/f.zip"), target, timeout=10)
    assert server.requests[-1]["if_range"] == '"v1"' and server.requests[-1]["status"] == 200
    assert target.read_bytes() == new


def test_http_error_and_unreachable_server_are_one_sentence(server, tmp_path):
    with pytest.raises(DownloadError, match="HTTP 404") as err:
        download_file(server.url("/missing.zip"), tmp_path / "x.zip", timeout=10)
    assert "\n" not in str(err.value)
    assert err.value.exit_code == 2  # a wrong URL: the user's to fix
    with pytest.raises(DownloadError, match="could not reach") as err:
        download_file("http://127.0.0.1:9/x.zip", tmp_path / "y.zip", timeout=5)   # discard port: refused
    assert err.value.exit_code == 1  # the network's failure, not a usage error
    with pytest.raises(ConfigError, match="http"):
        download_file("file:///etc/passwd", tmp_path / "z.zip")


def test_refused_download_can_be_placed_by_hand(server, tmp_path, images):
    archive = make_zip(kermany_entries(images))
    server.files[ZIP_PATH], server.refuse = archive, True
    dest = tmp_path / "k"
    with pytest.raises(DownloadError, match="HTTP 403") as err:
        download_kermany(dest, url=server.url(ZIP_PATH), timeout=10)
    target = dest / ".downloads" / "ChestXRay2017.zip"
    assert str(target) in str(err.value)
    target.write_bytes(archive)                    # what the user does with a browser download
    n_requests = len(server.requests)
    res = download_kermany(dest, url=server.url(ZIP_PATH), sha256=hashlib.sha256(archive).hexdigest())
    assert res.files[0].reused and res.files[0].verified and len(server.requests) == n_requests
    assert_layout(dest, images)


def _run_killed(code: str, crash_at: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "FEATCACHE_CRASH_AT": crash_at, "no_proxy": "127.0.0.1"}
    for var in ("http_proxy", "HTTP_PROXY"):
        env.pop(var, None)
    return subprocess.run([sys.executable, "-c", code, *args], env=env, timeout=120, capture_output=True)


def test_kill_mid_download_and_before_rename_then_resume(server, tmp_path):
    data = os.urandom(10_000)
    server.files["/f.zip"] = data
    target = tmp_path / "f.zip"
    code = ("import sys; from featcache.download import download_file; "
            "download_file(sys.argv[1], sys.argv[2], block_size=1024, timeout=10)")
    proc = _run_killed(code, "download.block:3", server.url("/f.zip"), str(target))
    assert proc.returncode == -9, proc.stderr.decode()
    part = tmp_path / "f.zip.part"
    assert part.stat().st_size == 3 * 1024 and not target.exists()

    proc = _run_killed(code, "download.before_rename", server.url("/f.zip"), str(target))
    assert proc.returncode == -9, proc.stderr.decode()
    assert server.requests[-1]["range"] == "bytes=3072-"
    assert part.stat().st_size == len(data) and not target.exists()   # complete but never renamed

    n_requests = len(server.requests)
    transferred, resumed = download_file(server.url("/f.zip"), target, timeout=10)
    assert (transferred, resumed) == (0, True) and len(server.requests) == n_requests
    assert target.read_bytes() == data


@pytest.mark.parametrize("crash_at", ["download.extract_entry:2", "download.install_split:1"])
def test_kill_during_extract_or_install_then_rerun_completes(server, tmp_path, images, crash_at):
    server.files[ZIP_PATH] = make_zip(kermany_entries(images))
    dest = tmp_path / "k"
    code = ("import sys; from featcache.download import download_kermany; "
            "download_kermany(sys.argv[1], url=sys.argv[2], timeout=10)")
    proc = _run_killed(code, crash_at, str(dest), server.url(ZIP_PATH))
    assert proc.returncode == -9, proc.stderr.decode()
    n_requests = len(server.requests)
    res = download_kermany(dest, url=server.url(ZIP_PATH), timeout=10)     # no --force needed
    assert res.files[0].reused and len(server.requests) == n_requests
    assert res.counts == COUNTS
    assert_layout(dest, images)


# ---------------------------------------------------------------------------------------------
# Malicious archives
# ---------------------------------------------------------------------------------------------
def _zip_symlink() -> zipfile.ZipInfo:
    info = zipfile.ZipInfo("chest_xray/train/NORMAL/link.jpeg")
    info.create_system = 3
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


def _tar_member(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info


def _malicious(kind: str, outside: Path, good: list[tuple[str, bytes]]) -> tuple[str, bytes]:
    """(file name, archive bytes): honest images first, then one hostile entry."""
    evil = b"pwned"
    if kind == "zip-dotdot":
        return "a.zip", make_zip([*good, ("chest_xray/../../evil.txt", evil)])
    if kind == "zip-dotdot-backslash":
        return "a.zip", make_zip([*good, ("..\\..\\evil.txt", evil)])
    if kind == "zip-absolute":
        return "a.zip", make_zip([*good, (str(outside / "evil.txt"), evil)])
    if kind == "zip-drive-letter":
        return "a.zip", make_zip([*good, ("C:/evil.txt", evil)])
    if kind == "zip-symlink":
        return "a.zip", make_zip([*good, (_zip_symlink(), b"../../../../evil.txt")])
    if kind == "zip-bomb":
        return "a.zip", make_zip([*good, ("chest_xray/train/NORMAL/bomb.jpeg", bytes(20 << 20))])
    if kind == "tar-dotdot":
        return "a.tar.gz", make_tar([*good, ("../evil.txt", evil)])
    if kind == "tar-absolute":
        return "a.tar.gz", make_tar([*good, (str(outside / "evil.txt"), evil)])
    if kind == "tar-symlink":
        return "a.tar.gz", make_tar([*good, _tar_member("chest_xray/train/NORMAL/l.jpeg", tarfile.SYMTYPE,
                                                       str(outside / "evil.txt"))])
    if kind == "tar-hardlink":
        return "a.tar.gz", make_tar([*good, _tar_member("chest_xray/train/NORMAL/h.jpeg", tarfile.LNKTYPE,
                                                       "../../../../evil.txt")])
    if kind == "tar-device":
        return "a.tar.gz", make_tar([*good, _tar_member("chest_xray/train/NORMAL/dev", tarfile.CHRTYPE)])
    if kind == "targz-bomb":
        return "a.tar.gz", make_tar([*good, ("chest_xray/train/NORMAL/bomb.jpeg", bytes(20 << 20))])
    raise AssertionError(kind)


MALICIOUS = ["zip-dotdot", "zip-dotdot-backslash", "zip-absolute", "zip-drive-letter", "zip-symlink",
             "zip-bomb", "tar-dotdot", "tar-absolute", "tar-symlink", "tar-hardlink", "tar-device",
             "targz-bomb"]
REASONS = {"dotdot": "'..'", "absolute": "absolute", "drive": "drive letter", "symlink": "symbolic link",
           "hardlink": "hard link", "device": "device", "bomb": "zip bomb"}


@pytest.mark.parametrize("kind", MALICIOUS)
def test_malicious_archive_is_rejected_and_nothing_escapes(server, tmp_path, images, kind):
    good = [(f"chest_xray/{rel}", data) for rel, data in images.items()]
    outside = tmp_path / "outside"
    outside.mkdir()
    name, archive = _malicious(kind, outside, good)
    server.files[f"/{name}"] = archive
    dest = tmp_path / "dest"
    before = snapshot(tmp_path, dest)
    with pytest.raises(DownloadError) as err:
        download_kermany(dest, url=server.url(f"/{name}"), timeout=10)
    message = str(err.value)
    reason = next(v for k, v in REASONS.items() if kind.endswith(k) or f"-{k}" in kind)
    assert reason in message and "\n" not in message
    assert snapshot(tmp_path, dest) == before                     # nothing written outside dest
    assert not list(tmp_path.rglob("evil.txt"))
    assert sorted(p.name for p in dest.iterdir()) == [".downloads"]   # no layout, no temp folder left


def test_entry_count_and_total_size_caps(tmp_path, images):
    archive = tmp_path / "a.zip"
    archive.write_bytes(make_zip([(f"chest_xray/{rel}", data) for rel, data in images.items()]))
    with pytest.raises(DownloadError, match="entries"):
        safe_extract(archive, tmp_path / "o1", ExtractLimits(max_entries=3))
    with pytest.raises(DownloadError, match="zip bomb"):
        safe_extract(archive, tmp_path / "o2", ExtractLimits(max_total_bytes=1000))
    assert not any((tmp_path / "o1").iterdir()) and not any((tmp_path / "o2").iterdir())
    assert safe_extract(archive, tmp_path / "o3") == len(images)


def test_not_an_archive_is_a_clear_error(server, tmp_path):
    server.files[ZIP_PATH] = b"<html>Please log in</html>"
    with pytest.raises(DownloadError, match="neither a zip nor a tar"):
        download_kermany(tmp_path / "k", url=server.url(ZIP_PATH), timeout=10)


# ---------------------------------------------------------------------------------------------
# TFRecord source
# ---------------------------------------------------------------------------------------------
def _write_tfrecord(path: Path, records: list[bytes]) -> bytes:
    import tensorflow as tf

    with tf.io.TFRecordWriter(str(path)) as writer:
        for r in records:
            writer.write(r)
    return path.read_bytes()


def test_tfrecord_source_pairs_images_with_paths(server, tmp_path, images):
    pytest.importorskip("tensorflow")
    prefix = "/data/ChestXRay2017"
    for split in ("train", "test"):
        rels = [r for r in images if r.startswith(split + "/")]
        paths = [f"gs://bucket/chest_xray/{r}".encode() for r in rels]
        if split == "train":       # a hostile path keeps only its last component
            rels.append("train/PNEUMONIA/evil.jpeg")
            paths.append(b"../../../../outside/PNEUMONIA/evil.jpeg")
        blobs = [images.get(r, images["train/PNEUMONIA/person1_bacteria_1.jpeg"]) for r in rels]
        server.files[f"{prefix}/{split}/images.tfrec"] = _write_tfrecord(tmp_path / "i.tfrec", blobs)
        server.files[f"{prefix}/{split}/paths.tfrec"] = _write_tfrecord(tmp_path / "p.tfrec", paths)
    dest = tmp_path / "k"
    res = download_kermany(dest, source="tfrecord", url=server.url(prefix), timeout=10)
    assert res.counts == {"train": {"NORMAL": 2, "PNEUMONIA": 3}, "test": {"NORMAL": 1, "PNEUMONIA": 1}}
    assert len(res.files) == 4 and all(f.record_path.exists() for f in res.files)
    assert (dest / "train/PNEUMONIA/evil.jpeg").exists() and not (tmp_path / "outside").exists()
    for rel, data in images.items():
        assert (dest / rel).read_bytes() == data


def test_tfrecord_examples_with_configurable_feature_names(tmp_path, images):
    tf = pytest.importorskip("tensorflow")

    def example(img: bytes, label: int, name: str) -> bytes:
        feat = {"img": tf.train.Feature(bytes_list=tf.train.BytesList(value=[img])),
                "y": tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
                "fname": tf.train.Feature(bytes_list=tf.train.BytesList(value=[name.encode()]))}
        return tf.train.Example(features=tf.train.Features(feature=feat)).SerializeToString()

    rels = [r for r in images if r.startswith("train/")]
    shard = tmp_path / "train.tfrec"
    _write_tfrecord(shard, [example(images[r], int("PNEUMONIA" in r), r.rsplit("/", 1)[1]) for r in rels])
    with pytest.raises(DownloadError, match="--tfrecord-image-key"):
        tfrecords_to_kermany([("train", shard, None)], tmp_path / "s0")
    counts = tfrecords_to_kermany([("train", shard, None)], tmp_path / "s1",
                                  TFRecordFeatures(image="img", label="y", filename="fname"))
    assert counts == {"train": COUNTS["train"]}
    for r in rels:
        assert (tmp_path / "s1" / r).read_bytes() == images[r]


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def cli():
    """The in-process CLI entry point (cli/data_cmd.py attaches `download` to `featcache data`)."""
    from featcache.cli.app import run

    return run


def test_cli_happy_path_prints_counts_and_checksum(server, tmp_path, images, cli, capsys):
    archive = make_zip(kermany_entries(images))
    server.files[ZIP_PATH] = archive
    code = cli(["data", "download", "kermany", "--dest", str(tmp_path / "k"), "--url", server.url(ZIP_PATH),
                "--timeout", "10"])
    out = capsys.readouterr().out
    assert code == 0
    assert hashlib.sha256(archive).hexdigest() in out and "6 images" in out
    assert_layout(tmp_path / "k", images)


@pytest.mark.parametrize("args, needle", [
    (["--source", "kaggle"], "unknown download source"),
    (["--sha256", "xyz"], "64-character"),
    (["--url", "file:///etc/passwd"], "http"),
    (["--sha256", "ab" * 32], "SHA-256"),
    (["--url", "EVIL"], "http"),
    # a TFRecord feature name for the Mendeley archive was ignored, and the download went ahead
    (["--tfrecord-image-key", "x"], "--tfrecord-image-key names a feature of the TFRecord files"),
])
def test_cli_errors_are_one_sentence(server, tmp_path, images, cli, capsys, args, needle):
    server.files[ZIP_PATH] = make_zip(kermany_entries(images))
    argv = ["data", "download", "kermany", "--dest", str(tmp_path / "k"), "--timeout", "10"]
    if "--url" not in args:
        argv += ["--url", server.url(ZIP_PATH)]
    code = cli(argv + args)
    err = capsys.readouterr().err
    assert code != 0
    assert needle in err and "Traceback" not in err
    assert not (tmp_path / "k" / "train").exists()


def test_cli_rejects_malicious_archive(server, tmp_path, images, cli, capsys):
    server.files["/a.zip"] = make_zip([("chest_xray/train/NORMAL/[bold]x.jpeg", b"x"), ("../evil.txt", b"x")])
    code = cli(["data", "download", "kermany", "--dest", str(tmp_path / "k"), "--url", server.url("/a.zip")])
    err = capsys.readouterr().err
    assert code == 2 and "'..'" in err and "Traceback" not in err
    assert not (tmp_path / "evil.txt").exists()


# ---------------------------------------------------------------------------------------------
# Audit fixes
# ---------------------------------------------------------------------------------------------
def test_recorded_digest_binds_a_fresh_download_until_a_new_pin(server, tmp_path, images):
    """Deleting the cache must not let a changed remote file through and overwrite the record."""
    archive, dest = first_download(server, tmp_path, images)
    record = dest / ".downloads" / "ChestXRay2017.zip.sha256"
    first = record.read_text()
    changed = make_zip(kermany_entries(images)[:-1])          # the remote file changed
    server.files[ZIP_PATH] = changed
    (dest / ".downloads" / "ChestXRay2017.zip").unlink()      # cache gone
    with pytest.raises(DownloadError, match="earlier download recorded") as err:
        download_kermany(dest, url=server.url(ZIP_PATH), force=True, timeout=10)
    new_digest = hashlib.sha256(changed).hexdigest()
    assert f"--sha256 {new_digest}" in str(err.value) and "\n" not in str(err.value)
    assert record.read_text() == first                        # the trusted digest is untouched
    assert (dest / ".downloads" / "ChestXRay2017.zip.bad").read_bytes() == changed
    assert_layout(dest, images)                               # the old layout is untouched
    res = download_kermany(dest, url=server.url(ZIP_PATH), force=True, sha256=new_digest, timeout=10)
    assert res.files[0].verified and record.read_text().split()[0] == new_digest


def test_digest_is_recorded_only_after_a_successful_extraction(server, tmp_path, images):
    server.files[ZIP_PATH] = b"<html>Please log in</html>"
    dest = tmp_path / "k"
    with pytest.raises(DownloadError, match="neither a zip nor a tar"):
        download_kermany(dest, url=server.url(ZIP_PATH), timeout=10)
    assert not (dest / ".downloads" / "ChestXRay2017.zip.sha256").exists()


@pytest.mark.parametrize("change", ["etag", "size"])
def test_resume_from_a_changed_remote_file_restarts_when_if_range_is_ignored(server, tmp_path, change):
    """A 206 whose ETag or Content-Range total differs from the .part's is another file: restart from 0."""
    old = os.urandom(20_000)
    new = os.urandom(20_000) if change == "etag" else os.urandom(21_000)
    server.files["/f.zip"], server.honour_if_range = old, False
    server.truncate["/f.zip"] = 7000
    target = tmp_path / "f.zip"
    with pytest.raises(DownloadError, match="resume"):
        download_file(server.url("/f.zip"), target, timeout=10)
    server.files["/f.zip"] = new
    if change == "etag":
        server.etag = '"v2"'
    transferred, resumed = download_file(server.url("/f.zip"), target, timeout=10)
    assert server.requests[-2]["status"] == 206 and server.requests[-1]["range"] is None
    assert target.read_bytes() == new and (transferred, resumed) == (len(new), False)


def test_fresh_download_has_nothing_for_discovery_to_skip(server, tmp_path, images):
    """`extract --strict` fails on any skipped file: the downloader's own files must not count."""
    server.files[ZIP_PATH] = make_zip(kermany_entries(images))
    dest = tmp_path / "k"
    download_kermany(dest, url=server.url(ZIP_PATH), timeout=10)
    from featcache.datasets import discover

    ds = discover(dest)
    assert ds.skipped == [] and len(ds.records) == len(images)


@pytest.mark.parametrize("status", [500, 502, 503, 429])
def test_server_failure_and_rate_limit_exit_1_not_2(server, tmp_path, images, cli, capsys, status):
    """README: network failures exit 1; a failing or busy server is one, not a usage error (2)."""
    server.files[ZIP_PATH], server.fail_status = make_zip(kermany_entries(images)), status
    with pytest.raises(NetworkError, match=f"HTTP {status}") as err:
        download_file(server.url(ZIP_PATH), tmp_path / "x.zip", timeout=10)
    assert err.value.exit_code == 1 and "\n" not in str(err.value)
    code = cli(["data", "download", "kermany", "--dest", str(tmp_path / "k"), "--url", server.url(ZIP_PATH),
                "--timeout", "10"])
    assert code == 1 and f"HTTP {status}" in capsys.readouterr().err


class _FullDisk:
    """A file whose write or close fails like a full disk (buffered bytes are flushed at close)."""

    def __init__(self, real, fail: str) -> None:
        self.real, self.fail = real, fail

    def write(self, data: bytes) -> int:
        if self.fail == "write":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.real.write(data)

    def close(self) -> None:
        self.real.close()
        if self.fail == "close":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("fail", ["mkdir", "open", "write", "close"])
def test_full_disk_during_extraction_is_a_write_error_not_a_damaged_archive(tmp_path, images, monkeypatch,
                                                                           fail):
    """"Damaged; delete it" would cost the user a good download; the disk is at fault: exit 1, name it."""
    import builtins

    from featcache.download import archive as archive_mod

    zpath = tmp_path / "a.zip"
    zpath.write_bytes(make_zip(kermany_entries(images)))
    out = tmp_path / "out"
    real_open, real_mkdir = builtins.open, Path.mkdir

    def fake_open(path, mode="r", *args, **kwargs):
        if fail == "open":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return _FullDisk(real_open(path, mode, *args, **kwargs), fail)

    def fake_mkdir(self, *args, **kwargs):
        if "chest_xray" in self.parts:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return real_mkdir(self, *args, **kwargs)

    if fail == "mkdir":
        monkeypatch.setattr(Path, "mkdir", fake_mkdir)
    else:
        monkeypatch.setattr(archive_mod, "open", fake_open, raising=False)
    with pytest.raises(NetworkError) as err:
        safe_extract(zpath, out)
    message = str(err.value)
    assert err.value.exit_code == 1 and "damaged" not in message and "\n" not in message
    assert "No space left on device" in message and str(out) in message


def test_corrupt_archive_still_says_damaged_with_its_full_path(tmp_path, images):
    good = make_tar([(f"chest_xray/{rel}", data) for rel, data in images.items()])
    tpath = tmp_path / "a.tar.gz"
    tpath.write_bytes(good[: len(good) // 2])
    with pytest.raises(DownloadError, match="damaged") as err:
        safe_extract(tpath, tmp_path / "out")
    assert err.value.exit_code == 2 and str(tpath) in str(err.value)


def test_mistyped_pin_keeps_the_recorded_cached_archive_and_downloads_nothing(server, tmp_path, images):
    archive, dest = first_download(server, tmp_path, images)
    n_requests = len(server.requests)
    wrong = "0" * 64
    with pytest.raises(DownloadError, match="nothing was moved or downloaded") as err:
        download_kermany(dest, url=server.url(ZIP_PATH), force=True, sha256=wrong, timeout=10)
    digest = hashlib.sha256(archive).hexdigest()
    assert wrong in str(err.value) and digest in str(err.value) and "\n" not in str(err.value)
    assert len(server.requests) == n_requests
    assert (dest / ".downloads" / "ChestXRay2017.zip").read_bytes() == archive
    assert not (dest / ".downloads" / "ChestXRay2017.zip.bad").exists()
    assert_layout(dest, images)


def test_cached_file_from_another_url_is_downloaded_again(server, tmp_path, images):
    """An HTML page saved under the archive's name must not stick whatever --url says next."""
    server.files["/a/ChestXRay2017.zip"] = b"<html>Please log in</html>"
    archive = make_zip(kermany_entries(images))
    server.files["/b/ChestXRay2017.zip"] = archive
    dest = tmp_path / "k"
    cached = dest / ".downloads" / "ChestXRay2017.zip"
    with pytest.raises(DownloadError, match="truncated or an HTML page") as err:
        download_kermany(dest, url=server.url("/a/ChestXRay2017.zip"), timeout=10)
    assert f"delete {cached} and rerun" in str(err.value)
    res = download_kermany(dest, url=server.url("/b/ChestXRay2017.zip"), timeout=10)
    assert not res.files[0].reused and res.files[0].sha256 == hashlib.sha256(archive).hexdigest()
    assert (dest / ".downloads" / "ChestXRay2017.zip.url").read_text().strip() == server.url(
        "/b/ChestXRay2017.zip")
    assert_layout(dest, images)


def test_tfrecord_source_without_tensorflow_is_refused_before_downloading(server, tmp_path, monkeypatch,
                                                                          cli, capsys):
    monkeypatch.setitem(sys.modules, "tensorflow", None)          # what find_spec sees when it is absent
    for split in ("train", "test"):
        for role in ("images", "paths"):
            server.files[f"/data/{split}/{role}.tfrec"] = b"records"
    dest = tmp_path / "k"
    with pytest.raises(ConfigError, match="needs TensorFlow"):
        download_kermany(dest, source="tfrecord", url=server.url("/data"), timeout=10)
    code = cli(["data", "download", "kermany", "--dest", str(dest), "--source", "tfrecord", "--url",
                server.url("/data")])
    err = capsys.readouterr().err
    assert code == 2 and "needs TensorFlow" in err and "Traceback" not in err
    assert server.requests == [] and not dest.exists()


def test_https_to_http_redirect_is_refused():
    """No local TLS server here: the redirect handler is asked directly, as urllib asks it."""
    import urllib.request

    from featcache.download.transfer import _SafeRedirects

    handler = _SafeRedirects()
    secure = urllib.request.Request("https://example.org/a.zip")
    with pytest.raises(DownloadError, match="https-to-http downgrade"):
        handler.redirect_request(secure, None, 302, "Found", {}, "http://example.org/a.zip")
    assert handler.redirect_request(secure, None, 302, "Found", {}, "https://mirror.example.org/a.zip")
    plain = urllib.request.Request("http://example.org/a.zip")
    assert handler.redirect_request(plain, None, 302, "Found", {}, "https://example.org/a.zip")
    assert handler.redirect_request(plain, None, 302, "Found", {}, "http://example.org/b.zip")


def test_several_kermany_roots_at_one_depth_are_refused_and_listed(server, tmp_path, images):
    """Picking one by name would install whichever copy sorts first; a copy without images is no rival."""
    entries = [(f"chest_xray/{rel}", data) for rel, data in images.items()]
    copy = [(f"chest_xray_v2/{rel}", data) for rel, data in images.items()]
    server.files["/two.zip"] = make_zip(entries + copy)
    with pytest.raises(DownloadError, match="several Kermany-like folders") as err:
        download_kermany(tmp_path / "k2", url=server.url("/two.zip"), timeout=10)
    assert "chest_xray/ (6 images)" in str(err.value) and "chest_xray_v2/ (6 images)" in str(err.value)
    assert not (tmp_path / "k2" / "train").exists()
    server.files["/one.zip"] = make_zip(entries + [("empty/train/NORMAL/readme.txt", b"no images")])
    res = download_kermany(tmp_path / "k1", url=server.url("/one.zip"), timeout=10)
    assert res.counts == COUNTS


def test_the_mendeley_v3_archive_installs_its_chest_xrays_not_its_oct_scans(server, tmp_path, images):
    """v3 (ZhangLabData.zip) holds CellData/OCT/{train,test}/{CNV,DME,DRUSEN,NORMAL} beside
    CellData/chest_xray/: both look like a Kermany root (split folders with NORMAL), so the download was
    refused as ambiguous. Only the chest X-ray tree has PNEUMONIA; its v3 names give subtype and patient."""
    v3_names = {"train/NORMAL/IM-0115-0001.jpeg": "train/NORMAL/NORMAL-28501-0001.jpeg",
                "train/NORMAL/NORMAL2-IM-1427-0001.jpeg": "train/NORMAL/NORMAL-28501-0002.jpeg",
                "train/PNEUMONIA/person1_bacteria_1.jpeg": "train/PNEUMONIA/BACTERIA-7422-0001.jpeg",
                "train/PNEUMONIA/person2_virus_2.jpeg": "train/PNEUMONIA/VIRUS-40699-0001.jpeg",
                "test/NORMAL/IM-0001-0001.jpeg": "test/NORMAL/NORMAL-4512-0001.jpeg",
                "test/PNEUMONIA/person3_bacteria_3.jpeg": "test/PNEUMONIA/BACTERIA-1008087-0001.jpeg"}
    chest = [(f"ZhangLabData/CellData/chest_xray/{v3_names[rel]}", data) for rel, data in images.items()]
    data = next(iter(images.values()))
    oct_scans = [(f"ZhangLabData/CellData/OCT/{split}/{label}/{label}-1016042-{i}.jpeg", data)
                 for split in ("train", "test") for i, label in enumerate(("CNV", "DME", "DRUSEN", "NORMAL"))]
    server.files["/ZhangLabData.zip"] = make_zip(oct_scans + chest)
    res = download_kermany(tmp_path / "v3", url=server.url("/ZhangLabData.zip"), timeout=10)
    assert res.counts == COUNTS
    records = discover(tmp_path / "v3").records
    assert sorted((r.split, r.subtype, r.group) for r in records) == [
        ("test", "bacteria", "1008087"), ("test", "normal", "4512"), ("train", "bacteria", "7422"),
        ("train", "normal", "28501"), ("train", "normal", "28501"), ("train", "virus", "40699")]


def test_a_wrong_url_keeps_the_verified_cached_archive(server, tmp_path, images):
    """A mistyped --url (a login page served with HTTP 200) was downloaded over the verified cached
    archive, which then went to .bad with the page: 1.2 GB to fetch again, and the message advised
    trusting the page's digest with --sha256."""
    archive, dest = first_download(server, tmp_path, images)
    server.files["/login/ChestXRay2017.zip"] = b"<html>Please log in</html>"
    cached = dest / ".downloads" / "ChestXRay2017.zip"
    with pytest.raises(DownloadError) as err:
        download_kermany(dest, url=server.url("/login/ChestXRay2017.zip"), force=True, timeout=10)
    message = " ".join(str(err.value).split())
    assert "is not a zip or tar archive" in message and "--sha256" not in message
    assert f"stays in {cached}" in message
    assert cached.read_bytes() == archive  # the verified archive is where it was
    n = len(server.requests)
    res = download_kermany(dest, url=server.url(ZIP_PATH), force=True, timeout=10)
    assert res.files[0].reused and len(server.requests) == n  # back on the right URL: nothing fetched


def test_a_download_larger_than_the_free_space_is_refused_before_it_starts(server, tmp_path, images,
                                                                          monkeypatch):
    """A 1.2 GB archive on a nearly full disk failed at the end of its transfer with the operating
    system's words and no folder; the announced size is now checked against the free space first."""
    from collections import namedtuple

    from featcache.download import transfer

    server.files[ZIP_PATH] = make_zip(kermany_entries(images))
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(transfer.shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 100, 100))
    with pytest.raises(NetworkError, match=r"ChestXRay2017.zip needs [\d,]+ more bytes but only 100 are free "
                                           r"in .*\.downloads; free some space"):
        download_kermany(tmp_path / "k", url=server.url(ZIP_PATH), timeout=10)
