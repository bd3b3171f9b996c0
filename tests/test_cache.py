"""The HDF5 feature cache: layout, resume, crash safety (SIGKILL), locking, readers during writes, integrity.

Synthetic features only (no TensorFlow): rows come from tests/cache_writer_child.py, whose content depends
only on (image index, view), so any resumed run must end byte-identical to an uninterrupted one.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from cache_writer_child import make_config, make_rows, write_all
from featcache.cli.app import run

from featcache import cache as fc
from featcache.errors import CacheError, CacheLockedError, CacheWriteError, ConfigError

CHILD = Path(__file__).with_name("cache_writer_child.py")
ROOT = Path("/data/xrays")          # a dataset root only used as a config value; never read
DIM = 16


def child(path: Path, *extra: str, crash: str | None = None, **popen) -> subprocess.Popen:
    env = dict(os.environ)
    env.pop("FEATCACHE_CRASH_AT", None)
    if crash:
        env["FEATCACHE_CRASH_AT"] = crash
    cmd = [sys.executable, str(CHILD), str(path), "--root", str(ROOT), "--dim", str(DIM), *extra]
    return subprocess.Popen(cmd, env=env, text=True, **popen)


def run_child(path: Path, *extra: str, crash: str | None = None) -> subprocess.CompletedProcess:
    proc = child(path, *extra, crash=crash, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def dump(path: Path) -> dict:
    """Everything a resumed run must reproduce exactly: all datasets plus the row-related attributes."""
    with h5py.File(path, "r") as f:
        out = {name: f[name][...] for name in fc.DATASETS}
        out.update({a: f.attrs[a] for a in ("n_rows", "views", "config_json", "config_hash")})
    return out


def assert_same_file_content(a: Path, b: Path) -> None:
    da, db = dump(a), dump(b)
    assert da.keys() == db.keys()
    for key in da:
        np.testing.assert_array_equal(da[key], db[key], err_msg=key)


def write_rows(path: Path, rows: dict, dtype: str = "float32", root: Path = ROOT,
               pooling: str = "avg") -> None:
    with fc.CacheWriter(path, make_config(root, rows["features"].shape[1], dtype, pooling),
                        rows["features"].shape[1]) as w:
        w.reserve(len(rows["keys"]))
        w.append(rows["keys"], rows["views"], rows["paths"], rows["features"])


@pytest.fixture
def cfg() -> dict:
    return make_config(ROOT, DIM)


@pytest.fixture
def good_file(tmp_path: Path, cfg: dict) -> Path:
    path = fc.cache_path(tmp_path / "cache", cfg)
    write_all(path, ROOT, n_images=12, chunk=5, dim=DIM, views=("orig", "hflip"))
    return path


# ------------------------------------------------------------------------------------------ config, names
def test_config_hash_is_canonical_and_in_the_name(tmp_path: Path) -> None:
    backbone = {"name": "vgg16", "pooling": "flatten", "image_size": 224, "weights": "imagenet"}
    a = fc.cache_config(Path("data/../data"), backbone, "squash", "float32")
    b = fc.cache_config(Path("data"), dict(reversed(list(backbone.items()))), "squash", "float32")
    assert a == b and fc.config_hash(a) == fc.config_hash(b)
    assert a["backbone"] == "vgg16" and a["dataset_root"] == str(Path("data").resolve())
    c = fc.cache_config(Path("data"), backbone, "squash", "float16")
    assert fc.config_hash(c) != fc.config_hash(a)
    name = fc.cache_path(tmp_path, a).name
    assert name == f"data__vgg16-flatten-224__{fc.config_hash(a)[:12]}.h5"
    shard = fc.cache_path(tmp_path, a, shard=(1, 4)).name
    assert shard.endswith(f"__{fc.config_hash(a)[:12]}.shard-1-of-4.h5")
    assert fc.parse_cache_name(Path(shard)) == {"hash12": fc.config_hash(a)[:12], "shard": (1, 4)}
    with pytest.raises(ConfigError, match="float64"):
        fc.cache_config(Path("data"), backbone, "squash", "float64")


# ------------------------------------------------------------------------------------------ write / read
def test_create_append_reopen_resume(tmp_path: Path, cfg: dict) -> None:
    path = fc.cache_path(tmp_path, cfg)
    rows = make_rows(10, DIM)
    with fc.CacheWriter(path, cfg, DIM) as w:
        assert w.present() == set()
        w.reserve(6)
        assert w.append(rows["keys"][:6], rows["views"][:6], rows["paths"][:6], rows["features"][:6]) == 6
    with fc.CacheWriter(path, cfg, DIM) as w:
        assert w.present() == set(zip(rows["keys"][:6], rows["views"][:6], strict=True))
        # rows 3..9: 3..5 are already there, 9 is passed twice: only 4 new rows are written
        keys = rows["keys"][3:] + rows["keys"][9:]
        feats = np.concatenate([rows["features"][3:], rows["features"][9:]])
        assert w.append(keys, ["orig"] * 8, rows["paths"][3:] + rows["paths"][9:], feats) == 4
    with fc.CacheReader(path) as r:
        assert r.n_rows == 10 and r.feature_dim == DIM and r.views == ["orig"]
        np.testing.assert_array_equal(r.get(rows["keys"]), rows["features"])
    with h5py.File(path, "r") as f:
        assert f["features"].shape == (10, DIM) and f.attrs["n_rows"] == 10
        assert json.loads(f.attrs["views"]) == ["orig"]
    assert fc.verify(path)["ok"]


def test_datasets_of_unequal_length_are_cut_to_whole_rows_and_refilled(tmp_path: Path, cfg: dict) -> None:
    """A resize interrupted between two datasets (before signals were held, or by SIGKILL) left features and
    keys at 4 rows and the rest at 10: the next extract wrote 6 rows past the short datasets' end, which
    h5py drops without an error, and exited 0; fit then failed with a traceback."""
    path = fc.cache_path(tmp_path, cfg)
    rows = make_rows(10, DIM)
    write_rows(path, rows)
    with h5py.File(path, "r+", locking=False) as f:
        for name in ("features", "keys"):
            f[name].resize((4,) + f[name].shape[1:])
    with fc.CacheReader(path) as r:  # only the rows every dataset holds
        assert r.n_rows == 4
        np.testing.assert_array_equal(r.get(rows["keys"][:4]), rows["features"][:4])
    with fc.CacheWriter(path, cfg, DIM) as w:
        assert w.present() == set(zip(rows["keys"][:4], rows["views"][:4], strict=True))
        w.reserve(6)
        assert w.append(rows["keys"], rows["views"], rows["paths"], rows["features"]) == 6
    with fc.CacheReader(path) as r:
        assert r.n_rows == 10
        np.testing.assert_array_equal(r.get(rows["keys"]), rows["features"])
    assert fc.verify(path)["ok"]


def test_ctrl_c_during_the_resizes_waits_for_the_last_one(tmp_path: Path, cfg: dict, monkeypatch) -> None:
    """Ctrl-C between two datasets' resizes left them with different lengths: it is held until all six are
    resized and flushed, then raised."""
    import signal

    path = fc.cache_path(tmp_path, cfg)
    rows = make_rows(10, DIM)
    real, calls = h5py.Dataset.resize, []

    def resize(self, *a, **k):
        calls.append(1)
        real(self, *a, **k)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)

    w = fc.CacheWriter(path, cfg, DIM)
    w.reserve(10)
    w.append(rows["keys"][:7], rows["views"][:7], rows["paths"][:7], rows["features"][:7])
    monkeypatch.setattr(h5py.Dataset, "resize", resize)
    with pytest.raises(KeyboardInterrupt):
        w.close()  # shrinks 10 -> 7
    monkeypatch.undo()
    assert len(calls) == len(fc.DATASETS)
    with h5py.File(path, "r", locking=False) as f:
        assert {f[name].shape[0] for name in fc.DATASETS} == {7}
    assert fc.verify(path)["ok"]


def test_append_rejects_bad_keys_and_shapes(tmp_path: Path, cfg: dict) -> None:
    with fc.CacheWriter(tmp_path / "c.h5", cfg, DIM) as w:
        with pytest.raises(ValueError, match="hex"):
            w.append(["not-a-hash"], ["orig"], ["a.png"], np.zeros((1, DIM)))
        with pytest.raises(ValueError, match="dim"):
            w.append(["a" * 64], ["orig"], ["a.png"], np.zeros((1, DIM + 1)))


def test_other_config_or_dim_is_refused(tmp_path: Path, cfg: dict) -> None:
    path = tmp_path / "c.h5"
    write_rows(path, make_rows(3, DIM))
    with pytest.raises(CacheError, match=r"other settings \(pooling: file 'avg', requested 'max'\)"):
        fc.CacheWriter(path, make_config(ROOT, DIM, pooling="max"), DIM)
    with pytest.raises(CacheError, match="16-d features"):
        fc.CacheWriter(path, cfg, DIM * 2)
    # the refused writers released the lock: a matching writer still gets in
    with fc.CacheWriter(path, cfg, DIM) as w:
        assert len(w.present()) == 3


def test_get_has_duplicates_and_missing(good_file: Path) -> None:
    rows = make_rows(12, DIM, ("orig", "hflip"))
    triples = list(zip(rows["keys"], rows["views"], rows["features"], strict=True))
    orig = {k: f for k, v, f in triples if v == "orig"}
    flip = {k: f for k, v, f in triples if v == "hflip"}
    keys = list(orig)
    ask = [keys[5], keys[0], keys[5], keys[11]]
    with fc.CacheReader(good_file) as r:
        got = r.get(ask)
        assert got.dtype == np.float32 and got.shape == (4, DIM)
        np.testing.assert_array_equal(got, np.stack([orig[k] for k in ask]))
        np.testing.assert_array_equal(r.get(ask, view="hflip"), np.stack([flip[k] for k in ask]))
        unknown = "f" * 64
        assert r.has([keys[0], unknown]).tolist() == [True, False]
        with pytest.raises(CacheError, match=r"1 of 3 images are not in the cache .*featcache extract"):
            r.get([keys[0], unknown, keys[1]])
        with pytest.raises(CacheError, match="view 'rot\\+20'"):
            r.get([keys[0]], view="rot+20")
        assert len(r.index()) == 24 and sorted(r.views) == ["hflip", "orig"]


def test_float16_halves_the_features(tmp_path: Path) -> None:
    rows = make_rows(400, 256)
    sizes = {}
    for dtype in ("float32", "float16"):
        path = tmp_path / dtype / "c.h5"
        write_rows(path, rows, dtype=dtype)
        with h5py.File(path, "r") as f:
            sizes[dtype] = (f["features"].id.get_storage_size(), path.stat().st_size)
        with fc.CacheReader(path) as r:
            got = r.get(rows["keys"])
        want = rows["features"].astype(dtype).astype(np.float32)
        np.testing.assert_array_equal(got, want)
        assert fc.verify(path)["ok"]
    assert sizes["float16"][0] * 2 == sizes["float32"][0]
    assert sizes["float16"][1] < sizes["float32"][1] - 0.4 * sizes["float32"][0]


def test_plain_h5py_reads_features_keys_paths_views(tmp_path: Path, cfg: dict) -> None:
    path = tmp_path / "c.h5"
    rows = make_rows(3, DIM)
    rows["paths"] = ["train/NORMAL/caf\u00e9.jpeg", "train/x/bad-\udcff.jpeg", "a/" + "d/" * 600 + "x.png"]
    write_rows(path, rows)
    with h5py.File(path, "r") as f:  # default h5py: no featcache code involved
        np.testing.assert_array_equal(f["features"][...], rows["features"])
        assert [k.decode() for k in f["keys"][...]] == rows["keys"]
        assert [v.decode() for v in f["views"][...]] == ["orig"] * 3
        paths = [p.decode("utf-8", "surrogateescape") for p in f["paths"][...]]
        assert paths[:2] == rows["paths"][:2]
        assert len(paths[2].encode()) >= fc.PATH_BYTES - 3 and paths[2].endswith("\u2026")  # cut: it says so
        assert rows["paths"][2].startswith(paths[2][:-1])
        assert f.attrs["pooling"] == "avg" and json.loads(f.attrs["config_json"]) == cfg
        assert f.attrs["image_size"] == 32 and f.attrs["featcache_format"] == 1


def test_a_path_longer_than_the_column_is_marked_cut_and_counted(tmp_path: Path, capsys) -> None:
    """The paths column was cut at 1,024 bytes silently: the stored path looked like a real, shorter one.
    A cut path now ends with an ellipsis, and the writer, `cache info` and a merge's copy count it."""
    path = tmp_path / "c.h5"
    rows = make_rows(3, DIM)
    long_path = "train/NORMAL/" + "x" * 250 + "/" + "\u00e9" * 600 + ".jpeg"  # 1,469 bytes in UTF-8
    rows["paths"] = ["train/NORMAL/a.jpeg", long_path, "a/" * 511 + "b.png"]  # the last: 1,027 bytes
    with fc.CacheWriter(path, make_config(ROOT, DIM), DIM) as w:
        w.append(rows["keys"], rows["views"], rows["paths"], rows["features"])
        assert w.paths_cut == 2
    info = fc.info(path)
    assert info["paths_cut"] == 2
    with h5py.File(path, "r") as f:
        stored = list(f["paths"][...])
    assert stored[0] == b"train/NORMAL/a.jpeg" and all(fc.path_was_cut(b) for b in stored[1:])
    assert long_path.startswith(stored[1].decode()[:-1])  # cut between characters, not inside one
    assert run(["cache", "info", str(path)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "paths cut" in out and "2 row(s) hold a path longer than 1,024 bytes" in out
    short = tmp_path / "short.h5"
    write_rows(short, make_rows(2, DIM))
    assert fc.info(short)["paths_cut"] == 0


def test_streaming_writes_touch_only_chunk_bytes(tmp_path: Path, cfg: dict) -> None:
    """The crash-safety premise: after reserve, appends change no byte outside allocated data chunks."""
    path = tmp_path / "c.h5"
    rows = make_rows(40, DIM)
    with fc.CacheWriter(path, cfg, DIM) as w:
        w.reserve(40)
        before = np.frombuffer(path.read_bytes(), np.uint8)
        for lo in range(0, 40, 7):
            sl = slice(lo, lo + 7)
            w.append(rows["keys"][sl], rows["views"][sl], rows["paths"][sl], rows["features"][sl])
        after = np.frombuffer(path.read_bytes(), np.uint8)
        spans = []
        for name in fc.DATASETS:
            ds = w._f[name]
            for i in range(ds.id.get_num_chunks()):
                info = ds.id.get_chunk_info(i)
                spans.append((info.byte_offset, info.byte_offset + info.size))
    assert before.size == after.size
    changed = np.flatnonzero(before != after)
    assert changed.size > 40 * DIM  # the rows really were written
    inside = np.zeros(changed.size, bool)
    for lo, hi in spans:
        inside |= (changed >= lo) & (changed < hi)
    assert inside.all(), f"{(~inside).sum()} bytes changed outside data chunks"


# ------------------------------------------------------------------------------------------ crash safety
CRASHES = [
    ("cache.during_create", 0, 0),         # (point:nth, min and max complete chunks left behind)
    ("cache.during_reserve", 0, 0),
    ("cache.before_data_write:2", 1, 1),
    ("cache.after_data_write:2", 1, 1),
    ("cache.after_data_flush:3", 2, 2),
    ("cache.after_valid_write:2", 1, 2),   # valid bytes may or may not have reached the OS yet
    ("cache.after_valid_flush:2", 2, 2),
    ("child.between_chunks:3", 3, 3),
    ("cache.during_close", 5, 5),
]
N_IMAGES, VIEWS, CHUNK = 20, "orig,hflip", 8     # 40 rows = 5 chunks


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted run, written in-process."""
    path = fc.cache_path(tmp_path_factory.mktemp("ref"), make_config(ROOT, DIM))
    write_all(path, ROOT, N_IMAGES, CHUNK, DIM, tuple(VIEWS.split(",")))
    return path


@pytest.mark.parametrize(("point", "lo", "hi"), CRASHES, ids=[c[0] for c in CRASHES])
def test_sigkill_then_resume_equals_uninterrupted(tmp_path: Path, reference: Path, point: str, lo: int,
                                                  hi: int) -> None:
    path = fc.cache_path(tmp_path, make_config(ROOT, DIM))
    args = ("--images", str(N_IMAGES), "--views", VIEWS, "--chunk", str(CHUNK))
    killed = run_child(path, *args, crash=point)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    complete = 0
    if path.exists():  # the killed writer left a readable file holding only whole chunks
        check = fc.verify(path)
        assert check["ok"], check["problems"]
        with fc.CacheReader(path) as r:
            complete = r.n_rows
    assert lo * CHUNK <= complete <= hi * CHUNK and complete % CHUNK == 0
    done = run_child(path, *args)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-2:] == ["done", str(2 * N_IMAGES - complete)]  # only missing rows computed
    assert_same_file_content(path, reference)
    check = fc.verify(path)
    assert check["ok"] and not check["warnings"], check
    assert not list(tmp_path.glob("*.tmp-*"))


def test_repeated_kills_then_resume(tmp_path: Path, reference: Path) -> None:
    path = fc.cache_path(tmp_path, make_config(ROOT, DIM))
    args = ("--images", str(N_IMAGES), "--views", VIEWS, "--chunk", str(CHUNK))
    complete = []
    for point in ("cache.during_reserve", "cache.after_data_flush:2", "cache.after_data_write:1",
                  "child.between_chunks:1", "cache.during_close"):
        assert run_child(path, *args, crash=point).returncode == -signal.SIGKILL, point
        assert fc.verify(path)["ok"], point
        with fc.CacheReader(path) as r:
            complete.append(r.n_rows)
    assert complete == [0, 8, 8, 16, 40]
    assert run_child(path, *args).returncode == 0
    assert_same_file_content(path, reference)
    assert fc.verify(path)["ok"]


def _limited_child(path: Path, max_bytes: int, *extra: str) -> subprocess.CompletedProcess:
    """The child writer with RLIMIT_FSIZE: the kernel refuses writes past ``max_bytes`` (EFBIG), through
    the same h5py calls that fail when a disk is full (ENOSPC). The child sets the limit itself: a
    preexec_fn would fork this (multithreaded) test process."""
    return run_child(path, *extra, "--max-file-bytes", str(max_bytes))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_FSIZE semantics are Linux's")
def test_a_refused_write_is_one_error_and_loses_no_rows(tmp_path: Path) -> None:
    """Creating the file, or growing it, on a file system that refuses writes: one CacheWriteError naming
    the file and the system's reason (h5py raised a multi-line RuntimeError, then a second one from
    close() while unwinding; and a refused growth left a file HDF5 could no longer open: all rows lost),
    no temporary or empty file left, the rows written before kept, the file's size unchanged, and a rerun
    given just the MiB the sentence asked for ends byte-identical to an uninterrupted writer."""
    dim, args = 1024, ("--dim", "1024", "--chunk", "64")
    path = fc.cache_path(tmp_path / "c", make_config(ROOT, dim))
    refused = _limited_child(path, 8000, "--images", "20", *args)
    assert refused.returncode == 4, refused.stderr
    assert refused.stderr.strip() == (f"could not create the cache file {path}: File too large; nothing was "
                                      "written, so free space (or fix the folder) and run the same command "
                                      "again")
    assert not path.exists() and not list(path.parent.glob("*.tmp-*"))
    empty = _limited_child(path, 40_000, "--images", "20", *args)  # created, then its growth is refused
    assert empty.returncode == 4 and "could not reserve" in empty.stderr, empty.stderr
    assert not path.exists()  # no empty cache left where there was none

    assert run_child(path, "--images", "20", *args).returncode == 0
    size = path.stat().st_size
    grown = _limited_child(path, 4 << 20, "--images", "2000", *args)  # 2000 rows need ~8 MiB
    assert grown.returncode == 4, grown.stderr
    assert grown.stderr.count("\n") == 1, grown.stderr
    assert re.match(rf"could not reserve [0-9.]+ MiB more for the cache file {re.escape(str(path))}: "
                    "File too large; the rows written before are kept", grown.stderr), grown.stderr
    assert fc.verify(path)["ok"]
    with fc.CacheReader(path) as r:
        assert r.n_rows == 20
    assert path.stat().st_size == size  # nothing of a refused reservation is kept

    # the MiB the sentence asked for are enough: reserve, stream and close all fit in them
    asked = float(re.search(r"reserve ([0-9.]+) MiB", grown.stderr).group(1))
    done = _limited_child(path, size + int((asked + 0.1) * 2**20), "--images", "2000", *args)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-2:] == ["done", "1980"]
    reference = fc.cache_path(tmp_path / "ref", make_config(ROOT, dim))
    write_all(reference, ROOT, 2000, 64, dim)
    assert_same_file_content(path, reference)


@pytest.fixture
def small_tmpfs(tmp_path: Path):
    """A tmpfs mount of its own (needs root, as in CI's container): a disk that really fills up."""
    where = tmp_path / "disk"
    where.mkdir()
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(where)],
                                 capture_output=True).returncode == 0
    except OSError:
        mounted = False
    if not mounted:
        pytest.skip("cannot mount a tmpfs here (not root)")

    def resize(kib: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={kib}k", str(where)], check=True)

    yield where, resize
    subprocess.run(["umount", str(where)], check=False)


def test_the_space_a_refusal_asks_for_is_enough_on_a_full_disk(small_tmpfs) -> None:
    """On a real disk that fills up (tmpfs), freeing exactly the MiB the sentence named let every row be
    computed and then close() asked for 1 MiB more (its margin had been given back after the flush), so
    the same command failed forever with nothing left to compute. Now reserve() keeps close()'s room."""
    where, resize = small_tmpfs
    path = fc.cache_path(where / "c", make_config(ROOT, DIM))
    assert run_child(path, "--images", "20").returncode == 0  # a ~3 MiB file (fixed-size chunks)
    grown = run_child(path, "--images", "6000")  # ~7 MiB more: does not fit in 8 MiB
    assert grown.returncode == 4 and "No space left on device" in grown.stderr, grown.stderr
    asked = float(re.search(r"reserve ([0-9.]+) MiB", grown.stderr).group(1))
    st = os.statvfs(where)
    used_kib = (st.f_blocks - st.f_bfree) * st.f_frsize // 1024
    resize(used_kib + int(asked * 1024))
    done = run_child(path, "--images", "6000")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-2:] == ["done", "5980"]
    check = fc.verify(path)
    assert check["ok"] and not check["warnings"], check


