"""predict round trip (known images reuse cached rows, new images run the backbone), tampering, errors."""
from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import make_kermany_tree, write_xray
from featcache.cli.app import run as cli

from featcache.backbones import BackboneConfig
from featcache.datasets import discover
from featcache.errors import DataError, RunError
from featcache.extract import ExtractOptions, extract
from featcache.fit import FitOptions, fit
from featcache.predict import predict


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path, str]:
    """A tiny dataset, a real (random-weights, seeded) mobilenet cache at 32 px and one logreg run."""
    base = tmp_path_factory.mktemp("predict")
    root = make_kermany_tree(base / "data", n_normal=5, n_pneu=5, size=32)
    cache_dir, runs_dir = base / "cache", base / "runs"
    extract(discover(root), BackboneConfig("mobilenet-0.75", weights="none", image_size=32), cache_dir,
            ExtractOptions(batch_size=8))
    res = fit(root, "mobilenet-0.75", "logreg",
              FitOptions(cache_dir=cache_dir, runs_dir=runs_dir, cv_folds=3, grid_args=["C=1"], n_boot=100))
    return root, runs_dir, res.runs[0].id


def _test_csv(runs_dir: Path, run_id: str) -> dict[str, dict]:
    with open(runs_dir / run_id / "predictions_test.csv", newline="") as fh:
        return {r["relpath"]: r for r in csv.DictReader(fh)}


def test_round_trip_known_and_new_images(trained, tmp_path: Path) -> None:
    root, runs_dir, run_id = trained
    known = sorted((root / "test" / "PNEUMONIA").iterdir())[0]
    new = write_xray(tmp_path / "new.jpeg", 999, size=48)
    out = predict([known, new], run_id, runs_dir)
    p_known, p_new = out["predictions"]
    assert p_known["from_cache"] and not p_new["from_cache"]
    for p in (p_known, p_new):
        assert sum(p["probabilities"].values()) == pytest.approx(1.0)
        assert p["label"] in ("NORMAL", "PNEUMONIA")
    row = _test_csv(runs_dir, run_id)[f"test/PNEUMONIA/{known.name}"]
    assert p_known["probabilities"]["PNEUMONIA"] == pytest.approx(float(row["p_PNEUMONIA"]), abs=1e-5)
    thr = out["threshold"]
    assert p_known["label"] == ("PNEUMONIA" if p_known["probabilities"]["PNEUMONIA"] >= thr else "NORMAL")
    # the same bytes under another name are found in the cache; with the cache gone the backbone
    # recomputes them and gives the same probabilities (same settings, same seeded weights)
    copy = shutil.copy(known, tmp_path / "renamed.jpeg")
    run_info = json.loads((runs_dir / run_id / "run.json").read_text())
    cache_file = Path(run_info["caches"][0]["path"])
    moved = tmp_path / "moved.h5"
    shutil.move(cache_file, moved)
    try:
        gone = predict([copy], run_id, runs_dir)
        cache_file.write_bytes(moved.read_bytes()[:4096])  # truncated: unreadable, said so, not refused
        truncated = predict([copy], run_id, runs_dir)
    finally:
        shutil.move(moved, cache_file)
    again = gone["predictions"][0]
    assert not again["from_cache"] and not truncated["predictions"][0]["from_cache"]
    assert gone["notes"][:1] == [f"the run's cache {cache_file} is gone: its images went through the "
                                 "backbone again (same settings, same features)"]
    assert truncated["notes"][0].startswith(f"the run's cache {cache_file} cannot be read (")
    # the fixture's run has random weights: said, and nothing else (a test image and a new one)
    assert [n.split(":")[0] for n in out["notes"]] == ["the run's features come from randomly initialised "
                                                       "weights (--weights none), not ImageNet"]
    assert (p_known["seen"], p_new["seen"]) == ("test", "new")
    p_again = again["probabilities"]["PNEUMONIA"]
    assert p_again == pytest.approx(p_known["probabilities"]["PNEUMONIA"], abs=1e-3)


