"""The streaming extract pipeline and `featcache extract`: cache hits, duplicates, views, shards, bad
files, strictness, kill -9 resume at many points, and one-sentence CLI errors.

Everything runs MobileNet-0.75 with seeded random weights at 32 px on ~24 tiny images, so a whole
extraction takes well under a second once TensorFlow is loaded.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from badcorpus import DUPLICATE_PAIR, make_bad_corpus, outcome_keyword
from conftest import ctrl_c_at_forward_pass, make_kermany_tree, save_rescaling_model, write_xray
from featcache.cli.app import run

from featcache import cache as fcache
from featcache.backbones import BackboneConfig, build_backbone
from featcache.datasets import discover
from featcache.errors import ConfigError, DataError
from featcache.extract import ExtractOptions, extract, parse_shard

BB = BackboneConfig("mobilenet-0.75", weights="none", image_size=32)
CLI_BB = ["--backbone", "mobilenet-0.75", "--weights", "none", "--image-size", "32"]


def _rows(path: Path) -> dict[tuple[str, str], np.ndarray]:
    """(key, view) -> feature row, read with the cache's own reader (valid rows only)."""
    with fcache.CacheReader(path) as reader:
        index = reader.index()
        feats = reader.read_rows(np.array([index[k] for k in index]))
    return {k: feats[i] for i, k in enumerate(index)}


def _close(got: np.ndarray, want: np.ndarray) -> None:
    """Equal to float32 precision, relative to the row's scale (random-init features are tiny)."""
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * float(np.abs(want).max()))


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """24 images (train + test) plus one byte-identical copy: shared, read-only, by the tests below."""
    root = make_kermany_tree(tmp_path_factory.mktemp("ds") / "data")
    shutil.copy(root / "train/NORMAL/IM-1000-0001.jpeg", root / "train/NORMAL/IM-1000-0002.jpeg")
    return root


@pytest.fixture(scope="module")
def reference(tree: Path, tmp_path_factory) -> dict[tuple[str, str], np.ndarray]:
    """An uninterrupted extraction with views orig+hflip: what every resumed run must reproduce."""
    out = tmp_path_factory.mktemp("ref")
    res = extract(discover(tree), BB, out, ExtractOptions(batch_size=8, views=("orig", "hflip")))
    assert res.rows_computed == 48 and res.duplicates == 1
    return _rows(res.cache_path)


def test_extract_then_full_cache_hit(tree: Path, tmp_path: Path, monkeypatch):
    import featcache.extract as xmod

    ds = discover(tree)
    events = []
    first = extract(ds, BB, tmp_path, ExtractOptions(batch_size=8), progress=events.append)
    assert (first.n_files, first.n_unique, first.duplicates) == (25, 24, 1)
    assert (first.rows_computed, first.rows_reused, first.skipped) == (24, 0, [])
    assert first.feature_dim == 768 and first.cache_path.parent == tmp_path
    done = [e.done for e in events if e.phase == "extract"]
    assert done == sorted(done) and done[-1] == 24
    monkeypatch.setattr(xmod, "build_backbone", lambda cfg: pytest.fail("a cache hit built the backbone"))
    second = extract(ds, BB, tmp_path, ExtractOptions(batch_size=8))
    assert second.cache_path == first.cache_path
    assert (second.rows_computed, second.rows_reused) == (0, 24)
    assert fcache.verify(first.cache_path)["ok"]


def test_rows_equal_the_backbone_on_decoded_images(tree: Path, tmp_path: Path, reference):
    """The pipeline (threads, batching, padding) computes exactly what the backbone gives.

    CPU kernels round differently depending on a row's position in the batch (~1e-7 relative), so
    rows computed at other batch positions agree to float precision, not bit for bit; the resume
    test below checks bit-for-bit equality, which holds because batches are aligned to chunks."""
    from featcache.hashing import sha256_file
    from featcache.images import decode_views, parse_views

    res = extract(discover(tree), BB, tmp_path, ExtractOptions(batch_size=5, workers=1))  # odd batch
    rows = _rows(res.cache_path)
    bb = build_backbone(BB)
    files = sorted((tree / "test").rglob("*.jpeg"))[:4]
    views = parse_views("orig,hflip")
    for f in files:
        key = sha256_file(f)
        imgs = decode_views(f.read_bytes(), 32, "squash", views)
        direct = bb(np.stack(imgs))
        scale = np.abs(direct).max()
        assert scale > 0
        for got in (rows[(key, "orig")], reference[(key, "orig")]):
            _close(got, direct[0])
        _close(reference[(key, "hflip")], direct[1])
        assert np.abs(direct[0] - direct[1]).max() > 1e-2 * scale  # the views really differ


def test_new_view_extends_the_same_file(tree: Path, tmp_path: Path, reference):
    ds = discover(tree)
    a = extract(ds, BB, tmp_path, ExtractOptions(views=("orig",)))
    b = extract(ds, BB, tmp_path, ExtractOptions(views=("orig", "hflip")))
    assert a.cache_path == b.cache_path
    assert (b.rows_computed, b.rows_reused) == (24, 24)
    assert not [n for n in a.notes + b.notes if "has no orig" in n]
    # views without orig were accepted without a word, and every fit on them then failed for want of orig
    c = extract(ds, BB, tmp_path, ExtractOptions(views=("hflip",)))
    assert (c.rows_computed, c.rows_reused) == (0, 24) and not [n for n in c.notes if "no orig" in n]
    d = extract(ds, BB, tmp_path / "elsewhere", ExtractOptions(views=("hflip",)))  # a cache without orig
    assert any(n.startswith("--views hflip has no orig: fit trains, selects and tests") for n in d.notes)
    rows = _rows(b.cache_path)
    assert rows.keys() == reference.keys()
    for k, v in reference.items():  # other batch positions than the reference: float precision
        _close(rows[k], v)