def test_a_refused_preallocation_gives_back_what_it_got(tmp_path: Path, cfg: dict, monkeypatch) -> None:
    """ext4 keeps the blocks a failed posix_fallocate allocated (and the longer size): the refused
    extract left the disk full. The file is cut back to its size before the call."""
    path = tmp_path / "c.h5"
    with fc.CacheWriter(path, cfg, DIM) as w:
        w.reserve(8)
    size = path.stat().st_size

    def partial(fd: int, offset: int, length: int) -> None:
        os.ftruncate(fd, offset + length // 2)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", partial)
    with pytest.raises(CacheWriteError, match="could not reserve"), fc.CacheWriter(path, cfg, DIM) as w:
        w.reserve(100_000)
    assert path.stat().st_size == size
    monkeypatch.undo()
    assert fc.verify(path)["ok"]


def test_a_folder_where_the_cache_file_goes_is_called_a_folder(tmp_path: Path, cfg: dict) -> None:
    """It was called "not a readable HDF5 file (truncated or corrupt)"."""
    path = tmp_path / "c.h5"
    path.mkdir()
    with pytest.raises(CacheError, match=r"c\.h5 is a folder; move it away or choose another --cache-dir"):
        fc.CacheWriter(path, cfg, DIM)
    with pytest.raises(CacheError, match="is a folder"):
        fc.CacheReader(path)


def test_a_write_refused_mid_stream_keeps_the_valid_prefix(tmp_path: Path, cfg: dict, monkeypatch) -> None:
    """Disk full after some chunks (a flush fails with h5py's multi-line RuntimeError): CacheWriteError
    with the short reason, the writer lets go of the file (no second error from close), and the chunks
    flushed before are the cache's valid rows."""
    path = tmp_path / "c.h5"
    rows = make_rows(20, DIM)
    real_flush, calls = fc.CacheWriter._flush, []

    def flaky_flush(self) -> None:
        calls.append(1)
        if len(calls) == 6:  # reserve's flush, 2 per chunk: chunks 1, 2 whole, chunk 3's data flush fails
            raise RuntimeError("Unable to flush file's cached information (file write failed: time = Sat "
                               "Dec  5 18:24:55 2026\n, filename = 'c.h5', file descriptor = 4, errno = 28, "
                               "error message = 'No space left on device', buf = 0x55e6, total write "
                               "size = 2096)")
        real_flush(self)

    monkeypatch.setattr(fc.CacheWriter, "_flush", flaky_flush)
    refused = pytest.raises(CacheWriteError, match=r"^could not write the cache file .*c\.h5: No space "
                                                    r"left on device; the rows written before are kept")
    with refused, fc.CacheWriter(path, cfg, DIM) as w:
        w.reserve(20)
        for lo in range(0, 20, 8):
            w.append(rows["keys"][lo:lo + 8], rows["views"][lo:lo + 8], rows["paths"][lo:lo + 8],
                     rows["features"][lo:lo + 8])
    monkeypatch.setattr(fc.CacheWriter, "_flush", real_flush)
    assert fc.verify(path)["ok"]
    with fc.CacheReader(path) as r:
        assert r.n_rows == 16
    with fc.CacheWriter(path, cfg, DIM) as w:  # the lock was released; a rerun writes the rest
        assert len(w.present()) == 16
        assert w.append(rows["keys"], rows["views"], rows["paths"], rows["features"]) == 4


# ------------------------------------------------------------------------------------------ concurrency
def test_second_writer_in_process_is_refused_or_waits(tmp_path: Path, cfg: dict) -> None:
    path = tmp_path / "c.h5"
    with fc.CacheWriter(path, cfg, DIM):
        with pytest.raises(CacheLockedError, match="being written by another featcache process.*--wait"):
            fc.CacheWriter(path, cfg, DIM)
        with pytest.raises(CacheLockedError):
            fc.CacheWriter(path, cfg, DIM, wait=0.2)
    with fc.CacheWriter(path, cfg, DIM, wait=0.2) as w:  # free again after close
        assert w.present() == set()


def test_a_writer_lock_taken_before_the_file_is_shared_by_its_threads_writers_only(tmp_path: Path,
                                                                                  cfg: dict) -> None:
    """extract takes the lock before it builds (``writer_lock``): its own writers of the file open under
    it, one after another; any other writer (another thread here, another process) is refused as before,
    and the lock is free once the block ends."""
    import threading

    path = tmp_path / "c.h5"
    refused: list[BaseException] = []

    def other_thread() -> None:
        for take in (lambda: fc.CacheWriter(path, cfg, DIM).close(),
                     lambda: fc.writer_lock(path).__enter__()):
            try:
                take()
            except CacheLockedError as exc:
                refused.append(exc)

    with fc.writer_lock(path):
        assert not path.exists()  # locked before the file is made
        with fc.writer_lock(path):  # nested: the outer block still holds it after this one
            pass
        for _ in range(2):
            with fc.CacheWriter(path, cfg, DIM) as w:
                w.present()
        worker = threading.Thread(target=other_thread)
        worker.start()
        worker.join()
        assert len(refused) == 2
    with fc.CacheWriter(path, cfg, DIM) as w:
        assert w.present() == set()


def test_two_writer_processes(tmp_path: Path) -> None:
    path = fc.cache_path(tmp_path, make_config(ROOT, DIM))
    # the first writer holds the lock for 15 chunks x the sleep: at 0.04 s (0.6 s) it had finished before
    # the second child process was up once, with three other jobs on the 2 cores ("done 0", exit 0)
    args = ("--images", "30", "--chunk", "2", "--sleep", "0.2")
    first = child(path, *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert first.stdout.readline().strip() == "ready"   # holds the lock now
        second = run_child(path, *args)
        assert second.returncode == 3
        assert "is being written by another featcache process" in second.stderr
        waiter = child(path, *args, "--wait", "60", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        w_out, w_err = waiter.communicate(timeout=120)
        out, err = first.communicate(timeout=120)
    finally:
        first.kill()
    assert first.returncode == 0 and out.split()[-2:] == ["done", "30"], err
    # the waiter got the lock once the first writer finished, then found every row present
    assert waiter.returncode == 0 and w_out.split() == ["ready", "done", "0"], w_err
    check = fc.verify(path)
    assert check["ok"] and check["n_rows"] == 30, check
    rows = make_rows(30, DIM)
    with fc.CacheReader(path) as r:
        np.testing.assert_array_equal(r.get(rows["keys"]), rows["features"])


def test_reader_during_writes_sees_only_complete_rows(tmp_path: Path) -> None:
    path = fc.cache_path(tmp_path, make_config(ROOT, DIM))
    n, chunk = 60, 3
    rows = make_rows(n, DIM)
    want = dict(zip(rows["keys"], rows["features"], strict=True))
    writer = child(path, "--images", str(n), "--chunk", str(chunk), "--sleep", "0.05",
                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen: list[int] = []
    try:
        assert writer.stdout.readline().strip() == "ready"
        while writer.poll() is None:
            with fc.CacheReader(path) as r:
                seen.append(r.n_rows)
                assert r.n_rows % chunk == 0
                for block in r.iter_blocks():
                    for key, view, digest, feats in zip(block["keys"], block["views"], block["digests"],
                                                        block["features"], strict=True):
                        assert fc.row_digest(key, view, feats) == digest
                        np.testing.assert_array_equal(feats, want[key])
            time.sleep(0.01)
        assert writer.wait(timeout=60) == 0
    finally:
        writer.kill()
    assert any(0 < s < n for s in seen), seen   # we really read in the middle of the write
    assert seen == sorted(seen)
    assert fc.verify(path)["ok"]


# ------------------------------------------------------------------------------------------ integrity
def test_verify_detects_truncation_and_garbage(good_file: Path, tmp_path: Path) -> None:
    size = good_file.stat().st_size
    for cut in (size // 2, size - 1):
        bad = tmp_path / f"cut{cut}.h5"
        bad.write_bytes(good_file.read_bytes()[:cut])
        result = fc.verify(bad)
        assert not result["ok"]
        assert result["problems"] == [f"not a readable HDF5 file: cut short ({cut:,} of the {size:,} bytes "
                                      "its HDF5 header gives: an interrupted copy or download?)"]
        with pytest.raises(CacheError, match="not a readable HDF5 file: cut short"):
            fc.CacheReader(bad)
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(np.random.default_rng(0).bytes(5000))
    assert fc.verify(garbage)["problems"] == ["not a readable HDF5 file (truncated or corrupt)"]
    with pytest.raises(CacheError, match="not a readable HDF5 file"):
        fc.CacheWriter(garbage, make_config(ROOT, DIM), DIM)
    with pytest.raises(CacheError, match="does not exist"):
        fc.verify(tmp_path / "nope.h5")
    # zero bytes (an interrupted copy): the same words from every reader, and extract builds it anew (a
    # writer opening it "r+" made it an empty HDF5 that later said "not a featcache cache")
    empty = tmp_path / "empty.h5"
    empty.touch()
    with pytest.raises(CacheError, match=r"is empty \(0 bytes"):
        fc.CacheReader(empty)
    assert fc.verify(empty)["problems"] == ["empty (0 bytes)"] and empty.stat().st_size == 0
    with fc.CacheWriter(empty, make_config(ROOT, DIM), DIM) as w:
        assert w.n_valid == 0
    assert fc.CacheReader(empty).config == make_config(ROOT, DIM)
    with pytest.raises(CacheError, match="is a folder, not a cache file; .*cache ls --cache-dir"):
        fc.verify(tmp_path)


def test_verify_detects_tampered_features_and_keys(good_file: Path) -> None:
    assert fc.verify(good_file)["ok"]
    with h5py.File(good_file, "r+") as f:
        f["features"][7, 3] += 0.001
    result = fc.verify(good_file)
    assert not result["ok"]
    assert any("row_digest mismatch in 1 of 24 rows (first: row 7)" in p for p in result["problems"])
    with h5py.File(good_file, "r+") as f:
        f["features"][7, 3] -= 0.001
        f["keys"][2] = b"0" * 64
    assert any("row 2" in p for p in fc.verify(good_file)["problems"])


def test_verify_detects_edited_attributes(good_file: Path) -> None:
    with h5py.File(good_file, "r+") as f:
        f.attrs["pooling"] = "max"
    problems = fc.verify(good_file)["problems"]
    assert len(problems) == 1 and "attribute pooling = 'max' differs from config_json" in problems[0]
    # edited consistently (attrs, config_json, config_hash): the hash in the file name still disagrees
    with h5py.File(good_file, "r+") as f:
        config = json.loads(f.attrs["config_json"])
        config["pooling"] = "max"
        f.attrs["config_json"] = fc.canonical_json(config)
        f.attrs["config_hash"] = fc.config_hash(config)
    problems = fc.verify(good_file)["problems"]
    assert len(problems) == 1 and "file name carries hash" in problems[0]
    with h5py.File(good_file, "r+") as f:
        f.attrs["config_hash"] = "0" * 64
    assert any("config_hash does not match" in p for p in fc.verify(good_file)["problems"])


def test_verify_detects_duplicates_and_broken_prefix(good_file: Path) -> None:
    with h5py.File(good_file, "r+") as f:
        key, view = f["keys"][0].decode(), f["views"][0].decode()
        f["keys"][1], f["views"][1] = key.encode(), view.encode()
        f["row_digest"][1] = fc.row_digest(key, view, f["features"][1]).encode()
    problems = fc.verify(good_file)["problems"]
    assert problems == ["1 duplicate (key, view) rows (first: rows 0 and 1)"]
    with h5py.File(good_file, "r+") as f:
        f["valid"][1] = 0
        f["valid"][2] = 84  # a damaged flag: a row, not 84 rows (verify summed the flags)
    result = fc.verify(good_file)
    assert "valid flags are not a prefix: 22 rows after row 1 are marked valid behind an incomplete row" in \
        result["problems"] and result["n_rows"] == 1
    with fc.CacheReader(good_file) as r:
        assert r.n_rows == 1


# ------------------------------------------------------------------------------------------ find, merge
def test_find_caches_filters_by_settings(tmp_path: Path) -> None:
    rows = make_rows(2, DIM)
    made = {}
    for pooling, dtype in (("avg", "float32"), ("max", "float32"), ("avg", "float16")):
        path = fc.cache_path(tmp_path, make_config(ROOT, DIM, dtype, pooling))
        write_rows(path, rows, dtype=dtype, pooling=pooling)
        made[pooling, dtype] = path
    shard = fc.cache_path(tmp_path, make_config(ROOT, DIM), shard=(0, 2))
    write_rows(shard, rows)
    (tmp_path / "broken.h5").write_bytes(b"not hdf5")
    found = fc.find_caches(tmp_path, dataset_root=ROOT, backbone="testnet", pooling="avg")
    assert found == sorted([made["avg", "float32"], made["avg", "float16"]])
    only_f16 = fc.find_caches(tmp_path, pooling="avg", dtype="float16", image_size="32")  # CLI-style text
    assert only_f16 == [made["avg", "float16"]]
    assert fc.find_caches(tmp_path, backbone="vgg16") == []
    assert fc.find_caches(tmp_path, dataset_root=tmp_path) == []
    assert shard in fc.find_caches(tmp_path, pooling="avg", dtype="float32", include_shards=True)
    assert fc.find_caches(tmp_path / "missing") == []


def test_a_hand_made_file_with_a_caches_attributes_is_named_and_skipped(
        tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file holding a real cache's attributes but only its features matched fit's lookup by its
    attributes, then stopped the folder's fit ("could not be read (object 'valid' doesn't exist)") though a
    good cache was beside it; one without config_hash was said to have been "edited after extraction"."""
    monkeypatch.setenv("COLUMNS", "250")
    good = fc.cache_path(tmp_path, make_config(ROOT, DIM))
    write_rows(good, make_rows(3, DIM))
    with h5py.File(good, "r") as f, h5py.File(tmp_path / "x.h5", "w") as only_features:
        for k, v in f.attrs.items():
            only_features.attrs[k] = v
        only_features["features"] = f["features"][...]
    with h5py.File(good, "r") as f, h5py.File(tmp_path / "y.h5", "w") as no_hash:
        for k, v in f.attrs.items():
            if k != "config_hash":
                no_hash.attrs[k] = v
        for name in f:
            f.copy(f[name], no_hash, name)
    assert fc.find_caches(tmp_path, dataset_root=ROOT, backbone="testnet") == [good]
    for name, missing in (("x.h5", "keys, views, paths, valid, row_digest"), ("y.h5", "config_hash")):
        with pytest.raises(CacheError) as err:
            fc.CacheReader(tmp_path / name)
        assert str(err.value) == (f"{tmp_path / name} is not a cache featcache extract wrote (missing: "
                                  f"{missing}); move it out of the cache folder")
        assert run(["cache", "info", str(tmp_path / name)]) != 0
        assert f"(missing: {missing}); move it out of the cache folder" in \
            " ".join(capsys.readouterr().err.split())


def test_merge_shards(tmp_path: Path) -> None:
    cfg = make_config(ROOT, DIM)
    s0, s1 = fc.cache_path(tmp_path, cfg, shard=(0, 3)), fc.cache_path(tmp_path, cfg, shard=(1, 3))
    write_all(s0, ROOT, 15, 4, DIM, ("orig", "hflip"))
    write_all(s1, ROOT, 16, 4, DIM, ("orig", "hflip"), start=10)   # images 10..14 are in both
    out_dir = tmp_path / "merged"
    out_dir.mkdir()
    result = fc.merge([s0, s1], out_dir)
    out = Path(result["out"])
    assert out == fc.cache_path(out_dir, cfg)
    assert result["n_rows"] == 52 and result["rows_added"] == 52 and result["duplicates"] == 10
    assert result["missing_shards"] == [2]
    assert fc.verify(out)["ok"]
    # shards merged one command at a time: those in the file already are not missing (a cache audit: the
    # last merge warned "incomplete" about a complete cache)
    s2 = fc.cache_path(tmp_path, cfg, shard=(2, 3))
    write_all(s2, ROOT, 2, 4, DIM, ("orig", "hflip"), start=30)
    by_one = tmp_path / "by_one.h5"
    assert fc.merge([s0], by_one)["missing_shards"] == [1, 2]
    assert fc.merge([s1, s2], by_one)["missing_shards"] == []
    rows = make_rows(26, DIM, ("orig", "hflip"))
    with fc.CacheReader(out) as r:
        for view in ("orig", "hflip"):
            sel = [i for i, v in enumerate(rows["views"]) if v == view]
            np.testing.assert_array_equal(r.get([rows["keys"][i] for i in sel], view), rows["features"][sel])
    assert fc.merge([s0, s1], out)["rows_added"] == 0   # merging again adds nothing
    # a shard named twice (a glob plus its name) waited on its own lock ("still being written")
    assert fc.merge([s0, s1, Path(str(s0))], out, wait=0)["rows_added"] == 0
    with fc.CacheReader(out) as r:  # one session per shard: where each row came from is kept
        assert [(x["first_row"], x["merged_from"]) for x in r.sessions] == [(0, s0.name), (30, s1.name)]
        with fc.CacheReader(s1) as shard:
            assert r.sessions[1]["versions"] == shard.sessions[0]["versions"]
            # when the shard's rows were computed, not only when they were merged
            assert r.sessions[1]["extracted"] == shard.sessions[0]["started"]
    other_split = fc.cache_path(tmp_path, cfg, shard=(1, 2))  # a shard of a split into 2, not 3
    write_all(other_split, ROOT, 2, 4, DIM, ("orig",), start=20)
    mixed = fc.merge([s0, other_split], tmp_path / "mixed.h5")
    assert mixed["mixed_shard_counts"] == [2, 3] and mixed["missing_shards"] == []
    # a glob such as cache/*.shard-* also catches the writers' lock files: they are ignored, and
    # without --out the merged file goes next to the shards under its canonical name
    locks = [Path(str(s0) + ".lock"), Path(str(s1) + ".lock")]
    for lock in locks:
        lock.touch()
    beside = fc.merge([s0, locks[0], s1, locks[1]])
    assert Path(beside["out"]) == fc.cache_path(tmp_path, cfg) and beside["n_shards"] == 2
    assert beside["n_rows"] == 52 and fc.verify(Path(beside["out"]))["ok"]

    other = tmp_path / "other.h5"
    write_rows(other, make_rows(3, DIM), pooling="max")
    with pytest.raises(CacheError, match="other settings .*pooling"):
        fc.merge([s0, other], tmp_path / "x.h5")
    with h5py.File(s1, "r+") as f:
        f["features"][0, 0] += 1
    with pytest.raises(CacheError, match="fails its integrity check at row 0"):
        fc.merge([s0, s1], tmp_path / "y.h5")


# ------------------------------------------------------------------------------------------ CLI
def test_cli_ls_names_each_caches_weights(tmp_path: Path, capsys: pytest.CaptureFixture,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """`featcache demo` and `featcache demo --weights none` in one folder left two rows of one backbone,
    pooling and size in `cache ls`: which held random features took `cache info` to tell."""
    from featcache.cache import cache_config

    monkeypatch.setenv("COLUMNS", "250")
    base = {"name": "testnet", "pooling": "avg", "image_size": 32, "preprocess": "unit", "feature_dim": DIM,
            "seed": 0}
    kinds = {"none": {"weights_digest": "none"}, "imagenet": {"weights_digest": "ab" * 32},
             "file": {"weights_digest": "cd" * 32, "weights_file_sha256": "12345678" + "e" * 56}}
    names = {}
    for weights, extra in kinds.items():
        cfg = cache_config(ROOT, {**base, "weights": weights, **extra}, "squash", "float32")
        names[weights] = fc.cache_path(tmp_path / "cache", cfg)
        with fc.CacheWriter(names[weights], cfg, DIM) as w:
            rows = make_rows(2, DIM)
            w.reserve(2)
            w.append(rows["keys"], rows["views"], rows["paths"], rows["features"])
    assert run(["cache", "ls", "--cache-dir", str(tmp_path / "cache")]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if "backbone" in line)
    assert "weights" in header.split("backbone")[1].split("pooling")[0]
    said = {w: next(line for line in lines if path.name in line) for w, path in names.items()}
    assert "random" in said["none"] and "ImageNet" not in said["none"]
    assert "ImageNet" in said["imagenet"] and "random" not in said["imagenet"]
    assert "file 12345678" in said["file"]


def test_cli_ls_info_json_and_escaping(tmp_path: Path, capsys: pytest.CaptureFixture,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    evil_root = tmp_path / "[bold]evil<img src=x>"
    cfg = make_config(evil_root, DIM)
    path = fc.cache_path(tmp_path / "cache", cfg)
    write_rows(path, make_rows(4, DIM), root=evil_root)
    (tmp_path / "cache" / "junk.h5").write_bytes(b"junk")
    assert run(["cache", "ls", "--cache-dir", str(tmp_path / "cache"), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [e["file"] for e in listed] == sorted([path.name, "junk.h5"])
    good = next(e for e in listed if e["file"] == path.name)
    assert good["n_rows"] == 4 and good["feature_dim"] == DIM and good["views"] == {"orig": 4}
    assert "not a readable HDF5 file" in next(e for e in listed if e["file"] == "junk.h5")["error"]

    assert run(["cache", "ls", "--cache-dir", str(tmp_path / "cache")]) == 0
    out = capsys.readouterr().out
    assert path.name in out and "testnet" in out and "unreadable" in out and "not closed" not in out
    # a writer killed after reserving rows: `ls` showed its 4 rows like a finished cache's
    with h5py.File(path, "r+", locking=False) as f:
        for name in fc.DATASETS:
            f[name].resize(7, axis=0)
    assert run(["cache", "ls", "--cache-dir", str(tmp_path / "cache")]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "4 (not closed)" in out and "1 file(s) not closed cleanly" in out

    assert run(["cache", "info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "[bold]evil<img src=x>" in out and fc.config_hash(cfg) in out
    assert run(["cache", "info", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["config"] == cfg

    (tmp_path / "empty").mkdir()
    assert run(["cache", "ls", "--cache-dir", str(tmp_path / "empty")]) == 0
    assert "No cache files" in capsys.readouterr().out
    assert run(["cache", "ls", "--cache-dir", str(tmp_path / "none")]) == 2  # a typo is not an empty folder
    assert f"--cache-dir {tmp_path / 'none'} does not exist" in " ".join(capsys.readouterr().err.split())
    # from a cache audit: a file as --cache-dir was "No cache files" (extract refuses it), `cache info` of a
    # folder advised "choose another --cache-dir" (it has none), a file killed before its first row had
    # "rows 0--1"
    assert run(["cache", "ls", "--cache-dir", str(path)]) == 2
    assert f"--cache-dir {path} is a file, not a folder" in " ".join(capsys.readouterr().err.split())
    assert run(["cache", "info", str(tmp_path / "empty")]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "is a folder, not a cache file; pass the .h5 files to describe" in err and "another" not in err
    from featcache.cli.cache_cmd import _session_lines

    killed = {"first_row": 0, "batch_size": 8, "versions": {"backend": "tensorflow"}, "started": "t"}
    assert _session_lines([killed], 0) == ["no rows yet (from row 0): tensorflow backend, batch 8 (t)"]


def test_cli_ls_table_says_why_a_file_is_unreadable(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The table said only "unreadable" (--json had the reason): a copy cut short, a file that is no HDF5
    and another program's HDF5 file looked the same, and each needed its own `cache info` to tell."""
    monkeypatch.setenv("COLUMNS", "250")
    folder = tmp_path / "cache"
    good = fc.cache_path(folder, make_config(ROOT, DIM))
    write_all(good, ROOT, 4, 4, DIM)
    (folder / "cut.h5").write_bytes(good.read_bytes()[:4096])
    (folder / "notes.h5").write_text("not hdf5")
    with h5py.File(folder / "weights.h5", "w") as f:
        f["kernel"] = np.zeros(3)
    assert run(["cache", "ls", "--cache-dir", str(folder), "--json"]) == 0
    errors = {e["file"]: e["error"] for e in json.loads(capsys.readouterr().out) if "error" in e}
    assert sorted(errors) == ["cut.h5", "notes.h5", "weights.h5"]
    assert "but not a featcache cache" in errors["weights.h5"]
    assert run(["cache", "ls", "--cache-dir", str(folder)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "3 file(s) unreadable" in out
    for error in errors.values():
        assert " ".join(error.split()) in out, error


def test_a_cache_cut_short_by_a_copy_says_so_and_that_a_full_copy_recovers_it(
        good_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A cache copied from another machine and cut mid-way (a full disk, a dropped connection) was "not a
    readable HDF5 file (truncated or corrupt); delete it", the words for random bytes: nothing said that
    this copy was at fault, nor that copying it again in full brings every row back. Its size is compared
    with the end of file its HDF5 header records, in every command that meets it."""
    monkeypatch.setenv("COLUMNS", "250")
    folder = tmp_path / "copied"
    folder.mkdir()
    whole = good_file.read_bytes()
    bad = folder / good_file.name
    half = len(whole) // 2
    for cut, said in ((half, rf"cut short \({half:,} of the {len(whole):,} bytes its HDF5 header gives: an "
                             r"interrupted copy or download\?\)"),
                      (30, r"cut short inside its HDF5 header \(only 30 bytes: an interrupted copy or "
                           r"download\?\)")):
        bad.write_bytes(whole[:cut])
        advice = r"; copy it again in full from where it came, or delete it and run the extraction again"
        with pytest.raises(CacheError, match=f"is not a readable HDF5 file: {said}{advice}"):
            fc.CacheReader(bad)
        with pytest.raises(CacheError, match=said):  # extract's writer: refused, the copy left as it is
            fc.CacheWriter(bad, make_config(ROOT, DIM), DIM)
        assert bad.stat().st_size == cut
        assert re.fullmatch(f"not a readable HDF5 file: {said}", fc.verify(bad)["problems"][0])
        assert run(["cache", "info", str(bad)]) == 2
        assert re.search(said, " ".join(capsys.readouterr().err.split()))
        assert run(["cache", "ls", "--cache-dir", str(folder)]) == 0
        assert re.search(said, " ".join(capsys.readouterr().out.split()))
    bad.write_bytes(whole)  # the copy made again in full: every row is there
    assert fc.verify(bad)["ok"] and fc.cut_short(bad) is None
    # bytes that are no HDF5 file, or an HDF5 file that is whole, are not called cut short
    (folder / "zeros.h5").write_bytes(bytes(5000))
    assert fc.cut_short(folder / "zeros.h5") is None
    assert fc.verify(folder / "zeros.h5")["problems"] == ["not a readable HDF5 file (truncated or corrupt)"]


def test_cli_verify_exit_codes(good_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert run(["cache", "verify", str(good_file)]) == 0
    assert "OK" in capsys.readouterr().out
    assert run(["cache", "verify", str(good_file), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True
    with h5py.File(good_file, "r+") as f:
        f["features"][0, 0] = 42.0
    assert run(["cache", "verify", str(good_file)]) == 1
    assert "row_digest mismatch" in capsys.readouterr().out
    assert run(["cache", "verify", str(good_file), "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["ok"] is False
    assert run(["cache", "verify", str(tmp_path / "nope.h5")]) == 2
    assert "does not exist" in " ".join(capsys.readouterr().err.split())
    assert run(["cache", "info", str(tmp_path / "nope.h5")]) == 2


def test_cli_merge_and_lock_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = make_config(ROOT, DIM)
    s0, s1 = fc.cache_path(tmp_path, cfg, shard=(0, 2)), fc.cache_path(tmp_path, cfg, shard=(1, 2))
    write_all(s0, ROOT, 5, 2, DIM)
    write_all(s1, ROOT, 5, 2, DIM, start=5)
    out = tmp_path / "all.h5"
    assert run(["cache", "merge", str(s0), str(s1), "--out", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n_rows"] == 10 and result["missing_shards"] == []
    other = tmp_path / "locked.h5"
    with fc.CacheWriter(other, cfg, DIM):
        assert run(["cache", "merge", str(s0), "--out", str(other)]) == 3
        assert "pass --wait SECONDS" in " ".join(capsys.readouterr().err.split())
        assert run(["cache", "merge", str(s0), "--out", str(other), "--wait", "0.1"]) == 3
    err = " ".join(capsys.readouterr().err.split())
    assert "being written by another featcache process; it was still held after --wait 0.1" in err
    # a shard whose extract still writes it is incomplete: refused (exit 3), not merged in part
    with fc.CacheWriter(s1, cfg, DIM):
        assert run(["cache", "merge", str(s0), str(s1), "--out", str(tmp_path / "partial.h5")]) == 3
    err = "".join(capsys.readouterr().err.split())  # rich may wrap the path at a hyphen
    assert f"shard{s1}isstillbeingwrittenbyitsextract" in err
    assert not (tmp_path / "partial.h5").exists()
    # --out naming a folder that does not exist yet (no .h5): created, the canonical name inside
    assert run(["cache", "merge", str(s0), str(s1), "--out", str(tmp_path / "merged"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["out"] == str(fc.cache_path(tmp_path / "merged", cfg))
    # a lock file the OS will not create is the OS's reason (exit 1), not "held by another process"
    assert run(["cache", "merge", str(s0), "--out", "/proc/featcache-test.h5"]) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert "operating system refused" in err and "featcache-test.h5.lock" in err and "another" not in err
    # not a cache at all: an image (which got a lock file beside it and "delete it"), a missing path
    # (whose folder got created), a folder
    image = tmp_path / "data" / "IM-0001-0001.jpeg"
    image.parent.mkdir()
    image.write_bytes(b"\xff\xd8\xff\xe0" + b"\0" * 64)
    for arg, said in ((image, "is not a featcache cache file (not HDF5)"), (tmp_path / "nope" / "a.h5",
                      "does not exist"), (image.parent, "is not a file")):
        assert run(["cache", "merge", str(arg)]) == 2
        assert said in " ".join(capsys.readouterr().err.split()), arg
    assert sorted(p.name for p in image.parent.iterdir()) == [image.name] and not (tmp_path / "nope").exists()


def test_shards_of_two_machines_data_paths_are_told_the_extract_that_joins_them(
        tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """Shards extracted on two machines whose data sit at different paths (the path is a setting) were
    refused with "merge only shards of one extraction" alone, as if everything had to be extracted again;
    an extract of the data here into a folder holding the shards copies their rows, and the refusal says
    which one. Shards that differ in any other setting keep the old refusal."""
    monkeypatch.setenv("COLUMNS", "250")
    a = fc.cache_path(tmp_path / "a", make_config(Path("/home/ann/xrays"), DIM), shard=(0, 2))
    b = fc.cache_path(tmp_path / "b", make_config(Path("/scratch/xrays"), DIM), shard=(1, 2))
    write_all(a, Path("/home/ann/xrays"), 3, 3, DIM)
    write_all(b, Path("/scratch/xrays"), 3, 3, DIM, start=3)
    want = ("merge joins the shards of one data folder only; to join these, put the shards in one FOLDER "
            "and run `featcache extract --data DATA --backbone testnet --weights none --pooling avg "
            "--image-size 32 --resize squash --dtype float32 --cache-dir FOLDER` with DATA the images here")
    assert run(["cache", "merge", str(a), str(b)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"shard {b} was extracted from the data at /scratch/xrays and {a} from /home/ann/xrays" in err
    assert want in err and "computes only the images no shard holds" in err
    together = tmp_path / "together"
    together.mkdir()
    for shard in (a, b):
        shard.rename(together / shard.name)
    with pytest.raises(CacheError, match=f"--cache-dir {re.escape(str(together))}` with DATA"):
        fc.merge([together / a.name, together / b.name])
    assert sorted(p.name for p in together.glob("*.h5")) == sorted([a.name, b.name])  # nothing merged
    # another setting too (the dtype): the old refusal, no extract that would not find the rows
    c = fc.cache_path(tmp_path / "c", make_config(Path("/scratch/xrays"), DIM, dtype="float16"), shard=(1, 2))
    write_all(c, Path("/scratch/xrays"), 3, 3, DIM, dtype="float16", start=3)
    with pytest.raises(CacheError, match="merge only shards of one extraction") as exc:
        fc.merge([together / a.name, c])
    assert "featcache extract" not in str(exc.value)



@pytest.mark.parametrize("weights", ["saved", "file"])
def test_the_extract_that_joins_two_machines_shards_of_a_saved_model_names_the_model_file(
        tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, weights: str) -> None:
    """Shards of a saved-model backbone (`--backbone model.keras`) from two machines' data paths got the
    joining command `--backbone saved-model`, the cache's label, which extract refuses as an unknown
    backbone; a saved model with a weights file also got no word of which file PATH is. MODEL and PATH
    are placeholders now, each named by the SHA-256 the cache recorded."""
    monkeypatch.setenv("COLUMNS", "250")
    described = {"backbone": "saved-model", "weights": weights, "weights_digest": "cd" * 32, "pooling": "avg",
                 "image_size": 32, "preprocess": "none", "feature_dim": DIM, "layer": None,
                 "weights_file_sha256": "ab" * 32,
                 **({"model_file_sha256": "ef" * 32} if weights == "file" else {})}
    shards = []
    for i, root in enumerate((Path("/home/ann/xrays"), Path("/scratch/xrays"))):
        config = fc.cache_config(root, described, "squash", "float32")
        shards.append(fc.cache_path(tmp_path, config, shard=(i, 2)))
        rows = make_rows(3, DIM, start=3 * i)
        with fc.CacheWriter(shards[-1], config, DIM) as writer:
            writer.reserve(3)
            writer.append(rows["keys"], rows["views"], rows["paths"], rows["features"])
    assert run(["cache", "merge", *map(str, shards)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    model_sha = ("ef" if weights == "file" else "ab") * 6
    flags = "--backbone MODEL" + (" --weights PATH" if weights == "file" else "")
    assert (f"run `featcache extract --data DATA {flags} --pooling avg --image-size 32 --resize squash "
            f"--dtype float32 --cache-dir {tmp_path}` with DATA the images here (all of them), MODEL the "
            f"saved model file (SHA-256 {model_sha}...)") in err, err
    assert ("PATH the weights file (SHA-256 abababababab...)" in err) == (weights == "file")
    assert "saved-model" not in err.split("run `")[1]  # the cache's label is no --backbone

def test_merge_warns_of_a_shard_whose_extract_was_killed(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A shard SIGKILLed mid-extract holds no lock, so merge took it: the merged file came out closed
    cleanly with no shard missing and "0 duplicates", 17 of 96 images short, and only fit noticed."""
    monkeypatch.setenv("COLUMNS", "250")
    cfg = make_config(ROOT, DIM)
    s0, s1 = fc.cache_path(tmp_path, cfg, shard=(0, 2)), fc.cache_path(tmp_path, cfg, shard=(1, 2))
    write_all(s0, ROOT, 10, 4, DIM)
    killed = run_child(s1, "--images", "10", "--start", "10", "--chunk", "4", crash="child.between_chunks:1")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    with fc.CacheReader(s1) as r:
        assert r.n_rows == 4 and not r.clean
    result = fc.merge([s0, s1], tmp_path / "all.h5")
    assert result["n_rows"] == 14 and result["missing_shards"] == []
    assert result["unfinished_shards"] == [{"shard": str(s1), "n_rows": 4}]
    assert run(["cache", "merge", str(s0), str(s1), "--out", str(tmp_path / "cli.h5")]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert f"warning: shard {s1} was not closed cleanly" in out and "only its 4 finished rows" in out
    assert "--shard 1/2" in out
    whole = tmp_path / "whole.h5"  # a killed whole cache: its extract finishes it without --shard
    assert run_child(whole, "--images", "10", "--chunk", "4", crash="child.between_chunks:1").returncode < 0
    assert run(["cache", "merge", str(whole), "--out", str(tmp_path / "from_whole.h5")]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert f"warning: cache file {whole} was not closed cleanly" in out and "(no --shard)" in out
    assert run_child(s1, "--images", "10", "--start", "10", "--chunk", "4").returncode == 0  # finished
    again = fc.merge([s0, s1], tmp_path / "all.h5")
    assert again["unfinished_shards"] == [] and again["n_rows"] == 20 and again["rows_added"] == 6


def test_merge_refuses_an_out_that_is_not_a_cache_of_its_settings(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    """An existing --out of other settings got extract's advice, "use another --cache-dir or delete that
    file" (merge has no --cache-dir; deleting throws a good cache away), and a file that is no cache at
    all got "delete it ... run the extraction again" and a lock file beside it."""
    cfg = make_config(ROOT, DIM)
    s0 = fc.cache_path(tmp_path, cfg, shard=(0, 1))
    write_all(s0, ROOT, 5, 4, DIM)
    other = tmp_path / "other.h5"
    write_rows(other, make_rows(3, DIM), pooling="max")
    notes = tmp_path / "notes.txt"
    notes.write_text("patient,label\n")
    truncated = tmp_path / "cut.h5"
    truncated.write_bytes(s0.read_bytes()[:4096])
    for target, said in ((other, f"--out {other} is a cache of other settings than the shards (pooling: "
                                 "file 'max', shards 'avg')"),
                         (notes, f"--out {notes} is a file but not a featcache cache"),
                         (truncated, f"--out {truncated} exists but cannot be read as a featcache cache")):
        before, locked = target.read_bytes(), Path(f"{target}.lock").exists()  # other.h5's writer left one
        assert run(["cache", "merge", str(s0), "--out", str(target)]) == 2, target
        err = " ".join(capsys.readouterr().err.split())
        assert said in err and "pass another --out (that file was left as it is)" in err, err
        assert "delete" not in err and "--cache-dir" not in err and "extraction again" not in err, err
        assert target.read_bytes() == before and Path(f"{target}.lock").exists() == locked
    with fc.CacheReader(other) as r:
        assert r.n_rows == 3


def test_without_posix_fallocate_the_free_space_is_checked(tmp_path: Path, cfg: dict, monkeypatch) -> None:
    """macOS has no posix_fallocate: a growth the disk cannot hold is refused by a free-space check
    before HDF5 touches the file, instead of leaving a file that no longer opens."""
    import collections
    import shutil

    path = tmp_path / "c.h5"
    with fc.CacheWriter(path, cfg, DIM) as w:
        w.reserve(8)
    size = path.stat().st_size
    monkeypatch.delattr(os, "posix_fallocate")
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: collections.namedtuple("U", "total used free")(
        10 << 20, 9 << 20, 1 << 20))
    refused = pytest.raises(CacheWriteError, match=r"could not reserve [0-9.]+ MiB for .*No space left on")
    with refused, fc.CacheWriter(path, cfg, DIM) as w:
        w.reserve(100_000)
    assert path.stat().st_size == size
    monkeypatch.undo()
    assert fc.verify(path)["ok"]