def test_cli_predict_json_and_table(trained, capsys) -> None:
    root, runs_dir, run_id = trained
    img = sorted((root / "test" / "NORMAL").iterdir())[0]
    assert cli(["predict", str(img), "--run", run_id, "--runs-dir", str(runs_dir), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["run"] == run_id and len(out["predictions"]) == 1
    assert cli(["predict", str(img), "--run", run_id, "--runs-dir", str(runs_dir)]) == 0
    table = capsys.readouterr().out
    assert "P(NORMAL)" in table and "cache" in table and ("NORMAL" in table.split("P(PNEUMONIA)")[-1])
    # probabilities to 4 decimals, as the threshold (at 3, 0.716 labelled NORMAL under threshold 0.7156)
    p = out["predictions"][0]["probabilities"]
    assert f"{p['NORMAL']:.4f}" in table and f"{p['PNEUMONIA']:.4f}" in table, table


def test_predictions_go_to_a_csv_with_a_summary_on_the_terminal(trained, tmp_path: Path, capsys,
                                                                monkeypatch) -> None:
    """The terminal table folds long paths (grep for a file name failed): --csv writes one row per image
    with the exact probabilities, and a path a spreadsheet would run as a formula is quoted."""
    root, runs_dir, run_id = trained
    shutil.copy(sorted((root / "test" / "NORMAL").iterdir())[0], tmp_path / "=cmd.jpeg")
    monkeypatch.chdir(tmp_path)
    img = "=cmd.jpeg"  # relative, as typed: a spreadsheet would run it
    out_csv = tmp_path / "out" / "predictions.csv"
    assert cli(["predict", str(root / "test"), str(img), "--run", run_id, "--runs-dir", str(runs_dir),
                "--csv", str(out_csv)]) == 0
    said = " ".join(capsys.readouterr().out.split())
    with open(out_csv, newline="") as fh:
        rows = list(csv.DictReader(fh))
    n = len(list((root / "test").rglob("*.jpeg"))) + 1
    assert len(rows) == n and f"{n} image(s) classified (NORMAL " in said and str(out_csv) in said
    assert list(rows[0]) == ["image", "label", "features", "p_NORMAL", "p_PNEUMONIA", "threshold", "seen",
                             "unusual", "skipped"]
    assert {r["skipped"] for r in rows} == {""}  # every image classified
    thr = json.loads((runs_dir / run_id / "run.json").read_text())["threshold"]["chosen"]
    assert {r["threshold"] for r in rows} == {repr(thr)} and {r["seen"] for r in rows} == {"test"}
    assert {r["unusual"] for r in rows} == {""}  # the fixture's 10 training images: too few for a reference
    from featcache.runs import threshold_text

    assert f"by threshold {threshold_text(thr)} on P(PNEUMONIA)" in said  # the rule, in the summary
    assert rows[-1]["image"] == "'=cmd.jpeg" and rows[-1]["features"] == "cache"
    direct = predict([root / "test"], run_id, runs_dir)["predictions"]
    for row, p in zip(rows, direct, strict=False):
        assert row["image"] == p["image"] and row["label"] == p["label"]
        assert float(row["p_PNEUMONIA"]) == p["probabilities"]["PNEUMONIA"]  # repr: no digits lost
    # `--csv -` made a file named "-"; it prints the same table on stdout, the summary on stderr
    assert cli(["predict", str(root / "test"), str(img), "--run", run_id, "--runs-dir", str(runs_dir),
                "--csv", "-"]) == 0
    printed = capsys.readouterr()
    assert printed.out == out_csv.read_bytes().decode("utf-8") and not (tmp_path / "-").exists()
    assert f"{n} image(s) classified (NORMAL " in " ".join(printed.err.split())
    both = ["predict", str(img), "--run", run_id, "--runs-dir", str(runs_dir), "--csv", "-", "--json"]
    assert cli(both) == 2
    assert "would both print on stdout" in " ".join(capsys.readouterr().err.split())
    # a file name that is no UTF-8 (surrogate escapes on Linux) crashed the writer half-way: escaped now,
    # as fit's prediction CSVs write it, and a write that fails leaves the previous file whole
    from featcache.predict import write_predictions_csv

    odd = {"classes": ["NORMAL", "PNEUMONIA"], "predictions": [
        {"image": "caf\udce9.jpeg", "label": "NORMAL", "from_cache": False,
         "probabilities": {"NORMAL": 0.75, "PNEUMONIA": 0.25}}]}
    write_predictions_csv(odd, out_csv)
    written = out_csv.read_text(encoding="utf-8").splitlines()[1]
    assert written.startswith("caf\\xe9.jpeg,NORMAL,backbone,0.75")
    odd["predictions"].append({"image": "x.jpeg", "label": "NORMAL", "from_cache": False,
                               "probabilities": {"NORMAL": object(), "PNEUMONIA": 0.5}})
    before = out_csv.read_bytes()
    with pytest.raises(TypeError):
        write_predictions_csv(odd, out_csv)
    assert out_csv.read_bytes() == before and [f.name for f in out_csv.parent.iterdir()] == [out_csv.name]
    # a --csv that cannot become a file is refused before any image is classified
    import featcache.predict as fp

    monkeypatch.setattr(fp, "predict", lambda *a, **k: pytest.fail("classified before checking --csv"))
    args = ["predict", str(img), "--run", run_id, "--runs-dir", str(runs_dir)]
    assert cli([*args, "--csv", str(tmp_path)]) == 2
    assert "is a folder; give a file name" in " ".join(capsys.readouterr().err.split())
    assert cli([*args, "--csv", str(tmp_path / "=cmd.jpeg" / "out.csv")]) == 2
    assert "=cmd.jpeg is a file, not a folder" in " ".join(capsys.readouterr().err.split())
    before = Path(img).read_bytes()  # `--csv` given the image itself replaced the X-ray with the table
    assert cli([*args, "--csv", str(img)]) == 2 and Path(img).read_bytes() == before
    assert "is named like an image" in " ".join(capsys.readouterr().err.split())


def test_tampered_model_is_refused(trained, tmp_path: Path, capsys) -> None:
    root, runs_dir, run_id = trained
    copy_dir = tmp_path / "runs"
    shutil.copytree(runs_dir / run_id, copy_dir / run_id)
    model = next((copy_dir / run_id / "model").iterdir())
    data = bytearray(model.read_bytes())
    data[-1] ^= 0xFF
    model.write_bytes(bytes(data))
    img = sorted((root / "test" / "NORMAL").iterdir())[0]
    with pytest.raises(RunError, match="does not match its recorded SHA-256"):
        predict([img], run_id, copy_dir)
    assert cli(["predict", str(img), "--run", run_id, "--runs-dir", str(copy_dir)]) != 0
    err = " ".join(capsys.readouterr().err.split())
    assert "SHA-256" in err and "plus --retrain" in err  # "fit the run again": fit skipped it as done
    # a hand-edited threshold in run.json labelled every image by it (a report audit): refused
    info = json.loads((copy_dir / run_id / "run.json").read_text())
    shutil.rmtree(copy_dir / run_id)
    shutil.copytree(runs_dir / run_id, copy_dir / run_id)
    assert info["threshold"]["chosen"] not in (None, 0.99)
    edited = {**info, "threshold": {**info["threshold"], "chosen": 0.99}}
    (copy_dir / run_id / "run.json").write_text(json.dumps(edited))
    with pytest.raises(RunError, match=r"chosen threshold \(0.99\) is not the .* plus --retrain"):
        predict([img], run_id, copy_dir)
    # a model file not recorded in run.json (e.g. dropped in by someone else) is never the one loaded
    info["artifacts"] = {}
    (copy_dir / run_id / "run.json").write_text(json.dumps(info))
    with pytest.raises(RunError, match="records no model files"):
        predict([img], run_id, copy_dir)


def test_each_file_is_listed_once(tmp_path: Path, monkeypatch) -> None:
    """A path given twice was classified twice; a JPEG without an extension named beside its folder was
    classified and also listed as skipped ("not an image file extension"), so --strict exited 2."""
    from featcache.predict import expand_images

    (tmp_path / "ne").mkdir()
    write_xray(tmp_path / "ne" / "a.jpeg", 1)
    write_xray(tmp_path / "ne" / "scan2.jpeg", 2).rename(tmp_path / "ne" / "scan2")  # no extension
    monkeypatch.chdir(tmp_path)
    rows = expand_images(["ne", "ne/scan2", "ne/a.jpeg", "./ne/a.jpeg"])
    assert sorted(os.path.normpath(p) for p, _ in rows) == ["ne/a.jpeg", "ne/scan2"]
    assert all(why is None for _, why in rows)


def test_predict_errors(trained, tmp_path: Path, capsys) -> None:
    root, runs_dir, run_id = trained
    img = sorted((root / "test" / "NORMAL").iterdir())[0]
    assert cli(["predict", str(img), "--run", "nope", "--runs-dir", str(runs_dir)]) != 0
    err = " ".join(capsys.readouterr().err.split())
    assert "no run 'nope'" in err and f"`featcache runs ls --runs-dir {runs_dir}` lists them" in err
    # the run's folder, as a shell completes it, names the same run
    assert cli(["predict", str(img), "--run", f"{runs_dir / run_id}/", "--runs-dir", str(runs_dir)]) == 0
    assert run_id in " ".join(capsys.readouterr().out.split())
    assert cli(["predict", str(img), "--run", str(runs_dir / run_id), "--runs-dir", str(tmp_path)]) == 2
    assert f"is a run of another runs folder than {tmp_path}; add --runs-dir {runs_dir}" in " ".join(
        capsys.readouterr().err.split())
    assert cli(["predict", str(tmp_path / "missing.jpeg"), "--run", run_id, "--runs-dir", str(runs_dir)]) != 0
    assert "does not exist" in " ".join(capsys.readouterr().err.split())
    bad = tmp_path / "bad.jpeg"
    bad.write_text("not an image")
    assert cli(["predict", str(bad), "--run", run_id, "--runs-dir", str(runs_dir)]) != 0
    assert "cannot decode" in " ".join(capsys.readouterr().err.split())


def test_weights_file_backbone_is_matched_by_sha256(tmp_path: Path) -> None:
    """A run whose backbone came from --weights FILE: new images need that file back, matched by hash."""
    from featcache.backbones import build_backbone

    root = make_kermany_tree(tmp_path / "data", n_normal=4, n_pneu=4, size=32)
    src = build_backbone(BackboneConfig("mobilenet-0.75", weights="none", image_size=32, seed=7))
    wfile = tmp_path / "mine.weights.h5"
    src.model.layers[2].save_weights(str(wfile))  # the keras.applications model inside the wrapper
    cache_dir, runs_dir = tmp_path / "cache", tmp_path / "runs"
    extract(discover(root), BackboneConfig("mobilenet-0.75", weights=str(wfile), image_size=32), cache_dir,
            ExtractOptions(batch_size=8))
    run_id = fit(root, "mobilenet-0.75", "logreg", FitOptions(cache_dir=cache_dir, runs_dir=runs_dir,
                 cv_folds=2, grid_args=["C=1"], n_boot=50)).runs[0].id
    new = write_xray(tmp_path / "new.jpeg", 123, size=40)
    with pytest.raises(RunError, match="--backbone-file"):
        predict([new], run_id, runs_dir)
    other = tmp_path / "other.weights.h5"
    build_backbone(BackboneConfig("mobilenet-0.75", weights="none", image_size=32, seed=8)) \
        .model.layers[2].save_weights(str(other))
    with pytest.raises(RunError, match="--backbone-file"):
        predict([new], run_id, runs_dir, backbone_files=[other])  # wrong file: no hash match
    out = predict([new], run_id, runs_dir, backbone_files=[other, wfile])
    assert not out["predictions"][0]["from_cache"]
    assert sum(out["predictions"][0]["probabilities"].values()) == pytest.approx(1.0)
    known = sorted((root / "test" / "NORMAL").iterdir())[0]  # cached rows need no file at all
    assert predict([known], run_id, runs_dir)["predictions"][0]["from_cache"]
    assert cli(["predict", str(new), "--run", run_id, "--runs-dir", str(runs_dir),
                "--backbone-file", str(wfile), "--json"]) == 0


def test_bad_images_are_skipped_and_folders_expanded(trained, tmp_path: Path, capsys, monkeypatch) -> None:
    """One bad file does not cost the others their predictions; chunks give the same numbers as one call."""
    import featcache.predict as fp

    root, runs_dir, run_id = trained
    folder = root / "test" / "PNEUMONIA"  # cached rows, read as a folder of images
    new = write_xray(tmp_path / "new" / "a.jpeg", 7, size=40)  # needs the backbone
    (tmp_path / "new" / "notes.txt").write_text("not an image: listed as skipped, not dropped unseen")
    (tmp_path / "new" / ".DS_Store").write_text("hidden: left out quietly")
    bad = tmp_path / "bad.jpeg"
    bad.write_bytes(new.read_bytes()[:200])  # truncated JPEG
    missing = tmp_path / "missing.png"
    whole = predict([folder, tmp_path / "new", bad, missing], run_id, runs_dir)
    names = [Path(p["image"]).name for p in whole["predictions"]]
    assert names == sorted(f.name for f in folder.iterdir()) + ["a.jpeg"]
    assert [(Path(s["path"]).name, s["reason"].split(":")[0]) for s in whole["skipped"]] == [
        ("notes.txt", "not an image file extension (.txt)"), ("bad.jpeg", "cannot decode"),
        ("missing.png", "does not exist")]
    # in chunks of 2 (a chunk of only cached rows, one of a cached row and the bad file, ...) nothing moves
    monkeypatch.setattr(fp, "PREDICT_CHUNK", 2)
    chunked = predict([folder, tmp_path / "new", bad, missing], run_id, runs_dir)
    assert [p["image"] for p in chunked["predictions"]] == [p["image"] for p in whole["predictions"]]
    for a, b in zip(chunked["predictions"], whole["predictions"], strict=True):
        assert a["from_cache"] == b["from_cache"] and a["label"] == b["label"]
        assert a["probabilities"]["PNEUMONIA"] == pytest.approx(b["probabilities"]["PNEUMONIA"], abs=1e-5)
    assert chunked["skipped"] == whole["skipped"]
    # the CLI prints what it could and lists the rest; --strict makes the skip an exit status
    args = ["predict", str(new), str(bad), "--run", run_id, "--runs-dir", str(runs_dir)]
    assert cli(args) == 0
    captured = capsys.readouterr()
    assert "a.jpeg" in captured.out and "1 image(s) skipped" in captured.err and "bad.jpeg" in captured.err
    assert cli([*args, "--strict", "--json"]) == 2
    entry = json.loads(capsys.readouterr().out)["skipped"][0]  # {path, reason}, as extract lists them
    assert set(entry) == {"path", "reason"} and entry["path"] == str(bad) and "decode" in entry["reason"]
    # a file named on the command line that the user may not read (simulated: root reads everything) was
    # a usage error that classified nothing (the argument's readable check): it is one skipped image
    import os

    real_access = os.access

    def access(path, mode, *a, **k) -> bool:
        return False if Path(path) == bad and mode & os.R_OK else real_access(path, mode, *a, **k)

    monkeypatch.setattr(os, "access", access)
    assert cli(args) == 0
    captured = capsys.readouterr()
    assert "a.jpeg" in captured.out and "Invalid value" not in captured.err
    monkeypatch.setattr(os, "access", real_access)
    # nothing usable at all is an error, with the first reason
    with pytest.raises(DataError, match="none of the 2 path.*does not exist"):
        predict([missing, tmp_path / "empty_dir_missing"], run_id, runs_dir)


def test_skipped_images_are_rows_of_the_csv(trained, tmp_path: Path, capsys) -> None:
    """Skipped images were listed on stderr only, not in the --csv table: a user joining it to their list of
    images lost them without a word. Each is a row of its own, its reason in column skipped, the rest empty;
    classified rows keep their cells and an empty skipped."""
    root, runs_dir, run_id = trained
    good = sorted((root / "test" / "NORMAL").iterdir())[0]
    bad = tmp_path / "bad.jpeg"
    bad.write_bytes(good.read_bytes()[:200])  # truncated JPEG
    text = tmp_path / "notes.jpeg"
    text.write_text("a text file named like an image")
    missing = tmp_path / "missing.png"
    out_csv = tmp_path / "p.csv"
    args = ["predict", str(bad), str(good), str(text), str(missing), "--run", run_id, "--runs-dir",
            str(runs_dir), "--csv"]
    assert cli([*args, str(out_csv)]) == 0
    said = " ".join(capsys.readouterr().out.split())
    with open(out_csv, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["image"] for r in rows] == [str(good), str(bad), str(text), str(missing)]
    assert rows[0]["skipped"] == "" and rows[0]["label"] in ("NORMAL", "PNEUMONIA")
    assert rows[0]["features"] == "cache" and 0 <= float(rows[0]["p_PNEUMONIA"]) <= 1
    empty = ["label", "features", "p_NORMAL", "p_PNEUMONIA", "threshold", "seen", "unusual"]
    for r in rows[1:]:
        assert [r[c] for c in empty] == [""] * len(empty), r
    assert rows[1]["skipped"].startswith("cannot decode") and rows[2]["skipped"].startswith("cannot decode")
    assert rows[3]["skipped"] == "does not exist"
    assert "3 skipped image(s) as rows of their own (column skipped)" in said
    assert cli([*args, "-"]) == 0  # the same table on stdout
    assert capsys.readouterr().out == out_csv.read_bytes().decode("utf-8")


def test_a_csv_is_written_when_every_image_is_skipped(trained, tmp_path: Path, capsys) -> None:
    """Skipped images are rows of --csv, yet a call that skipped every image wrote no file at all: a script
    reading it next failed, or read an earlier call's predictions left at that path. The CSV now holds the
    skipped rows, and the call still fails (exit 2), saying where they are."""
    root, runs_dir, run_id = trained
    bad = tmp_path / "bad.jpeg"
    bad.write_bytes(sorted((root / "test" / "NORMAL").iterdir())[0].read_bytes()[:200])  # truncated JPEG
    missing = tmp_path / "missing.png"
    out_csv = tmp_path / "out" / "p.csv"
    args = ["predict", str(bad), str(missing), "--run", run_id, "--runs-dir", str(runs_dir), "--csv"]
    assert cli([*args, str(out_csv)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "none of the 2 path(s) given or found could be classified" in err
    assert ("The CSV of the 2 skipped path(s), each with its reason in column skipped, is written to "
            f"{out_csv}") in err
    with open(out_csv, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["image", "label", "features", "p_NORMAL", "p_PNEUMONIA", "threshold", "seen",
                             "unusual", "skipped"]
    assert [r["image"] for r in rows] == [str(bad), str(missing)]
    assert rows[0]["skipped"].startswith("cannot decode") and rows[1]["skipped"] == "does not exist"
    assert all(r["label"] == "" and r["p_PNEUMONIA"] == "" for r in rows)
    assert cli([*args, "-"]) == 2  # the same table on stdout, the error on stderr
    printed = capsys.readouterr()
    assert printed.out == out_csv.read_bytes().decode("utf-8") and "is printed above" in printed.err
    with pytest.raises(DataError, match="none of the 2 path"):  # the library's error is unchanged
        predict([bad, missing], run_id, runs_dir)


def test_json_is_printed_when_every_image_is_skipped(trained, tmp_path: Path, capsys) -> None:
    """`predict junk --json` that skipped every image printed no JSON (only the error), while --csv writes
    its skipped rows then: a script parsing stdout failed on an empty string. Now the JSON object, with
    every skipped path and its reason, is printed, and the call still exits 2."""
    root, runs_dir, run_id = trained
    bad = tmp_path / "bad.jpeg"
    bad.write_bytes(sorted((root / "test" / "NORMAL").iterdir())[0].read_bytes()[:200])  # truncated JPEG
    missing = tmp_path / "missing.png"
    assert cli(["predict", str(bad), str(missing), "--run", run_id, "--runs-dir", str(runs_dir),
                "--json"]) == 2
    printed = capsys.readouterr()
    out = json.loads(printed.out)
    assert out["predictions"] == [] and [s["path"] for s in out["skipped"]] == [str(bad), str(missing)]
    assert out["skipped"][1]["reason"] == "does not exist"
    err = " ".join(printed.err.split())
    assert "none of the 2 path(s) given or found could be classified" in err
    assert "The JSON printed above lists the 2 skipped path(s)" in err


def test_an_existing_csv_is_kept_unless_force(trained, tmp_path: Path, capsys, monkeypatch) -> None:
    """--csv out.csv replaced an earlier prediction file without a word: a rerun on the next batch under the
    same name lost the first batch's labels. It is refused before any image is classified (a link to it
    too); --force replaces it; a device is written into as before."""
    import featcache.predict as fp

    root, runs_dir, run_id = trained
    img = str(sorted((root / "test" / "NORMAL").iterdir())[0])
    earlier = tmp_path / "out.csv"
    earlier.write_text("image,label\nbatch1/a.jpeg,PNEUMONIA\n")
    before = earlier.read_bytes()
    link = tmp_path / "link.csv"
    link.symlink_to(earlier)
    real_predict, called = fp.predict, []
    monkeypatch.setattr(fp, "predict", lambda *a, **k: called.append(a) or real_predict(*a, **k))
    args = ["predict", img, "--run", run_id, "--runs-dir", str(runs_dir), "--csv"]
    for target in (earlier, link):
        assert cli([*args, str(target)]) == 2
        err = " ".join(capsys.readouterr().err.split())
        assert f"--csv {target} already exists (an earlier prediction file?); add --force to replace" in err
    assert earlier.read_bytes() == before and not called
    assert cli([*args, str(earlier), "--force"]) == 0
    with open(earlier, newline="") as fh:
        assert [r["image"] for r in csv.DictReader(fh)] == [img]
    assert cli([*args, "/dev/null"]) == 0 and len(called) == 2


def test_images_are_read_from_a_list_file(trained, tmp_path: Path, capsys) -> None:
    """A list of images was itself "cannot decode: not an image" (predict took paths on the command line
    only, and xargs over a long list ran it several times, each --csv replacing the last). --images-from
    reads one path per line, relative to the list's folder, beside any IMAGES given."""
    root, runs_dir, run_id = trained
    imgs = sorted((root / "test" / "NORMAL").iterdir())[:2]
    lists = tmp_path / "lists"
    lists.mkdir()
    shutil.copy(imgs[0], lists / "near.jpeg")
    (lists / "new.txt").write_bytes(f"near.jpeg\r\n\n{imgs[1]}\nmissing.jpeg\n".encode())
    out_csv = tmp_path / "p.csv"
    extra = sorted((root / "test" / "PNEUMONIA").iterdir())[0]
    assert cli(["predict", str(extra), "--images-from", str(lists / "new.txt"), "--run", run_id,
                "--runs-dir", str(runs_dir), "--csv", str(out_csv)]) == 0
    with open(out_csv, newline="") as fh:
        rows = {r["image"]: r for r in csv.DictReader(fh)}
    assert set(rows) == {str(extra), str(lists / "near.jpeg"), str(imgs[1]), str(lists / "missing.jpeg")}
    assert rows[str(lists / "near.jpeg")]["features"] == "cache"  # the same bytes as a test image
    assert rows[str(imgs[1])]["label"] in ("NORMAL", "PNEUMONIA")
    capsys.readouterr()
    assert cli(["predict", "--images-from", str(tmp_path / "nolist.txt"), "--run", run_id, "--runs-dir",
                str(runs_dir)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"--images-from {tmp_path / 'nolist.txt'} cannot be read" in err
    assert cli(["predict", "--images-from", str(imgs[0]), "--run", run_id, "--runs-dir", str(runs_dir)]) == 2
    assert "not a text file with one image path per line" in " ".join(capsys.readouterr().err.split())


def test_a_manifest_given_to_images_from_gives_its_path_column(trained, tmp_path: Path, capsys) -> None:
    """A --data manifest given to --images-from was read line by line: its header and each
    "image.jpeg,NORMAL" line became a missing file, and predict ended with "none of the 3 path(s) could be
    classified". Its path column is read now (relative to its folder, as --data reads it); a CSV without
    one is refused, naming the formats read; a text list of names holding commas is read as before."""
    from featcache.predict import read_image_list

    root, runs_dir, run_id = trained
    imgs = sorted((root / "test" / "NORMAL").iterdir())[:2]
    lists = tmp_path / "lists"
    lists.mkdir()
    shutil.copy(imgs[0], lists / "near, 1.jpeg")
    (lists / "manifest.csv").write_text(f'label,Path,split\r\nNORMAL,"near, 1.jpeg",test\r\n,,\r\n'
                                        f"PNEUMONIA,{imgs[1]},\r\n", encoding="utf-8-sig")  # as Excel saves
    out_csv = tmp_path / "p.csv"
    args = ["--run", run_id, "--runs-dir", str(runs_dir)]
    assert cli(["predict", "--images-from", str(lists / "manifest.csv"), *args, "--csv", str(out_csv)]) == 0
    with open(out_csv, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["image"], r["skipped"]) for r in rows] == [(str(lists / "near, 1.jpeg"), ""),
                                                          (str(imgs[1]), "")]
    assert rows[0]["features"] == "cache"  # the same bytes as a test image: the manifest's labels unused
    capsys.readouterr()
    (lists / "labels.csv").write_text("filename,label\nnear, 1.jpeg,NORMAL\n")
    assert cli(["predict", "--images-from", str(lists / "labels.csv"), *args]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert (f"--images-from {lists / 'labels.csv'} is a table whose header names no path column (its first "
            "line: 'filename,label')") in err and "(path,label[,split][,group])" in err
    (lists / "names.txt").write_text("near, 1.jpeg\n")
    assert read_image_list(lists / "names.txt") == [str(lists / "near, 1.jpeg")]
    (lists / "gap.csv").write_text("path,label\n,NORMAL\n")
    with pytest.raises(DataError, match="line 2 has an empty path"):
        read_image_list(lists / "gap.csv")


def test_damaged_cached_rows_go_through_the_backbone_again(trained, tmp_path: Path) -> None:
    """A row changed in the run's cache after writing (here NaN) made predict fail for every image, though a
    cache that is gone or unreadable only sends its images through the backbone. Now the damaged rows'
    images do the same (same features, same probabilities), with a note; the other rows are reused."""
    import h5py

    root, runs_dir, run_id = trained
    info = json.loads((runs_dir / run_id / "run.json").read_text())
    cache_file = Path(info["caches"][0]["path"])
    images = sorted((root / "test" / "NORMAL").iterdir())[:2]
    before = predict(images, run_id, runs_dir)
    assert all(p["from_cache"] for p in before["predictions"])
    backup = tmp_path / "backup.h5"
    shutil.copy(cache_file, backup)
    try:
        with h5py.File(cache_file, "r+") as h:
            keys = [k.decode() for k in h["keys"][:]]
            h["features"][keys.index(before["predictions"][0]["key"]), 0] = np.nan
        after = predict(images, run_id, runs_dir)
        assert [p["from_cache"] for p in after["predictions"]] == [False, True]
        for a, b in zip(after["predictions"], before["predictions"], strict=True):
            np.testing.assert_allclose(list(a["probabilities"].values()), list(b["probabilities"].values()),
                                       atol=1e-5)
        assert any(f"1 cached row(s) of {cache_file} changed after they were written" in n
                   for n in after["notes"])
    finally:
        shutil.copy(backup, cache_file)


def test_dicom_files_are_called_dicom_with_what_to_do(trained, tmp_path: Path) -> None:
    """A hospital's X-rays come as DICOM: a .dcm in a folder was "not an image file extension (.dcm)", and
    one given by name or under an image extension "not an image (unrecognised format)", neither saying
    that featcache does not read DICOM or that a PNG export would do."""
    root, runs_dir, run_id = trained
    dicom = b"\x00" * 128 + b"DICM" + b"\x02\x00\x00\x00UL\x04\x00" + bytes(range(200))  # preamble, magic
    scans = tmp_path / "scans"
    scans.mkdir()
    (scans / "chest.dcm").write_bytes(dicom)
    (scans / "exported.png").write_bytes(dicom)  # a DICOM under an image extension: found by its magic
    good = shutil.copy(sorted((root / "test" / "NORMAL").iterdir())[0], scans / "good.jpeg")
    out = predict([scans], run_id, runs_dir)
    assert [p["image"] for p in out["predictions"]] == [str(good)]  # the good one still classified
    reasons = {Path(s["path"]).name: s["reason"] for s in out["skipped"]}
    assert set(reasons) == {"chest.dcm", "exported.png"}
    for reason in reasons.values():
        assert "DICOM, which featcache does not read" in reason and "export it as PNG" in reason
    assert reasons["chest.dcm"].startswith("not an image file extension (.dcm")


def test_a_broken_symlink_is_called_so(tmp_path: Path) -> None:
    """predict words a dangling link as extract does, not as a missing file."""
    from featcache import predict as fp

    link = tmp_path / "link.jpeg"
    link.symlink_to(tmp_path / "gone.jpeg")
    assert fp._read_image(str(link)) == "broken symlink"
    assert fp._read_image(str(tmp_path / "nothing.jpeg")) == "does not exist"


def test_symlinked_folders_are_followed_as_discovery_follows_them(trained, tmp_path: Path) -> None:
    """A folder whose images sit behind a symlinked sub-folder gave "a folder with no image files"
    (os.walk does not follow links); beside a real image the linked ones were dropped without a word.
    A link back up the tree is listed as a loop, not followed forever."""
    root, runs_dir, run_id = trained
    new = tmp_path / "new"
    write_xray(new / "own.jpeg", 3, size=40)
    (new / "linked").symlink_to(root / "test" / "NORMAL", target_is_directory=True)
    (new / "loop").symlink_to(new, target_is_directory=True)
    out = predict([new], run_id, runs_dir)
    names = sorted(Path(p["image"]).name for p in out["predictions"])
    assert names == sorted(["own.jpeg", *(f.name for f in (root / "test" / "NORMAL").iterdir())])
    assert [(Path(s["path"]).name, s["reason"]) for s in out["skipped"]] == [("loop", "symlink loop")]
    only_link = tmp_path / "only"
    only_link.mkdir()
    (only_link / "x").symlink_to(root / "test" / "NORMAL", target_is_directory=True)
    assert len(predict([only_link], run_id, runs_dir)["predictions"]) == len(names) - 1


def test_missing_imagenet_weights_are_explained_in_predicts_terms() -> None:
    """extract's advice ("use --weights none or --weights PATH") named options predict does not have:
    predict must use the run's weights, so it says which file to put where."""
    from featcache.backbones import keras_models_dir
    from featcache.predict import _missing_imagenet

    text = _missing_imagenet(BackboneConfig("mobilenet-0.75", weights="imagenet"))
    assert "put mobilenet_7_5_224_tf_no_top.h5 in " + str(keras_models_dir()) in text
    assert "--weights" not in text and "the weights the run was trained on" in text


def test_a_tiny_image_gets_its_label_and_a_note(trained, tmp_path: Path) -> None:
    """A 5x5 image was labelled PNEUMONIA at 0.74 like any X-ray, without a word. It is still classified
    (the user may know better), and a note names it: upscaled more than 4x to the backbone's 32 px."""
    from PIL import Image

    root, runs_dir, run_id = trained
    Image.fromarray(np.full((5, 5, 3), 120, dtype=np.uint8)).save(tmp_path / "tiny.png")
    fine = write_xray(tmp_path / "fine.jpeg", 5, size=16)  # 2x: not noted
    out = predict([tmp_path / "tiny.png", fine], run_id, runs_dir)
    assert len(out["predictions"]) == 2
    random = [n for n in out["notes"] if n.startswith("the run's features come from randomly")]  # fixture's
    assert [n for n in out["notes"] if n not in random] == [
        f"1 image(s) smaller than 8 px on a side were upscaled more than 4 times to the backbone's input "
        f"(e.g. {tmp_path / 'tiny.png'}, 5x5): their labels carry little information."]
    assert predict([fine], run_id, runs_dir)["notes"] == random


def test_an_animated_gif_or_multi_page_tiff_is_classified_from_its_first_frame_with_a_note(
        trained, tmp_path: Path) -> None:
    """A 3-page TIFF and a 2-frame GIF each got one label like a single X-ray, without a word that the
    other frames were never looked at. They are still classified (as extract reads them), and a note
    says so; a one-frame GIF is not noted."""
    from PIL import Image

    root, runs_dir, run_id = trained
    pages = [Image.fromarray(np.full((32, 32), v, dtype=np.uint8)) for v in (40, 120, 200)]
    pages[0].save(tmp_path / "scan.tiff", save_all=True, append_images=pages[1:])
    pages[0].save(tmp_path / "cine.gif", save_all=True, append_images=pages[1:2])
    pages[0].save(tmp_path / "still.gif")
    out = predict([tmp_path / "scan.tiff", tmp_path / "cine.gif", tmp_path / "still.gif"], run_id, runs_dir)
    assert len(out["predictions"]) == 3
    assert [n for n in out["notes"] if "frames" in n] == [
        "2 image(s) hold several frames (an animated GIF or a multi-page TIFF; "
        f"e.g. {tmp_path / 'scan.tiff'}, 3 frames): each was classified from its first frame only; "
        "save the frame to classify as an image "
        "of its own."]
    assert not [n for n in predict([tmp_path / "still.gif"], run_id, runs_dir)["notes"] if "frames" in n]


def test_keras_is_asked_for_only_when_an_image_needs_the_backbone(trained, tmp_path: Path) -> None:
    root, runs_dir, run_id = trained
    known = sorted((root / "test" / "NORMAL").iterdir())[:2]
    calls: list[int] = []
    predict(known, run_id, runs_dir, before_backend=lambda: calls.append(1))
    assert calls == []  # a logreg run and cached images: no backbone, no Keras
    new = [write_xray(tmp_path / f"new{i}.jpeg", 500 + i, size=48) for i in range(2)]
    out = predict([*known, *new], run_id, runs_dir, before_backend=lambda: calls.append(1))
    assert calls == [1]  # once, however many images or views need it
    assert [p["from_cache"] for p in out["predictions"]] == [True, True, False, False]


def test_skipped_files_beside_cached_images_build_no_backbone(trained, tmp_path: Path, monkeypatch) -> None:
    """A truncated JPEG and a notes.txt named beside a cached image made predict import TensorFlow and build
    the backbone (6.9 s against 1.6 s) only to skip them: no image needed it."""
    import featcache.backbones as bmod

    root, runs_dir, run_id = trained
    known = sorted((root / "test" / "NORMAL").iterdir())[0]
    (tmp_path / "trunc.jpeg").write_bytes(write_xray(tmp_path / "x.jpeg", 7, size=48).read_bytes()[:300])
    (tmp_path / "notes.txt").write_text("reading notes\n")
    calls: list[int] = []
    monkeypatch.setattr(bmod, "build_backbone", lambda *a, **k: calls.append(2) or pytest.fail("built"))
    out = predict([known, tmp_path / "trunc.jpeg", tmp_path / "notes.txt"], run_id, runs_dir,
                  before_backend=lambda: calls.append(1))
    assert calls == []
    assert [p["from_cache"] for p in out["predictions"]] == [True]
    assert [s["path"] for s in out["skipped"]] == [str(tmp_path / "trunc.jpeg"), str(tmp_path / "notes.txt")]
    assert all(s["reason"].startswith("cannot decode") for s in out["skipped"])


def test_cli_predict_of_cached_images_does_not_import_tensorflow(trained) -> None:
    """In a fresh process, as a user's call: the import took 3-7 s of a 7 s call that needed none of it."""
    import subprocess
    import sys

    root, runs_dir, run_id = trained
    img = sorted((root / "test" / "NORMAL").iterdir())[0]
    argv = ["predict", str(img), "--run", run_id, "--runs-dir", str(runs_dir), "--json"]
    code = ("import sys\nfrom featcache.cli.app import run\n"
            f"rc = run({argv!r})\n"
            "print('RESULT', rc, 'tensorflow' in sys.modules, 'keras' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert "RESULT 0 False False" in done.stdout, done.stdout[-2000:] + done.stderr[-2000:]


def test_predict_says_when_a_one_channel_saved_model_now_reads_the_luma(tmp_path: Path):
    """A run made on a 1-channel saved model before it was fed the luma trained on red-channel features;
    predict now feeds it the luma: the same for grey X-rays, not for colour images, and it says so."""
    import keras

    from featcache.hashing import sha256_file
    from featcache.predict import _Extractor

    keras.utils.set_random_seed(0)
    inp = keras.Input((32, 32, 1))
    x = keras.layers.Conv2D(4, 3, activation="relu", name="feat_conv")(keras.layers.Rescaling(1 / 255)(inp))
    path = tmp_path / "gray.keras"
    keras.Model(inp, keras.layers.GlobalAveragePooling2D()(x)).save(path)
    config = {"backbone": "saved-gray", "weights": "saved", "weights_file_sha256": sha256_file(path),
              "layer": "feat_conv", "pooling": "avg", "image_size": 32}
    old = _Extractor({"path": str(tmp_path / "gone.h5"), "name": "saved-gray", "config": config}, [path])
    old._build()
    assert "now gets each image's luma" in old.input_note
    new = _Extractor({"path": str(tmp_path / "gone.h5"), "name": "saved-gray",
                      "config": {**config, "input_channels": "luma"}}, [path])
    new._build()
    assert new.input_note is None


def test_a_run_of_a_pad_cache_made_before_full_size_boxes_is_noted(tmp_path: Path) -> None:
    """predict decodes new images with the full-size pad/crop box; a run whose cache was made before (no
    resize_box in its config) trained on boxes up to a pixel apart for large JPEGs, without a word."""
    from featcache.predict import _Extractor

    gone = str(tmp_path / "gone.h5")
    old = _Extractor({"path": gone, "config": {"resize": "pad"}})
    assert old.box_note is not None and "--resize pad before its boxes came from the full" in old.box_note
    for config in ({"resize": "pad", "resize_box": "full size"}, {"resize": "squash"}, {}):
        assert _Extractor({"path": gone, "config": config}).box_note is None


def test_predict_says_which_images_the_run_was_fitted_on(trained, tmp_path: Path, capsys) -> None:
    """Nothing told a run's own training images from new ones: their labels (0.986 accurate on 72 of them,
    against 0.944 out of fold) read as an estimate of accuracy."""
    root, runs_dir, run_id = trained
    train_img = sorted((root / "train" / "NORMAL").iterdir())[0]
    test_img = sorted((root / "test" / "NORMAL").iterdir())[0]
    new = write_xray(tmp_path / "new.jpeg", 4242, size=48)
    copy = shutil.copy(train_img, tmp_path / "renamed.jpeg")  # the same bytes: the same image
    out = predict([train_img, test_img, new, copy], run_id, runs_dir)
    assert [p["seen"] for p in out["predictions"]] == ["training", "test", "new", "training"]
    said = [n for n in out["notes"] if "among the run's own training images" in n]
    assert len(said) == 1 and said[0].startswith("2 image(s)")
    args = ["predict", str(train_img), str(new), "--run", run_id, "--runs-dir", str(runs_dir)]
    assert cli(args) == 0
    printed = capsys.readouterr()
    assert "seen" in printed.out and "training" in printed.out and "new" in printed.out
    assert "own training images" in " ".join(printed.err.split())
    # a run fitted before the keys were recorded: unknown, and said once
    keys = runs_dir / run_id / "seen_keys.npz"
    saved = keys.read_bytes()
    keys.unlink()
    try:
        old = predict([train_img], run_id, runs_dir)
    finally:
        keys.write_bytes(saved)
    assert old["predictions"][0]["seen"] is None
    assert any("cannot say whether these images were among its training images" in n for n in old["notes"])


def test_a_copy_of_a_training_image_under_its_name_is_noted(trained, tmp_path: Path) -> None:
    """The 42 full-size Kermany originals of a run's training images all read seen=new (other bytes, so
    another key), and their labels passed for held-out ones; they keep the training images' file names."""
    from PIL import Image

    root, runs_dir, run_id = trained
    train_img = sorted((root / "train" / "PNEUMONIA").iterdir())[0]
    bigger = tmp_path / "originals" / train_img.name.upper()  # the full-size copy, its name kept
    bigger.parent.mkdir()
    Image.open(train_img).resize((64, 64)).save(bigger, format="JPEG", quality=95)
    new = write_xray(tmp_path / "unrelated.jpeg", 4343, size=48)
    out = predict([bigger, new], run_id, runs_dir)
    assert [p["seen"] for p in out["predictions"]] == ["new", "new"]  # by content: neither is the run's
    said = [n for n in out["notes"] if "have the file name of one of the run's own" in n]
    assert len(said) == 1 and said[0].startswith("1 image(s)")
    assert str(bigger) in said[0] and f"PNEUMONIA/{train_img.name}" in said[0]
    alone = predict([new], run_id, runs_dir)  # an unrelated name: no such note
    assert not [n for n in alone["notes"] if "file name of one of the run's own" in n]


def test_csv_into_a_pipe_a_link_or_a_run_folder(trained, tmp_path: Path, capsys) -> None:
    """--csv replaced whatever was at the path: /dev/null became a regular file (as root), a named pipe and
    a symbolic link were replaced, and `--csv runs/<id>/run.json` destroyed the run."""
    import stat
    import threading

    from featcache.predict import write_predictions_csv

    root, runs_dir, run_id = trained
    out = predict([sorted((root / "test" / "NORMAL").iterdir())[0]], run_id, runs_dir)
    fifo = tmp_path / "pipe.csv"
    os.mkfifo(fifo)
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_text(encoding="utf-8")), daemon=True)
    reader.start()
    write_predictions_csv(out, fifo)
    reader.join(timeout=20)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and got and got[0].startswith("image,label,")
    real = tmp_path / "real.csv"
    real.write_text("old")
    link = tmp_path / "link.csv"
    link.symlink_to(real)
    write_predictions_csv(out, link)
    assert link.is_symlink() and real.read_text(encoding="utf-8").startswith("image,label,")
    record = (runs_dir / run_id / "run.json").read_bytes()
    img = str(sorted((root / "test" / "NORMAL").iterdir())[0])
    for inside in (runs_dir / run_id / "run.json", runs_dir / run_id / "mine.csv",
                   runs_dir / run_id / "model" / "x.csv"):
        assert cli(["predict", img, "--run", run_id, "--runs-dir", str(runs_dir), "--csv", str(inside)]) == 2
        assert "is inside the run folder" in " ".join(capsys.readouterr().err.split())
    assert (runs_dir / run_id / "run.json").read_bytes() == record
    assert not (runs_dir / run_id / "mine.csv").exists()


@pytest.mark.skipif(not Path("/sys/kernel").is_dir(), reason="needs sysfs, which refuses new files")
def test_a_csv_folder_that_refuses_files_stops_predict_before_any_image(trained, tmp_path: Path, capsys,
                                                                         monkeypatch) -> None:
    """A --csv in a read-only folder failed only after every image was classified, with a bare "the
    operating system refused a file operation" and none of the labels shown. sysfs refuses new files to
    root as well, so this runs whoever runs the tests."""
    import featcache.predict as predict_mod

    root, runs_dir, run_id = trained
    img = str(sorted((root / "test" / "NORMAL").iterdir())[0])
    called: list[object] = []
    monkeypatch.setattr(predict_mod, "predict", lambda *a, **k: called.append(a))
    for target in ("/sys/featcache-test.csv", "/sys/kernel/featcache-missing/out.csv"):
        assert cli(["predict", img, "--run", run_id, "--runs-dir", str(runs_dir), "--csv", target]) == 2
        err = " ".join(capsys.readouterr().err.split())
        assert f"--csv {target} cannot be written" in err and "refuses new files" in err
    assert not called  # refused before the forward passes
    assert not Path("/sys/kernel/featcache-missing").exists()
    monkeypatch.undo()
    fine = tmp_path / "new" / "folder" / "p.csv"  # a writable place, missing folders included, still works
    assert cli(["predict", img, "--run", run_id, "--runs-dir", str(runs_dir), "--csv", str(fine)]) == 0
    assert fine.read_text(encoding="utf-8").startswith("image,label,")
    assert sorted(x.name for x in fine.parent.iterdir()) == ["p.csv"]  # no probe left behind


def test_a_run_whose_result_files_changed_is_used_with_a_note(trained, tmp_path: Path) -> None:
    """`runs ls` called the run damaged (predictions_test.csv edited) while predict used it without a word."""
    root, runs_dir, run_id = trained
    csv_file = runs_dir / run_id / "predictions_test.csv"
    saved = csv_file.read_bytes()
    csv_file.write_bytes(saved + b"\n")
    try:
        out = predict([sorted((root / "test" / "NORMAL").iterdir())[0]], run_id, runs_dir)
    finally:
        csv_file.write_bytes(saved)
    assert any(n.startswith("the run's predictions_test.csv was changed after the fit") for n in out["notes"])
    assert not any("changed after the fit" in n for n in predict([root / "test"], run_id, runs_dir)["notes"])


def test_a_backbone_file_is_checked_before_any_image_even_when_all_are_cached(trained, tmp_path: Path,
                                                                              capsys) -> None:
    """Checked only where an image missed the cache: a mistyped --backbone-file passed without a word when
    every image was cached, and a file given to a run built by name was ignored."""
    root, runs_dir, run_id = trained
    img = str(sorted((root / "test" / "NORMAL").iterdir())[0])  # cached: no backbone would be built
    args = ["predict", img, "--run", run_id, "--runs-dir", str(runs_dir), "--backbone-file"]
    assert cli([*args, str(tmp_path / "typo.h5")]) == 2
    assert "typo.h5 does not exist" in " ".join(capsys.readouterr().err.split())
    real = tmp_path / "w.h5"
    real.write_bytes(b"weights")
    assert cli([*args, str(real)]) == 2
    assert "builds its backbone by name (none weights), not from a file: --backbone-file is not used" in \
        " ".join(capsys.readouterr().err.split())


def test_csv_to_dev_stdout_appends_and_a_link_loop_is_refused(trained, tmp_path: Path, capfd) -> None:
    """A review: /dev/stdout was resolved to /proc/self/fd/1 and on to "pipe:[N]" (the write failed after
    every forward pass) or to the log file the shell appends to (renamed over: the log was wiped); a link
    loop raised a bare RuntimeError."""
    from featcache.predict import write_predictions_csv

    root, runs_dir, run_id = trained
    img = sorted((root / "test" / "NORMAL").iterdir())[0]
    out = predict([img], run_id, runs_dir)
    capfd.readouterr()
    print("an earlier log line", flush=True)
    write_predictions_csv(out, "/dev/stdout")
    got = capfd.readouterr().out
    assert got.startswith("an earlier log line\nimage,label,features,") and img.name in got
    loop = tmp_path / "loop.csv"
    loop.symlink_to(loop)
    assert cli(["predict", str(img), "--run", run_id, "--runs-dir", str(runs_dir), "--csv", str(loop)]) == 2
    assert "is a symbolic link that loops" in " ".join(capfd.readouterr().err.split())


def test_an_unreadable_seen_keys_file_is_said_not_a_traceback(trained) -> None:
    root, runs_dir, run_id = trained
    keys = runs_dir / run_id / "seen_keys.npz"
    saved = keys.read_bytes()
    try:
        for damage in (b"", saved[: len(saved) // 2]):
            keys.write_bytes(damage)
            got = predict([sorted((root / "train" / "NORMAL").iterdir())[0]], run_id, runs_dir)
            assert got["predictions"][0]["seen"] is None
            assert any(n.startswith("its seen_keys.npz cannot be read") for n in got["notes"])
    finally:
        keys.write_bytes(saved)


def test_images_unlike_the_training_images_are_marked_unusual(tmp_path: Path, capsys, monkeypatch) -> None:
    """A head labels anything: fit stores a reference of the training features (PCA and limits set by
    patients held out of it) and predict marks images beyond it, with a note and a CSV column. Synthetic
    X-rays of the same kind pass; a black image and colour noise do not. A damaged reference is no error."""
    from PIL import Image

    monkeypatch.setenv("COLUMNS", "250")
    root = make_kermany_tree(tmp_path / "data", n_normal=100, n_pneu=100, splits=("train",), size=32)
    cache_dir, runs_dir = tmp_path / "cache", tmp_path / "runs"
    extract(discover(root), BackboneConfig("mobilenet-0.75", weights="none", image_size=32), cache_dir,
            ExtractOptions(batch_size=32))
    opts = FitOptions(cache_dir=cache_dir, runs_dir=runs_dir, cv_folds=3, grid_args=["C=1"], n_boot=50)
    run = fit(root, "mobilenet-0.75", "logreg", opts).runs[0]
    assert (run.path / "feature_reference.npz").is_file()
    new = [write_xray(tmp_path / f"new{i}.jpeg", 500 + i, size=32, bright=i % 2) for i in range(4)]
    Image.new("RGB", (32, 32)).save(tmp_path / "black.png")
    noise = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "noise.png")
    images = [*new, tmp_path / "black.png", tmp_path / "noise.png"]
    out = predict(images, run.id, runs_dir)
    assert [p["unusual"] for p in out["predictions"]] == [False] * 4 + [True] * 2
    assert all(p["unusual_score"] <= 1 for p in out["predictions"][:4])
    unusual = [n for n in out["notes"] if "unlike the images the run was trained on" in n]
    assert len(unusual) == 1 and unusual[0].startswith("2 image(s) are unlike") and "black.png" in unusual[0]
    training = predict(sorted((root / "train" / "NORMAL").iterdir()), run.id, runs_dir)["predictions"]
    assert not any(p["unusual"] for p in training)
    csv_path = tmp_path / "p.csv"
    assert cli(["predict", *map(str, images), "--run", run.id, "--runs-dir", str(runs_dir),
                "--csv", str(csv_path)]) == 0
    with open(csv_path, newline="") as fh:
        assert [r["unusual"] for r in csv.DictReader(fh)] == ["no"] * 4 + ["yes"] * 2
    assert "column unusual=yes" in " ".join(capsys.readouterr().err.split())
    assert cli(["predict", str(tmp_path / "black.png"), "--run", run.id, "--runs-dir", str(runs_dir)]) == 0
    table = capsys.readouterr().out
    assert "unusual" in table.splitlines()[1] + table.splitlines()[2]  # the column, beside seen
    assert cli(["runs", "show", run.id, "--runs-dir", str(runs_dir)]) == 0
    said = " ".join(capsys.readouterr().out.replace("│", " ").split())
    assert ("unusual images predict marks them: PCA of 20 components of 160 training images' features, "
            "limits set by 40 held out by patient") in said
    (run.path / "feature_reference.npz").write_bytes(b"PK\x03\x04 cut short")
    damaged = predict(images, run.id, runs_dir)
    assert [p["unusual"] for p in damaged["predictions"]] == [None] * 6
    assert not any("unlike the images" in n for n in damaged["notes"])
    assert cli(["runs", "show", run.id, "--runs-dir", str(runs_dir)]) == 0
    assert "not marked: its feature_reference.npz cannot be read" in capsys.readouterr().out


def test_fit_notes_test_images_unlike_its_training_images(tmp_path: Path) -> None:
    """A test split with images unlike the training ones (a stray black file here; another scanner in
    practice) got metrics without a word: fit names how many lie beyond the feature reference."""
    from PIL import Image

    root = make_kermany_tree(tmp_path / "data", n_normal=100, n_pneu=100, splits=("train",), size=32)
    for i in range(10):  # new patients, new seeds
        name = f"NORMAL/IM-{5000 + i}-0001.jpeg" if i < 5 else f"PNEUMONIA/person{900 + i}_virus_{i}.jpeg"
        write_xray(root / "test" / name, 7000 + i, size=32, bright=float(i >= 5))
    Image.new("RGB", (32, 32)).save(root / "test" / "NORMAL" / "IM-9999-0001.jpeg")
    cache_dir, runs_dir = tmp_path / "cache", tmp_path / "runs"
    extract(discover(root), BackboneConfig("mobilenet-0.75", weights="none", image_size=32), cache_dir,
            ExtractOptions(batch_size=32))
    opts = FitOptions(cache_dir=cache_dir, runs_dir=runs_dir, cv_folds=3, grid_args=["C=1"], n_boot=50)
    res = fit(root, "mobilenet-0.75", "logreg", opts)
    said = [n for n in res.notes if "lie beyond the limits" in n]
    assert len(said) == 1 and said[0].startswith("1 of the 11 test images (9.1%) lie beyond the limits")
    assert "test/NORMAL/IM-9999-0001.jpeg" in said[0]
    assert not [n for n in fit(root, "mobilenet-0.75", "logreg", opts).notes if "lie beyond" in n]  # done
