"""`featcache run` and `featcache demo` end to end (random seeded weights for speed; real weights when
../shared/weights exists), plus the bundled sample itself."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import pytest
from featcache.cli.app import run

from featcache.errors import ConfigError
from featcache.pipeline import demo_root, split_grid_args


def test_bundled_sample_layout_and_attribution():
    root = demo_root()
    files = sorted(p for p in root.rglob("*.jpeg"))
    assert 60 <= len(files) <= 120
    assert sum(p.stat().st_size for p in root.rglob("*")) < 2.5e6
    kinds = {"normal": 0, "bacteria": 0, "virus": 0}
    patients: dict[str, str] = {}
    for p in files:
        split = p.relative_to(root).parts[0]
        assert split in ("train", "test")
        kind = "normal" if p.parent.name == "NORMAL" else ("bacteria" if "_bacteria_" in p.name else "virus")
        kinds[kind] += 1
        m = re.match(r"(person\d+)_", p.name)
        patient = m.group(1) if m else re.sub(r"-\d+$", "", p.stem)
        assert patients.setdefault(patient, split) == split, f"patient {patient} in two splits"
    assert max(kinds.values()) - min(kinds.values()) <= 2  # balanced normal / bacteria / virus
    text = (root.parent / "ATTRIBUTION.md").read_text(encoding="utf-8")
    for needle in ("10.17632/rscbjbr9sj.2", "CC BY 4.0", "Cell", "TRAINING split", "NOT the official"):
        assert needle in text


def test_grid_args_are_routed_to_the_heads_that_have_them():
    routed = split_grid_args(["C=0.1,1", "mlp:lr=0.001", "n_neighbors=3"], ["logreg", "mlp", "svm", "knn"])
    assert routed["logreg"] == ["C=0.1,1"] and routed["svm"] == ["C=0.1,1"]
    assert routed["mlp"] == ["lr=0.001"] and routed["knn"] == ["n_neighbors=3"]
    with pytest.raises(ConfigError, match="belongs to none of the heads"):
        split_grid_args(["colour=red"], ["logreg"])
    # a prefixed grid for a head that is not run: said so (it advised the prefix already given)
    with pytest.raises(ConfigError, match="--grid mlp:lr=0.1 is for the mlp head, and --head is logreg"):
        split_grid_args(["mlp:lr=0.1"], ["logreg"])


def test_bad_seed_is_refused_before_the_extraction(kermany_tree, tmp_path):
    from featcache.fit import FitOptions
    from featcache.pipeline import run_pipeline

    with pytest.raises(ConfigError, match="--seed must be between 0 and"):
        run_pipeline(kermany_tree, ["mobilenet-0.75"], ["logreg"], weights="none", cache_dir=tmp_path / "c",
                     runs_dir=tmp_path / "r", reports_dir=tmp_path / "rep", fit_options=FitOptions(seed=-1))
    assert not (tmp_path / "c").exists()  # nothing was extracted
    # --task, --balance and --cv-folds were checked only in the fit, after the whole extraction
    for bad, said in ((FitOptions(task="foo"), "unknown task 'foo'"),
                      (FitOptions(balance="foo"), "--balance"),
                      (FitOptions(cv_folds=1), "--cv-folds must be at least 2")):
        with pytest.raises(ConfigError, match=said):
            run_pipeline(kermany_tree, ["mobilenet-0.75"], ["logreg"], weights="none",
                         cache_dir=tmp_path / "c", runs_dir=tmp_path / "r", reports_dir=tmp_path / "rep",
                         fit_options=bad)
        assert not (tmp_path / "c").exists()


def test_an_empty_tag_is_refused_before_any_work(kermany_tree, tmp_path):
    from featcache.fit import FitOptions
    from featcache.pipeline import run_pipeline

    with pytest.raises(ConfigError, match="--tag needs a name"):
        run_pipeline(kermany_tree, ["mobilenet-0.75"], ["knn"], weights="none", cache_dir=tmp_path / "c",
                     runs_dir=tmp_path / "r", reports_dir=tmp_path / "rep",
                     fit_options=FitOptions(tags=(" ",)))
    assert not (tmp_path / "c").exists()
    assert run(["fit", "--data", str(kermany_tree), "--backbone", "mobilenet-0.75", "--head", "knn",
                "--tag", "", "--runs-dir", str(tmp_path / "r"), "--cache-dir", str(tmp_path / "c")]) == 2
    assert not (tmp_path / "r").exists()


def test_run_and_demo_with_an_mlp_refuse_a_typo_before_importing_the_backend(kermany_tree, tmp_path,
                                                                              monkeypatch, capsys):
    """With an mlp head, run and demo imported TensorFlow (18 s under load) before any option was checked:
    `run --head mlp --metric foo` took 19 s to say the metric was wrong, `--head logreg` 1.8 s. The import
    now comes after the checks (and still before any training)."""
    from featcache.cli import pipeline_cmd

    imported = []
    monkeypatch.setattr(pipeline_cmd, "import_backend_quietly", lambda **kw: imported.append(kw))
    base = ["--data", str(kermany_tree), "--backbone", "mobilenet-0.75", "--head", "mlp", "--cache-dir",
            str(tmp_path / "c"), "--runs-dir", str(tmp_path / "r"), "--out", str(tmp_path / "rep")]
    assert run(["run", *base, "--metric", "foo"]) == 2
    assert run(["demo", "--head", "mlp", "--weights", "foo", "--workdir", str(tmp_path / "w")]) == 2
    assert run(["run", *base, "--data", str(tmp_path / "nothing")]) == 2
    assert run(["run", *base, "--val-fraction", "2"]) == 2  # was refused by the fit, after the extraction
    logreg = [*base[:5], "logreg", *base[6:]]  # 6 images per class and split: 9 folds cannot be
    assert run(["run", *logreg, "--cv-folds", "9"]) == 2
    assert "every class has fewer than 9 images" in " ".join(capsys.readouterr().err.split())
    # --test-fraction on data with a test split, and folds the held-out split leaves too few patients
    # for, were refused by the fit, after the extraction
    assert run(["run", *logreg, "--test-fraction", "0.2"]) == 2
    assert "has a test split of its own (12 images)" in " ".join(capsys.readouterr().err.split())
    from conftest import make_kermany_tree

    flat = make_kermany_tree(tmp_path / "flat", n_normal=10, n_pneu=10, splits=("train",))
    flat_args = [*logreg[:1], str(flat), *logreg[2:], "--cv-folds", "8"]
    assert run(["run", *flat_args, "--test-fraction", "0.5"]) == 2  # 8 folds of 20 patients, of 10: no
    assert "--test-fraction 0.5 moved 10 of the 20 patients" in " ".join(capsys.readouterr().err.split())
    assert imported == [] and not (tmp_path / "c").exists()
    before_build, before_train = pipeline_cmd._backend_for(["logreg", "mlp"])
    assert before_build is not None and before_train is not None
    before_train()
    assert imported == [{"tensorflow_too": True}]


def test_a_rerun_with_an_mlp_head_and_every_run_done_imports_no_keras(kermany_tree, tmp_path):
    """`featcache run`/`demo` with an mlp head imported TensorFlow before knowing whether anything needed
    training: a demo rerun with every run done took 13.8 s instead of 6.4 s. `fit` alone did the same. The
    reruns here go in a child process whose import hook refuses Keras and TensorFlow: they must find
    every run done (same ids) without them."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import sys\n"
        "class _NoKeras:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('tensorflow', 'keras'):\n"
        "            raise ImportError(name + ' imported in a rerun (test hook)')\n"
        "sys.meta_path.insert(0, _NoKeras())\n")
    where = ["--cache-dir", str(tmp_path / "c"), "--runs-dir", str(tmp_path / "r")]
    fit_args = ["--data", str(kermany_tree), "--backbone", "mobilenet-0.75", "--weights", "none",
                "--image-size", "64", "--grid", "epochs=2", "--layers", "8", "--json", *where]
    run_args = ["run", *fit_args, "--head", "logreg,mlp", "--cv-folds", "2", "--out", str(tmp_path / "o")]
    first = subprocess.run([sys.executable, "-m", "featcache.cli.app", *run_args], capture_output=True,
                           text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    trained = sorted(r["id"] for fr in json.loads(first.stdout)["fits"] for r in fr["runs"])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")]),
           "TF_CPP_MIN_LOG_LEVEL": "2"}
    blocked = subprocess.run([sys.executable, "-c", "import keras"], env=env, capture_output=True, text=True)
    assert blocked.returncode != 0 and "test hook" in blocked.stderr  # the hook works
    again = subprocess.run([sys.executable, "-m", "featcache.cli.app", *run_args], env=env,
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    fits = json.loads(again.stdout)["fits"]
    assert [fr["runs"] for fr in fits] == [[], []]
    assert sorted(rid for fr in fits for rid in fr["skipped"] if "mlp" in rid) == [
        rid for rid in trained if "mlp" in rid]
    alone = subprocess.run([sys.executable, "-m", "featcache.cli.app", "fit", *fit_args, "--head", "mlp"],
                           env=env, capture_output=True, text=True, timeout=600)
    assert alone.returncode == 0, alone.stderr[-3000:]
    assert json.loads(alone.stdout)["runs"] == []


def test_run_gives_layers_to_the_mlp_and_checks_every_grid_before_the_extraction(kermany_tree, tmp_path):
    """`run --head logreg,mlp --layers 16` means the mlp's layers (it failed for logreg after extracting);
    a grid a head refuses stops the run before any image is read."""
    from featcache.fit import FitOptions
    from featcache.pipeline import _head_options, run_pipeline

    opts = _head_options(FitOptions(layers=(16,)), ["logreg", "mlp"], {"logreg": [], "mlp": []}, None)
    assert opts["logreg"].layers is None and opts["mlp"].layers == (16,)
    # an option for one of the heads is not noted as unused by the others (the demo's --cv-folds 3)
    both = {"logreg": [], "mlp": []}
    opts = _head_options(FitOptions(cv_folds=3, val_fraction=0.3), ["logreg", "mlp"], both, None)
    assert (opts["logreg"].cv_folds, opts["logreg"].val_fraction) == (3, 0.2)
    assert (opts["mlp"].cv_folds, opts["mlp"].val_fraction) == (5, 0.3)
    alone = _head_options(FitOptions(val_fraction=0.3), ["logreg"], {"logreg": []}, None)
    assert alone["logreg"].val_fraction == 0.3  # used by no head: kept, so fit notes it
    kw = {"weights": "none", "cache_dir": tmp_path / "c", "runs_dir": tmp_path / "r",
          "reports_dir": tmp_path / "rep"}
    with pytest.raises(ConfigError, match="--layers applies to the mlp head only, and --head is logreg,knn"):
        run_pipeline(kermany_tree, ["mobilenet-0.75"], ["logreg", "knn"], fit_options=FitOptions(layers=(4,)),
                     **kw)
    with pytest.raises(ConfigError, match="lr"):
        run_pipeline(kermany_tree, ["mobilenet-0.75"], ["logreg", "mlp"], grid_args=["mlp:lr=fast"], **kw)
    # --layer on registry backbones only was ignored; --out a file was refused after extracting and fitting
    with pytest.raises(ConfigError, match="--layer only applies to a saved-model backbone"):
        run_pipeline(kermany_tree, ["mobilenet-0.75"], ["logreg"], layer="conv1", **kw)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        run_pipeline(kermany_tree, ["mobilenet-0.75"], ["logreg"],
                     **{**kw, "reports_dir": tmp_path / "notes.txt"})
    assert not (tmp_path / "c").exists()  # nothing was extracted


def test_a_run_on_cached_features_with_a_scikit_learn_head_imports_no_backend(tmp_path, capsys, monkeypatch):
    """`run` imported Keras and TensorFlow before every call; with scikit-learn heads it needs them only to
    build a backbone, so a rerun on cached features waits for neither. (An mlp head imports them for its
    fit, up front, as before.)"""
    import featcache.cli.pipeline_cmd as cmd
    from conftest import make_kermany_tree, save_rescaling_model

    calls: list[bool] = []
    monkeypatch.setattr(cmd, "import_backend_quietly",
                        lambda tensorflow_too=False: calls.append(tensorflow_too))
    monkeypatch.chdir(tmp_path)
    root = make_kermany_tree(tmp_path / "data", n_normal=4, n_pneu=4, splits=("train",), size=32)
    model = save_rescaling_model(tmp_path / "m.keras", 1 / 255, 0.0)
    argv = ["run", "--data", str(root), "--backbone", str(model), "--layer", "feat_conv", "--head", "knn",
            "--cv-folds", "2", "--json"]
    assert run(argv) == 0 and calls == [False]  # the build
    first = json.loads(capsys.readouterr().out)
    assert first["extracts"][0]["rows_computed"] == 8
    assert run(argv) == 0 and calls == [False]  # all cached: no build, no import
    assert json.loads(capsys.readouterr().out)["extracts"][0]["rows_reused"] == 8
    # data without a test split: the summary says why the test column is blank, as fit's table does (a
    # researcher's audit: `run` showed "—" without a word)
    assert run(argv[:-1]) == 0
    assert "no test images in the data" in " ".join(capsys.readouterr().out.split())


def test_run_end_to_end(kermany_tree, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = run(
        [
            "run",
            "--data",
            str(kermany_tree),
            "--backbone",
            "mobilenet-0.75",
            "--weights",
            "none",
            "--head",
            "logreg,knn",
            "--grid",
            "logreg:C=0.1,1",
            "--grid",
            "n_neighbors=3,5",
            "--cv-folds",
            "2",
            "--tag",
            "e2e",
        ]
    )
    out = capsys.readouterr()
    assert code == 0, out.err
    report = tmp_path / "reports" / "report.html"
    assert report.is_file() and str(report) in out.out.replace("\n", "")
    assert (tmp_path / "cache").is_dir() and (tmp_path / "runs").is_dir()
    board = json.loads((tmp_path / "reports" / "leaderboard.json").read_text())["runs"]
    assert sorted(r["head"] for r in board) == ["knn", "logreg"]
    assert all(r["tags"] == ["e2e"] and r["test_accuracy"] is not None for r in board)
    html = report.read_text()
    assert "Grid views" in html and "mean CV" in html  # the CV search inside each run is shown


def test_run_and_demo_wait_for_a_cache_another_process_writes_as_long_as_wait_says(kermany_tree, tmp_path,
                                                                                  capsys, monkeypatch):
    """The lock message offers --wait, so run and demo have it: a held cache lock is waited for, then
    refused (demo's message named --wait, which demo lacked)."""
    from featcache import cache as fcache

    real, held = fcache.CacheWriter, {}
    holder = ("import sys; from filelock import FileLock; lock = FileLock(sys.argv[1]); lock.acquire(); "
              "print('held', flush=True); sys.stdin.read()")

    def writer_of_a_locked_file(path, *args, **kwargs):  # another process holds this file's lock
        if str(path) not in held:
            held[str(path)] = proc = subprocess.Popen(
                [sys.executable, "-c", holder, str(path) + ".lock"], stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, text=True)
            assert proc.stdout.readline().strip() == "held"
        return real(path, *args, **kwargs)

    monkeypatch.setattr(fcache, "CacheWriter", writer_of_a_locked_file)
    monkeypatch.chdir(tmp_path)
    argv = ["run", "--data", str(kermany_tree), "--backbone", "mobilenet-0.75", "--weights", "none",
            "--head", "knn", "--cv-folds", "2"]
    demo = ["demo", "--weights", "none", "--workdir", str(tmp_path / "d"), "--head", "knn"]
    try:
        assert run([*argv, "--wait", "0.3"]) == 3
        err = capsys.readouterr().err.replace("\n", " ")
        assert "being written by another featcache process" in err and "still held after --wait 0.3" in err
        assert run(argv) == 3
        assert "pass --wait SECONDS" in capsys.readouterr().err.replace("\n", " ")
        assert run([*demo, "--wait", "0.2"]) == 3
        assert "still held after --wait 0.2" in capsys.readouterr().err.replace("\n", " ")
    finally:
        for proc in held.values():
            proc.kill()
            proc.wait()
    assert len(held) == 2  # the demo's own cache file was the one held
    assert not (tmp_path / "runs").exists() and not (tmp_path / "d" / "runs").exists()


def test_run_on_a_manifest_fits_the_manifests_images(kermany_tree, tmp_path, capsys, monkeypatch):
    """--data manifest.csv: the fit read the manifest's folder as class folders (and found the cache)."""
    from featcache.datasets import discover

    records = discover(kermany_tree).records
    manifest = tmp_path / "lists" / "manifest.csv"
    manifest.parent.mkdir()
    rows = [f"{os.path.relpath(r.path, manifest.parent)},{r.label},{'test' if i % 4 == 0 else 'train'}"
            for i, r in enumerate(records)]
    manifest.write_text("path,label,split\n" + "\n".join(rows) + "\n")
    monkeypatch.chdir(tmp_path)
    argv = ["run", "--data", str(manifest), "--backbone", "mobilenet-0.75", "--weights", "none",
            "--head", "knn", "--cv-folds", "2", "--grid", "n_neighbors=3"]
    code = run(argv)
    out = capsys.readouterr()
    assert code == 0, out.err
    board = json.loads((tmp_path / "reports" / "leaderboard.json").read_text())["runs"]
    assert len(board) == 1 and board[0]["n_test"] == sum(1 for i in range(len(records)) if i % 4 == 0)
    # run.json's command is this one as typed (in-process it took the caller's sys.argv: pytest's)
    from featcache.runs import list_runs

    assert [r["command"] for r in list_runs(tmp_path / "runs")] == [["featcache", *argv]]


def test_run_with_a_preset_extracts_and_fits_the_papers_setup(kermany_tree, tmp_path, capsys, monkeypatch):
    """`run --preset` takes the preset's pooling, image size, task and head; before, run extracted the
    backbone's default (avg) features and fit the paper's head on them as a binary task, without a word."""
    monkeypatch.chdir(tmp_path)
    code = run(["run", "--data", str(kermany_tree), "--preset", "aucouturier2020", "--backbone",
                "mobilenet-0.75", "--weights", "none", "--head", "logreg"])
    assert code == 2 and "uses the mlp head, not 'logreg'" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists()  # refused before any extraction
    code = run(["run", "--data", str(kermany_tree), "--preset", "aucouturier2020", "--backbone",
                "mobilenet-0.75", "--weights", "none", "--grid", "epochs=2"])  # the paper's 100: a minute
    out = capsys.readouterr()
    assert code == 0, out.err
    note = " ".join(out.out.split())  # the preset's settings reached a backbone the paper did not use
    assert ("preset aucouturier2020: mobilenet-0.75 extracted with the preset's flatten pooling, 224 px "
            "(the paper used inceptionv3)") in note
    (cache,) = (tmp_path / "cache").glob("*.h5")
    with h5py.File(cache, "r") as f:
        assert f["features"].shape[1] == 7 * 7 * 768  # flatten at 224 px, as the preset says
    (run_json,) = (tmp_path / "runs").glob("*/run.json")
    record = json.loads(run_json.read_text())
    assert record["task"] == "3class" and record["preset"] == "aucouturier2020" and record["head"] == "mlp"


def test_run_extracts_the_views_an_oversampling_preset_needs(kermany_tree, tmp_path, capsys, monkeypatch):
    """vazquez2021 oversamples from cached augmentation views: `run` extracts them too (it extracted only
    the originals and then refused), and fit's hint names the cache's own weights."""
    monkeypatch.chdir(tmp_path)
    code = run(["fit", "--data", str(kermany_tree), "--backbone", "mobilenet-0.75", "--head", "knn"])
    assert code == 2  # no cache yet
    capsys.readouterr()
    assert run(["extract", "--data", str(kermany_tree), "--backbone", "mobilenet-0.75", "--weights",
                "none", "--image-size", "64"]) == 0
    code = run(["fit", "--data", str(kermany_tree), "--backbone", "mobilenet-0.75", "--head", "knn",
                "--balance", "oversample", "--cv-folds", "2"])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2 and "--weights none" in err and "--image-size 64" in err and "--views orig,hflip" in err
    code = run(["run", "--data", str(kermany_tree), "--preset", "vazquez2021", "--backbone", "mobilenet-0.75",
                "--weights", "none", "--grid", "epochs=2", "--cache-dir", "cache2"])
    out = capsys.readouterr()
    assert code == 0, out.err
    (cache,) = (tmp_path / "cache2").glob("*.h5")
    with h5py.File(cache, "r") as f:
        views = {v.decode() for v in f["views"][...]}
    assert views == {"orig", "hflip", "rot+20"}
    (run_json,) = (tmp_path / "runs").glob("*mlp*/run.json")
    assert json.loads(run_json.read_text())["balance"] == "oversample"


def test_run_with_a_saved_model_and_then_fit_by_its_path(kermany_tree, tmp_path, capsys, monkeypatch):
    """`run --backbone model.keras --layer NAME` (the route for fine-tuned CNNs), then `fit --backbone
    model.keras` finds the cache run wrote (recorded as saved-<stem>) and names it."""
    import keras

    monkeypatch.chdir(tmp_path)
    keras.utils.set_random_seed(0)
    inp = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(4, 3, activation="relu")(inp)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    keras.Model(inp, keras.layers.Dense(2)(x)).save(tmp_path / "tiny.keras")
    code = run(["run", "--data", str(kermany_tree), "--backbone", "tiny.keras", "--layer", "gap", "--head",
                "knn", "--cv-folds", "2"])
    out = capsys.readouterr()
    assert code == 0, out.err
    (cache,) = (tmp_path / "cache").glob("*saved-tiny*.h5")
    code = run(["fit", "--data", str(kermany_tree), "--backbone", "tiny.keras", "--head", "knn", "--cv-folds",
                "2"])
    out = " ".join(capsys.readouterr().out.split())
    assert code == 0 and f"features of tiny.keras: {cache.resolve()}" in out
    assert "already has a finished run" in out  # the run's sweep (one run for knn's CV search)


def test_demo_with_random_weights(tmp_path, capsys):
    argv = ["demo", "--weights", "none", "--workdir", str(tmp_path), "--head", "logreg,mlp"]
    code = run(argv)
    out = capsys.readouterr()
    assert code == 0, out.err
    from featcache.runs import list_runs

    assert {tuple(r["command"]) for r in list_runs(tmp_path / "runs")} == {("featcache", *argv)}  # as typed
    report = tmp_path / "reports" / "report.html"
    assert report.is_file() and str(report) in out.out.replace("\n", "")
    assert "0 file(s) skipped" in " ".join(out.out.split())  # the attribution file is not in the dataset
    first = out.out.splitlines()[0]  # the first line is the extract's summary, whole (no wrapping, no blank)
    assert first.startswith("extract ") and first.endswith("file(s) skipped"), out.out
    html = report.read_text()
    assert "TRAINING split" in html and "Random weights:" in html and "(random weights)" in html
    board = json.loads((tmp_path / "reports" / "leaderboard.json").read_text())["runs"]
    assert {r["head"] for r in board} == {"logreg", "mlp"}
    # a second demo reuses the cached features and the finished runs
    code = run(["demo", "--weights", "none", "--workdir", str(tmp_path), "--head", "logreg,mlp"])
    out = " ".join(capsys.readouterr().out.split())
    assert code == 0 and "0 rows computed, 96 reused" in out and "0 run(s) trained" in out
    # --json: stdout is the JSON alone (as run's), the report's leaders in it
    code = run(["demo", "--weights", "none", "--workdir", str(tmp_path), "--head", "logreg,mlp", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert code == 0 and data["extracts"][0]["rows_computed"] == 0
    assert data["report"]["leaders"][0]["run_id"] == data["report"]["best_run_id"]
    assert data["report"]["random_weights"] == ["mobilenet-0.75"]


@pytest.mark.slow
@pytest.mark.shared
def test_demo_with_real_imagenet_weights(shared_dir, tmp_path):
    weights = sorted((shared_dir / "weights").glob("mobilenet_7_5_224_tf*.h5"))
    if not weights:
        pytest.skip("no mobilenet-0.75 weights in ../shared/weights")
    keras_home = tmp_path / "keras"
    (keras_home / "models").mkdir(parents=True)
    for w in weights:
        shutil.copy(w, keras_home / "models" / w.name)
    env = {**os.environ, "KERAS_HOME": str(keras_home), "TF_CPP_MIN_LOG_LEVEL": "2"}
    exe = Path(sys.executable).with_name("featcache")
    proc = subprocess.run(
        [str(exe), "demo", "--workdir", str(tmp_path), "--head", "logreg,mlp"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "report.html" in proc.stdout
    # TensorFlow's native start-up log (absl lines written before absl is initialised) is filtered
    assert "absl::InitializeLog" not in proc.stderr and "I0000 " not in proc.stderr, proc.stderr[:2000]
    board = json.loads((tmp_path / "reports" / "leaderboard.json").read_text())["runs"]
    assert {r["head"] for r in board} == {"logreg", "mlp"}
    # ImageNet features must separate normal from pneumonia far better than chance on the held-out images
    assert max(r["test_auc"] for r in board) > 0.75


def test_run_seed_is_the_fits_not_the_backbones(kermany_tree, tmp_path, monkeypatch):
    """`run --seed 1 --weights none` drew the random backbone with seed 1: a second cache of the same
    images, which `fit` then could not choose between and `predict` (seed 0, as extract) could not rebuild.
    The backbone is seed 0, as in extract; --seed is the fit's."""
    import featcache.extract as fx
    from featcache.fit import FitOptions
    from featcache.pipeline import run_pipeline

    seen = []

    def stop(dataset, bb, *args, **kwargs):
        seen.append(bb.seed)
        raise RuntimeError("stop after the backbone config")

    monkeypatch.setattr(fx, "extract", stop)
    with pytest.raises(RuntimeError, match="stop after"):
        run_pipeline(kermany_tree, ["mobilenet-0.75"], ["logreg"], weights="none", cache_dir=tmp_path / "c",
                     runs_dir=tmp_path / "r", reports_dir=tmp_path / "rep", fit_options=FitOptions(seed=1))
    assert seen == [0]


def test_run_passes_the_fit_options_a_fit_would_take(kermany_tree, tmp_path):
    """`run` lacked --val-fraction, --refit, --metric, --threshold, --train-views, --tta and the mlp
    trainer options, so a user had to leave it for extract + fit + report to set any of them."""
    from featcache.cli.app import run

    from featcache.runs import load_run

    code = run(["run", "--data", str(kermany_tree), "--backbone", "mobilenet-0.75", "--weights", "none",
                "--head", "knn", "--grid", "n_neighbors=3", "--cv-folds", "3", "--metric", "auc",
                "--no-refit", "--threshold", "sensitivity:0.9", "--train-views", "orig,hflip",
                "--cache-dir", str(tmp_path / "c"), "--runs-dir", str(tmp_path / "r"),
                "--out", str(tmp_path / "o")])
    assert code == 0
    (run_dir,) = [p for p in (tmp_path / "r").iterdir() if p.is_dir() and not p.name.startswith(".")]
    rec = load_run(tmp_path / "r", run_dir.name)
    assert rec["metric"] == "auc" and rec["train_views"] == ["orig", "hflip"]
    assert rec["threshold"]["method"] == "sensitivity" and rec["selection"]["refit"] is False
    assert "ranked by validation auc" in (tmp_path / "o" / "report.md").read_text(encoding="utf-8")


def test_run_takes_extracts_feature_settings_and_a_grid_file(kermany_tree, tmp_path, capsys):
    """`run` had no --pooling, --image-size, --resize, --dtype or --grid-file: features other than the
    backbone's defaults, or a grid kept in a file, meant leaving it for extract + fit + report."""
    from featcache.cli.app import run

    from featcache.cache import CacheReader
    from featcache.runs import load_run

    grid = tmp_path / "grid.toml"
    grid.write_text("[grid]\nC = [0.05, 0.5]\n", encoding="utf-8")
    dirs = ["--cache-dir", str(tmp_path / "c"), "--runs-dir", str(tmp_path / "r"),
            "--out", str(tmp_path / "o")]
    base = ["run", "--data", str(kermany_tree), "--backbone", "mobilenet-0.75", "--weights", "none",
            "--cv-folds", "2", *dirs]
    # refused before any image is read: a grid file with two heads, and a dtype no cache can have
    assert run([*base, "--head", "logreg,knn", "--grid-file", str(grid)]) == 2
    assert "--grid-file holds one head's grid, and --head is logreg,knn" in capsys.readouterr().err
    assert run([*base, "--head", "logreg", "--dtype", "float8"]) == 2
    assert "--dtype: unknown dtype 'float8'" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()

    code = run([*base, "--head", "logreg", "--grid-file", str(grid), "--pooling", "max", "--image-size", "64",
                "--resize", "pad", "--dtype", "float16"])
    assert code == 0
    (cache,) = (tmp_path / "c").rglob("*.h5")
    with CacheReader(cache) as reader:
        config = reader.config
    assert (config["pooling"], config["image_size"], config["resize"], config["dtype"]) == \
        ("max", 64, "pad", "float16")
    (run_dir,) = [p for p in (tmp_path / "r").iterdir() if p.is_dir() and not p.name.startswith(".")]
    rec = load_run(tmp_path / "r", run_dir.name)
    # the file's grid, not logreg's default (14 configs): its 2 values of C and nothing else
    assert rec["selection"]["n_configs"] == 2 and rec["params"]["C"] in (0.05, 0.5)


def test_run_separate_fits_each_backbone_on_its_own_features(kermany_tree, tmp_path, capsys):
    """`run --backbone a,b` could only fuse them (one run on the concatenated features), so comparing
    backbones, what the report is for, took a run per backbone. --separate fits each on its own."""
    from featcache.cli.app import run

    base = ["run", "--data", str(kermany_tree), "--backbone", "mobilenet-0.75,mobilenet", "--weights", "none",
            "--image-size", "64", "--head", "knn", "--grid", "n_neighbors=3", "--cv-folds", "2", "--json",
            "--cache-dir", str(tmp_path / "c"), "--runs-dir", str(tmp_path / "r"),
            "--out", str(tmp_path / "o")]
    assert run([*base, "--separate"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["extracts"]) == 2
    board = json.loads((tmp_path / "o" / "leaderboard.json").read_text())["runs"]
    assert sorted(r["backbone"] for r in board) == ["mobilenet (random weights)",
                                                    "mobilenet-0.75 (random weights)"]
    assert run(base) == 0  # without it: one fused run, from the same two caches
    out = json.loads(capsys.readouterr().out)
    assert [e["rows_computed"] for e in out["extracts"]] == [0, 0]
    board = json.loads((tmp_path / "o" / "leaderboard.json").read_text())["runs"]
    assert [r["backbone"] for r in board] == ["mobilenet-0.75+mobilenet (random weights)"]
    code = run([*base[:4], "mobilenet-0.75", *base[5:], "--separate"])
    assert code == 2 and "--separate compares several backbones" in " ".join(capsys.readouterr().err.split())


def test_run_json_prints_every_stage_in_the_shapes_extract_and_fit_print(kermany_tree, tmp_path, capsys):
    """`run` had no --json: a script had to parse the tables, or call extract, fit and report itself."""
    from featcache.cli.app import run

    code = run(["run", "--data", str(kermany_tree), "--backbone", "mobilenet-0.75", "--weights", "none",
                "--head", "knn", "--grid", "n_neighbors=3", "--cv-folds", "2", "--json",
                "--cache-dir", str(tmp_path / "c"), "--runs-dir", str(tmp_path / "r"),
                "--out", str(tmp_path / "o")])
    assert code == 0
    out = json.loads(capsys.readouterr().out)  # stdout is the JSON and nothing else
    (ex,) = out["extracts"]
    assert ex["rows_computed"] == 24 and ex["feature_dim"] == 768 and Path(ex["cache_path"]).is_file()
    (fr,) = out["fits"]
    assert len(fr["runs"]) == 1 and fr["runs"][0]["head"] == "knn"
    assert out["report"]["best_run_id"] == fr["runs"][0]["id"] and Path(out["report"]["html"]).is_file()


def test_fit_picks_the_cache_of_the_saved_model_and_weights_file_it_is_given(kermany_tree, tmp_path):
    """Two saved models sharing a weights file now get two caches (both files are in the key), but fit
    only matched the weights file's hash and refused to choose between them."""
    import keras
    from conftest import save_rescaling_model as model

    from featcache.backbones import BackboneConfig
    from featcache.datasets import discover
    from featcache.extract import ExtractOptions, extract
    from featcache.fit import FitOptions, fit

    a = model(tmp_path / "m.keras", 1 / 255.0, 0.0)
    (tmp_path / "b").mkdir()
    b = model(tmp_path / "b" / "m.keras", 1 / 127.5, -1.0)
    weights = tmp_path / "w.weights.h5"
    keras.models.load_model(a, compile=False).save_weights(weights)
    caches = {}
    for p in (a, b):
        bb = BackboneConfig(str(p), layer="feat_conv", weights=str(weights))
        caches[p] = extract(discover(kermany_tree), bb, tmp_path / "c", ExtractOptions()).cache_path
    assert caches[a] != caches[b]
    for p in (a, b):
        res = fit(kermany_tree, [str(p)], "knn", FitOptions(cache_dir=tmp_path / "c", runs_dir=tmp_path / "r",
                                                            weights=str(weights), cv_folds=2, n_boot=50,
                                                            grid_args=["n_neighbors=3"], command=["t"]))
        assert res.caches == {str(p): caches[p].resolve()}
    # predict on an image the cache lacks rebuilds that backbone from both files (it could not before)
    from conftest import write_xray

    from featcache.errors import RunError
    from featcache.predict import predict

    new = write_xray(tmp_path / "new" / "x.jpeg", seed=99)
    out = predict([new], res.runs[0].id, tmp_path / "r", backbone_files=[weights, b])
    assert [p["from_cache"] for p in out["predictions"]] == [False]
    with pytest.raises(RunError, match="pass both files, each with --backbone-file"):
        predict([new], res.runs[0].id, tmp_path / "r", backbone_files=[b])


def test_run_extracts_the_views_the_fit_names():
    """`run` extracts what the fit reads: --tta-views / --aug-views (or their defaults) besides --views,
    and no more (it extracted orig,hflip,rot+20 for any --tta, of which the fit now averages hflip)."""
    from featcache.extract import ExtractOptions
    from featcache.fit import FitOptions
    from featcache.grids import PRESETS
    from featcache.pipeline import _with_needed_views

    def views(preset=None, **kw) -> tuple[str, ...]:
        return tuple(_with_needed_views(ExtractOptions(), FitOptions(**kw), preset).views)

    assert views(tta=True) == ("orig", "hflip")
    assert views(tta=True, tta_views="rot-20,zoom1.1") == ("orig", "rot-20", "zoom1.1")
    assert views(balance="oversample", train_views="orig,hflip") == ("orig", "hflip", "rot+20")
    assert views(PRESETS["vazquez2021"], aug_views="rot+10") == ("orig", "rot+10")
    with pytest.raises(ConfigError, match="add --tta, or drop --tta-views"):
        views(tta_views="hflip")


def test_run_views_choose_what_tta_averages(kermany_tree, tmp_path):
    """`run --tta` extracted orig,hflip,rot+20 whatever the user wanted to average: now the views extracted
    are --views and those the fit names (--tta-views, default hflip), and TTA averages those named."""
    from featcache.cli.app import run

    from featcache.cache import CacheReader
    from featcache.runs import load_run

    code = run(["run", "--data", str(kermany_tree), "--backbone", "mobilenet-0.75", "--weights", "none",
                "--head", "knn", "--grid", "n_neighbors=3", "--cv-folds", "2", "--tta",
                "--views", "orig,hflip", "--cache-dir", str(tmp_path / "c"),
                "--runs-dir", str(tmp_path / "r"), "--out", str(tmp_path / "o")])
    assert code == 0
    (cache,) = (tmp_path / "c").glob("*.h5")
    with CacheReader(cache) as reader:
        assert sorted(reader.views) == ["hflip", "orig"]
    (run_dir,) = [p for p in (tmp_path / "r").iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert load_run(tmp_path / "r", run_dir.name)["tta_views"] == ["hflip"]


@pytest.mark.slow
def test_run_and_predict_with_keras_on_jax_where_tensorflow_cannot_be_imported(kermany_tree, tmp_path):
    """The GPU machines this project may borrow have JAX and no TensorFlow: extract, fit (the fused JAX
    trainer), report and predict must not need TensorFlow when Keras runs on JAX. Here TensorFlow is
    installed, so an import hook refuses it in the child process."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import sys\n"
        "class _NoTensorFlow:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'tensorflow' or name.startswith('tensorflow.'):\n"
        "            raise ImportError('TensorFlow is not installed on this machine (test hook)')\n"
        "sys.meta_path.insert(0, _NoTensorFlow())\n")
    env = {**os.environ, "KERAS_BACKEND": "jax", "PYTHONPATH": str(hook), "TF_CPP_MIN_LOG_LEVEL": "2"}
    env.pop("FEATCACHE_MLP_TRAINER", None)
    blocked = subprocess.run([sys.executable, "-c", "import tensorflow"], env=env, capture_output=True,
                             text=True)
    assert blocked.returncode != 0 and "test hook" in blocked.stderr  # the hook works
    exe = str(Path(sys.executable).with_name("featcache"))
    where = ["--cache-dir", str(tmp_path / "c"), "--runs-dir", str(tmp_path / "r")]
    proc = subprocess.run(
        [exe, "run", "--data", str(kermany_tree), "--backbone", "mobilenet-0.75", "--weights", "none",
         "--image-size", "96", "--head", "logreg,mlp", "--layers", "8", "--grid", "lr=0.01,0.001",
         "--grid", "epochs=2", "--cv-folds", "2", "--json", "--out", str(tmp_path / "o"), *where],
        env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    (ex,) = out["extracts"]
    assert ex["rows_computed"] == 24
    with h5py.File(ex["cache_path"], "r") as f:
        sessions = json.loads(f.attrs["sessions_json"])
    assert sessions[-1]["versions"]["backend"] == "jax"
    runs = {r["head"]: r for fr in out["fits"] for r in fr["runs"]}
    assert set(runs) == {"logreg", "mlp"}
    record = json.loads((tmp_path / "r" / runs["mlp"]["id"] / "run.json").read_text())
    assert record["environment"]["keras_backend"] == "jax"
    assert record["trainer"]["saved_model"]["path"] == "fused-jax"
    image = next(kermany_tree.glob("test/PNEUMONIA/*.jpeg"))
    pred = subprocess.run([exe, "predict", "--run", runs["mlp"]["id"], str(image), "--json",
                           "--runs-dir", str(tmp_path / "r")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert pred.returncode == 0, pred.stderr[-3000:]
    assert len(json.loads(pred.stdout)["predictions"]) == 1


def test_demo_offline_without_weights_offers_what_the_demo_accepts(tmp_path: Path, monkeypatch):
    """`featcache demo` offline, before the weights are in Keras' cache, said "or use --weights none ... or
    --weights PATH to a weights file", and the demo refuses --weights PATH. It names the file, where Keras
    looks for it, and `featcache demo --weights none` (no real download here)."""
    from keras.src.utils import file_utils

    import featcache.backbones as bmod
    from featcache.errors import NetworkError
    from featcache.pipeline import run_demo

    def offline(*args, **kwargs):
        raise Exception("URL fetch failure: no network")

    monkeypatch.setattr(file_utils, "get_file", offline)
    monkeypatch.setattr(bmod, "keras_models_dir", lambda: tmp_path / "models")
    with pytest.raises(NetworkError) as err:
        run_demo(tmp_path / "work", heads=("logreg",))
    msg = str(err.value)
    assert err.value.exit_code == 1 and "\n" not in msg
    assert "mobilenet_7_5_224_tf_no_top.h5" in msg and str(tmp_path / "models") in msg
    assert "featcache demo --weights none" in msg and "--weights PATH" not in msg
    with pytest.raises(ConfigError, match="imagenet or none"):  # what that advice led to
        run_demo(tmp_path / "work", weights=str(tmp_path / "models" / "mobilenet_7_5_224_tf_no_top.h5"))


def test_ctrl_c_during_runs_extract_says_how_many_images_are_kept_and_left(tmp_path, capsys, monkeypatch):
    """`featcache run` (and `demo`) interrupted while extracting said only "finished work is saved; run the
    same command to resume", where `featcache extract` says how many images the cache keeps and how many
    the same command computes: they say the same now, with the cache's true counts."""
    from conftest import ctrl_c_at_forward_pass, make_kermany_tree

    from featcache.backbones import BackboneConfig
    from featcache.datasets import discover
    from featcache.extract import ExtractOptions, extract

    root = make_kermany_tree(tmp_path / "data", n_normal=4, n_pneu=4, splits=("train",))
    ctrl_c_at_forward_pass(monkeypatch, 3)
    monkeypatch.setenv("COLUMNS", "250")
    argv = ["run", "--data", str(root), "--backbone", "mobilenet-0.75", "--weights", "none", "--image-size",
            "32", "--head", "knn", "--cv-folds", "2", "--batch-size", "2", "--cache-dir", str(tmp_path / "c"),
            "--runs-dir", str(tmp_path / "r"), "--out", str(tmp_path / "rep")]
    assert run(argv) == 130
    err = " ".join(capsys.readouterr().err.split())
    name = next((tmp_path / "c").glob("*.h5")).name
    assert (f"extract stopped: 4 of the 8 images this extract wants are in {name} (4 computed before the "
            "interruption, 0 there before); the same command computes the remaining 4.") in err, err
    assert err.endswith("interrupted: finished work is saved; run the same command to resume.")
    assert not (tmp_path / "r").exists()  # stopped in the extract stage: nothing was fitted
    ctrl_c_at_forward_pass(monkeypatch, 3)  # the demo's 96 images at batch 32: its third batch, 64 kept
    assert run(["demo", "--weights", "none", "--workdir", str(tmp_path / "d"), "--head", "knn"]) == 130
    err = " ".join(capsys.readouterr().err.split())
    assert "extract stopped: 64 of the 96 images this extract wants are in" in err, err
    monkeypatch.undo()
    res = extract(discover(root), BackboneConfig("mobilenet-0.75", weights="none", image_size=32),
                  tmp_path / "c", ExtractOptions(batch_size=2))
    assert (res.rows_reused, res.rows_computed) == (4, 4)  # the sentence's counts were the cache's