def test_a_file_records_how_each_part_of_its_rows_was_computed(tree: Path, tmp_path: Path, monkeypatch,
                                                                capsys):
    """Rows added on another backend or batch size differ in the last digits: the file says from which
    row on (before, it kept its creator's versions only, and a JAX resume of a TensorFlow file said
    "tensorflow" throughout)."""
    ds = discover(tree)
    first = extract(ds, BB, tmp_path, ExtractOptions(splits=["train"], batch_size=8))
    n_train = first.rows_computed
    extract(ds, BB, tmp_path, ExtractOptions(splits=["train"], batch_size=8))  # nothing new: no session
    more = extract(ds, BB, tmp_path, ExtractOptions(batch_size=5))
    assert more.rows_computed > 0 and not more.notes  # same backend: recorded, not announced
    with fcache.CacheReader(first.cache_path) as r:
        sessions = r.sessions
    assert [(s["first_row"], s["batch_size"]) for s in sessions] == [(0, 8), (n_train, 5)]
    assert all(s["versions"]["backend"] == fcache._versions()["backend"] for s in sessions)
    real = fcache._versions
    monkeypatch.setattr(fcache, "_versions", lambda: {**real(), "backend": "otherbackend"})
    flipped = extract(ds, BB, tmp_path, ExtractOptions(views=("orig", "hflip"), batch_size=5))
    assert len(flipped.notes) == 1 and "otherbackend" in flipped.notes[0]
    info = fcache.info(first.cache_path)
    assert [s["versions"]["backend"] for s in info["sessions"]][-1] == "otherbackend"
    assert info["sessions"][-1]["first_row"] == n_train + more.rows_computed
    assert run(["cache", "info", str(first.cache_path)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert f"rows 0-{n_train - 1}:" in out and "otherbackend backend, batch 5" in out


def test_a_rerun_that_only_meets_undecodable_images_records_no_session(tmp_path: Path, monkeypatch):
    """Such a rerun adds no row: before, after a Keras upgrade it recorded an empty session ("rows 4-3" in
    `cache info`) and said the rows added now came from other library versions."""
    root = make_kermany_tree(tmp_path / "data", n_normal=2, n_pneu=2, splits=("train",))
    (root / "train/NORMAL/IM-0901-0001.jpeg").write_bytes(b"plain text, not a JPEG")
    ds = discover(root)
    first = extract(ds, BB, tmp_path / "c", ExtractOptions(batch_size=8))
    real = fcache._versions
    monkeypatch.setattr(fcache, "_versions", lambda: {**real(), "keras": "99.0.0"})  # builds (not a hit)
    again = extract(ds, BB, tmp_path / "c", ExtractOptions(batch_size=5))
    assert (again.rows_computed, again.rows_reused, len(again.skipped)) == (0, 4, 1)
    assert again.notes == []
    with fcache.CacheReader(first.cache_path) as r:
        assert [(s["first_row"], s["batch_size"]) for s in r.sessions] == [(0, 8)]


def test_shards_partition_the_keys_and_merge_to_the_full_cache(tree: Path, tmp_path: Path, reference):
    ds = discover(tree)
    shards = []
    for i in range(2):
        res = extract(ds, BB, tmp_path, ExtractOptions(views=("orig", "hflip"), shard=(i, 2)))
        assert res.cache_path.name.endswith(f".shard-{i}-of-2.h5")
        shards.append(_rows(res.cache_path))
    assert not shards[0].keys() & shards[1].keys()
    assert shards[0].keys() | shards[1].keys() == reference.keys()
    assert all(int(k, 16) % 2 == i for i, rows in enumerate(shards) for k, _ in rows)
    # a plain extract beside the shards takes their rows (it sent every image through the backbone again)
    beside = tmp_path / "beside"
    beside.mkdir()
    for f in tmp_path.glob("*.shard-*-of-2.h5"):
        shutil.copy(f, beside / f.name)
    plain = extract(ds, BB, beside, ExtractOptions(views=("orig", "hflip")))
    assert (plain.rows_copied, plain.rows_computed) == (48, 0)
    assert sum("shard 0/2 of this cache" in n or "shard 1/2 of this cache" in n for n in plain.notes) == 2
    assert _rows(plain.cache_path).keys() == reference.keys()
    for kv, want in reference.items():
        _close(_rows(plain.cache_path)[kv], want)
    # merged under a name of the user's: a later extract of the same settings copies its rows instead of
    # sending every image through the backbone again
    merged = fcache.merge(sorted(tmp_path.glob("*.shard-*-of-2.h5")), tmp_path / "merged.h5")
    assert merged["n_rows"] == 48
    for f in tmp_path.glob("*.shard-*-of-2.h5"):
        f.unlink()  # the merged file alone is the source below
    again = extract(ds, BB, tmp_path, ExtractOptions(views=("orig", "hflip")))
    assert (again.rows_copied, again.rows_computed) == (48, 0)
    assert any("a copy of this cache under another name" in n for n in again.notes)
    assert _rows(again.cache_path).keys() == reference.keys()


def test_splits_float16_and_option_errors(tree: Path, tmp_path: Path):
    ds = discover(tree)
    res = extract(ds, BB, tmp_path, ExtractOptions(splits=["test"], dtype="float16"))
    assert res.n_files == 12 and res.rows_computed == 12
    with fcache.CacheReader(res.cache_path) as r:
        assert r.config["dtype"] == "float16"
    (tmp_path / "a-file").write_text("mine")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        extract(ds, BB, tmp_path / "a-file", ExtractOptions())
    for bad in (ExtractOptions(views=("orig", "spin")), ExtractOptions(resize="stretch"),
                ExtractOptions(dtype="int8"), ExtractOptions(shard=(2, 2)), ExtractOptions(batch_size=0)):
        with pytest.raises(ConfigError):
            extract(ds, BB, tmp_path, bad)
    with pytest.raises(DataError, match="no split 'val'"):
        extract(ds, BB, tmp_path, ExtractOptions(splits=["val"]))
    assert parse_shard("1/3") == (1, 3)
    for text in ("3/3", "x", "1/0", "-1/2", "1/2/3"):
        with pytest.raises(ConfigError, match="bad --shard"):
            parse_shard(text)


def test_bad_files_are_skipped_with_reasons_and_strict_fails_after_saving(tmp_path: Path):
    root = make_kermany_tree(tmp_path / "data", n_normal=2, n_pneu=2, splits=("train",))
    (root / "train/NORMAL/IM-0900-0001.jpeg").write_bytes(b"")
    (root / "train/NORMAL/IM-0901-0001.jpeg").write_bytes(b"plain text, not a JPEG")
    ds = discover(root)
    res = extract(ds, BB, tmp_path / "c1", ExtractOptions())
    assert res.rows_computed == 4 and len(res.skipped) == 2
    assert {rel for rel, _ in res.skipped} == {"train/NORMAL/IM-0900-0001.jpeg",
                                               "train/NORMAL/IM-0901-0001.jpeg"}
    with pytest.raises(DataError, match="2 file") as err:
        extract(ds, BB, tmp_path / "c2", ExtractOptions(strict=True))
    saved = err.value.result  # the good rows are cached before strict mode fails
    assert saved.rows_computed == 4 and len(_rows(saved.cache_path)) == 4


def test_strict_does_not_count_hidden_entries_but_still_lists_them(tmp_path: Path):
    """A dataset copied from a Mac carries .DS_Store and ._x.jpeg forks, a Jupyter session leaves
    .ipynb_checkpoints/: --strict failed on every such copy, and named .DS_Store as the first bad file
    even when a real image was damaged. They are listed, not counted; a damaged image still fails."""
    root = make_kermany_tree(tmp_path / "data", n_normal=2, n_pneu=2, splits=("train",))
    (root / "train/NORMAL/.DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (root / "train/NORMAL/._IM-0001-0001.jpeg").write_bytes(b"\x00\x05\x16\x07" + b"\x00" * 60)
    (root / "train/PNEUMONIA/.ipynb_checkpoints").mkdir()
    res = extract(discover(root), BB, tmp_path / "c", ExtractOptions(strict=True))
    assert res.rows_computed == 4
    assert sorted(res.skipped) == [("train/NORMAL/.DS_Store", "hidden file"),
                                   ("train/NORMAL/._IM-0001-0001.jpeg", "hidden file"),
                                   ("train/PNEUMONIA/.ipynb_checkpoints/", "hidden folder")]
    (root / "train/NORMAL/IM-0900-0001.jpeg").write_bytes(b"")
    with pytest.raises(DataError, match=r"^1 file\(s\) could not be used \(first: train/NORMAL/IM-0900-0001"):
        extract(discover(root), BB, tmp_path / "c", ExtractOptions(strict=True))


def test_summary_counts_add_up_and_its_rate_is_the_computing_rate(tmp_path: Path, capsys, monkeypatch):
    """The summary's "files" counted image files only while "files skipped" also held .DS_Store and notes.txt
    (96 files, 10 skipped, 91 computed did not add up), and its rate divided the rows by the whole run, the
    backbone's build included (10.5 rows/s for a run the bar showed at 58 img/s; 0.0 for a full cache)."""
    monkeypatch.setenv("COLUMNS", "250")
    root = make_kermany_tree(tmp_path / "data", n_normal=2, n_pneu=2, splits=("train",))
    (root / "train/NORMAL/.DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (root / "train/NORMAL/notes.txt").write_text("not an image")
    (root / "train/NORMAL/IM-0900-0001.jpeg").write_bytes(b"")
    argv = ["extract", "--data", str(root), *CLI_BB, "--cache-dir", str(tmp_path / "c")]
    assert run(argv) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "image files │ 5 │" in out and "rows computed │ 4 │" in out
    assert ("files skipped │ 3 (1 of the image files could not be read or decoded; 2 other entries left out "
            "while listing the folders) │") in out
    assert "s building the backbone; rows computed at " in out
    assert run([*argv, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["skipped_while_listing"] == 2 and len(info["skipped"]) == 3
    assert run(argv) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "(nothing to compute) │" in out and "0.0 rows/s" not in out


def test_a_complete_cache_that_cannot_be_written_to_is_used_read_only(tmp_path: Path, monkeypatch, capsys):
    """A shared cache in a folder we may not write to (simulated: root ignores permissions): nothing to
    compute means nothing to lock, and undecodable images are still listed; a missing row that could be
    computed is refused, naming the folder to make writable (the refusal named the lock file)."""
    root = make_kermany_tree(tmp_path / "data", n_normal=2, n_pneu=2, splits=("train",))
    (root / "train/NORMAL/IM-0900-0001.jpeg").write_bytes(b"")
    ds = discover(root)
    first = extract(ds, BB, tmp_path / "c", ExtractOptions())

    def read_only(*_a, **_k):
        raise PermissionError(13, "Permission denied", str(first.cache_path) + ".lock")

    monkeypatch.setattr(fcache, "CacheWriter", read_only)
    again = extract(ds, BB, tmp_path / "c", ExtractOptions())
    assert (again.rows_computed, again.rows_reused) == (0, 4)
    assert again.skipped == [("train/NORMAL/IM-0900-0001.jpeg", "zero-byte file")]
    write_xray(root / "train" / "NORMAL" / "IM-0950-0001.jpeg", 950, 32)
    # a row to add: the error named the lock file (which the user never made); now the folder to fix
    folder = f"the cache folder {tmp_path / 'c'} is not writable (Permission denied, for the lock file "
    with pytest.raises(fcache.CacheWriteError, match=re.escape(folder)):
        extract(discover(root), BB, tmp_path / "c", ExtractOptions())
    argv = ["extract", "--data", str(root), *CLI_BB, "--cache-dir", str(tmp_path / "c")]
    assert run(argv) == 1  # the operating system's refusal's status, as before
    err = " ".join(capsys.readouterr().err.split())
    name = first.cache_path.name  # 2 rows: the new image's, and the zero-byte file's (cannot be computed)
    assert (f"error: {folder}{name}.lock): 2 row(s) of this extract are not in {name}, and those that can be "
            "computed must be written to it; make the folder and its files writable for you, or pass "
            f"--cache-dir with a writable folder (copy {name} there first to reuse its rows).") in err, err
    shutil.rmtree(tmp_path / "c")  # no cache yet: it must be created there
    with pytest.raises(fcache.CacheWriteError, match=f"{re.escape(folder)}.*does not exist yet and must be "
                       "created there; make the folder and its files writable for you, or pass --cache-dir "
                       "with a writable folder$"):
        extract(discover(root), BB, tmp_path / "c", ExtractOptions())


def test_a_read_only_cache_file_is_not_called_corrupt(tmp_path: Path, monkeypatch, capsys):
    """A cache file we may not write to (the folder and its lock file writable; simulated, as root ignores
    permissions: h5py refuses "r+" as it does) was "not a readable HDF5 file (truncated or corrupt); delete
    it", and fit sent the user back to that extract: a circle ending in 97 good rows deleted (a cache
    audit). Complete, it is used read-only; with a row to add, the refusal is the operating system's."""
    import h5py

    root = make_kermany_tree(tmp_path / "data", n_normal=2, n_pneu=2, splits=("train",))
    ds = discover(root)
    first = extract(ds, BB, tmp_path / "c", ExtractOptions())
    real = h5py.File

    def no_write(name, mode="r", *a, **k):
        if mode != "r":
            raise OSError(13, f"Unable to synchronously open file (unable to open file: name = '{name}', "
                              "errno = 13, error message = 'Permission denied', flags = 1, o_flags = 2)")
        return real(name, mode, *a, **k)

    monkeypatch.setattr(h5py, "File", no_write)
    again = extract(ds, BB, tmp_path / "c", ExtractOptions())
    assert (again.rows_computed, again.rows_reused) == (0, 4)
    write_xray(root / "train" / "NORMAL" / "IM-0950-0001.jpeg", 950, 32)
    argv = ["extract", "--data", str(root), *CLI_BB, "--cache-dir", str(tmp_path / "c")]
    assert run(argv) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert "Permission denied" in err and str(first.cache_path) in err and "corrupt" not in err


def test_bad_corpus_end_to_end(tmp_path: Path):
    """Every file of the generated bad corpus is cached or skipped as expected; exit 0 (2 with --strict)."""
    expected = make_bad_corpus(tmp_path / "bad")
    code = run(["extract", "--data", str(tmp_path / "bad"), *CLI_BB, "--cache-dir", str(tmp_path / "c"),
                "--json"])
    assert code == 0
    ds = discover(tmp_path / "bad")
    res = extract(ds, BB, tmp_path / "c", ExtractOptions())
    assert res.rows_computed == 0  # the CLI run cached everything that can be cached
    reasons = dict(res.skipped)
    cached_paths = set()
    with fcache.CacheReader(res.cache_path) as r:
        index = r.index()
    by_rel = {rec.relpath: rec for rec in ds.records}
    from featcache.hashing import sha256_file

    for rel, outcome in expected.items():
        kind, keyword = outcome_keyword(outcome)
        if kind == "ok":
            assert rel not in reasons, (rel, reasons.get(rel))
            assert (sha256_file(by_rel[rel].path), "orig") in index, rel
            cached_paths.add(rel)
        else:
            assert rel.rstrip("/") in reasons or rel in reasons, rel
            reason = reasons.get(rel, reasons.get(rel.rstrip("/"), ""))
            assert keyword in reason.lower(), (rel, reason)
    assert len(index) == len(cached_paths) - 2  # the duplicate pair and the symlink share keys
    pair = [sha256_file(tmp_path / "bad" / rel) for rel in DUPLICATE_PAIR]
    assert pair[0] == pair[1]
    assert run(["extract", "--data", str(tmp_path / "bad"), *CLI_BB, "--cache-dir", str(tmp_path / "c"),
                "--strict"]) != 0


def test_strict_json_still_prints_the_result_with_its_skip_list(tmp_path: Path, capsys):
    """`--strict --json` exits 2 on a skipped file, but scripts still get the JSON result to read it from."""
    tree = tmp_path / "d"
    write_xray(tree / "train" / "NORMAL" / "IM-0001-0001.jpeg", 1, 32)
    (tree / "train" / "NORMAL" / "zero.jpeg").write_bytes(b"")
    code = run(["extract", "--data", str(tree), *CLI_BB, "--cache-dir", str(tmp_path / "c"), "--strict",
                "--json"])
    captured = capsys.readouterr()
    assert code == 2 and json.loads(captured.out)["skipped"] == [
        {"path": "train/NORMAL/zero.jpeg", "reason": "zero-byte file"}]
    assert "without --strict" in " ".join(captured.err.split())


def test_imagenet_weights_of_another_size_are_one_note_not_a_keras_warning(tmp_path, capsys, monkeypatch):
    """At a size Keras has no ImageNet weights for (mao2018's 300 px on mobilenet-0.75), Keras' raw
    UserWarning ("`input_shape` is undefined or non-square, or `rows` is not in [128, 160, 192, 224]...",
    pointing at a line of featcache) reached the user. It is one featcache note now, and no warning. The
    ImageNet file is a locally saved copy of the same architecture (no download, no ../shared)."""
    import warnings

    import keras
    from keras.src.utils import file_utils

    import featcache.backbones as bmod

    local = tmp_path / "mobilenet_0.75.weights.h5"
    keras.applications.MobileNet(alpha=0.75, include_top=False, weights=None, input_shape=(224, 224, 3),
                                 pooling="avg").save_weights(local)
    monkeypatch.setattr(file_utils, "get_file", lambda *a, **k: str(local))
    monkeypatch.setattr(bmod, "keras_models_dir", lambda: tmp_path / "models")
    (tmp_path / "models").mkdir()
    shutil.copy(local, tmp_path / "models" / bmod.imagenet_weights_file("mobilenet-0.75", 300))
    tree = tmp_path / "d"
    write_xray(tree / "train" / "NORMAL" / "IM-0001-0001.jpeg", 1, 64)
    argv = ["extract", "--data", str(tree), "--backbone", "mobilenet-0.75", "--weights", "imagenet",
            "--image-size", "300", "--cache-dir", str(tmp_path / "c")]
    note = ("note mobilenet-0.75 at --image-size 300: Keras has no ImageNet weights trained at that size and "
            "loaded the 224x224-px ones")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert run(argv) == 0
    assert [str(w.message) for w in caught if "input_shape" in str(w.message)] == []
    assert note in " ".join(capsys.readouterr().out.split())
    import featcache.extract as xmod

    with monkeypatch.context() as m:  # fully cached: found without a build, and the note is the same
        m.setattr(xmod, "build_backbone", lambda cfg: pytest.fail("a fully cached extract built the model"))
        assert run(argv) == 0
    assert note in " ".join(capsys.readouterr().out.split())
    with warnings.catch_warnings(record=True) as caught:  # at a size it has weights for: nothing to say
        warnings.simplefilter("always")
        assert run([*argv[:-3], "224", *argv[-2:]]) == 0
    assert "Keras has no ImageNet weights" not in capsys.readouterr().out
    assert [str(w.message) for w in caught if "input_shape" in str(w.message)] == []


def test_a_fully_cached_extract_finds_its_file_without_building_the_backbone(tmp_path: Path, monkeypatch):
    """A cache hit built the model (1.9 s for vgg16, plus the weights and TensorFlow) only to learn its
    weights digest and feature size for the file name. The cache files record them with the library
    versions that built them: a saved model, alone or with a weights file, finds the file a build names
    (the first extracts' own, made as before); a missing row or other versions build. (Random weights:
    test_extract_then_full_cache_hit; ImageNet weights: the note test above.)"""
    import keras

    import featcache.extract as xmod

    root = make_kermany_tree(tmp_path / "data", n_normal=2, n_pneu=2, splits=("train",), size=32)
    model = save_rescaling_model(tmp_path / "m.keras", 1 / 255, 0.0)
    weights = tmp_path / "m.weights.h5"
    keras.models.load_model(model).save_weights(weights)
    saved = BackboneConfig(str(model), layer="feat_conv")
    configs = [saved, BackboneConfig(str(model), weights=str(weights), layer="feat_conv")]
    firsts = [extract(discover(root), cfg, tmp_path / "c", ExtractOptions()) for cfg in configs]
    assert len({r.cache_path for r in firsts}) == 2
    built: list[BackboneConfig] = []
    real = xmod.build_backbone
    monkeypatch.setattr(xmod, "build_backbone", lambda cfg: built.append(cfg) or real(cfg))
    for cfg, first in zip(configs, firsts, strict=True):
        again = extract(discover(root), cfg, tmp_path / "c", ExtractOptions())
        assert (again.cache_path, again.rows_reused, again.rows_computed, again.feature_dim) == (
            first.cache_path, 4, 0, first.feature_dim)
    assert built == []
    write_xray(root / "train" / "NORMAL" / "IM-0950-0001.jpeg", 950, 32)
    more = extract(discover(root), saved, tmp_path / "c", ExtractOptions())
    assert (more.cache_path, more.rows_computed, len(built)) == (firsts[0].cache_path, 1, 1)
    versions = fcache._versions
    monkeypatch.setattr(fcache, "_versions", lambda: {**versions(), "keras": "9.9.9"})
    other = extract(discover(root), saved, tmp_path / "c", ExtractOptions())
    assert (other.cache_path, other.rows_computed, len(built)) == (firsts[0].cache_path, 0, 2)
    # featcache's build rules changed since the file was written (or a file from before they were recorded),
    # and a backend version this process cannot tell: the hit builds rather than trust the file's digest
    rules = versions()["build_rules"]
    for now in ({**versions(), "build_rules": rules + 1}, {**versions(), "numpy": None}):
        monkeypatch.setattr(fcache, "_versions", lambda now=now: now)
        again = extract(discover(root), saved, tmp_path / "c", ExtractOptions())
        assert (again.cache_path, again.rows_computed) == (firsts[0].cache_path, 0)
    assert len(built) == 4


def test_random_weights_of_another_seed_are_not_taken_from_a_cache_of_seed_0(tmp_path: Path, monkeypatch):
    """The seed draws --weights none's weights but is not one of the settings a cache records, so a hit
    cannot tell its digest: only the default seed's are looked up without a build. A weights file that
    cannot be read leaves it to the build, which says what is wrong in its own words."""
    import featcache.backbones as bmod

    assert bmod.describe_unbuilt(BackboneConfig("vgg16", weights="none")) is not None
    assert bmod.describe_unbuilt(BackboneConfig("vgg16", weights="none", seed=1)) is None
    weights = tmp_path / "w.h5"
    weights.write_bytes(b"x")
    assert bmod.describe_unbuilt(BackboneConfig("vgg16", weights=str(weights))) is not None

    def unreadable(path: Path) -> str:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(bmod, "sha256_file", unreadable)
    assert bmod.describe_unbuilt(BackboneConfig("vgg16", weights=str(weights))) is None


def test_a_cache_hit_on_the_command_line_imports_no_backend(tmp_path: Path, monkeypatch, capsys):
    """`featcache extract` imported Keras and TensorFlow (7-20 s on a busy 2-core VM) before every extract;
    it does so only before a build now, so a cache hit waits for neither."""
    import featcache.cli.extract_cmd as cmd

    calls: list[int] = []
    monkeypatch.setattr(cmd, "import_backend_quietly", lambda: calls.append(1))
    root = make_kermany_tree(tmp_path / "data", n_normal=2, n_pneu=2, splits=("train",), size=32)
    model = save_rescaling_model(tmp_path / "m.keras", 1 / 255, 0.0)
    argv = ["extract", "--data", str(root), "--backbone", str(model), "--layer", "feat_conv", "--cache-dir",
            str(tmp_path / "c"), "--json"]
    assert run(argv) == 0 and calls == [1]
    assert json.loads(capsys.readouterr().out)["rows_computed"] == 4
    assert run(argv) == 0 and calls == [1]
    assert json.loads(capsys.readouterr().out)["rows_reused"] == 4


def test_a_cache_another_process_writes_is_refused_before_the_backbone_is_built(tmp_path: Path, monkeypatch,
                                                                                  capsys):
    """A second extract of a file another process writes was told so by its CacheWriter only after it had
    imported the backend and built the backbone (47 s for vgg16 on a busy 2-core VM). The file is known
    from the cache before the build, so its lock is taken first: same message, no backend, no build; the
    lock is let go again, and the rerun once the other process is gone computes the missing rows."""
    import featcache.cli.extract_cmd as cmd

    import featcache.extract as xmod

    root = make_kermany_tree(tmp_path / "data", n_normal=2, n_pneu=2, size=32)
    first = extract(discover(root), BB, tmp_path / "c", ExtractOptions(splits=("train",)))
    assert first.rows_computed == 4  # the test split's rows are missing: the next extract has work
    holder = ("import sys; from filelock import FileLock; lock = FileLock(sys.argv[1]); lock.acquire(); "
              "print('held', flush=True); sys.stdin.read()")
    other = subprocess.Popen([sys.executable, "-c", holder, str(first.cache_path) + ".lock"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    built: list[str] = []
    real = xmod.build_backbone
    monkeypatch.setattr(xmod, "build_backbone", lambda cfg: built.append("build") or real(cfg))
    monkeypatch.setattr(cmd, "import_backend_quietly", lambda: built.append("backend"))
    argv = ["extract", "--data", str(root), *CLI_BB, "--cache-dir", str(tmp_path / "c")]
    try:
        assert other.stdout.readline().strip() == "held"
        assert run(argv) == 3
        err = " ".join(capsys.readouterr().err.split())
        assert f"cache file {first.cache_path} is being written by another featcache process; wait for it " \
               "to finish or pass --wait SECONDS." in err
        assert run([*argv, "--wait", "0.3"]) == 3
        assert "it was still held after --wait 0.3; wait longer." in " ".join(capsys.readouterr().err.split())
        assert built == []
    finally:
        other.kill()
        other.wait()
    assert run([*argv, "--json"]) == 0 and built == ["backend", "build"]
    out = json.loads(capsys.readouterr().out)
    assert (out["cache_path"], out["rows_computed"], out["rows_reused"]) == (str(first.cache_path), 4, 4)


BUILDING_CHILD = """
import sys
from pathlib import Path

import featcache.extract as xmod
from featcache.backbones import BackboneConfig
from featcache.datasets import discover


def build_until_told(cfg):
    print("building", flush=True)
    sys.stdin.read()  # the test lets go: leave without writing a row
    raise SystemExit(0)


xmod.build_backbone = build_until_told
xmod.extract(discover(Path(sys.argv[1])), BackboneConfig("mobilenet-0.75", weights="none", image_size=32),
             Path(sys.argv[2]), xmod.ExtractOptions())
"""


def test_a_second_extract_of_a_new_cache_is_refused_while_the_first_builds(tmp_path: Path, monkeypatch,
                                                                         capsys):
    """Two extracts of the same data and settings into a new cache: the second imported the backend and
    built the model too (~25 s for mobilenet on a 2-core VM), and only then met the cache file's lock, exit
    3. The file's name needs the build, so a lock named after the options is taken before it: the second is
    refused at once (or waits with --wait), other settings are not held up, and once the first is gone
    the same command extracts."""
    import featcache.cli.extract_cmd as cmd

    import featcache.extract as xmod

    root = make_kermany_tree(tmp_path / "data", n_normal=2, n_pneu=2, splits=("train",), size=32)
    cache = tmp_path / "c"
    first = subprocess.Popen([sys.executable, "-c", BUILDING_CHILD, str(root), str(cache)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    built: list[str] = []
    real = xmod.build_backbone
    monkeypatch.setattr(xmod, "build_backbone", lambda cfg: built.append("build") or real(cfg))
    monkeypatch.setattr(cmd, "import_backend_quietly", lambda: built.append("backend"))
    argv = ["extract", "--data", str(root), *CLI_BB, "--cache-dir", str(cache)]
    try:
        assert first.stdout.readline().strip() == "building"
        assert run(argv) == 3
        err = " ".join(capsys.readouterr().err.split())
        assert f"another featcache process is extracting {root} with the same settings into {cache}" in err
        assert "wait for it to finish or pass --wait SECONDS." in err
        assert run([*argv, "--wait", "0.3"]) == 3
        assert "it was still held after --wait 0.3; wait longer." in " ".join(capsys.readouterr().err.split())
        assert built == [] and not list(cache.glob("*.h5"))
        other = extract(discover(root), BB, cache, ExtractOptions(dtype="float16"))  # other settings: free
        assert other.rows_computed == 4 and built == ["build"]
    finally:
        first.communicate(timeout=60)
    assert first.returncode == 0
    assert run([*argv, "--json"]) == 0 and built == ["build", "backend", "build"]
    out = json.loads(capsys.readouterr().out)
    assert (out["rows_computed"], out["rows_reused"]) == (4, 0) and out["cache_path"] != str(other.cache_path)


def test_a_changed_row_of_the_cache_is_computed_again_not_reused(tmp_path: Path):
    """`fit` and `cache verify` refuse a row that fails its digest, but a plain re-extract counted it as
    cached and reused it: now it is computed again, in its own row, with a note."""
    import h5py

    root = make_kermany_tree(tmp_path / "data", n_normal=3, n_pneu=3, splits=("train",), size=32)
    bb = BackboneConfig(str(save_rescaling_model(tmp_path / "m.keras", 1 / 255, 0.0)), layer="feat_conv")
    first = extract(discover(root), bb, tmp_path / "c", ExtractOptions())
    want = _rows(first.cache_path)
    with h5py.File(first.cache_path, "r+") as f:
        kv = (f["keys"][2].decode(), f["views"][2].decode())
        f["features"][2, 0] += 1.0  # a flipped bit, say
    assert not fcache.verify(first.cache_path)["ok"]
    again = extract(discover(root), bb, tmp_path / "c", ExtractOptions())
    assert (again.cache_path, again.rows_computed, again.rows_reused) == (first.cache_path, 1, 5)
    assert any(n.startswith(f"1 row(s) of {first.cache_path.name} failed their integrity check")
               for n in again.notes)
    assert fcache.verify(first.cache_path)["ok"]
    rows = _rows(first.cache_path)
    assert rows.keys() == want.keys()
    _close(rows[kv], want[kv])
    assert extract(discover(root), bb, tmp_path / "c", ExtractOptions()).rows_computed == 0


def _cli(tree: Path, cache_dir: Path, *extra: str) -> list[str]:
    return ["extract", "--data", str(tree), *CLI_BB, "--cache-dir", str(cache_dir), "--batch-size", "8",
            "--views", "orig,hflip", *extra]


# Kill points: during decode, before a forward pass, between chunks, mid-chunk (rows written, not
# flushed), during a flush (data flushed, valid not yet), after valid is written but not flushed.
# (Creation and growth of the file are killed in tests/test_cache.py.)
CRASH_POINTS = [
    "extract.decode:14",
    "extract.forward:3",
    "extract.between_chunks:2",
    "cache.after_data_write:2",
    "cache.after_data_flush:4",
    "cache.after_valid_write:3",
]


@pytest.mark.slow
@pytest.mark.parametrize("point", CRASH_POINTS)
def test_sigkill_then_resume_gives_the_uninterrupted_features(point: str, tree: Path, tmp_path: Path,
                                                              reference):
    env = dict(os.environ, FEATCACHE_CRASH_AT=point, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run([sys.executable, "-m", "featcache.cli.app", *_cli(tree, tmp_path)], env=env,
                          capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    files = sorted(tmp_path.glob("*.h5"))
    if files:   # whatever survived the kill is readable and holds only complete rows
        assert len(_rows(files[0])) < 48
    assert run(_cli(tree, tmp_path)) == 0
    files = sorted(tmp_path.glob("*.h5"))
    assert len(files) == 1
    rows = _rows(files[0])
    assert rows.keys() == reference.keys()
    for k, v in reference.items():
        np.testing.assert_array_equal(rows[k], v, err_msg=str(k))
    assert run(["cache", "verify", str(files[0])]) == 0


def test_ctrl_c_during_extract_says_how_many_images_are_kept_and_left(tmp_path: Path, capsys, monkeypatch):
    """Ctrl-C printed only "finished work is saved; run the same command to resume": no word of how many
    images were kept or how many a resume would compute. The counts come first now, and they are true."""
    root = make_kermany_tree(tmp_path / "data", n_normal=4, n_pneu=4, splits=("train",))
    ctrl_c_at_forward_pass(monkeypatch, 3)
    monkeypatch.setenv("COLUMNS", "250")
    argv = ["extract", "--data", str(root), *CLI_BB, "--cache-dir", str(tmp_path / "c"), "--batch-size", "2"]
    assert run(argv) == 130
    err = " ".join(capsys.readouterr().err.split())
    name = next((tmp_path / "c").glob("*.h5")).name
    assert (f"extract stopped: 4 of the 8 images this extract wants are in {name} (4 computed before the "
            "interruption, 0 there before); the same command computes the remaining 4.") in err
    assert err.endswith("interrupted: finished work is saved; run the same command to resume.")
    monkeypatch.undo()
    res = extract(discover(root), BB, tmp_path / "c", ExtractOptions(batch_size=2))
    assert (res.rows_reused, res.rows_computed) == (4, 4)  # the sentence's counts were the cache's


def test_images_smaller_than_the_input_or_of_several_frames_are_noted(tmp_path: Path):
    """predict noted images upscaled more than 4 times and multi-frame files; extract cached an 8 x 8
    thumbnail as a full-size blur, or a GIF's first frame, without a word, and fit trained and tested on
    them."""
    from PIL import Image

    root = make_kermany_tree(tmp_path / "data", n_normal=2, n_pneu=2, splits=("train",))  # 64 px: no note
    res = extract(discover(root), BB, tmp_path / "c", ExtractOptions())
    assert res.rows_computed == 4 and not any("upscaled" in n or "frames" in n for n in res.notes)
    rng = np.random.default_rng(0)
    for name, (w, h) in (("IM-0900-0001.png", (4, 4)), ("IM-0901-0001.png", (20, 40)),
                         ("IM-0902-0001.png", (200, 1))):
        Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8)).save(root / "train/NORMAL" / name)
    frames = [Image.fromarray(rng.integers(0, 256, (48, 48), dtype=np.uint8)) for _ in range(3)]
    frames[0].save(root / "train/PNEUMONIA/person9_virus_9.gif", save_all=True, append_images=frames[1:])
    res = extract(discover(root), BB, tmp_path / "c", ExtractOptions())
    assert res.rows_computed == 4
    assert ("3 image(s) computed now are smaller than the backbone's 32-px input on a side and were upscaled "
            "to it, 2 of them more than 4 times (under 8 px a side): their features carry little information "
            "(e.g. train/NORMAL/IM-0900-0001.png, 4x4).") in res.notes
    assert ("1 image(s) hold several frames (an animated GIF or a multi-page TIFF; e.g. "
            "train/PNEUMONIA/person9_virus_9.gif, 3 frames): only the first frame of each was extracted; "
            "save a frame as an image of its own to use it.") in res.notes


def test_cli_json_summary_and_cache_hit(tree: Path, tmp_path: Path, capsys):
    assert run(_cli(tree, tmp_path, "--json")) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["rows_computed"] == 48 and first["duplicates"] == 1 and first["feature_dim"] == 768
    assert Path(first["cache_path"]).is_file() and first["cache_bytes"] > 0
    assert run(_cli(tree, tmp_path)) == 0
    out = capsys.readouterr().out
    assert "rows reused from cache" in out and "48" in out


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--backbone", "resnet51"], "unknown backbone"),
        (["--image-size", "16"], "at least 32 px"),
        (["--shard", "2/2"], "bad --shard"),
        (["--shard", "half"], "bad --shard"),
        (["--views", "orig,spin"], "view"),
        (["--pooling", "median"], "unknown pooling"),
        (["--splits", "val"], "no split"),
        (["--data", "/no/such/folder"], "/no/such/folder"),
        (["--weights", "JUNK"], "does not fit backbone"),  # fails inside the progress display
    ],
)
def test_cli_errors_are_one_sentence(args: list[str], needle: str, tree: Path, tmp_path: Path, capsys):
    if "JUNK" in args:
        (tmp_path / "junk.h5").write_bytes(b"not an HDF5 file")
        args = [str(tmp_path / "junk.h5") if a == "JUNK" else a for a in args]
    base = {"--data": str(tree), "--backbone": "mobilenet-0.75", "--weights": "none", "--image-size": "32",
            "--cache-dir": str(tmp_path)}
    for flag, value in zip(args[::2], args[1::2], strict=True):
        base[flag] = value
    argv = ["extract"] + [x for kv in base.items() for x in kv]
    code = run(argv)
    err = capsys.readouterr().err
    assert code != 0
    assert needle in " ".join(err.split()) and "Traceback" not in err  # the console wraps long paths
    assert err.count("error:") == 1 and err.startswith("error:")  # one message, no bar or empty line before


def test_a_full_disk_mid_extract_is_one_sentence_and_the_rerun_resumes(tree: Path, tmp_path: Path, reference,
                                                                       monkeypatch, capsys):
    """Disk full while rows stream in (a flush fails with h5py's multi-line RuntimeError; the unwinding
    close() then failed again): it was a Python traceback. Now one sentence naming the cache file and the
    reason, exit 1; the chunks flushed before stay valid and a rerun computes only the rest."""
    real_flush, calls = fcache.CacheWriter._flush, []

    def flaky_flush(self) -> None:
        calls.append(1)
        if len(calls) == 4:  # reserve, chunk 1 (data, valid): chunk 2's data flush fails
            raise RuntimeError("Unable to flush file's cached information (file write failed: time = Sat "
                               "Dec  5 18:24:55 2026\n, errno = 28, error message = 'No space left on "
                               "device')")
        real_flush(self)

    monkeypatch.setattr(fcache.CacheWriter, "_flush", flaky_flush)
    assert run(_cli(tree, tmp_path)) == 1
    raw = capsys.readouterr().err
    (path,) = tmp_path.glob("*.h5")
    assert raw.count("\n") == 1 and "Traceback" not in raw, raw
    assert " ".join(raw.split()).startswith(f"error: could not write the cache file {path}: No space left on "
                                            "device; the rows written before are kept")
    assert len(_rows(path)) == 8
    monkeypatch.setattr(fcache.CacheWriter, "_flush", real_flush)
    assert run(_cli(tree, tmp_path, "--json")) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["rows_computed"], summary["rows_reused"]) == (40, 8)
    rows = _rows(path)
    assert rows.keys() == reference.keys()
    for k, v in reference.items():
        _close(rows[k], v)


def test_a_moved_dataset_copies_its_rows_from_the_old_folders_cache(tree: Path, tmp_path: Path, reference):
    """A cache is per (dataset folder, settings): a moved or copied folder (or a cache folder carried from
    the machine that extracted) got a new file and every image went through the backbone again. Now the
    rows of a cache with the same settings for another folder are copied, and only new images computed."""
    cache_dir = tmp_path / "cache"
    old = shutil.copytree(tree, tmp_path / "old")
    extract(discover(old), BB, cache_dir, ExtractOptions(batch_size=8))
    first = extract(discover(old), BB, cache_dir, ExtractOptions(batch_size=4, views=("orig", "hflip")))
    assert first.rows_computed == 24 and first.rows_copied == 0  # two sessions: batch 8, then 4
    moved = old.rename(tmp_path / "moved")
    write_xray(moved / "train" / "NORMAL" / "IM-9999-0001.jpeg", 9999, size=40)  # one new image
    other = extract(discover(moved), BackboneConfig("mobilenet-0.75", weights="none", image_size=32,
                                                    pooling="max"), cache_dir, ExtractOptions(batch_size=8))
    assert other.rows_copied == 0 and other.rows_computed == 25  # other settings: nothing to copy
    res = extract(discover(moved), BB, cache_dir, ExtractOptions(batch_size=8, views=("orig", "hflip")))
    assert res.cache_path != first.cache_path and "moved__" in res.cache_path.name
    assert (res.rows_copied, res.rows_computed, res.rows_reused) == (48, 2, 48)
    assert any(f"48 row(s) copied from {first.cache_path.name}" in n for n in res.notes)
    rows = _rows(res.cache_path)
    assert len(rows) == 50
    for kv, want in _rows(first.cache_path).items():
        np.testing.assert_array_equal(rows[kv], want)  # copied bit for bit
        _close(rows[kv], reference[kv])
    with fcache.CacheReader(res.cache_path) as reader:
        assert reader.config["dataset_root"] == str(moved.resolve())
        sessions = reader.sessions
    # each source session is recorded again for its rows, with its batch size and versions
    assert [(x["first_row"], x["batch_size"], x.get("copied_from")) for x in sessions] == [
        (0, 8, first.cache_path.name), (24, 4, first.cache_path.name), (48, 8, None)]
    assert sessions[0]["source_dataset_root"] == str(old.resolve())
    assert sessions[0]["versions"] == sessions[2]["versions"]
    again = extract(discover(moved), BB, cache_dir, ExtractOptions(batch_size=8, views=("orig", "hflip")))
    assert (again.rows_copied, again.rows_computed) == (0, 0)  # its own file has everything now


def test_fit_names_a_cache_of_the_same_settings_for_another_folder(tree: Path, tmp_path: Path, capsys):
    cache_dir = tmp_path / "cache"
    old = shutil.copytree(tree, tmp_path / "old")
    assert run(["extract", "--data", str(old), *CLI_BB, "--cache-dir", str(cache_dir)]) == 0
    moved = old.rename(tmp_path / "moved")
    capsys.readouterr()
    assert run(["fit", "--data", str(moved), *CLI_BB[:2], "--head", "logreg", "--cache-dir", str(cache_dir),
                "--runs-dir", str(tmp_path / "runs")]) != 0
    err = " ".join(capsys.readouterr().err.split())
    assert "old__mobilenet-0.75-avg-32__" in err and f"holds its features for {old.resolve()}" in err
    # the command it prints has the twin's settings (fit was given none: ImageNet weights would not copy)
    assert f"featcache extract --data {moved} --backbone mobilenet-0.75 --weights none" in err
    assert "--image-size 32" in err
    assert run(["extract", "--data", str(moved), *CLI_BB, "--cache-dir", str(cache_dir), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["rows_copied"] == 24 and out["rows_computed"] == 0
    assert run(["cache", "ls", "--cache-dir", str(cache_dir)]) == 0
    listed = " ".join(capsys.readouterr().out.split())
    assert f"was made for {old.resolve()}, which no longer exists" in listed
    assert f"made for {moved.resolve()}" not in listed  # the folder that is there is not named


def test_fit_does_not_name_a_cache_of_a_folder_that_shares_no_image(tree: Path, tmp_path: Path, capsys):
    """fit said another folder's cache "holds its features" and sent the user to an extract that would copy
    nothing, although the two folders shared no image: rows are keyed by content, so it now checks."""
    cache_dir = tmp_path / "cache"
    assert run(["extract", "--data", str(tree), *CLI_BB, "--cache-dir", str(cache_dir)]) == 0
    other = tmp_path / "other"
    for i, label in enumerate(("NORMAL", "PNEUMONIA") * 2):
        write_xray(other / "train" / label / f"IM-{900 + i:04d}-0001.jpeg", 500 + i, 64, float(i % 2))
    capsys.readouterr()
    assert run(["fit", "--data", str(other), *CLI_BB[:2], "--head", "logreg", "--cache-dir", str(cache_dir),
                "--runs-dir", str(tmp_path / "runs")]) != 0
    err = " ".join(capsys.readouterr().err.split())
    assert "holds its features" not in err and "same images" not in err
    assert f"no feature cache for backbone 'mobilenet-0.75' of {other.resolve()}" in err
    assert f"featcache extract --data {other}" in err


def test_a_damaged_twin_row_is_computed_not_copied(tree: Path, tmp_path: Path, reference):
    """Another folder's cache with a row that fails its digest check stopped extract of this folder on
    every run (exit 2, "delete it"): now its intact rows are copied, with a note, and the backbone
    computes the changed one."""
    import h5py

    cache_dir = tmp_path / "cache"
    old = shutil.copytree(tree, tmp_path / "old")
    first = extract(discover(old), BB, cache_dir, ExtractOptions(batch_size=8))
    with h5py.File(first.cache_path, "r+") as f:
        f["features"][20, 0] += 1.0  # a row changed after it was written
    moved = shutil.copytree(old, tmp_path / "moved")
    res = extract(discover(moved), BB, cache_dir, ExtractOptions(batch_size=8))
    assert (res.rows_copied, res.rows_computed) == (23, 1)  # the changed row went through the backbone
    name = first.cache_path.name
    note = next(n for n in res.notes if n.startswith(f"1 row(s) of {name} failed their integrity check"))
    assert "cache verify" in note and "run the same" not in note  # this folder's extract repairs nothing
    rows = _rows(res.cache_path)
    assert len(rows) == 24
    for kv, want in reference.items():
        if kv[1] == "orig":
            _close(rows[kv], want)  # none of the damaged row's values arrived


def test_rows_behind_a_damaged_valid_flag_are_computed_again_with_a_note(tree: Path, tmp_path: Path,
                                                                         reference):
    """A damaged valid flag (a byte of 84 at row 5) cleared every row behind it, which were then computed
    again with no word: 90 rows silently redone (a cache audit). The rerun now says so."""
    import h5py

    first = extract(discover(tree), BB, tmp_path / "c", ExtractOptions(batch_size=8))
    with h5py.File(first.cache_path, "r+") as f:
        f["valid"][5] = 84
    again = extract(discover(tree), BB, tmp_path / "c", ExtractOptions(batch_size=8))
    assert (again.rows_reused, again.rows_computed) == (5, 19)
    assert any(n.startswith(f"19 row(s) of {first.cache_path.name} were marked valid behind row 5")
               for n in again.notes)
    rows = _rows(again.cache_path)
    for kv, want in reference.items():
        if kv[1] == "orig":
            _close(rows[kv], want)


def test_rows_are_copied_in_the_sources_row_order() -> None:
    """Blocks of rows scattered over a source file each read the whole span between their rows: copying
    a source ordered otherwise (extracted split by split, merged shards) read 2 GB of a 64 MB file."""
    from featcache.extract import _wanted
    from featcache.images import parse_views

    keys = [f"{i:064x}" for i in range(6)]
    order = [(k, v) for v in ("hflip", "orig") for k in reversed(keys)]  # not the folder's order
    index = {kv: row for row, kv in enumerate(order)}
    need = _wanted(keys, parse_views(["orig", "hflip"]), {(keys[0], "orig"): 0}, index)
    assert [index[kv] for kv in need] == sorted(index[kv] for kv in need) and len(need) == 11


def test_fits_hint_gives_a_weights_file_not_the_caches_word_for_it(tmp_path: Path) -> None:
    """A cache records `weights: file` (or `saved`): the hint printed `--weights file`, which extract
    refuses; a damaged cache of another folder must not replace the hint with its own error."""
    from featcache.fit import FitOptions, _extract_cmd, _twin_config

    like = {"backbone": "mobilenet", "weights": "file", "dtype": "float32", "image_size": 32}
    given = _extract_cmd(tmp_path / "d", "mobilenet", FitOptions(weights="mine.weights.h5"), like=like)
    assert "--weights mine.weights.h5" in given and "--weights file" not in given
    assert "--weights PATH" in _extract_cmd(tmp_path / "d", "mobilenet", FitOptions(), like=like)
    saved = _extract_cmd(tmp_path / "d", "m.keras", FitOptions(), like={**like, "weights": "saved"})
    assert "--weights" not in saved
    (tmp_path / "bad.h5").write_bytes(b"not hdf5")
    assert _twin_config([tmp_path / "bad.h5"], tmp_path / "d", None) is None


def test_an_edited_session_entry_of_a_source_does_not_stop_the_copy() -> None:
    from types import SimpleNamespace

    from featcache.cache import source_sessions

    reader = SimpleNamespace(versions={"keras": "3"}, sessions=[
        {"first_row": 40, "batch_size": 8}, {"first_row": None, "batch_size": 4}, {"batch_size": 2}])
    starts, sessions = source_sessions(reader)
    assert starts == [0, 40] and sessions == [{"batch_size": 2}, {"batch_size": 8}]


def test_a_batch_size_whose_buffers_cannot_fit_is_one_sentence_naming_an_upper_bound(
        tree: Path, tmp_path: Path, monkeypatch, capsys):
    """Every pass is padded to --batch-size, so --batch-size 100000 on 4 images had the process killed by
    the kernel (2000000: numpy's allocation error as a traceback). Now it is refused up front."""
    import featcache.resources as res

    # 10 MB: 325 images of 32 px (6 uint8 batches + the forward pass's float32 copy: 10 bytes a channel)
    monkeypatch.setattr(res, "available_memory", lambda: 10e6)
    code = run(["extract", "--data", str(tree), *CLI_BB, "--cache-dir", str(tmp_path), "--batch-size", "400"])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2 and err.count("error:") == 1 and "Traceback" not in err
    assert "--batch-size 400 needs about" in err and "leave room for --batch-size 325 at most" in err
    # an upper bound, said as one: "the largest that would" sent a user to a batch 20 times too large
    assert "the network's working memory comes on top" in err and "the largest that would" not in err
    assert not list(tmp_path.rglob("*.h5"))  # refused before a cache file was made
    # a complete cache has no batch to hold: a rerun is not refused, whatever the memory
    monkeypatch.setattr(res, "available_memory", lambda: 1e12)
    args = ["extract", "--data", str(tree), *CLI_BB, "--cache-dir", str(tmp_path), "--batch-size"]
    assert run([*args, "4"]) == 0
    monkeypatch.setattr(res, "available_memory", lambda: 10e6)
    assert run([*args, "400"]) == 0
    capsys.readouterr()
    from featcache.extract import check_batch_memory

    check_batch_memory(325, 32, available=10e6)  # the one it names passes
    with pytest.raises(ConfigError, match="not even --batch-size 1"):
        check_batch_memory(1, 224, available=1e5)


def test_extract_says_when_a_path_is_stored_cut(tmp_path: Path):
    """Paths longer than the cache's 1,024-byte column were cut without a word."""
    root = make_kermany_tree(tmp_path / "data", n_normal=1, n_pneu=1, splits=("train",))
    deep = root / "train" / "NORMAL" / "/".join(c * 250 for c in "abcd") / "IM-0500-0001.jpeg"
    write_xray(deep, 77, 64, 0.0)
    res = extract(discover(root), BB, tmp_path / "cache", ExtractOptions(batch_size=4))
    assert res.rows_computed == 3
    assert any("1 row(s) added to" in n and "longer than 1,024 bytes" in n for n in res.notes)
    assert fcache.info(res.cache_path)["paths_cut"] == 1


def test_a_resume_with_less_than_a_batch_missing_gives_the_fresh_extracts_rows(tmp_path: Path):
    """Rows added to a cache by a later extract (3 new images, --batch-size 8) went through a backbone
    compiled for batches of 3, whose float rounding differed (up to 4e-6) from the batches of 8 of a fresh
    extract: the features depended on the cache's history. Every pass is now padded to --batch-size."""
    root = make_kermany_tree(tmp_path / "data", n_normal=4, n_pneu=4, splits=("train",))
    later = sorted((root / "train").rglob("*.jpeg"))[:3]
    aside = tmp_path / "aside"
    aside.mkdir()
    for p in later:
        p.rename(aside / p.name)
    bb = BackboneConfig("mobilenet-0.75", weights="none", image_size=96)
    first = extract(discover(root), bb, tmp_path / "grown", ExtractOptions(batch_size=8))
    for p in later:
        (aside / p.name).rename(p)
    grown = extract(discover(root), bb, tmp_path / "grown", ExtractOptions(batch_size=8))
    assert (first.rows_computed, grown.rows_computed, grown.rows_reused) == (5, 3, 5)
    fresh = extract(discover(root), bb, tmp_path / "fresh", ExtractOptions(batch_size=8))
    got, want = _rows(grown.cache_path), _rows(fresh.cache_path)
    assert got.keys() == want.keys()
    assert all(np.array_equal(got[k], want[k]) for k in want)


def test_rows_added_under_other_library_versions_are_announced_and_shown(tree: Path, tmp_path: Path,
                                                                        monkeypatch, capsys):
    """Rows added after a Keras or TensorFlow upgrade went in without a word, and `cache info` showed two
    identical-looking lines ("tensorflow backend, batch 8"): the versions that differ are now in both."""
    ds = discover(tree)
    first = extract(ds, BB, tmp_path, ExtractOptions(splits=["train"], batch_size=8))
    real = fcache._versions
    monkeypatch.setattr(fcache, "_versions", lambda: {**real(), "keras": "9.9.9"})
    more = extract(ds, BB, tmp_path, ExtractOptions(batch_size=8))
    assert more.rows_computed > 0 and len(more.notes) == 1
    assert f"keras {real()['keras']} -> 9.9.9" in more.notes[0]
    assert run(["cache", "info", str(first.cache_path)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert f"keras {real()['keras']}" in out and "keras 9.9.9" in out


def test_extract_into_a_log_writes_dated_progress_lines(tree: Path, tmp_path: Path, capsys, monkeypatch):
    """Into a log (nohup, `> log 2>&1`) rich draws no bar, so extract wrote nothing until it ended: a
    5-minute extract looked hung. It writes dated lines on stderr now, as fit, run and report do (here with
    the interval at 0 s, so each event gives one)."""
    import re

    import featcache.cli.text as text

    real = text.LogLines
    monkeypatch.setattr(text, "LogLines", lambda console: real(console, every=0))
    code = run(["extract", "--data", str(tree), *CLI_BB, "--cache-dir", str(tmp_path / "c")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    lines = captured.err.splitlines()
    assert any(re.match(r"\d\d:\d\d:\d\d extract \d+/\d+", line) for line in lines), captured.err
    assert any(re.match(r"\d\d:\d\d:\d\d extract (\d+)/\1 ", line + " ") for line in lines)  # its end
    assert "extract summary" in captured.out
