"""fit: the validation protocol, every head, fusion/views/balance, resumable grids, runs ls, CLI errors.

Features are synthetic (written with CacheWriter under a fake backbone name) so no CNN runs here.
"""
from __future__ import annotations

import collections
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import write_xray
from featcache.cli.app import run as cli
from sklearn.exceptions import ConvergenceWarning

from featcache.cache import CacheWriter, cache_config, cache_path
from featcache.datasets import discover
from featcache.errors import CacheError, ConfigError, DataError, RunError
from featcache.fit import FitOptions, fit
from featcache.hashing import sha256_file
from featcache.runs import done_with_other_versions, keras_backend, list_runs, load_run
from featcache.splits import index_digest

SUBTYPES = ("normal", "bacteria", "virus")


def make_tree(root: Path, n_patients: int = 12, seed: int = 0) -> Path:
    """Kermany-layout tree where many patients have 2-3 images (train) plus a test split."""
    rng = np.random.default_rng(seed)
    s = 1000 * seed
    for split, n_pat in (("train", n_patients), ("test", max(6, n_patients // 2))):
        base = 0 if split == "train" else 500
        for p in range(n_pat):
            kind = SUBTYPES[p % 3]
            for j in range(int(rng.integers(1, 4))):
                s += 1
                if kind == "normal":
                    path = root / split / "NORMAL" / f"IM-{base + p:04d}-{j + 1:04d}.jpeg"
                else:
                    path = root / split / "PNEUMONIA" / f"person{base + p}_{kind}_{s}.jpeg"
                write_xray(path, s, size=16)
    return root


def fake_backbone(name: str = "fakenet", dim: int = 6, **settings) -> dict:
    return {"backbone": name, "weights": "none", "weights_digest": f"digest-{name}", "pooling": "avg",
            "image_size": 16, "preprocess": "none", "feature_dim": dim, **settings}


def write_cache(root: Path, cache_dir: Path, name: str = "fakenet", views=("orig",), dim: int = 6,
                skip: int = 0, noise: float = 0.3, signal_dims: int = 3, dtype: str = "float32",
                poison: float | None = None, **settings) -> Path:
    """Features that separate the 3 subtypes (so binary and 3class are learnable), one row per key/view.

    ``settings`` override the fake backbone's description (weights, weights_file_sha256, ...)."""
    ds = discover(root)
    cfg = cache_config(ds.root, fake_backbone(name, dim, **settings), "squash", dtype)
    path = cache_path(cache_dir, cfg)
    keys, paths, feats, vws = [], [], [], []
    seen = set()
    for rec in ds.records[skip:]:
        key = sha256_file(rec.path)
        if key in seen:
            continue
        seen.add(key)
        name_ = rec.path.name  # class from the file name, so relabelled folders keep identical features
        cls = 1 if "bacteria" in name_ else 2 if "virus" in name_ else 0
        rng = np.random.default_rng(int(key[:8], 16))
        for v_i, view in enumerate(views):
            x = rng.normal(0, noise, dim)
            x[cls % signal_dims] += 2.0
            x[-1] += 0.1 * v_i
            keys.append(key)
            paths.append(rec.relpath)
            vws.append(view)
            feats.append(x)
    if poison is not None:  # a value the backbone "produced": written with a matching digest
        feats[2][1] = poison
    with CacheWriter(path, cfg, dim) as w:
        w.reserve(len(keys))
        w.append(keys, vws, paths, np.asarray(feats, dtype=np.float32))
    return path


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, Path, Path]:
    root = make_tree(tmp_path / "data")
    cache_dir = tmp_path / "cache"
    write_cache(root, cache_dir, views=("orig", "hflip", "rot+20"))
    return root, cache_dir, tmp_path / "runs"


def opts(cache_dir: Path, runs_dir: Path, **kw) -> FitOptions:
    kw.setdefault("n_boot", 200)
    kw.setdefault("cv_folds", 3)
    return FitOptions(cache_dir=cache_dir, runs_dir=runs_dir, command=["test"], **kw)


def test_cv_protocol_never_touches_test(setup) -> None:
    root, cache_dir, runs_dir = setup
    res = fit(root, "fakenet", "logreg", opts(cache_dir, runs_dir, grid_args=["C=0.1,1"]))
    assert len(res.runs) == 1
    run = load_run(runs_dir, res.runs[0].id)
    ds = discover(root)
    idx = run.indices()
    test = np.flatnonzero([r.split == "test" for r in ds.records])
    assert np.array_equal(np.sort(idx["test"]), test)
    selection = np.concatenate([idx["train"], idx["val"], *[idx[k] for k in idx if k.startswith("fold")]])
    assert not set(selection.tolist()) & set(test.tolist())
    groups = np.array([r.group for r in ds.records])
    for i in range(3):
        assert not set(groups[idx[f"fold{i}_train"]]) & set(groups[idx[f"fold{i}_val"]])
    sel = run["selection"]
    assert sel["test_indices_digest"] == index_digest(idx["test"])
    assert sel["val_indices_digest"] == index_digest(idx["val"])
    assert sel["method"] == "grouped_kfold" and sel["folds"] == 3
    assert sel["cv_unconverged_fits"] == 0  # logreg's search counts its fits stopped at max_iter
    val_rel = {r["relpath"] for r in run.predictions("val")}
    assert all(rel.startswith("train/") for rel in val_rel) and len(val_rel) == len(idx["val"])
    m = run.metrics()
    assert m["val"]["accuracy"] > 0.9 and m["test"]["accuracy"] > 0.9
    assert m["test"]["ci"]["accuracy"][0] <= m["test"]["accuracy"] <= m["test"]["ci"]["accuracy"][1]
    assert len(m["cv_results"]["mean_test_score"]) == 4  # C x the default class_weight values
    assert 0.0 <= run["threshold"]["chosen"] <= 1.0 and "at_threshold" in m["test"]
    assert set(run["artifacts"]) and run["caches"][0]["weights_digest"] == "digest-fakenet"
    assert run["status"] == "done" and run["command"] == ["test"]


def test_a_search_with_unconverged_fits_says_so(setup, capsys) -> None:
    """scikit-learn's ConvergenceWarning is one line however many fits stopped at max_iter, printed amid
    the progress bar: the fit's notes give the count and the way out."""
    root, cache_dir, runs_dir = setup
    with pytest.warns(ConvergenceWarning):
        res = fit(root, "fakenet", "logreg", opts(cache_dir, runs_dir, grid_args=["C=1000", "max_iter=1"]))
    n = load_run(runs_dir, res.runs[0].id)["selection"]["cv_unconverged_fits"]
    # C=1000 x the default two class weights x 3 folds, every one stopped after one iteration
    assert n == 6 and any("6 of the search's 6 fits stopped before converging" in note for note in res.notes)
    # the way out is ten times the max_iter the fits ran with (it said 1000 whatever they had)
    assert any("(e.g. --grid max_iter=10) lets them converge" in note for note in res.notes)
    # the CLI leaves scikit-learn's raw warning out (it reached stderr with a featcache source path beside
    # the note; a researcher's audit); the library above still raised it
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cli(_fit_cmd(root, cache_dir, runs_dir, "--head", "logreg", "--grid", "C=1000", "--grid",
                            "max_iter=1", "--retrain")) == 0
    assert not [w for w in caught if issubclass(w.category, ConvergenceWarning)]


def test_an_svm_search_with_unconverged_fits_says_so_and_the_cli_prints_no_raw_warnings(setup,
                                                                                       capsys) -> None:
    """`fit --head svm --grid kernel=linear --grid max_iter=5` printed liblinear's raw ConvergenceWarning
    once per fit on the terminal, and recorded no count and gave no note (logreg's search did both)."""
    import warnings

    root, cache_dir, runs_dir = setup
    with pytest.warns(ConvergenceWarning):  # the library still warns, as GridSearchCV would
        res = fit(root, "fakenet", "svm", opts(cache_dir, runs_dir,
                                                 grid_args=["kernel=linear,rbf", "C=1", "max_iter=1"]))
    n = load_run(runs_dir, res.runs[0].id)["selection"]["cv_unconverged_fits"]
    # 2 kernels x the default two class weights x 3 folds, every one stopped after one iteration
    assert n == 12 and any("12 of the search's 12 fits stopped before converging (at max_iter;" in note
                           for note in res.notes)
    assert any("(e.g. --grid max_iter=10) lets them converge" in note for note in res.notes)
    converged = fit(root, "fakenet", "svm", opts(cache_dir, runs_dir / "converged",
                                                   grid_args=["kernel=linear,rbf", "C=1"]))
    assert load_run(runs_dir / "converged", converged.runs[0].id)["selection"]["cv_unconverged_fits"] == 0
    assert not any("converging" in note for note in converged.notes)
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cli(_fit_cmd(root, cache_dir, runs_dir, "--head", "svm", "--grid", "kernel=linear,rbf",
                            "--grid", "C=1", "--grid", "max_iter=1", "--retrain")) == 0
    assert not [w for w in caught if issubclass(w.category, ConvergenceWarning)]
    said = capsys.readouterr()
    assert "failed to converge" not in said.err + said.out and "Solver terminated early" not in said.err
    # every fit of the CLI's search (its own folds) counted in the note, in place of the raw warnings
    assert re.search(r"note (\d+) of the search's \1 fits stopped before converging \(at max_iter;",
                     " ".join((said.err + said.out).split()))


def test_test_labels_cannot_change_any_choice(tmp_path: Path) -> None:
    """Swap the labels of the test split: params, threshold and validation results stay identical."""
    a = make_tree(tmp_path / "a")
    b = tmp_path / "b"
    shutil.copytree(a, b)
    for f in list((b / "test" / "NORMAL").iterdir()):  # relabel every test image
        f.rename(b / "test" / "PNEUMONIA" / f.name)
    for f in [p for p in (b / "test" / "PNEUMONIA").iterdir() if p.name.startswith("person")]:
        (b / "test" / "NORMAL").mkdir(exist_ok=True)
        f.rename(b / "test" / "NORMAL" / f.name)
    out = []
    for root in (a, b):
        write_cache(root, tmp_path / f"cache_{root.name}", noise=1.2)
        o = opts(tmp_path / f"cache_{root.name}", tmp_path / f"runs_{root.name}")
        res = fit(root, "fakenet", "logreg", o)
        out.append(res.runs[0])
    ra, rb = out
    assert ra["params"] == rb["params"] and ra["threshold"]["chosen"] == rb["threshold"]["chosen"]
    assert ra.metrics()["val"] == rb.metrics()["val"]
    assert ra.metrics()["test"]["accuracy"] != rb.metrics()["test"]["accuracy"]


def test_a_three_class_report_says_how_its_labels_and_auc_are_made(setup, tmp_path: Path) -> None:
    """A 3-class report said "threshold 0.5" (hero, leaderboard, tables), showed '@thr' columns empty on
    every row and never said its AUC is one-vs-rest macro; the paired table's "—" had no reason."""
    from featcache.report import ReportOptions, build_report

    root, cache_dir, runs_dir = setup
    for grid in (["n_neighbors=3"], ["n_neighbors=5"]):
        fit(root, "fakenet", "knn", opts(cache_dir, runs_dir, grid_args=grid, task="3class"))
    res = build_report(runs_dir, tmp_path / "rep", ReportOptions(inspect_data=False))
    text = " ".join(res.markdown.read_text(encoding="utf-8").split())
    assert "threshold 0.5" not in text and "@thr" not in text
    assert "sorted by validation accuracy (the most probable class; higher is better)" in text
    assert "AUC of a task with more than two classes is one-vs-rest, macro-averaged over the classes" in text
    assert "the paired AUC difference is computed for binary runs only" in text
    assert "accuracy and F1 by the most probable class" in text  # the grid table's caption
    assert [r["rank"] for r in res.leaders] == [1, 2] and res.metric == "accuracy"
    meta = json.loads(res.json.read_text())["meta"]
    assert meta["confidence_intervals"]["n_boot"] and meta["featcache_version"]


@pytest.mark.parametrize("head, grid", [("svm", ["C=1", "kernel=linear,rbf"]), ("knn", ["n_neighbors=3,5"]),
                                        ("mlp", ["layers=8", "epochs=3", "lr=0.01,0.001", "dropout=0"])])
def test_each_head_through_fit(setup, head: str, grid: list[str]) -> None:
    root, cache_dir, runs_dir = setup
    res = fit(root, "fakenet", head, opts(cache_dir, runs_dir, grid_args=grid, task="3class"))
    n_runs = 2 if head == "mlp" else 1  # mlp: one run per config; CV heads: one run per search
    assert len(res.runs) == n_runs
    for r in res.runs:
        m = r.metrics()
        assert r["task"] == "3class" and r["threshold"]["chosen"] is None
        assert len(m["val"]["confusion"]) == 3 and m["test"]["auc"] is not None
        if head == "mlp":
            assert r["selection"]["method"] == "grouped_holdout" and len(m["history"]["loss"]) >= 1
            idx = r.indices()
            groups = np.array([x.group for x in discover(root).records])
            assert not set(groups[idx["train"]]) & set(groups[idx["val"]])
        else:
            assert m["val"]["accuracy"] > 0.8


def test_fusion_views_balance_tta(setup) -> None:
    root, cache_dir, runs_dir = setup
    write_cache(root, cache_dir, name="othernet", dim=4, views=("orig", "hflip"))
    res = fit(root, "fakenet,othernet", "logreg",
              opts(cache_dir, runs_dir, grid_args=["C=1"], train_views=["orig", "hflip"], tta=True,
                   balance="undersample"))
    r = res.runs[0]
    assert [c["name"] for c in r["caches"]] == ["fakenet", "othernet"]
    assert sum(b["feature_dim"] for b in r["backbones"]) == 10
    assert r["train_views"] == ["orig", "hflip"] and r["tta_views"] == ["hflip"]
    assert r["balance"] == "undersample"
    res2 = fit(root, "fakenet", "logreg", opts(cache_dir, runs_dir, grid_args=["C=1"], balance="oversample"))
    assert res2.runs[0].metrics()["train"]["n"] > res.runs[0].metrics()["train"]["n"] / 2


def test_train_views_order_does_not_make_another_run(setup) -> None:
    """README: "The order views are named in does not matter". `--train-views orig,rot+20,hflip` and
    `--train-views orig,hflip,rot+20` trained two runs, with two ids and other numbers (the training rows in
    another order); the second command now finds the first's run done."""
    root, cache_dir, runs_dir = setup
    first = fit(root, "fakenet", "logreg", opts(cache_dir, runs_dir, grid_args=["C=1"],
                                                  train_views=["orig", "rot+20", "hflip"]))
    assert first.runs[0]["train_views"] == ["orig", "hflip", "rot+20"]
    assert any("sorted order" in n for n in first.notes)
    again = fit(root, "fakenet", "logreg", opts(cache_dir, runs_dir, grid_args=["C=1"],
                                                  train_views="hflip,orig,rot+20"))
    assert not again.runs and again.skipped == [r["id"] for r in first.runs]
    assert len([p for p in runs_dir.iterdir() if (p / "run.json").exists()]) == 1


def test_undersampling_cuts_images_before_their_views() -> None:
    """Paper 000 cut each class to the smallest in images, then augmented those: with --train-views every
    kept image brings all its views (cutting image x view rows kept some views of many images)."""
    from featcache.fit import _Ctx

    class Feats:
        def has(self, view: str, idx: np.ndarray) -> np.ndarray:
            return np.ones(len(idx), dtype=bool) if view != "rot" else idx % 2 == 0  # a view some lack

    y = np.array([0] * 10 + [1] * 30)
    subtypes = np.array(["normal"] * 10 + ["bacteria"] * 30, dtype=object)
    views = ["orig", "hflip", "rot", "zoom"]
    for balance in ("undersample", "undersample-subtypes"):
        ctx = _Ctx(train_views=views, aug_views=[], feats=Feats(), y=y, subtypes=subtypes, balance=balance)
        rec, view, yy = ctx.train_rows(np.arange(40), np.random.default_rng(0))
        kept = np.unique(rec)
        assert list(np.bincount(y[kept])) == [10, 10]  # ten images per class, not ten-ish rows' worth
        for r in kept:  # each kept image with every view it has
            assert sorted(view[rec == r]) == sorted(v for v in views if v != "rot" or r % 2 == 0)
        assert list(yy) == list(y[rec])
    from featcache.fit import _balance_rows  # one view: the same rows as cutting rows (old runs stay valid)

    ctx = _Ctx(train_views=["orig"], aug_views=[], feats=Feats(), y=y, subtypes=subtypes,
               balance="undersample")

    idx = np.arange(40)
    old = _balance_rows(idx, np.full(40, "orig"), y, "undersample", np.random.default_rng(3))[0]
    assert list(ctx.train_rows(idx, np.random.default_rng(3))[0]) == list(old)


def test_undersampling_by_subtype_keeps_paper_000s_binary_mix(setup, tmp_path) -> None:
    """mao2018 balanced normal/bacteria/virus and trained binary on those sets (NORMAL:PNEUMONIA 1:2)."""
    from featcache.fit import _balance_rows

    y = np.array([0] * 5 + [1] * 9 + [1] * 4)
    strata = np.array(["normal"] * 5 + ["bacteria"] * 9 + ["virus"] * 4, dtype=object)
    rec = np.arange(len(y))
    r, _, yb = _balance_rows(rec, rec.astype(str), y, "undersample-subtypes", np.random.default_rng(0),
                             strata=strata)
    assert sorted(collections.Counter(strata[r]).values()) == [4, 4, 4] and list(np.bincount(yb)) == [4, 8]
    r, _, yb = _balance_rows(rec, rec.astype(str), y, "undersample", np.random.default_rng(0))
    assert list(np.bincount(yb)) == [5, 5]  # class-level: 1:1, whatever the subtypes

    root, cache_dir, runs_dir = setup
    res = fit(root, "fakenet", "logreg", opts(cache_dir, runs_dir, grid_args=["C=1"],
                                              balance="undersample-subtypes"))
    train = [x for x in discover(root).records if x.split == "train"]
    smallest = min(collections.Counter(x.subtype for x in train).values())
    assert res.runs[0]["balance"] == "undersample-subtypes"
    assert res.runs[0].metrics()["train"]["n"] == 3 * smallest  # the refit's rows: each subtype cut alike

    plain = tmp_path / "plain"
    for i in range(8):
        write_xray(plain / ("cats" if i % 2 else "dogs") / f"img{i}.png", i, size=16)
    write_cache(plain, cache_dir)
    with pytest.raises(DataError, match="undersample-subtypes balances the Kermany subtypes"):
        fit(plain, "fakenet", "logreg", opts(cache_dir, runs_dir, grid_args=["C=1"], task="folders",
                                             balance="undersample-subtypes"))


def test_resume_skips_done_and_cleans_stale(setup) -> None:
    root, cache_dir, runs_dir = setup
    o = opts(cache_dir, runs_dir, grid_args=["layers=4", "epochs=2", "dropout=0", "lr=0.01,0.001"])
    first = fit(root, "fakenet", "mlp", o)
    assert len(first.runs) == 2
    more = ["layers=4", "epochs=2", "dropout=0", "lr=0.01,0.001,0.1"]
    again = fit(root, "fakenet", "mlp", opts(cache_dir, runs_dir, grid_args=more))
    assert len(again.runs) == 1 and sorted(again.skipped) == sorted(r.id for r in first.runs)
    assert again.runs[0]["params"]["lr"] == 0.1
    # fused grid training in another matmul precision gives other numbers: not the same run
    o32 = opts(cache_dir, runs_dir / "p", grid_args=more, mlp_precision="float32")
    bf16 = opts(cache_dir, runs_dir / "p", grid_args=more, mlp_precision="bfloat16")
    first32 = fit(root, "fakenet", "mlp", o32)
    assert len(first32.runs) == 3 and not first32.skipped
    fused32 = {"path": "fused", "precision": "float32", "group_size": 3}
    assert first32.runs[0]["trainer"]["selection"] == fused32
    assert len(fit(root, "fakenet", "mlp", bf16).runs) == 3
    assert len(fit(root, "fakenet", "mlp", bf16).skipped) == 3


def test_jax_trainer_runs_are_their_own(setup) -> None:
    """The JAX grid trainer draws other dropout masks: its runs are new ones, recorded as such."""
    pytest.importorskip("jax")
    root, cache_dir, runs_dir = setup
    grid = ["layers=4", "epochs=2", "dropout=0", "lr=0.01,0.001,0.1"]
    tf = fit(root, "fakenet", "mlp", opts(cache_dir, runs_dir, grid_args=grid, mlp_precision="float32"))
    jx = fit(root, "fakenet", "mlp", opts(cache_dir, runs_dir, grid_args=grid, mlp_precision="float32",
                                          mlp_trainer="jax"))
    assert len(jx.runs) == 3 and not jx.skipped
    fused = {"path": "fused-jax", "precision": "float32", "group_size": 3}
    assert jx.runs[0]["trainer"]["selection"] == fused
    assert {r.id for r in jx.runs}.isdisjoint(r.id for r in tf.runs)
    again = fit(root, "fakenet", "mlp", opts(cache_dir, runs_dir, grid_args=grid, mlp_precision="float32",
                                             mlp_trainer="jax"))
    assert not again.runs and len(again.skipped) == 3


def _fit_cmd(root: Path, cache_dir: Path, runs_dir: Path, *extra: str) -> list[str]:
    return ["fit", "--data", str(root), "--backbone", "fakenet", "--cache-dir", str(cache_dir),
            "--runs-dir", str(runs_dir), *extra]


def test_grid_killed_mid_way_resumes_only_unfinished(setup) -> None:
    root, cache_dir, runs_dir = setup
    grid = ["--head", "mlp", "--grid", "layers=4", "--grid", "epochs=2", "--grid", "dropout=0.2", "--grid",
            "lr=0.1,0.01,0.001", "--mlp-precision", "float32", "--json"]
    args = _fit_cmd(root, cache_dir, runs_dir, *grid)
    exe = [str(Path(sys.executable).parent / "featcache")]
    env = {**os.environ, "FEATCACHE_CRASH_AT": "fit.after_run_saved:2"}
    killed = subprocess.run([*exe, *args], env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    done = list_runs(runs_dir)
    assert len(done) == 2
    # three configs sharing a batch size were trained as one fused chunk; run.json says so
    assert [r["trainer"]["selection"]["path"] for r in done] == ["fused", "fused"]
    assert {r["trainer"]["selection"]["group_size"] for r in done} == {3}
    assert {r["trainer"]["selection"]["precision"] for r in done} == {"float32"}
    # a second kill, this time in the middle of writing the third run: leaves a "running" folder
    env = {**os.environ, "FEATCACHE_CRASH_AT": "fit.run_started:1"}
    killed = subprocess.run([*exe, *args], env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9
    assert len(list_runs(runs_dir, include_incomplete=True)) == 3 and len(list_runs(runs_dir)) == 2
    ok = subprocess.run([*exe, *args], capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
    out = json.loads(ok.stdout)
    assert len(out["runs"]) == 1 and sorted(out["skipped"]) == sorted(r.id for r in done)
    assert len(out["cleaned"]) == 1
    final = list_runs(runs_dir, include_incomplete=True)
    assert len(final) == 3 and all(r.status == "done" for r in final)
    assert sorted(r["params"]["lr"] for r in final) == [0.001, 0.01, 0.1]
    # the resumed config trained in its chunk of the whole grid (not alone through model.fit), and all
    # three runs have exactly the numbers of an uninterrupted grid
    assert [r["trainer"]["selection"]["group_size"] for r in final] == [3, 3, 3]
    assert {r["trainer"]["selection"]["path"] for r in final} == {"fused"}
    whole_dir = runs_dir.parent / "uninterrupted"
    whole = subprocess.run([*exe, *_fit_cmd(root, cache_dir, whole_dir, *grid)], capture_output=True,
                           text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr[-2000:]
    reference = {r["params"]["lr"]: r.metrics() for r in list_runs(whole_dir)}
    for r in final:
        m, ref = r.metrics(), reference[r["params"]["lr"]]
        assert (m["history"], m["val"], m["test"]) == (ref["history"], ref["val"], ref["test"])
    for r in final:  # consistent: every artifact and result file matches its recorded digest
        assert {"metrics.json", "predictions_val.csv", "predictions_test.csv"} <= set(r["records"])
        for rel, digest in [*r["artifacts"].items(), *r["records"].items()]:
            assert sha256_file(r.path / rel) == digest


def test_grid_killed_mid_chunk_resumes_from_its_epoch_checkpoint(setup, capsys, monkeypatch) -> None:
    """SIGKILL after a fused chunk's second epoch checkpoint: the rerun resumes the chunk at epoch 2, says so
    in run.json, gives the uninterrupted grid's numbers and leaves no checkpoint behind."""
    root, cache_dir, runs_dir = setup
    grid = ["--head", "mlp", "--grid", "layers=4", "--grid", "epochs=4", "--grid", "dropout=0.2", "--grid",
            "lr=0.1,0.01,0.001", "--mlp-precision", "float32", "--json"]
    exe = [str(Path(sys.executable).parent / "featcache")]
    env = {**os.environ, "FEATCACHE_MLP_CHECKPOINT_SECONDS": "0"}  # a checkpoint before every epoch
    kill = {**env, "FEATCACHE_CRASH_AT": "mlp.after_checkpoint:2"}
    killed = subprocess.run([*exe, *_fit_cmd(root, cache_dir, runs_dir, *grid)], capture_output=True,
                            text=True, env=kill, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not list_runs(runs_dir)
    assert sorted(p.name for p in (runs_dir / ".checkpoints").glob("*/*")) == ["chunk-0.npz", "sweep.json"]
    monkeypatch.setenv("COLUMNS", "80")
    assert cli(["runs", "ls", "--runs-dir", str(runs_dir)]) == 0
    *lines, sweep_line = capsys.readouterr().err.splitlines()  # the sweep's line is not wrapped
    head = " ".join(" ".join(lines).split())
    assert head.startswith("1 interrupted sweep(s) keep epoch checkpoints in")
    assert "delete its checkpoints with `featcache runs drop-checkpoints ID`" in head
    # it says which command resumes the sweep: the one typed (as run.json records commands)
    sweep_id, _size, _mb, last, saved, *_when, command = sweep_line.split(maxsplit=7)
    assert sweep_id == next((runs_dir / ".checkpoints").iterdir()).name and (last, saved) == ("last", "saved")
    assert command == shlex.join(["featcache", *_fit_cmd(root, cache_dir, runs_dir, *grid)])
    # --json: stdout stays the JSON list (no finished run), the sweep is named on stderr (it was not at all)
    assert cli(["runs", "ls", "--runs-dir", str(runs_dir), "--json"]) == 0
    listed = capsys.readouterr()
    assert json.loads(listed.out) == [] and sweep_id in listed.err
    assert "1 interrupted sweep(s) keep epoch checkpoints in" in " ".join(listed.err.split())
    ok = subprocess.run([*exe, *_fit_cmd(root, cache_dir, runs_dir, *grid[:-1])], capture_output=True,
                        text=True, env=env, timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
    first, second, _ = ok.stdout.split("\n", 2)
    assert first.startswith("features of fakenet: ") and first.endswith(".h5")  # the cache it read
    assert second == "3 config(s) resumed at epoch 2 from a checkpoint."
    resumed = list_runs(runs_dir)
    assert [r["trainer"]["selection"].get("resumed_from_epoch") for r in resumed] == [2, 2, 2]
    monkeypatch.setenv("COLUMNS", "250")  # one table line per row
    assert cli(["runs", "show", resumed[0].id, "--runs-dir", str(runs_dir)]) == 0
    shown = " ".join(capsys.readouterr().out.split())
    assert "fused (float32, chunk of 3), resumed at epoch 2 from a checkpoint" in shown
    assert not (runs_dir / ".checkpoints").exists()
    assert cli(["runs", "ls", "--runs-dir", str(runs_dir)]) == 0
    assert "checkpoints" not in capsys.readouterr().err
    whole_dir = runs_dir.parent / "uninterrupted"
    whole = subprocess.run([*exe, *_fit_cmd(root, cache_dir, whole_dir, *grid)], capture_output=True,
                           text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr[-2000:]
    reference = {r["params"]["lr"]: r.metrics() for r in list_runs(whole_dir)}
    assert all("resumed_from_epoch" not in r["trainer"]["selection"] for r in list_runs(whole_dir))
    for r in resumed:
        m, ref = r.metrics(), reference[r["params"]["lr"]]
        assert (m["history"], m["val"], m["test"]) == (ref["history"], ref["val"], ref["test"])


def test_runs_ls(setup, capsys, monkeypatch) -> None:
    root, cache_dir, runs_dir = setup
    fit(root, "fakenet", "knn", opts(cache_dir, runs_dir, grid_args=["n_neighbors=3"], tags=["<img src=x>"]))
    assert cli(["runs", "ls", "--runs-dir", str(runs_dir), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 1 and rows[0]["head"] == "knn" and rows[0]["val"] is not None
    # into a pipe (no terminal, no $COLUMNS) the table is as wide as its content: at 80 columns its cells
    # wrapped mid-value, so `runs ls > f` split numbers and ids that grep then missed (a CLI audit)
    monkeypatch.delenv("COLUMNS", raising=False)
    assert cli(["runs", "ls", "--runs-dir", str(runs_dir)]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if rows[0]["id"] in line)
    assert "│ knn " in row and "n_neighbors=3 weights=uniform" in row and "<img src=x>" in row
    # one run in full: its record and metrics, as JSON and as tables
    run_id = rows[0]["id"]
    assert cli(["runs", "show", run_id, "--runs-dir", str(runs_dir), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["run"]["id"] == run_id and shown["run"]["params"]["n_neighbors"] == 3
    assert shown["metrics"]["val"]["accuracy"] == rows[0]["val"]
    assert cli(["runs", "show", run_id, "--runs-dir", str(runs_dir)]) == 0
    out = capsys.readouterr().out
    table = " ".join(out.split())
    assert "n_neighbors=3" in table and "fakenet" in table and "<img src=x>" in table and "val" in table
    # whole lines in a pipe, as runs ls: the versions and the cache path were folded at 80 columns
    assert any("python " in line and "scikit-learn " in line and "h5py " in line for line in out.splitlines())
    assert any(str(cache_dir) in line and "rows ×" in line for line in out.splitlines())
    assert cli(["runs", "show", "nope", "--runs-dir", str(runs_dir)]) == 2
    assert "no run 'nope'" in " ".join(capsys.readouterr().err.split())
    assert cli(["runs", "ls", "--runs-dir", str(runs_dir) + "x"]) == 2  # a typo is not an empty folder
    assert "does not exist" in capsys.readouterr().err
    assert cli(["runs", "show", run_id, "--runs-dir", str(runs_dir) + "x"]) == 2
    assert f"runs folder {runs_dir}x does not exist" in " ".join(capsys.readouterr().err.split())


def test_runs_ls_lists_only_runs_the_report_would_publish(setup, capsys, monkeypatch) -> None:
    """`runs ls` showed a run whose metrics.json was edited after the fit (val 0.99), and one whose model
    files were gone, as results, while the report left both out; a valid run.json of the wrong shape
    crashed the whole listing; unfinished runs vanished without a word; and in 80 columns the run id was
    folded across lines, so `runs ls | grep ID` found nothing."""
    root, cache_dir, runs_dir = setup
    for k in (1, 3, 5, 7, 9):
        fit(root, "fakenet", "knn", opts(cache_dir, runs_dir, grid_args=[f"n_neighbors={k}"]))
    runs = sorted(p for p in runs_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert len(runs) == 5
    edited, no_model, malformed, unfinished, bad_records = runs
    info = json.loads((bad_records / "run.json").read_text())
    info["records"] = []  # a hand edit of the wrong shape: crashed ls and show with a traceback
    (bad_records / "run.json").write_text(json.dumps(info))
    m = json.loads((edited / "metrics.json").read_text())
    m["val"]["accuracy"] = 0.99
    (edited / "metrics.json").write_text(json.dumps(m))
    shutil.rmtree(no_model / "model")
    info = json.loads((malformed / "run.json").read_text())
    info["backbones"] = None
    (malformed / "run.json").write_text(json.dumps(info))
    info = json.loads((unfinished / "run.json").read_text())
    info["status"] = "running"
    (unfinished / "run.json").write_text(json.dumps(info))

    assert cli(["runs", "ls", "--runs-dir", str(runs_dir), "--json"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out) == []
    err = " ".join(out.err.split())
    assert f"4 run folder(s) left out, damaged: {edited.name} (metrics.json was changed after the fit" in err
    assert f"{bad_records.name} (run.json's records are malformed)" in err
    assert f"{no_model.name} (model file model/" in err
    assert f"{malformed.name} (run.json or metrics.json" in err
    assert "1 unfinished run folder(s) left out" in err and unfinished.name in err
    # a folder without run.json (being created, or its run.json deleted) was left out without a word
    (runs_dir / "20240101-000000-knn-00000000").mkdir()
    assert cli(["runs", "ls", "--runs-dir", str(runs_dir), "--json"]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "2 unfinished run folder(s) left out" in err
    assert "20240101-000000-knn-00000000 (no run.json)" in err

    info["status"] = "done"  # the listing of an intact run keeps its id on one line in 80 columns
    (unfinished / "run.json").write_text(json.dumps(info))
    monkeypatch.setenv("COLUMNS", "80")
    assert cli(["runs", "ls", "--runs-dir", str(runs_dir)]) == 0
    assert any(unfinished.name in line for line in capsys.readouterr().out.splitlines())
    assert cli(["runs", "show", edited.name, "--runs-dir", str(runs_dir)]) == 0
    assert "cannot be trusted (metrics.json was changed" in " ".join(capsys.readouterr().err.split())
    assert cli(["runs", "drop-checkpoints", "--all", "--runs-dir", str(runs_dir) + "x"]) == 2


def test_knn_configs_capped_to_one_model_in_every_fold_are_named(setup) -> None:
    """`--grid n_neighbors=1,500,1000` on folds of a few dozen training rows: k=500 and k=1000 are both
    capped at each fold's training rows, so they are one model and tie, and fit said nothing; the run
    looked chosen between them. fit names them in a note and run.json records them (cv_same_models); a
    grid whose k fit every fold gets neither."""
    root, cache_dir, runs_dir = setup
    res = fit(root, "fakenet", "knn", opts(cache_dir, runs_dir, grid_args=["n_neighbors=1,500,1000",
                                                                          "weights=uniform"]))
    info = load_run(runs_dir, res.runs[0].id).info
    grid = json.loads((runs_dir / res.runs[0].id / "metrics.json").read_text())["grid"]
    same = info["selection"]["cv_same_models"]
    assert [[grid[i]["n_neighbors"] for i in g] for g in same] == [[500, 1000]]
    note = " ".join(" ".join(res.notes).split())
    assert "n_neighbors=500 and n_neighbors=1000 ran as the same model in every CV fold" in note, note
    assert "(recorded as cv_same_models)" in note
    plain = fit(root, "fakenet", "knn", opts(cache_dir, runs_dir, grid_args=["n_neighbors=1,3",
                                                                            "weights=uniform"]))
    assert "cv_same_models" not in load_run(runs_dir, plain.runs[0].id).info["selection"]
    assert not any("same model" in n for n in plain.notes)


def test_a_hand_edited_run_json_is_left_out_as_damaged(setup, tmp_path: Path, capsys) -> None:
    """run.json cannot record its own SHA-256: a chosen threshold or params edited after the fit were
    published as the run's (a report audit: test sensitivity at 0.9 beside the CI recorded at the real
    threshold, and params the CV search had not chosen). metrics.json, whose digest run.json records,
    says which threshold and which configs are the fit's."""
    from featcache.report import ReportOptions, build_report

    root, cache_dir, runs_dir = setup
    for k in (3, 5):
        fit(root, "fakenet", "knn", opts(cache_dir, runs_dir, grid_args=[f"n_neighbors=1,{k}"]))
    moved, swapped = sorted(p for p in runs_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert cli(["runs", "ls", "--runs-dir", str(runs_dir), "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 2  # untouched runs pass the check
    info = json.loads((moved / "run.json").read_text())
    info["threshold"]["chosen"] = 0.9
    (moved / "run.json").write_text(json.dumps(info))
    info = json.loads((swapped / "run.json").read_text())
    info["params"] = {**info["params"], "n_neighbors": 99}  # a config the search never tried
    (swapped / "run.json").write_text(json.dumps(info))
    assert cli(["runs", "ls", "--runs-dir", str(runs_dir), "--json"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out) == []
    err = " ".join(out.err.split())
    assert "run.json's chosen threshold (0.9) is not the" in err and "edited after the fit" in err
    assert "run.json's params are not a config its CV search ranked first" in err
    with pytest.raises(RunError, match="no usable runs"):
        build_report(runs_dir, tmp_path / "rep", ReportOptions(inspect_data=False))


def test_cli_fit_table(setup, capsys) -> None:
    root, cache_dir, runs_dir = setup
    code = cli(_fit_cmd(root, cache_dir, runs_dir, "--head", "logreg", "--grid", "C=[bold]1"))
    assert code != 0 and "'C'" in " ".join(capsys.readouterr().err.split())
    code = cli(_fit_cmd(root, cache_dir, runs_dir, "--head", "logreg", "--grid", "C=1", "--cv-folds", "3"))
    assert code == 0
    assert "logreg" in capsys.readouterr().out
    run = list_runs(runs_dir)[0]
    assert run["command"][:2] == ["featcache", "fit"] and "--grid" in run["command"]


def test_cli_fit_table_of_a_sweep_puts_its_fixed_settings_in_the_title_and_the_best_first(
        setup, capsys, monkeypatch) -> None:
    """In 80 columns every setting of every row, fixed or not, shared the params column with four metric
    headers: it folded into strips of a few letters (`lr=0.00` / `1`), and the rows came in training order."""
    root, cache_dir, runs_dir = setup
    monkeypatch.setenv("COLUMNS", "80")
    code = cli(_fit_cmd(root, cache_dir, runs_dir, "--head", "mlp", "--layers", "4", "--grid",
                        "lr=0.3,0.03,0.003,0.0003", "--grid", "epochs=2", "--grid", "batch_size=8"))
    assert code == 0
    out = capsys.readouterr().out
    title = " ".join(out[:out.index(" run ")].split())
    assert f"{len(list_runs(runs_dir))} runs, best first; all with" in title
    assert all(s in title for s in ("layers=4", "epochs=2", "batch_size=8")) and "lr=" not in title
    for lr in ("0.3", "0.03", "0.003", "0.0003"):  # the varying setting whole, on one line
        assert re.search(rf"\blr={re.escape(lr)}\s", out)
    shown_ids = [line.split()[0] for line in out.splitlines() if "-mlp-" in line]
    vals = {r["id"]: load_run(runs_dir, r["id"]).metrics()["val"]["accuracy"] for r in list_runs(runs_dir)}
    assert sorted(shown_ids) == sorted(vals)
    assert [vals[i] for i in shown_ids] == sorted(vals.values(), reverse=True)


def test_runs_ls_lists_runs_in_the_order_they_were_made(setup, capsys, monkeypatch) -> None:
    """runs ls sorted by folder name, which is the creation time only while the folder keeps fit's name: runs
    renamed (or copied in under other names) were listed out of order. It sorts by run.json's created time
    (finished when created is missing, offsets honoured), oldest first."""
    root, cache_dir, runs_dir = setup
    made = {  # folder name -> (C, created, finished): names sort the other way round
        "zz-made-first": ("1", "2026-01-01T09:00:00+00:00", "2026-01-01T09:01:00+00:00"),
        "aa-made-last": ("0.1", None, "2026-01-01T10:00:00+00:00"),
        "mm-made-second": ("10", "2026-01-01T10:45:00+01:00", "2026-01-01T10:46:00+01:00"),  # 09:45 UTC
    }
    for name, (c, created, finished) in made.items():
        argv = _fit_cmd(root, cache_dir, runs_dir, "--head", "logreg", "--grid", f"C={c}", "--cv-folds", "3")
        assert cli([*argv, "--json"]) == 0
        (folder,) = [p for p in runs_dir.iterdir() if p.name[:2].isdigit()]  # fit's own name: a UTC time
        info = {**json.loads((folder / "run.json").read_text()), "created": created, "finished": finished}
        if created is None:
            del info["created"]
        (folder / "run.json").write_text(json.dumps(info))
        folder.rename(runs_dir / name)
    capsys.readouterr()
    assert cli(["runs", "ls", "--runs-dir", str(runs_dir), "--json"]) == 0
    order = ["zz-made-first", "mm-made-second", "aa-made-last"]
    assert [r["id"] for r in json.loads(capsys.readouterr().out)] == order
    monkeypatch.setenv("COLUMNS", "200")
    assert cli(["runs", "ls", "--runs-dir", str(runs_dir)]) == 0
    out = capsys.readouterr().out
    assert sorted(order, key=out.index) == order


def test_runs_ls_orders_runs_of_one_second_by_their_place_in_the_grid(setup, capsys) -> None:
    """created is stored to the second and a fused sweep finishes several runs per second, not in grid
    order: those ties went by folder name, whose end is a random config hash."""
    root, cache_dir, runs_dir = setup
    for c, index, name in (("1", 2, "a-third"), ("0.1", 0, "c-first"), ("10", 1, "b-second")):
        argv = _fit_cmd(root, cache_dir, runs_dir, "--head", "logreg", "--grid", f"C={c}", "--cv-folds", "3")
        assert cli([*argv, "--json"]) == 0
        (folder,) = [p for p in runs_dir.iterdir() if p.name[:2].isdigit()]
        info = {**json.loads((folder / "run.json").read_text()), "created": "2026-01-01T09:00:00+00:00",
                "grid": {"index": index, "size": 3, "configs": []}}
        (folder / "run.json").write_text(json.dumps(info))
        folder.rename(runs_dir / name)
    capsys.readouterr()
    assert cli(["runs", "ls", "--runs-dir", str(runs_dir), "--json"]) == 0
    assert [r["id"] for r in json.loads(capsys.readouterr().out)] == ["c-first", "b-second", "a-third"]


def test_a_new_untracked_module_marks_the_source_revision_dirty(tmp_path: Path) -> None:
    """A Python file git does not track yet in the package folders (a new module) left the revision clean
    (a reproducibility audit); other untracked files still do not count."""
    import subprocess

    from featcache.runs import source_revision

    def git(*args: str) -> None:
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    (tmp_path / "featcache").mkdir()
    (tmp_path / "featcache" / "a.py").write_text("x = 1\n")
    git("init", "-q")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "one")
    clean = source_revision(tmp_path)
    assert clean and not clean.endswith("-dirty")
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "featcache" / "data.csv").write_text("1")
    assert source_revision(tmp_path) == clean
    (tmp_path / "featcache" / "new_module.py").write_text("y = 2\n")
    assert source_revision(tmp_path) == f"{clean}-dirty"


def test_the_replay_command_names_the_keras_backend_keras_json_chose() -> None:
    """An mlp trained on the backend keras.json chose (no $KERAS_BACKEND) replayed as a bare command, which
    trained on the replaying machine's backend: other numbers, other run ids (a reproducibility audit).
    A logistic-regression fit's numbers do not depend on it, and a variable set already is not repeated."""
    from featcache.runs import replay_command

    env = {"cwd": "/w", "keras_backend": "jax", "variables": {}}
    mlp = {"head": "mlp", "command": ["featcache", "fit", "--head", "mlp"], "environment": env}
    assert replay_command(mlp) == "cd /w && KERAS_BACKEND=jax featcache fit --head mlp"
    logreg = {**mlp, "head": "logreg", "command": ["featcache", "fit", "--head", "logreg"]}
    assert replay_command(logreg) == "cd /w && featcache fit --head logreg"
    extracted = {**logreg, "command": ["featcache", "run", "--head", "logreg"]}  # its features too
    assert replay_command(extracted) == "cd /w && KERAS_BACKEND=jax featcache run --head logreg"
    given = {**mlp, "environment": {**env, "variables": {"KERAS_BACKEND": "jax"}}}
    assert replay_command(given).count("KERAS_BACKEND") == 1


def test_run_json_records_the_command_as_typed(setup, capsys, monkeypatch) -> None:
    """run.json's command was rebuilt from the parsed options: flags in declaration order, defaults left out,
    so `runs show` printed a command the user never typed. It is now the argv as typed, shell-quoted."""
    from featcache.runs import replay_command

    root, cache_dir, runs_dir = setup
    argv = ["fit", "--head", "logreg", "--seed=0", "--tag", "two words", "--runs-dir", str(runs_dir),
            "--cv-folds", "3", "--grid", "C=1", "--data", str(root), "--backbone", "fakenet", "--cache-dir",
            str(cache_dir), "--tag", "a;b"]
    assert cli(argv) == 0
    capsys.readouterr()
    run = list_runs(runs_dir)[0]
    assert run["command"] == ["featcache", *argv]
    typed = shlex.join(["featcache", *argv])
    assert replay_command(run.info).endswith(typed)  # after `cd` into the working folder (and variables)
    monkeypatch.setenv("COLUMNS", "2000")  # the table on one line per row, to find the command whole
    assert cli(["runs", "show", run.id, "--runs-dir", str(runs_dir)]) == 0
    assert typed in capsys.readouterr().out


@pytest.mark.parametrize("extra, needle", [
    (["--head", "forest"], "unknown head 'forest'"),
    (["--head", "logreg,mlp"], "fit trains one head per call, got --head logreg,mlp; run fit once per "
                               "head, or use `featcache run --head logreg,mlp`"),
    (["--head", "logreg", "--grid", "C=abc"], "'C'"),
    (["--head", "logreg", "--grid", "bogus=1"], "bogus"),
    (["--head", "mlp", "--grid", "epochs=1.5"], "epochs"),
    (["--head", "logreg", "--preset", "nope"], "unknown preset"),
    (["--head", "logreg", "--threshold", "magic"], "--threshold"),
    (["--head", "logreg", "--balance", "sideways"], "--balance"),
    (["--head", "knn", "--task", "folders", "--metric", "speed"], "--metric"),
    (["--head", "mlp", "--mlp-precision", "fp8"], "--mlp-precision"),
    (["--head", "mlp", "--mlp-trainer", "torch"], "--mlp-trainer"),
    (["--head", "logreg", "--seed", "-3"], "--seed must be between 0 and"),
    (["--head", "mlp", "--layers", "8", "--grid", "layers=32"], "--layers and --grid layers=... both set"),
    (["--head", "mlp", "--layers", "16 8"], "--layers expects positive sizes"),
    (["--head", "logreg", "--pooling", "mean"], "--pooling must be one of avg, max, flatten, got 'mean'"),
    (["--head", "logreg", "--dtype", "float64"], "--dtype must be one of float32, float16"),
    (["--head", "logreg", "--resize", "foo"], "--resize must be one of squash, pad, crop"),
    (["--head", "logreg", "--image-size", "0"], "--image-size must be a positive number of pixels"),
    (["--head", "logreg", "--tta-views", "hflip"], "add --tta, or drop --tta-views"),
    (["--head", "logreg", "--balance", "oversample", "--aug-views", "sideways"], "--aug-views: invalid view"),
    # each view option names itself: "invalid view 'flip'" named no flag, and an empty --tta-views was told
    # to "pass e.g. --views orig,hflip", extract's option
    (["--head", "logreg", "--train-views", "orig,flip"], "--train-views: invalid view 'flip'"),
    (["--head", "logreg", "--tta", "--tta-views", ","], "--tta-views: no views given; pass e.g. --tta-views "
                                                         "orig,hflip"),
    (["--head", "mlp", "--env", "FEATCACHE_MLP_CHECKPOINT_SECONDS=abc"], "a number of seconds, 0 or more"),
    (["--head", "mlp", "--env", "FEATCACHE_MLP_CHECKPOINT_SECONDS=-5"], "got '-5'"),
])
def test_cli_config_errors(setup, capsys, monkeypatch, extra: list[str], needle: str) -> None:
    root, cache_dir, runs_dir = setup
    if extra[-2] == "--env":  # an environment variable, not a flag
        monkeypatch.setenv(*extra[-1].split("=", 1))
        extra = extra[:-2]
    assert cli(_fit_cmd(root, cache_dir, runs_dir, *extra)) != 0
    raw = capsys.readouterr().err
    assert raw.startswith("error:"), raw  # the error first: no empty line left by a progress bar
    err = " ".join(raw.split())
    assert needle in err and "Traceback" not in err and err.count("error:") == 1


def test_missing_rows_and_3class_errors(tmp_path: Path, capsys) -> None:
    root = make_tree(tmp_path / "data")
    write_cache(root, tmp_path / "cache", skip=3)
    with pytest.raises(CacheError) as exc:
        fit(root, "fakenet", "logreg", opts(tmp_path / "cache", tmp_path / "runs"))
    msg = str(exc.value)
    assert msg.startswith("3 of ") and "featcache extract --data" in msg and "--backbone fakenet" in msg
    assert "cache merge" not in msg
    # a merged file cut short beside its shards: the cheap fix (merge again) is offered too
    cfg = cache_config(discover(root).root, fake_backbone("fakenet", 6), "squash", "float32")
    shard = cache_path(tmp_path / "cache", cfg, shard=(0, 1))
    shutil.copy(write_cache(root, tmp_path / "full", name="fakenet"), shard)
    with pytest.raises(CacheError, match=r"was cut short, rerun `featcache cache merge .*shard-0-of-1.h5`"):
        fit(root, "fakenet", "logreg", opts(tmp_path / "cache", tmp_path / "runs"))
    shard.unlink()
    with pytest.raises(CacheError, match="no feature cache for backbone 'vgg16'"):
        fit(root, "vgg16", "logreg", opts(tmp_path / "cache", tmp_path / "runs"))
    # shards never merged: the error gives the merge command
    cfg = cache_config(discover(root).root, fake_backbone("fakenet", 6), "squash", "float32")
    shard = cache_path(tmp_path / "sharded", cfg, shard=(0, 2))
    shard.parent.mkdir()
    shutil.copy(write_cache(root, tmp_path / "whole", name="fakenet"), shard)
    merge_hint = r"in 1 shard file\(s\) .*merge them first: `featcache cache merge "
    with pytest.raises(CacheError, match=merge_hint) as exc:
        fit(root, "fakenet", "logreg", opts(tmp_path / "sharded", tmp_path / "runs"))
    assert str(shard) in str(exc.value)
    # a cache that is there but truncated is named, not reported missing ("extract first" would not help)
    broken = write_cache(root, tmp_path / "broken", name="fakenet")
    broken.write_bytes(broken.read_bytes()[:2000])
    with pytest.raises(CacheError) as exc:
        fit(root, "fakenet", "logreg", opts(tmp_path / "broken", tmp_path / "runs"))
    assert str(broken) in str(exc.value) and "not a readable HDF5 file" in str(exc.value)
    # a copy cut short says so, and that a full copy brings the rows back (not only "delete it")
    assert "file: cut short (2,000 of the " in str(exc.value) and "copy it again in full" in str(exc.value)
    _, pooling, size = broken.name.split("__")[1].rsplit("-", 2)  # the command rebuilds that file, whose
    said = " ".join(str(exc.value).split())  # settings fit's own flags do not give
    assert f"--pooling {pooling} --image-size {size} --cache-dir" in said and "a file name does not" in said
    # readable HDF5 that this featcache cannot use is not "truncated or corrupt, delete it"
    newer = write_cache(root, tmp_path / "newer", name="fakenet")
    with h5py.File(newer, "r+") as f:
        f.attrs["featcache_format"] = 99
    with pytest.raises(CacheError, match="has format 99, newer than this featcache understands"):
        fit(root, "fakenet", "logreg", opts(tmp_path / "newer", tmp_path / "runs"))
    with pytest.raises(CacheError, match="no feature cache for backbone 'resnet50'"):  # only its backbone's
        fit(root, "resnet50", "logreg", opts(tmp_path / "broken", tmp_path / "runs"))
    # a name that is no backbone at all: the valid names, not an extract command that would fail too
    with pytest.raises(ConfigError, match="unknown backbone 'resnet99'; choose one of: .*vgg16"):
        fit(root, "resnet99", "logreg", opts(tmp_path / "broken", tmp_path / "runs"))
    # damaged feature values (NaN, infinity, or 3e38 from overwritten bytes) are refused with the file named
    for bad_value in (np.nan, np.inf, 3.4e38):
        damaged = write_cache(root, tmp_path / f"damaged{bad_value}", name="fakenet", poison=bad_value)
        with pytest.raises(CacheError, match="NaN, infinite or absurdly large .* in 1 row") as exc:
            fit(root, "fakenet", "logreg", opts(tmp_path / f"damaged{bad_value}", tmp_path / "runs"))
        assert str(damaged) in str(exc.value) and "cache verify" in str(exc.value)
    # a row changed after it was written (its digest no longer matches) is refused, whatever its value
    tampered = write_cache(root, tmp_path / "tampered", name="fakenet")
    with h5py.File(tampered, "r+") as h:
        h["features"][2] = -5 * h["features"][2]
        first = h["paths"][2].decode()
    with pytest.raises(CacheError, match=r"1 row\(s\) of cache .* changed after they were written") as exc:
        fit(root, "fakenet", "logreg", opts(tmp_path / "tampered", tmp_path / "runs"))
    assert f"the first is {first}" in str(exc.value) and "cache verify" in str(exc.value)
    folders = tmp_path / "pets"
    for i in range(4):
        write_xray(folders / "train" / "cat" / f"c{i}.png", i, 16)
        write_xray(folders / "train" / "dog" / f"d{i}.png", 10 + i, 16)
    with pytest.raises(DataError, match="3class"):
        fit(folders, "fakenet", "logreg", opts(tmp_path / "cache", tmp_path / "runs", task="3class"))
    with pytest.raises(ConfigError, match="--layers applies to the mlp head only"):
        fit(root, "fakenet", "logreg", opts(tmp_path / "cache", tmp_path / "runs", layers=(8,)))
    code = cli(["fit", "--data", str(root), "--backbone", "fakenet", "--head", "knn", "--cache-dir",
                str(tmp_path / "cache"), "--runs-dir", str(tmp_path / "runs")])
    assert code != 0 and "featcache extract" in " ".join(capsys.readouterr().err.split())


def test_a_manifests_missing_cache_names_the_csv_in_the_extract_command(tmp_path: Path) -> None:
    """`fit --data labels.csv` without a cache said `extract --data <the CSV's folder>`, which extract refuses
    (a folder above a dataset), and missed a cache of the same images in another folder."""
    root = make_tree(tmp_path / "data")
    csv = tmp_path / "labels.csv"
    rows = [f"{r.path.relative_to(tmp_path).as_posix()},{r.label},{r.split}" for r in discover(root).records]
    csv.write_text("path,label,split\n" + "\n".join(rows) + "\n")
    with pytest.raises(CacheError) as exc:
        fit(csv, "vgg16", "logreg", opts(tmp_path / "empty", tmp_path / "runs"))
    cmd = str(exc.value).split("`")[1]
    assert f"--data {csv}" in cmd
    assert discover(shlex.split(cmd)[shlex.split(cmd).index("--data") + 1]).records  # extract can read it
    write_cache(root, tmp_path / "cache", name="vgg16")  # the same images' features, from the folder
    with pytest.raises(CacheError, match=rf"holds its features for {re.escape(str(root))}.*--data {csv} "):
        fit(csv, "vgg16", "logreg", opts(tmp_path / "cache", tmp_path / "runs"))


def test_a_cache_whose_settings_were_edited_is_refused_with_cache_verify_named(tmp_path: Path) -> None:
    """`cache verify` said "config_hash does not match config_json (the settings were edited)" while fit
    read the same file without a word and recorded the edited settings as the ones its rows came from."""
    from featcache.cache import canonical_json, verify

    root = make_tree(tmp_path / "data", n_patients=6)
    edited = write_cache(root, tmp_path / "cache")
    with h5py.File(edited, "r+") as f:
        config = json.loads(f.attrs["config_json"])
        config["preprocess"] = "caffe"  # a setting fit does not select by: the file is still "the" cache
        f.attrs["config_json"] = canonical_json(config)
    for cache_files in (None, {"fakenet": edited}):  # found in --cache-dir, or given as the file itself
        with pytest.raises(CacheError) as exc:
            fit(root, "fakenet", "logreg", opts(tmp_path / "cache", tmp_path / "runs",
                                                 cache_files=cache_files))
        said = " ".join(str(exc.value).split())
        assert str(edited) in said and "were edited" in said and f"featcache cache verify {edited}" in said
    assert not (tmp_path / "runs").exists()
    assert "config_hash does not match config_json" in " ".join(verify(edited)["problems"])


def test_images_extract_could_not_decode_are_left_out_and_named(setup, capsys) -> None:
    """A zero-byte or text "image" has no features (extract skipped it): fit leaves it out, says so and
    records it, instead of asking for an extract that would skip it again. A missing image that decodes
    still asks for the extract."""
    root, cache_dir, runs_dir = setup
    (root / "train" / "NORMAL" / "zero.jpeg").write_bytes(b"")
    (root / "test" / "PNEUMONIA" / "person900_virus_1.jpeg").write_text("not an image")
    res = fit(root, "fakenet", "knn", opts(cache_dir, runs_dir))
    assert sorted(rel for rel, _ in res.left_out) == ["test/PNEUMONIA/person900_virus_1.jpeg",
                                                      "train/NORMAL/zero.jpeg"]
    run = load_run(runs_dir, res.runs[0].id)
    assert {e["path"] for e in run["dataset"]["left_out"]} == {rel for rel, _ in res.left_out}
    assert run["dataset"]["n_images"] == len(discover(root).records) - 2
    assert "person900" not in {r["relpath"].split("/")[-1][:9] for r in run.predictions("test")}
    code = cli(["fit", "--data", str(root), "--backbone", "fakenet", "--head", "knn", "--cache-dir",
                str(cache_dir), "--runs-dir", str(runs_dir), "--cv-folds", "3"])
    out = " ".join(capsys.readouterr().out.split())
    assert code == 0 and "2 image(s) cannot be decoded and were left out" in out
    assert "train/NORMAL/zero.jpeg: zero-byte file" in out
    write_xray(root / "train" / "NORMAL" / "IM-0999-0001.jpeg", 999, size=16)  # decodes: not extracted yet
    with pytest.raises(CacheError, match="1 of .* have no 'orig' features .*featcache extract"):
        fit(root, "fakenet", "knn", opts(cache_dir, runs_dir))


def test_values_scikit_learn_or_keras_reject_and_too_little_data_are_one_sentence(setup, tmp_path) -> None:
    """Grid values only the estimator knows are invalid, splits that need more images than a class has, an
    impossible head size and a calibration without data: each is one sentence, not a library traceback."""
    root, cache_dir, runs_dir = setup
    cases = [
        ("knn", {"grid_args": ["metric=foo"]}, ConfigError,
         "head 'knn' rejected a grid value: The 'metric' parameter of KNeighborsClassifier"),
        ("logreg", {"grid_args": ["penalty=l1"]}, ConfigError,
         "logistic regression rejected the grid: Solver lbfgs supports only 'l2' or None penalties"),
        ("mlp", {"grid_args": ["activation=foo", "epochs=1"], "layers": (4,)}, ConfigError,
         "unknown activation 'foo'"),
        ("mlp", {"grid_args": ["epochs=1"], "layers": (10**9,)}, ConfigError,
         r"parameters: .* GiB of weights and optimizer state, more than the .* GiB of memory available"),
        ("knn", {"cv_folds": 60}, DataError, "only .* patients are available but the split needs at least"),
    ]
    orig_only = write_cache(root, tmp_path / "orig_only")
    for head, kw, error, message in cases:
        with pytest.raises(error, match=message) as exc:
            fit(root, "fakenet", head, opts(cache_dir, runs_dir, **kw))
        assert "Traceback" not in str(exc.value) and "\n" not in str(exc.value)
    with pytest.raises(ConfigError, match="--tta averages orig with hflip, and cache .* has no 'hflip'"):
        fit(root, "fakenet", "knn",
            opts(tmp_path / "orig_only", runs_dir, tta=True, cache_files={"fakenet": orig_only}))
    # a tiny validation fraction means fewer folds (one validation patient), not a failure
    res = fit(root, "fakenet", "mlp", opts(cache_dir, runs_dir, val_fraction=0.001, layers=(4,),
                                           grid_args=["epochs=1"]))
    assert res.runs and all(r["selection"]["method"] == "grouped_holdout" for r in res.runs)
    # two images: no class has an image for each of 2 folds; svm's calibration needs 2 patients per class
    tiny = tmp_path / "tiny"
    write_xray(tiny / "train" / "NORMAL" / "IM-0001-0001.jpeg", 1, size=16)
    write_xray(tiny / "train" / "PNEUMONIA" / "person1_virus_1.jpeg", 2, size=16)
    write_cache(tiny, tmp_path / "tiny_cache")
    with pytest.raises(DataError, match="every class has fewer than 2 images"):
        fit(tiny, "fakenet", "knn", opts(tmp_path / "tiny_cache", runs_dir, cv_folds=2))
    from featcache.heads import get_head

    with pytest.raises(DataError, match="svm's probability calibration needs at least 2 patients of every"):
        get_head("svm").fit(np.eye(3), np.array([0, 0, 1]), {"kernel": "linear"})
    one_class = tmp_path / "one_class"
    for i in range(4):
        write_xray(one_class / "train" / "cats" / f"c{i}.png", i, 16)
    write_cache(one_class, tmp_path / "one_cache")
    with pytest.raises(DataError, match="holds images of one class only"):
        fit(one_class, "fakenet", "knn", opts(tmp_path / "one_cache", runs_dir, task="folders"))


def test_damaged_run_files_are_named_not_tracebacks(setup, capsys) -> None:
    """A run whose metrics.json or run.json was damaged after the fact: `runs ls` lists the others and names
    it, `runs show` says what to do, and the report leaves it out with the reason."""
    root, cache_dir, runs_dir = setup
    for grid in ("n_neighbors=3", "n_neighbors=5", "n_neighbors=7"):
        fit(root, "fakenet", "knn", opts(cache_dir, runs_dir, grid_args=[grid], tags=["t1"]))
    a, b, c = (r.id for r in list_runs(runs_dir))
    (runs_dir / a / "metrics.json").write_text("garbage")
    (runs_dir / b / "run.json").write_text("[]")
    assert cli(["runs", "ls", "--runs-dir", str(runs_dir), "--json"]) == 0
    captured = capsys.readouterr()
    rows = json.loads(captured.out)
    assert [r["id"] for r in rows] == [c] and rows[0]["tags"] == ["t1"]
    err = " ".join(captured.err.split())
    assert f"2 run folder(s) left out, damaged: {a} (metrics.json damaged); {b} (run.json unreadable)" in err
    assert cli(["runs", "show", a, "--runs-dir", str(runs_dir)]) == 2
    assert "has a damaged metrics.json; delete" in " ".join(capsys.readouterr().err.split())
    assert cli(["runs", "show", b, "--runs-dir", str(runs_dir)]) == 2
    assert "has an unreadable run.json" in " ".join(capsys.readouterr().err.split())
    from featcache.report.collect import load_runs

    kept, left_out = load_runs(runs_dir)
    assert [r.id for r in kept] == [c] and {name for name, _ in left_out} == {a, b}


def test_prediction_csvs_are_utf8_whatever_the_file_names(tmp_path: Path) -> None:
    """A file name with non-UTF-8 bytes is written escaped, so csv (and pandas, and the report) read the
    predictions file back."""
    import csv

    root = make_tree(tmp_path / "data")
    odd = os.fsencode(root / "test" / "NORMAL") + b"/IM-9003-\xff\xfe.jpeg"
    shutil.copy(root / "train" / "NORMAL" / sorted(os.listdir(root / "train" / "NORMAL"))[0], odd)
    write_cache(root, tmp_path / "cache")
    res = fit(root, "fakenet", "knn", opts(tmp_path / "cache", tmp_path / "runs"))
    with open(res.runs[0].path / "predictions_test.csv", encoding="utf-8", newline="") as fh:
        names = [row["relpath"] for row in csv.DictReader(fh)]
    assert "test/NORMAL/IM-9003-\\xff\\xfe.jpeg" in names
    from featcache.report.collect import load_run as load_record

    assert not load_record(res.runs[0].path).problems


def test_prediction_csvs_hold_the_exact_probabilities_and_patient_ids_are_counted(setup, tmp_path) -> None:
    """The report recomputes metrics from the CSVs: rounded probabilities made false ties and another AUC.
    run.json counts the images that have a real patient id (0 for names without one), and says what the
    selection grouped by."""
    from sklearn.metrics import roc_auc_score

    root, cache_dir, runs_dir = setup
    res = fit(root, "fakenet", "logreg", opts(cache_dir, runs_dir, grid_args=["C=0.1"]))
    run = load_run(runs_dir, res.runs[0].id)
    rows = run.predictions("test")
    auc = roc_auc_score([int(r["y_true"]) for r in rows], [float(r["p_PNEUMONIA"]) for r in rows])
    assert auc == run.metrics()["test"]["auc"]
    assert run["dataset"]["patient_ids"] == run["dataset"]["n_images"]
    assert run["selection"]["group_by"] == "patient"
    # the chosen threshold is no validation image's probability: recomputing one in the last digits (as
    # predict does) cannot flip its label
    val = [float(r["p_PNEUMONIA"]) for r in run.predictions("val")]
    chosen = run["threshold"]["chosen"]
    assert chosen not in val and min(abs(v - chosen) for v in val) > 1e-6
    plain = tmp_path / "plain"
    for i in range(6):
        write_xray(plain / "train" / "cats" / f"c{i}.png", i, 16)
        write_xray(plain / "train" / "dogs" / f"d{i}.png", 10 + i, 16)
    write_cache(plain, tmp_path / "plain_cache")
    res = fit(plain, "fakenet", "knn", opts(tmp_path / "plain_cache", runs_dir, task="folders", cv_folds=2))
    plain_run = load_run(runs_dir, res.runs[0].id)
    assert plain_run["dataset"]["patient_ids"] == 0
    assert plain_run["selection"]["group_by"] == "file name"  # it said "patient" (Provenance printed it)


def test_a_dataset_changed_in_place_is_trained_anew(setup) -> None:
    """The runs of a dataset's old contents are not "already done" for its new ones: moving an image to
    another class (or adding one) under the same root gives a new sweep; moving it back finds the old runs."""
    root, cache_dir, runs_dir = setup
    first = fit(root, "fakenet", "knn", opts(cache_dir, runs_dir))
    assert first.runs and not first.skipped
    image = sorted((root / "train" / "NORMAL").iterdir())[0]
    moved = root / "train" / "PNEUMONIA" / image.name
    image.rename(moved)
    relabelled = fit(root, "fakenet", "knn", opts(cache_dir, runs_dir))
    assert relabelled.runs and not relabelled.skipped and relabelled.sweep_id != first.sweep_id
    moved.rename(image)
    again = fit(root, "fakenet", "knn", opts(cache_dir, runs_dir))
    assert not again.runs and again.skipped == [first.runs[0].id] and again.sweep_id == first.sweep_id



def test_a_fit_stopped_while_writing_a_run_leaves_no_run_folder(setup, monkeypatch) -> None:
    """Ctrl-C, SIGTERM or a full disk while a run's files were written left a "running" folder (and its
    half-written model) that only a rerun of the same config removed; on a full disk it kept the disk full."""
    import errno

    from featcache.runs import RunWriter, list_runs

    root, cache_dir, runs_dir = setup

    def full(self, model):
        (self.path / "model").mkdir(exist_ok=True)
        (self.path / "model" / "tmp-part").write_bytes(b"x" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(RunWriter, "save_head", full)
    with pytest.raises(OSError, match="No space"):
        fit(root, "fakenet", "knn", opts(cache_dir, runs_dir))
    assert list_runs(runs_dir, include_incomplete=True) == []
    monkeypatch.setattr(RunWriter, "save_head", lambda self, model: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        fit(root, "fakenet", "knn", opts(cache_dir, runs_dir))
    assert list_runs(runs_dir, include_incomplete=True) == []
    monkeypatch.undo()
    assert fit(root, "fakenet", "knn", opts(cache_dir, runs_dir)).runs


def test_a_checkpoint_that_cannot_be_written_is_said(setup, monkeypatch) -> None:
    """A failed checkpoint write (a full disk) turned a fused chunk's checkpoints off without a word: the
    runs are whole, but an interruption would have restarted the chunk. run.json and a note say so now."""
    import featcache.heads.mlp_checkpoint as ck

    root, cache_dir, runs_dir = setup
    monkeypatch.setenv("FEATCACHE_MLP_CHECKPOINT_SECONDS", "0")  # a checkpoint before every epoch
    monkeypatch.setattr(ck, "save", lambda *a, **k: False)
    grid = ["layers=4", "epochs=3", "dropout=0", "lr=0.01,0.001"]
    res = fit(root, "fakenet", "mlp", opts(cache_dir, runs_dir, grid_args=grid, mlp_precision="float32"))
    assert len(res.runs) == 2
    assert all(r["trainer"]["selection"]["checkpoint_failed"] for r in res.runs)
    assert any("epoch checkpoints could not be written for 2 config(s)" in n for n in res.notes)
    monkeypatch.undo()
    ok = fit(root, "fakenet", "mlp", opts(cache_dir, runs_dir / "ok", grid_args=grid,
                                          mlp_precision="float32"))
    assert not any("checkpoint_failed" in r["trainer"]["selection"] for r in ok.runs)
    assert not any("checkpoints could not" in n for n in ok.notes)


def test_tta_needs_every_view_of_every_image_it_scores(tmp_path: Path) -> None:
    """Views extracted for the training split only: TTA averaged orig alone for test images and both views
    for the rest, without a word, while predict computed every view (0.195 apart). Refused now."""
    root = make_tree(tmp_path / "data")
    cache = write_cache(root, tmp_path / "cache", views=("orig",))
    ds = discover(root)
    train = [r for r in ds.records if r.split == "train"]
    keys = list(dict.fromkeys(sha256_file(r.path) for r in train))
    cfg = cache_config(ds.root, fake_backbone(), "squash", "float32")
    with CacheWriter(cache, cfg, 6) as w:  # hflip rows for the training images only
        w.reserve(len(keys))
        w.append(keys, ["hflip"] * len(keys), [r.relpath for r in train][: len(keys)],
                 np.ones((len(keys), 6), dtype=np.float32))
    with pytest.raises(ConfigError, match=r"images it scores lack view hflip in the cache") as err:
        fit(root, "fakenet", "logreg", opts(tmp_path / "cache", tmp_path / "runs", tta=True))
    assert "--views orig,hflip" in str(err.value)


def _add_view(root: Path, cache: Path, view: str) -> None:
    """Append one more view to a fake cache, as an extract for another experiment would: every image, with
    features far from the other views' (an average or draw that took it in would move the numbers)."""
    ds = discover(root)
    keys = list(dict.fromkeys(sha256_file(r.path) for r in ds.records))
    rel = {sha256_file(r.path): r.relpath for r in ds.records}
    with CacheWriter(cache, cache_config(ds.root, fake_backbone(), "squash", "float32"), 6) as w:
        w.reserve(len(keys))
        w.append(keys, [view] * len(keys), [rel[k] for k in keys],
                 np.random.default_rng(5).normal(0, 4, (len(keys), 6)).astype(np.float32))


def test_tta_and_oversampling_views_come_from_the_command_not_the_cache(setup, tmp_path: Path) -> None:
    """--tta averaged, and --balance oversample drew from, every view the cache held: a view extracted into
    the same cache for another experiment changed what the same command computed (another run, other
    numbers). They are the views the options name now (defaults: hflip; hflip,rot+20)."""
    root, cache_dir, runs_dir = setup
    (cache,) = cache_dir.glob("*.h5")
    o = opts(cache_dir, runs_dir, grid_args=["C=1"], tta=True, balance="oversample")
    done = fit(root, "fakenet", "logreg", o)
    first = done.runs[0]
    assert first["tta_views"] == ["hflip"] and first["aug_views"] == ["hflip", "rot+20"]
    # runs made before the options existed used every cached view: the note says how to reuse them
    assert [n for n in done.notes if "existed" in n] == [
        "--tta used hflip (--tta-views's default). Before --tta-views existed it used every view the cache "
        "holds, here hflip, rot+20: to reuse runs made that way, pass --tta-views hflip,rot+20."]
    _add_view(root, cache, "rot-20")
    again = fit(root, "fakenet", "logreg", o)
    assert not again.runs and again.skipped == [first.id]  # the same run: already done
    assert any("pass --aug-views hflip,rot+20,rot-20." in n for n in again.notes)
    elsewhere = fit(root, "fakenet", "logreg", replace(o, runs_dir=tmp_path / "runs2")).runs[0]
    assert elsewhere["config_hash"] == first["config_hash"]  # the run id's config part (not its time)
    assert elsewhere.predictions("test") == first.predictions("test")
    assert elsewhere.metrics()["train"]["n"] == first.metrics()["train"]["n"]
    # naming the new view is another run, which reads it
    named = fit(root, "fakenet", "logreg", opts(cache_dir, runs_dir, grid_args=["C=1"], tta=True,
                                                tta_views="rot-20,hflip")).runs[0]
    assert named["tta_views"] == ["hflip", "rot-20"] and named["config_hash"] != first["config_hash"]


def test_a_named_view_the_cache_lacks_is_refused_with_the_extract_that_adds_it(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "data")
    write_cache(root, tmp_path / "cache", views=("orig", "hflip"))
    o = {"grid_args": ["C=1"]}
    cases = [({"tta": True, "tta_views": "hflip,rot+20"}, "--tta averages orig with hflip, rot+20", "rot+20",
              "orig,hflip,rot+20"),
             ({"balance": "oversample"}, "--balance oversample draws from hflip, rot+20", "rot+20",
              "orig,hflip,rot+20"),
             ({"balance": "oversample", "aug_views": "zoom1.1"}, "--balance oversample draws from zoom1.1",
              "zoom1.1", "orig,zoom1.1")]
    for kw, says, view, views in cases:
        with pytest.raises(ConfigError, match=re.escape(says)) as err:
            fit(root, "fakenet", "logreg", opts(tmp_path / "cache", tmp_path / "runs", **o, **kw))
        assert f"has no '{view}' features" in str(err.value) and f"--views {views} " in str(err.value)
    refused = [({"tta_views": "hflip"}, "add --tta, or drop --tta-views"),
               ({"aug_views": "hflip"}, "add --balance oversample, or drop --aug-views"),
               ({"tta": True, "tta_views": "orig"}, "--tta-views needs a view besides orig"),
               ({"balance": "oversample", "aug_views": "hflip", "train_views": "orig,hflip"},
                "--aug-views names hflip, which --train-views already trains on")]
    for kw, says in refused:
        with pytest.raises(ConfigError, match=re.escape(says)):
            fit(root, "fakenet", "logreg", opts(tmp_path / "cache", tmp_path / "runs", **o, **kw))
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").glob("*/run.json"))


def test_another_bootstrap_count_is_another_run(setup) -> None:
    """The demo fits with 500 resamples: a later fit asking 1000 was served the demo's run and intervals."""
    root, cache_dir, runs_dir = setup
    first = fit(root, "fakenet", "knn", opts(cache_dir, runs_dir, n_boot=50))
    other = fit(root, "fakenet", "knn", opts(cache_dir, runs_dir, n_boot=60))
    assert other.runs and not other.skipped and other.sweep_id != first.sweep_id
    assert fit(root, "fakenet", "knn", opts(cache_dir, runs_dir, n_boot=50)).skipped == [first.runs[0].id]
    tagged = fit(root, "fakenet", "knn", opts(cache_dir, runs_dir, n_boot=50, tags=["audit"]))
    assert tagged.skipped and any("--tag audit was not added to 1 run(s) found already done" in n
                                  for n in tagged.notes)


def test_an_unused_threshold_on_a_3class_fit_finds_its_runs_already_done(setup) -> None:
    """--threshold is noted as unused by a 3-class head, yet it keyed the run: the same config trained
    again under a new id, a duplicate that tied with the first in the report."""
    root, cache_dir, runs_dir = setup
    first = fit(root, "fakenet", "knn", opts(cache_dir, runs_dir, task="3class", grid_args=["n_neighbors=3"]))
    again = fit(root, "fakenet", "knn", opts(cache_dir, runs_dir, task="3class", grid_args=["n_neighbors=3"],
                                              threshold="sensitivity:0.95"))
    assert again.skipped == [first.runs[0].id] and not again.runs
    assert any("not used by the knn head: --threshold" in n for n in again.notes)
    binary = fit(root, "fakenet", "knn", opts(cache_dir, runs_dir, grid_args=["n_neighbors=3"]))
    other = fit(root, "fakenet", "knn", opts(cache_dir, runs_dir, grid_args=["n_neighbors=3"],
                                             threshold="sensitivity:0.95"))
    assert other.runs and other.sweep_id != binary.sweep_id  # a binary head uses it: another run


def test_a_threshold_spelt_another_way_finds_its_run_already_done(setup) -> None:
    """A fit audit: --threshold keyed the run as typed, so sensitivity:0.90 after sensitivity:0.9 (or Youden
    after the default youden) trained the same config again under a new id, to the same numbers."""
    root, cache_dir, runs_dir = setup
    knn = ["n_neighbors=3"]
    first = fit(root, "fakenet", "knn", opts(cache_dir, runs_dir, grid_args=knn, threshold="sensitivity:0.9"))
    for spelt in ("sensitivity:0.90", " Sensitivity:.9 "):
        again = fit(root, "fakenet", "knn", opts(cache_dir, runs_dir, grid_args=knn, threshold=spelt))
        assert again.skipped == [first.runs[0].id] and not again.runs, spelt
    plain = fit(root, "fakenet", "knn", opts(cache_dir, runs_dir, grid_args=knn))
    assert fit(root, "fakenet", "knn", opts(cache_dir, runs_dir, grid_args=knn, threshold="Youden")).skipped \
        == [plain.runs[0].id]
    other = fit(root, "fakenet", "knn", opts(cache_dir, runs_dir, grid_args=knn,
                                             threshold="sensitivity:0.95"))
    assert other.runs and other.sweep_id != first.sweep_id  # another target: another run
    three = fit(root, "fakenet", "knn", opts(cache_dir, runs_dir, grid_args=knn, task="3class",
                                             threshold="YOUDEN"))
    assert not any("--threshold" in n for n in three.notes)  # the default, spelt in capitals: nothing unused


def test_a_folders_task_of_three_classes_gets_the_multiclass_logreg_grid(setup, tmp_path: Path) -> None:
    """A fit audit: --task 3class runs logreg's default grid at max_iter 1000 (at scikit-learn's 100 most
    3-class fits on Kermany features stopped unconverged), while the same three classes as class folders
    (--task folders) kept max_iter 100 and the unconverged fits. Two class folders keep the binary grid."""
    root, cache_dir, runs_dir = setup
    three = tmp_path / "three"
    for rec in discover(root).records:  # normal/, bacteria/, virus/ under each split: the same images
        dest = three / rec.split / rec.subtype / rec.path.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(rec.path, dest)
    write_cache(three, tmp_path / "c3")
    res = fit(three, "fakenet", "logreg", opts(tmp_path / "c3", runs_dir, task="folders", grid_args=["C=1"]))
    assert res.runs[0].info["classes"] == ["bacteria", "normal", "virus"]
    assert res.runs[0].info["params"]["max_iter"] == 1000
    assert {c["max_iter"] for c in res.runs[0].metrics()["grid"]} == {1000}
    as_3class = fit(root, "fakenet", "logreg", opts(cache_dir, runs_dir, task="3class", grid_args=["C=1"]))
    assert as_3class.runs[0].info["params"] == res.runs[0].info["params"]
    two = fit(root, "fakenet", "logreg", opts(cache_dir, runs_dir, task="folders", grid_args=["C=1"]))
    assert "max_iter" not in two.runs[0].info["params"]


def test_a_damaged_finished_run_is_not_already_done(setup) -> None:
    """The report leaves out a run whose result files changed after the fit; "already done" kept its config
    out of every report for good. Such a run's config trains again, and fit says why."""
    root, cache_dir, runs_dir = setup
    first = fit(root, "fakenet", "knn", opts(cache_dir, runs_dir))
    grid = ["layers=4", "epochs=2", "lr=0.01,0.1"]
    hold = fit(root, "fakenet", "mlp", opts(cache_dir, runs_dir, grid_args=grid))
    (first.runs[0].path / "metrics.json").write_text("{}")
    again = fit(root, "fakenet", "knn", opts(cache_dir, runs_dir))
    assert len(again.runs) == 1 and not again.skipped and again.runs[0].id != first.runs[0].id
    assert any(f"{first.runs[0].id}: metrics.json was changed after the fit" in n for n in again.notes)
    assert fit(root, "fakenet", "knn", opts(cache_dir, runs_dir)).skipped == [again.runs[0].id]
    lost = hold.runs[-1]
    next(p for p in (lost.path / "model").rglob("*") if p.is_file()).unlink()
    redo = fit(root, "fakenet", "mlp", opts(cache_dir, runs_dir, grid_args=grid))  # only that config trains
    assert [r["config_hash"] for r in redo.runs] == [lost["config_hash"]]
    assert sorted(redo.skipped) == sorted(r.id for r in hold.runs[:-1]) and len(hold.runs) > 1
    assert any(f"{lost.id}: model file" in n and "is missing" in n for n in redo.notes)


def test_several_extractions_of_a_backbone_are_never_chosen_between_silently(tmp_path: Path, capsys) -> None:
    """Caches of one backbone that differ in weights or dtype: fit refuses to guess and names the flag that
    picks one (a guess could train on random-weight features); the flags, or the files that `run` extracted,
    pick exactly one, and fit says which file it read."""
    root = make_tree(tmp_path / "data")
    cache_dir, runs = tmp_path / "cache", tmp_path / "runs"
    imagenet = write_cache(root, cache_dir, weights="imagenet")
    random_w = write_cache(root, cache_dir, weights="none", noise=0.4)
    with pytest.raises(CacheError) as exc:
        fit(root, "fakenet", "knn", opts(cache_dir, runs))
    msg = str(exc.value)
    assert "2 feature caches of backbone 'fakenet'" in msg and "differ in weights" in msg
    assert imagenet.name in msg and random_w.name in msg and "choose one with --weights" in msg
    assert not runs.exists() or not list_runs(runs)
    res = fit(root, "fakenet", "knn", opts(cache_dir, runs, weights="none"))
    assert res.caches == {"fakenet": random_w.resolve()}
    assert load_run(runs, res.runs[0].id)["caches"][0]["file"] == random_w.name
    res = fit(root, "fakenet", "knn", opts(cache_dir, runs, weights="ImageNet"))
    assert res.caches == {"fakenet": imagenet.resolve()}
    res = fit(root, "fakenet", "knn", opts(cache_dir, runs, cache_files={"fakenet": random_w}))  # `run`
    assert res.caches == {"fakenet": random_w.resolve()} and res.skipped  # the same sweep as above
    half = write_cache(root, cache_dir, weights="none", noise=0.4, dtype="float16")
    with pytest.raises(CacheError, match="differ in dtype.*choose one with --dtype"):
        fit(root, "fakenet", "knn", opts(cache_dir, runs, weights="none"))
    assert fit(root, "fakenet", "knn", opts(cache_dir, runs, weights="none", dtype="float16")).caches == {
        "fakenet": half.resolve()}
    with pytest.raises(ConfigError, match="--weights 'nope.h5' is neither imagenet, none nor an existing"):
        fit(root, "fakenet", "knn", opts(cache_dir, runs, weights="nope.h5"))
    # a copy under another name (`cache merge --out merged.h5`): the same settings, said so
    shutil.copy(half, cache_dir / "merged.h5")
    with pytest.raises(CacheError, match=r"2 feature caches .* hold the same settings: .*merged\.h5.*copies"):
        fit(root, "fakenet", "knn", opts(cache_dir, runs, weights="none", dtype="float16"))
    (cache_dir / "merged.h5").unlink()
    # the CLI names the file it read, and takes the same selectors
    code = cli(["fit", "--data", str(root), "--backbone", "fakenet", "--head", "knn", "--cache-dir",
                str(cache_dir), "--runs-dir", str(runs), "--weights", "imagenet", "--cv-folds", "3"])
    out = " ".join(capsys.readouterr().out.split())
    assert code == 0 and f"features of fakenet: {imagenet.resolve()}" in out
    code = cli(["fit", "--data", str(root), "--backbone", "fakenet", "--head", "knn", "--cache-dir",
                str(cache_dir), "--runs-dir", str(runs)])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2 and "3 feature caches of backbone 'fakenet'" in err and "--dtype / --weights" in err


def test_a_saved_model_backbone_is_found_by_its_path(tmp_path: Path) -> None:
    """`extract --backbone model.keras --layer L` records the backbone as saved-<stem>; `fit --backbone
    model.keras` finds that cache, and two models with the same stem are told apart by the file's hash."""
    root = make_tree(tmp_path / "data")
    cache_dir, runs = tmp_path / "cache", tmp_path / "runs"
    mine, other = tmp_path / "mine" / "tiny.keras", tmp_path / "other" / "tiny.keras"
    for i, model in enumerate((mine, other)):
        model.parent.mkdir()
        model.write_bytes(b"model %d" % i)
    ours = write_cache(root, cache_dir, name="saved-tiny", weights="saved", layer="gap",
                       weights_file_sha256=sha256_file(mine))
    write_cache(root, cache_dir, name="saved-tiny", weights="saved", layer="gap", noise=0.4,
                weights_file_sha256=sha256_file(other))
    assert fit(root, str(mine), "knn", opts(cache_dir, runs)).caches == {str(mine): ours.resolve()}
    gone = tmp_path / "moved" / "tiny.keras"  # file not at hand: the name matches both, which is refused
    with pytest.raises(CacheError, match="2 feature caches of backbone .*differ in weights_file_sha256"):
        fit(root, str(gone), "knn", opts(cache_dir, runs))
    with pytest.raises(CacheError, match=r"no feature cache .*--backbone \S*nothere.keras --layer NAME"):
        fit(root, str(tmp_path / "nothere.keras"), "knn", opts(cache_dir, runs))


def test_the_same_sweep_started_while_it_runs_is_refused(setup, capsys) -> None:
    """A second fit of a sweep that a fit trains now would train its configs twice: it is refused with the
    first one's process, writes nothing, and runs normally once the first has finished."""
    from featcache.runs import sweep_lock

    root, cache_dir, runs_dir = setup
    args = _fit_cmd(root, cache_dir, runs_dir, "--head", "logreg", "--grid", "C=0.1,1", "--cv-folds", "3",
                    "--json")
    assert cli(args) == 0
    sweep_id = json.loads(capsys.readouterr().out)["sweep_id"]
    shutil.rmtree(runs_dir)  # as if the first fit had not finished yet
    with sweep_lock(runs_dir, sweep_id):  # what the first fit holds while it trains
        assert cli(args) == 2
        err = capsys.readouterr().err
        assert f"sweep {sweep_id} is being trained now by process {os.getpid()}" in " ".join(err.split())
        assert list_runs(runs_dir, include_incomplete=True) == []
    assert cli(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["sweep_id"] == sweep_id and len(out["runs"]) == 1
    assert not (runs_dir / ".locks").exists()


def test_an_overlapping_grid_started_while_another_trains_is_refused(setup, capsys) -> None:
    """Two grids that share a config (at the same place, e.g. a grid and its extension), side by side, would
    train it twice into two runs: the later fit is refused while the earlier one holds that config."""
    from featcache.runs import sweep_lock

    root, cache_dir, runs_dir = setup
    base = ["--head", "mlp", "--grid", "layers=4", "--grid", "epochs=2", "--grid", "dropout=0.2",
            "--mlp-precision", "float32", "--json"]
    assert cli(_fit_cmd(root, cache_dir, runs_dir, *base, "--grid", "lr=0.1,0.01")) == 0
    capsys.readouterr()
    shared = next(r["config_hash"] for r in list_runs(runs_dir) if r["params"]["lr"] == 0.01)
    shutil.rmtree(runs_dir)
    later = _fit_cmd(root, cache_dir, runs_dir, *base, "--grid", "lr=0.1,0.01,0.001")
    with sweep_lock(runs_dir, "0123456789ab", ["x" * 64, shared]):  # as the earlier grid holds it
        assert cli(later) == 2
        err = " ".join(capsys.readouterr().err.split())
        assert "1 of this sweep's 3 config(s) are being trained now by sweep 0123456789ab" in err
        assert list_runs(runs_dir, include_incomplete=True) == []
    assert cli(later) == 0
    assert len(json.loads(capsys.readouterr().out)["runs"]) == 3


def test_a_config_placed_elsewhere_in_another_grid_is_trained_there(setup) -> None:
    """A config's seed, minibatch stream and dropout key depend on the grid points before it: run at
    another place in another grid, it is not "already done", and its numbers equal those of that grid run
    in a fresh folder (before, the same command gave numbers that depended on what ran before)."""
    root, cache_dir, runs_dir = setup
    base = {"layers": (4,), "mlp_precision": "float32"}
    grid = ["epochs=3", "dropout=0.2"]
    fit(root, "fakenet", "mlp", opts(cache_dir, runs_dir, grid_args=[*grid, "lr=0.1,0.01"], **base))
    here = fit(root, "fakenet", "mlp", opts(cache_dir, runs_dir, grid_args=[*grid, "lr=0.01,0.001"], **base))
    assert not here.skipped and len(here.runs) == 2
    fresh = fit(root, "fakenet", "mlp", opts(cache_dir, runs_dir.parent / "fresh",
                                             grid_args=[*grid, "lr=0.01,0.001"], **base))
    for a, b in zip(here.runs, fresh.runs, strict=True):
        assert a["config_hash"] == b["config_hash"]
        assert a.metrics()["val"] == b.metrics()["val"] and a.metrics()["history"] == b.metrics()["history"]


def test_a_config_trained_alone_is_not_taken_for_the_same_config_trained_fused(setup, monkeypatch) -> None:
    """A config that no other shares its batch size with trains alone (model.fit); a later config of its
    batch size makes it train fused, with other numbers. Before, both had one run id, so the longer grid
    found it "already done" and reported the lone numbers (which numbers depended on the folder's past)."""
    root, cache_dir, runs_dir = setup
    base = {"layers": (4,), "mlp_precision": "float32"}
    grid = ["epochs=3", "dropout=0"]
    lone = fit(root, "fakenet", "mlp", opts(cache_dir, runs_dir, grid_args=[*grid, "lr=0.01"], **base))
    assert lone.runs[0]["trainer"]["selection"]["path"] == "keras.fit"
    pair = fit(root, "fakenet", "mlp", opts(cache_dir, runs_dir, grid_args=[*grid, "lr=0.01,0.001"], **base))
    assert not pair.skipped and len(pair.runs) == 2
    assert [r["trainer"]["selection"]["path"] for r in pair.runs] == ["fused", "fused"]
    fresh = fit(root, "fakenet", "mlp", opts(cache_dir, runs_dir.parent / "fresh",
                                             grid_args=[*grid, "lr=0.01,0.001"], **base))
    for a, b in zip(pair.runs, fresh.runs, strict=True):
        assert a["config_hash"] == b["config_hash"] and a.metrics()["val"] == b.metrics()["val"]
    # a non-fusable config (SGD) trains alone in any grid: its id does not depend on partners
    sgd = fit(root, "fakenet", "mlp", opts(cache_dir, runs_dir, grid_args=[*grid, "lr=0.01", "optimizer=sgd"],
                                           **base))
    assert sgd.runs and sgd.runs[0]["trainer"]["selection"]["path"] == "keras.fit"
    # Keras on another backend draws other initial weights: another run, not "already done"
    import featcache.fit as fit_module

    monkeypatch.setattr(fit_module, "keras_backend", lambda load=False: "jax")
    other = fit(root, "fakenet", "mlp", opts(cache_dir, runs_dir, grid_args=[*grid, "lr=0.01"], **base,
                                             mlp_trainer="tf"))
    assert other.runs and not other.skipped


def test_a_run_records_what_its_numbers_depend_on(setup, tmp_path, monkeypatch) -> None:
    """run.json pins the features (a content digest: another backend or oneDNN setting changes them under the
    same settings), an mlp config's place in its grid, every default, and the working folder; features that
    differ under the same settings are a new sweep, not an "already done" one."""
    root, cache_dir, runs_dir = setup
    grid = ["--grid", "epochs=3", "--grid", "lr=0.01,0.001"]
    import featcache.fit as fit_module

    calls = []
    real = fit_module.environment
    monkeypatch.setattr(fit_module, "environment", lambda: calls.append(1) or real())
    res = fit(root, "fakenet", "mlp", opts(cache_dir, runs_dir, grid_args=grid[1::2], layers=(8,)))
    assert len(res.runs) > 1 and len(calls) == 1  # once per fit (it starts git), not once per stored run
    run = load_run(runs_dir, res.runs[1].id)
    size = len(res.runs)  # 2 lr x the default grid's 2 dropouts
    assert run["grid"]["size"] == size == len(run["grid"]["configs"]) and 0 <= run["grid"]["index"] < size
    assert run["grid"]["configs"][run["grid"]["index"]] == run["params"]
    hp = run["hyperparameters"]
    assert hp["batch_size"] == 64 and hp["optimizer"] == "adam" and hp["layers"] == [8]
    assert run["environment"]["cwd"] and run["environment"]["cpus"] >= 1
    env = run["environment"]
    assert env["keras_backend"] == keras_backend(load=True) and env["cpu_model"] and env["system"]
    assert env["blas_threads"] and all(n >= 1 for n in env["blas_threads"].values())  # move logreg at 1e-7
    monkeypatch.setenv("FEATCACHE_MLP_PRECISION", "float32")  # a precision no flag shows in the command
    res = fit(root, "fakenet", "mlp", opts(cache_dir, runs_dir / "env", grid_args=grid[1::2], layers=(8,)))
    assert res.runs[0]["environment"]["variables"]["FEATCACHE_MLP_PRECISION"] == "float32"
    from featcache.runs import replay_command

    assert "FEATCACHE_MLP_PRECISION=float32 " in replay_command(res.runs[0].info)
    assert f"KERAS_BACKEND={keras_backend(load=True)} " in replay_command(res.runs[0].info)
    monkeypatch.delenv("FEATCACHE_MLP_PRECISION")
    cache = run["caches"][0]
    assert len(cache["features_digest"]) == 64 and "numpy" in cache["extracted_with"]
    logreg = load_run(runs_dir, fit(root, "fakenet", "logreg", opts(cache_dir, runs_dir)).runs[0].id)
    assert logreg["hyperparameters"]["C"] > 0 and "max_iter" in logreg["hyperparameters"]
    knn = fit(root, "fakenet", "knn", opts(cache_dir, runs_dir, grid_args=["n_neighbors=500"])).runs[0]
    assert knn["params"]["n_neighbors"] == 500  # the config as asked; what ran: capped at the training rows
    assert knn["hyperparameters"]["n_neighbors"] == len(knn.indices()["train"]) < 500
    assert logreg["hyperparameters"]["random_state"] == 0  # the trained model's, not the grid's None
    svm = fit(root, "fakenet", "svm", opts(cache_dir, runs_dir, seed=3, grid_args=["kernel=linear", "C=1"]))
    assert load_run(runs_dir, svm.runs[0].id)["hyperparameters"]["estimator__random_state"] == 3
    other = tmp_path / "other-cache"  # the same settings, other values (as another backend would give)
    write_cache(root, other, views=("orig", "hflip", "rot+20"), noise=0.31)
    again = fit(root, "fakenet", "logreg", opts(other, runs_dir))
    assert again.runs and not again.skipped  # trained on the other values, not reused
    assert again.sweep_id != logreg["sweep_id"]


def test_per_class_weights_must_name_every_class_of_the_task(setup) -> None:
    """A binary 3:1 used on the 3-class task left bacteria and virus at weight 1 without a word."""
    root, cache_dir, runs_dir = setup
    with pytest.raises(ConfigError, match="task has 3 classes .normal, bacteria, virus"):
        fit(root, "fakenet", "logreg",
            opts(cache_dir, runs_dir, task="3class", grid_args=["class_weight=3:1"]))
    with pytest.raises(ConfigError, match="laban2021|class_weight"):
        fit(root, "fakenet", None, opts(cache_dir, runs_dir, task="3class", preset="laban2021"))
    res = fit(root, "fakenet", "logreg", opts(cache_dir, runs_dir, task="3class",
                                                grid_args=["class_weight=3:1:1", "C=1"]))
    assert res.runs


def test_a_class_too_small_for_the_split_is_named_before_training(setup, tmp_path: Path, capsys) -> None:
    """A class with one patient cannot be on both sides of a patient-grouped split: CV heads stop with one
    sentence naming the class (they raised a numpy shape error, or for binary logreg blamed the grid), and
    a hold-out without the class says its validation recall is undefined instead of recording 0."""
    from featcache.metrics import classification_metrics

    root, _, runs_dir = setup
    write_xray(root / "train" / "OTHER" / "IM-0900-0001.jpeg", 900, size=16)
    write_cache(root, tmp_path / "c3")
    for head in ("logreg", "knn"):
        message = r"^class OTHER has 1 image from 1 patient for training, .* so fold \d of the 3-fold cross-"
        with pytest.raises(DataError, match=message + "validation trains without it") as exc:
            fit(root, "fakenet", head, opts(tmp_path / "c3", runs_dir, task="folders"))
        assert "\n" not in str(exc.value)
    binary = tmp_path / "binary"
    for p in range(6):
        write_xray(binary / "train" / "NORMAL" / f"IM-{p:04d}-0001.jpeg", p, size=16)
    write_xray(binary / "train" / "PNEUMONIA" / "person77_virus_1.jpeg", 77, size=16)
    write_cache(binary, tmp_path / "c2")
    with pytest.raises(DataError, match="^class PNEUMONIA has 1 image from 1 patient for training"):
        fit(binary, "fakenet", "logreg", opts(tmp_path / "c2", runs_dir))
    outcomes = set()
    for seed in range(6):  # the one OTHER patient lands in validation (no training image) or in training
        try:
            res = fit(root, "fakenet", "mlp", opts(tmp_path / "c3", tmp_path / f"r{seed}", task="folders",
                                                   seed=seed, layers=(4,), grid_args=["epochs=1"],
                                                   cv_folds=5))  # the default: no "not used" note
        except DataError as exc:
            assert "the training side of the validation hold-out trains without it" in str(exc)
            outcomes.add("error")
            continue
        notes = [n for n in res.notes if not n.startswith("the test split has no image of OTHER")]
        assert len(notes) == 1 and "the validation hold-out has no image of OTHER" in notes[0]
        val = load_run(tmp_path / f"r{seed}", res.runs[0].id).metrics()["val"]
        assert val["per_class"]["OTHER"]["recall"] is None
        assert val["per_class"]["NORMAL"]["recall"] is not None
        outcomes.add("note")
        # the CLI prints the note, and says why the test columns are blank (this data has a test split)
        assert cli(_fit_cmd(root, tmp_path / "c3", tmp_path / f"cli{seed}", "--task", "folders", "--seed",
                            str(seed), "--head", "mlp", "--layers", "4", "--grid", "epochs=1")) == 0
        out = " ".join(capsys.readouterr().out.split())
        assert "note the validation hold-out has no image of OTHER" in out and "no test images" not in out
    assert "note" in outcomes
    shutil.rmtree(root / "test")  # no test split: the table's blank test columns are explained
    write_cache(root, tmp_path / "c4")
    assert cli(_fit_cmd(root, tmp_path / "c4", tmp_path / "notest", "--head", "knn", "--cv-folds", "3")) == 0
    assert "no test images in the data" in " ".join(capsys.readouterr().out.split())
    m = classification_metrics([0, 0, 0], np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7]]), ["a", "b"])
    assert m["sensitivity"] is None and m["specificity"] == pytest.approx(2 / 3)


def test_a_manifest_leak_is_noted_by_fit_and_audited_by_the_report_from_the_manifest(setup, tmp_path) -> None:
    """A manifest whose split puts one patient in train and test: fit notes it, and the report audits the
    manifest (it re-read the manifest's folder as class folders and found no leak)."""
    from featcache.report import ReportOptions, build_report

    root, cache_dir, runs_dir = setup
    ds = discover(root)
    rows = ["path,label,split,group"]
    for i, r in enumerate(ds.records):
        group = "kid0" if i in (0, len(ds.records) - 1) else f"kid{i}"  # one child: first train, last test
        rows.append(f"{r.relpath},{r.label},{r.split},{group}")
    manifest = root / "list.csv"
    manifest.write_text("\n".join(rows) + "\n")
    assert ds.records[0].split == "test" and ds.records[-1].split == "train"
    write_cache(manifest, tmp_path / "mc")
    res = fit(root, "fakenet", "knn", opts(tmp_path / "mc", runs_dir, manifest=manifest))
    leaks = [n for n in res.notes if "kid0" in n]  # (the tiny folds also cap knn's k: another note)
    assert len(leaks) == 1
    assert leaks[0].startswith("1 patient(s) have images in both the training and the test split")
    assert load_run(runs_dir, res.runs[0].id)["dataset"]["manifest"] == str(manifest)
    text = (build_report(runs_dir, tmp_path / "rep", ReportOptions()).markdown).read_text()
    assert "| patients in more than one split | 1 |" in text and "kid0 (test/train)" in text
    # named by the manifest, not its folder (two manifests of one folder read as one name)
    assert re.search(r"^### .*list\.csv @[0-9a-f]{8}", text, re.M), text
    manifest.unlink()  # gone: not audited (the folder is not the dataset the runs used)
    text = (build_report(runs_dir, tmp_path / "rep2", ReportOptions()).markdown).read_text()
    assert "patients in more than one split" not in text


def test_a_class_only_in_the_test_split_is_named(setup, tmp_path: Path) -> None:
    root, _, runs_dir = setup
    write_xray(root / "test" / "OTHER" / "IM-0901-0001.jpeg", 901, size=16)
    write_cache(root, tmp_path / "c")
    with pytest.raises(DataError, match=r"have no image of OTHER \(classes: NORMAL, OTHER, PNEUMONIA\);"):
        fit(root, "fakenet", "knn", opts(tmp_path / "c", runs_dir, task="folders"))


def test_binary_and_3class_runs_of_one_folder_are_one_dataset_in_the_report(setup, tmp_path: Path) -> None:
    """The two tasks number labels differently, which changed the data digest: the report called one folder
    two datasets ("validated and tested on different images") and listed it twice. A changed folder still
    counts as another version."""
    from featcache.report import ReportOptions, build_report

    root, cache_dir, runs_dir = setup
    for task in ("binary", "3class"):
        fit(root, "fakenet", "knn", opts(cache_dir, runs_dir, task=task, grid_args=["n_neighbors=3"]))
    text = build_report(runs_dir, tmp_path / "rep", ReportOptions()).markdown.read_text()
    assert "Mixed datasets" not in text and "Mixed tasks" in text
    assert len(re.findall(r"^### .*data @", text, re.M)) == 1  # one Dataset entry
    write_xray(root / "train" / "NORMAL" / "IM-0950-0001.jpeg", 950, size=16)  # the folder changes
    write_cache(root, cache_dir, views=("orig", "hflip", "rot+20"))
    fit(root, "fakenet", "knn", opts(cache_dir, runs_dir, task="binary", grid_args=["n_neighbors=3"]))
    text = build_report(runs_dir, tmp_path / "rep2", ReportOptions()).markdown.read_text()
    assert "Mixed datasets" in text and len(re.findall(r"^### .*data @", text, re.M)) == 2


def test_a_file_or_folder_in_the_wrong_place_is_one_sentence(setup, tmp_path) -> None:
    """--runs-dir naming a file ended in an operating-system error about a lock path (exit 1),
    --cache-dir naming a file in advice to extract into it, --grid-file naming a folder in "Is a
    directory", and a grid file's empty list named neither the key nor the file."""
    root, cache_dir, runs_dir = setup
    mine = tmp_path / "notes.txt"
    mine.write_text("mine")
    with pytest.raises(ConfigError, match="--runs-dir .*notes.txt is a file, not a folder"):
        fit(root, "fakenet", "logreg", opts(cache_dir, mine))
    with pytest.raises(ConfigError, match="--cache-dir .*notes.txt is a file, not a folder; point"):
        fit(root, "fakenet", "logreg", opts(mine, runs_dir))  # it advised `extract --cache-dir notes.txt`
    with pytest.raises(ConfigError, match="is a folder; give --grid-file a .toml file"):
        fit(root, "fakenet", "logreg", opts(cache_dir, runs_dir, grid_file=tmp_path))
    empty = tmp_path / "empty.toml"
    empty.write_text("[grid]\nC = []\n")  # named neither the key nor the file
    with pytest.raises(ConfigError, match="C has no values in --grid-file .*empty.toml; give at least"):
        fit(root, "fakenet", "logreg", opts(cache_dir, runs_dir, grid_file=empty))
    assert mine.read_text() == "mine"


def test_options_the_head_does_not_use_are_noted(setup) -> None:
    """--val-fraction with a CV head (or --cv-folds with the hold-out mlp, --mlp-* with other heads) was
    accepted without a word, as if it had shaped the runs."""
    root, cache_dir, runs_dir = setup
    res = fit(root, "fakenet", "logreg", opts(cache_dir, runs_dir, grid_args=["C=1"], val_fraction=0.3,
                                              mlp_precision="float32"))
    assert "not used by the logreg head: --val-fraction (logreg is validated by 3-fold CV)." in res.notes
    assert "not used by the logreg head: --mlp-precision (mlp only)." in res.notes
    plain = fit(root, "fakenet", "logreg", opts(cache_dir, runs_dir, grid_args=["C=1"]))
    assert not any(n.startswith("not used") for n in plain.notes)
    # a fit audit: --threshold on a 3-class task, and --metric with mlp (each config its own run), were
    # accepted without a word, and the mlp runs retrained under a new id as the metric is in it
    three = fit(root, "fakenet", "knn", opts(cache_dir, runs_dir, grid_args=["n_neighbors=3"], task="3class",
                                             threshold="sensitivity:0.9"))
    assert ("not used by the knn head: --threshold (a 3-class head labels each image by its most probable "
            "class).") in three.notes
    from featcache.fit import FitOptions, _unused_option_notes
    from featcache.heads import get_head

    said = " ".join(_unused_option_notes(FitOptions(metric="auc"), get_head("mlp")))
    assert "--metric auc: every mlp config is a run of its own" in said and "train again" in said
    assert not _unused_option_notes(FitOptions(metric="auc"), get_head("logreg"))  # its CV search uses it


def test_mlp_precision_and_trainer_are_noted_when_no_config_trains_fused(monkeypatch) -> None:
    """An mlp audit: `fit --head mlp --grid lr=0.001 --grid dropout=0 --mlp-precision float32` (one config)
    trained it again under a new run id, to the same numbers, without a word: a lone config (or SGD, or
    a decay schedule) trains with model.fit in float32 whatever --mlp-precision or --mlp-trainer say."""
    from featcache.fit import FitOptions, _unused_option_notes
    from featcache.heads import get_head

    monkeypatch.delenv("FEATCACHE_MLP_TRAINER", raising=False)
    monkeypatch.delenv("FEATCACHE_MLP_PRECISION", raising=False)
    mlp = get_head("mlp")
    lone = [{"layers": (8,), "lr": 1e-3, "epochs": 1}]
    sgd_pair = [{"layers": (8,), "optimizer": "sgd", "lr": lr, "epochs": 1} for lr in (1e-3, 1e-2)]
    for configs in (lone, sgd_pair):
        said = " ".join(_unused_option_notes(FitOptions(mlp_precision="float32"), mlp, 2, configs))
        assert ("--mlp-precision changes nothing these configs train: it applies to fused grid training"
                in said), said
        assert "each trains alone with model.fit in float32" in said
    both = " ".join(_unused_option_notes(FitOptions(mlp_precision="float32", mlp_trainer="tf"), mlp, 2, lone))
    assert "--mlp-precision and --mlp-trainer change nothing these configs train: they apply" in both
    # two Adam configs sharing a batch size train fused: the option shapes them, no note
    fused = [{"layers": (8,), "lr": lr, "epochs": 1} for lr in (1e-3, 1e-2)]
    assert not _unused_option_notes(FitOptions(mlp_precision="float32"), mlp, 2, fused)
    assert not _unused_option_notes(FitOptions(), mlp, 2, lone)  # not given: nothing to say


def test_fit_notes_mlp_precision_on_a_lone_config(setup) -> None:
    """The same, through fit: a one-config mlp sweep given --mlp-precision float32 says so."""
    root, cache_dir, runs_dir = setup
    res = fit(root, "fakenet", "mlp", opts(cache_dir, runs_dir, grid_args=["epochs=1", "lr=0.001",
                                                                          "dropout=0", "layers=4"],
                                            mlp_precision="float32"))
    assert any(n.startswith("--mlp-precision changes nothing these configs train") for n in res.notes)


def test_a_preset_names_the_task_it_ran_when_the_paper_ran_two() -> None:
    """`fit --preset mao2018` without --task ran binary without a word, though the paper also reports
    3-class; a task the paper did not run is noted too; a task given explicitly, or a one-task paper, is
    not noted."""
    from featcache.fit import _preset_task_notes
    from featcache.grids import get_preset

    mao, laban = get_preset("mao2018"), get_preset("laban2021")
    (note,) = _preset_task_notes(FitOptions(preset="mao2018"), mao, "binary")
    assert note == ("preset mao2018: the paper ran binary and 3class; this sweep is binary (the preset's "
                    "default); add --task 3class for the other.")
    assert _preset_task_notes(FitOptions(preset="mao2018", task="3class"), mao, "3class") == []
    (other,) = _preset_task_notes(FitOptions(preset="mao2018", task="folders"), mao, "folders")
    assert other.startswith("preset mao2018: the paper ran binary and 3class, not folders")
    assert _preset_task_notes(FitOptions(preset="laban2021"), laban, "binary") == []
    assert _preset_task_notes(FitOptions(), None, "binary") == []


def test_identical_images_under_two_patients_are_one_group(tmp_path: Path) -> None:
    """Patient ids come from file names, so one image saved under a second patient's name made two
    groups, and CV trained on one copy and validated on the other (the same feature vector). Such
    groups are joined now, said in a note; a test image identical to a training image is named too."""
    import csv

    root = make_tree(tmp_path / "data")
    pneu = root / "train" / "PNEUMONIA"
    src = sorted(pneu.iterdir())[0]
    shutil.copy(src, pneu / "person9999_bacteria_1.jpeg")
    shutil.copy(src, root / "test" / "PNEUMONIA" / "person9998_bacteria_2.jpeg")
    write_cache(root, tmp_path / "cache")
    res = fit(root, "fakenet", "logreg", opts(tmp_path / "cache", tmp_path / "runs", grid_args=["C=0.1"]))
    notes = " ".join(res.notes)
    src_patient = src.name.split("_")[0]
    assert (f"3 patient groups share byte-identical images and were joined into 1 group(s) (e.g. "
            f"{src_patient}, person9998, person9999)") in notes  # the test copy's patient too
    assert "1 test image(s) are byte-identical to a training image (e.g. test/PNEUMONIA/person9998" in notes
    with open(res.runs[0].path / "predictions_val.csv", encoding="utf-8", newline="") as fh:
        group = {row["relpath"]: row["group"] for row in csv.DictReader(fh)}
    twin = group["train/PNEUMONIA/person9999_bacteria_1.jpeg"]
    assert group[f"train/PNEUMONIA/{src.name}"] == twin == min(src_patient, "person9999")
    idx = load_run(tmp_path / "runs", res.runs[0].id).indices()
    rows = {r.relpath: i for i, r in enumerate(discover(root).records)}
    a, b = rows[f"train/PNEUMONIA/{src.name}"], rows["train/PNEUMONIA/person9999_bacteria_1.jpeg"]
    folds = [k for k in idx if k.startswith("fold") and k.endswith("_val")]
    assert len(folds) == 3 and all((a in idx[k]) == (b in idx[k]) for k in folds)  # never split up
    assert res.runs[0].metrics()["test"]["ci"]["resampled"] == "patients"  # every test image has an id
    (root / "test" / "NORMAL" / "x.jpeg").write_bytes((root / "test" / "PNEUMONIA" /
                                                       "person9998_bacteria_2.jpeg").read_bytes())
    res = fit(root, "fakenet", "logreg", opts(tmp_path / "cache", tmp_path / "runs", grid_args=["C=0.1"]))
    test = res.runs[0].metrics()["test"]
    assert test["ci"]["resampled"] == test["at_threshold"]["ci"]["resampled"] == (
        "patients and file-name groups (1 image(s) without a patient id)")  # both CIs say so


def test_an_mlp_refit_trains_for_the_hold_out_models_epochs(setup, monkeypatch) -> None:
    """`--refit` retrained the chosen config on the hold-out rows too, with early stopping and best-epoch
    checkpointing still watching those rows: the refit model ran on a rule that no longer meant
    anything (17 epochs against 5). It trains for the hold-out model's epochs now, with no validation
    callbacks, and run.json records the plan."""
    from featcache.heads.mlp import refit_plan

    hist = {"loss": [1.0, 0.8, 0.7, 0.6, 0.5], "val_loss": [0.9, 0.7, float("nan"), 0.75, 0.8],
            "lr": [0.01, 0.01, 0.005, 0.005, 0.0025]}
    base = {"layers": [8], "epochs": 30, "patience": 3}
    params, rates, plan = refit_plan({**base, "checkpoint": True}, hist)
    assert params["epochs"] == 2 and params["patience"] is None and not params["checkpoint"] and rates is None
    assert plan["epochs_from"] == "best hold-out epoch (checkpoint)" and plan["hold_out_epochs_run"] == 5
    params, rates, plan = refit_plan({**base, "reduce_lr_patience": 1}, hist)
    assert params["epochs"] == 5 and rates == hist["lr"] and params["reduce_lr_patience"] is None
    params, rates, plan = refit_plan({"layers": [8], "epochs": 30}, hist)  # nothing watches the hold-out
    assert params == {"layers": [8], "epochs": 30} and rates is None and plan["as_configured"]
    # a decay schedule cannot be set per epoch (Keras raised TypeError mid-sweep): kept, not replayed
    params, rates, plan = refit_plan({**base, "reduce_lr_patience": 1, "lr_decay": 0.01}, hist)
    assert rates is None and not plan["learning_rates_replayed"] and params["epochs"] == 5

    from featcache.heads.mlp import MLPHead

    calls = []
    real_train = MLPHead.train

    def spy(self, *args, **kwargs):
        calls.append((dict(args[4]), kwargs.get("lr_per_epoch")))
        return real_train(self, *args, **kwargs)

    monkeypatch.setattr(MLPHead, "train", spy)
    root, cache_dir, runs_dir = setup
    res = fit(root, "fakenet", "mlp", opts(cache_dir, runs_dir, refit=True, grid_args=[
        "layers=8", "epochs=40", "lr=0.05", "dropout=0", "patience=2", "checkpoint=true",
        "reduce_lr_patience=1"]))
    run = res.runs[0]
    history = run.metrics()["history"]
    best = int(np.nanargmin(history["val_loss"])) + 1
    assert len(history["loss"]) < 40  # the hold-out model stopped early, so the plan is not trivial
    assert run["selection"]["refit_plan"] == {
        "epochs": best, "as_configured": False, "epochs_from": "best hold-out epoch (checkpoint)",
        "hold_out_epochs_run": len(history["loss"]), "learning_rates_replayed": True}
    (held, _), (refit, rates) = calls  # the refit really trained that plan
    assert held["epochs"] == 40 and refit["epochs"] == best and refit["patience"] is None
    assert not refit["checkpoint"] and refit["reduce_lr_patience"] is None
    assert rates == pytest.approx(history["lr"][:best])
    # the record describes the saved (refit) model: its images, its train metrics, its seed (a fit audit:
    # indices.npz held only the hold-out model's training images and "train" metrics were of those)
    sel, idx = run["selection"], run.indices()
    assert index_digest(idx["refit_train"]) == sel["refit_train_indices_digest"]
    assert len(idx["refit_train"]) == sel["refit_n_train_images"] > sel["n_train_images"] == len(idx["train"])
    assert sel["refit_seed"] == 0 and run.metrics()["train"]["n"] == len(idx["refit_train"])
    monkeypatch.setattr(MLPHead, "train", real_train)
    # the refits trained before (early-stopped on their own rows) are other models: not "already done"
    from featcache.fit import _holdout_hashes

    cfg = [{"layers": [8], "patience": 2}]
    assert _holdout_hashes({"x": 1}, cfg) != _holdout_hashes({"x": 1}, cfg, planned={0})
    # fused sigmoid runs trained with the clipped loss are other models too
    assert _holdout_hashes({"x": 1}, cfg) != _holdout_hashes({"x": 1}, cfg, logit_loss={0})
    X = np.random.default_rng(0).normal(size=(40, 4)).astype(np.float32)
    y = (X[:, 0] > 0).astype(int)
    _, h = MLPHead().train(X, y, X[:8], y[:8], {"layers": [4], "epochs": 3, "lr": 0.1}, seed=0,
                           lr_per_epoch=[0.1, 0.02, 0.004])
    assert h["lr"] == pytest.approx([0.1, 0.02, 0.004])  # the replayed schedule, epoch by epoch


def test_binary_names_the_labels_it_counts_as_pneumonia(tmp_path: Path) -> None:
    """Binary is NORMAL against anything else, so a misspelt NORMAL trained as pneumonia without a word."""
    root = make_tree(tmp_path / "data")
    normal = sorted((root / "train" / "NORMAL").iterdir())
    (root / "train" / "NROMAL").mkdir()
    shutil.move(normal[0], root / "train" / "NROMAL" / normal[0].name)
    write_cache(root, tmp_path / "cache")
    one = ["n_neighbors=1"]
    res = fit(root, "fakenet", "knn", opts(tmp_path / "cache", tmp_path / "runs", grid_args=one))
    assert ("task binary counts every label but NORMAL as PNEUMONIA, here also 'NROMAL' (1 image(s))"
            in " ".join(res.notes))
    shutil.rmtree(root / "train" / "NROMAL")
    write_cache(root, tmp_path / "cache2")
    res = fit(root, "fakenet", "knn", opts(tmp_path / "cache2", tmp_path / "runs", grid_args=one))
    assert "counts every label but NORMAL" not in " ".join(res.notes)


def test_an_auc_search_whose_fold_lacks_a_class_is_refused(tmp_path: Path) -> None:
    """With 2 NORMAL patients and 3 folds, one fold's validation side has no NORMAL image: its AUC is NaN,
    every config's mean was NaN, and config 0 was "chosen" without a word (metrics.json then held a NaN,
    which is not JSON)."""
    root = make_tree(tmp_path / "data", n_patients=6)  # patients 0 and 3 are NORMAL
    cache_dir = tmp_path / "cache"
    write_cache(root, cache_dir)
    with pytest.raises(DataError, match=r"fold \d of the 3-fold cross-validation has no validation image of "
                                        r"NORMAL .* --metric auc cannot rank the configs"):
        fit(root, "fakenet", "knn", opts(cache_dir, tmp_path / "runs", metric="auc",
                                         grid_args=["n_neighbors=1,3"]))
    res = fit(root, "fakenet", "knn", opts(cache_dir, tmp_path / "runs", grid_args=["n_neighbors=1,3"]))
    assert len(res.runs) == 1  # accuracy still ranks them


def test_svm_with_too_few_patients_per_fold_is_refused_before_the_search(tmp_path: Path) -> None:
    """svm's patient-grouped calibration needs 2 patients of a class per fit; with fewer, the error came
    after the whole search and named neither the class nor the fold."""
    root = make_tree(tmp_path / "data", n_patients=6)  # 2 NORMAL patients: a 2-fold split trains on 1
    cache_dir = tmp_path / "cache"
    write_cache(root, cache_dir)
    events = []
    with pytest.raises(DataError, match=r"svm head needs 2 patients of every class .* fold \d of the 2-fold "
                                        r"cross-validation trains on 1 patient\(s\) of NORMAL"):
        fit(root, "fakenet", "svm", opts(cache_dir, tmp_path / "runs", cv_folds=2,
                                         grid_args=["kernel=linear", "C=1"]), progress=events.append)
    assert not any("config" in e.message for e in events)  # no search ran


def test_runs_ls_tells_apart_runs_on_other_data_or_random_weights(tmp_path: Path, capsys,
                                                                  monkeypatch) -> None:
    """Runs of one head and config on two datasets, or on random-weight features, read the same in
    `runs ls` (backbone, head, params): the report told them apart, the listing did not."""
    runs, cache_dir = tmp_path / "runs", tmp_path / "cache"
    a, b = make_tree(tmp_path / "a"), make_tree(tmp_path / "b", seed=1)
    write_cache(a, cache_dir, weights="imagenet")
    write_cache(b, cache_dir, weights="none")
    for root in (a, b):
        fit(root, "fakenet", "knn", opts(cache_dir, runs, grid_args=["n_neighbors=3"]))
    assert cli(["runs", "ls", "--runs-dir", str(runs), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert sorted((Path(r["dataset"]).name, r["random_weights"]) for r in rows) == [("a", False), ("b", True)]
    monkeypatch.setenv("COLUMNS", "250")
    assert cli(["runs", "ls", "--runs-dir", str(runs)]) == 0
    table = capsys.readouterr().out
    assert "dataset" in table and "fakenet (random weights)" in table
    # what every row shares is said once, in the title, not in a column (80 columns were 3-letter strips)
    assert "task binary, metric accuracy" in " ".join(table.split())


def test_runs_show_says_a_multi_class_run_has_no_threshold(setup, capsys) -> None:
    """`runs show` printed "threshold - (None, on -)" for a 3-class run."""
    root, cache_dir, runs_dir = setup
    res = fit(root, "fakenet", "knn", opts(cache_dir, runs_dir, task="3class", grid_args=["n_neighbors=3"]))
    assert cli(["runs", "show", res.runs[0].id, "--runs-dir", str(runs_dir)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "none: more than two classes" in out and "(None, on" not in out


def test_a_run_is_found_by_any_part_of_its_id_only_one_run_has(setup, capsys) -> None:
    """`runs show 8f18c1b7` said "no run" although `report --id 8f18c1b7` found it: the hash (or any part
    only one run has) names a run for show and predict too; a part several runs share is refused."""
    root, cache_dir, runs_dir = setup
    ids = [fit(root, "fakenet", "knn", opts(cache_dir, runs_dir, grid_args=[f"n_neighbors={k}"])).runs[0].id
           for k in (3, 5)]
    assert load_run(runs_dir, ids[0][-8:]).id == ids[0]
    assert cli(["runs", "show", ids[1][-8:], "--runs-dir", str(runs_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["run"]["id"] == ids[1]
    with pytest.raises(RunError, match="'knn' is part of 2 run ids"):
        load_run(runs_dir, "knn")


def test_a_run_found_done_with_other_versions_is_kept_and_said(setup, monkeypatch) -> None:
    """The run identity leaves versions out, so after an upgrade a rerun found the old run "already done"
    and kept its numbers without a word. It still keeps them, and says which versions moved."""
    root, cache_dir, runs_dir = setup
    first = fit(root, "fakenet", "knn", opts(cache_dir, runs_dir, n_boot=50))
    rid = first.runs[0].id
    recorded = load_run(runs_dir, rid).info["versions"]
    assert not done_with_other_versions(runs_dir, [rid], recorded)  # the same versions: nothing to say
    upgraded = {**recorded, "featcache": "99.0", "scikit-learn": "99.1", "keras": "99.2"}
    monkeypatch.setattr("featcache.runs.library_versions", lambda: upgraded)
    again = fit(root, "fakenet", "knn", opts(cache_dir, runs_dir, n_boot=50))
    assert again.skipped == [rid] and not again.runs  # kept, not trained again
    note = next(n for n in again.notes if "other versions" in n)
    assert (f"1 of the 1 run(s) found already done were trained with other versions ({rid}: featcache "
            f"{recorded['featcache']} (now 99.0), scikit-learn {recorded['scikit-learn']} (now 99.1))"
            in note)  # keras moved too, but a knn's numbers do not depend on it
    assert "add --retrain" in note


def test_the_version_note_of_a_dense_head_names_only_the_libraries_that_trained_it() -> None:
    """An mlp run was said to depend on TensorFlow and JAX whatever trained it, so upgrading JAX alone
    sent users of TensorFlow-trained runs to retrain for nothing. Now: Keras, its backend, and the fused
    trainer's library; a run without those records keeps the old answer (all three)."""
    from featcache.runs import version_changes

    versions = {"featcache": "1", "numpy": "1", "scipy": "1", "scikit-learn": "1", "keras": "3",
                "tensorflow": "2", "jax": "0.4"}
    tf_run = {"head": "mlp", "versions": versions, "environment": {"keras_backend": "tensorflow"},
              "trainer": {"selection": {"path": "fused"}, "saved_model": {"path": "keras.fit"}}}
    jax_run = {**tf_run, "environment": {"keras_backend": "jax"},
               "trainer": {"selection": {"path": "fused-jax"}, "saved_model": {"path": "keras.fit"}}}
    jax_trainer_on_tf = {**tf_run, "trainer": {"selection": {"path": "fused-jax"}}}
    new_jax, new_tf = {**versions, "jax": "0.5"}, {**versions, "tensorflow": "2.9"}
    assert version_changes(tf_run, new_jax) == []
    assert version_changes(tf_run, new_tf) == ["tensorflow 2 (now 2.9)"]
    assert version_changes(jax_run, new_tf) == []
    assert version_changes(jax_run, new_jax) == ["jax 0.4 (now 0.5)"]
    assert version_changes(jax_trainer_on_tf, new_jax) == ["jax 0.4 (now 0.5)"]
    assert version_changes(jax_trainer_on_tf, new_tf) == ["tensorflow 2 (now 2.9)"]
    unrecorded = {"head": "mlp", "versions": versions}
    assert version_changes(unrecorded, new_jax) == ["jax 0.4 (now 0.5)"]
    assert version_changes({**tf_run, "head": "knn"}, new_tf) == []  # a knn does not use Keras


def test_retrain_trains_done_configs_again_and_keeps_the_old_runs_aside(setup, capsys) -> None:
    """There was no way to retrain a run found already done (after an upgrade, say) but deleting its folder.
    --retrain moves the old runs of the sweep's configs to runs/.retrained (kept, listed nowhere) and
    trains them again; runs of other configs stay where they are."""
    from featcache.runs import RETIRED_DIR

    root, cache_dir, runs_dir = setup
    other = fit(root, "fakenet", "knn", opts(cache_dir, runs_dir, grid_args=["n_neighbors=3"]))
    knn = ("--head", "knn", "--cv-folds", "3")
    assert cli(_fit_cmd(root, cache_dir, runs_dir, *knn)) == 0
    old = next(r for r in list_runs(runs_dir) if r.id != other.runs[0].id)
    capsys.readouterr()
    assert cli(_fit_cmd(root, cache_dir, runs_dir, *knn)) == 0
    assert "skipped it (--retrain trains it again)" in " ".join(capsys.readouterr().out.split())
    assert cli(_fit_cmd(root, cache_dir, runs_dir, *knn, "--retrain", "--json")) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["retired"] == [old.id] and not again["skipped"] and len(again["runs"]) == 1
    new = load_run(runs_dir, again["runs"][0]["id"])
    assert new.id != old.id and new.info["config_hash"] == old.info["config_hash"]
    assert sorted(r.id for r in list_runs(runs_dir)) == sorted([other.runs[0].id, new.id])
    assert (runs_dir / RETIRED_DIR / old.id / "run.json").is_file()
    assert any(f"moved to {runs_dir / RETIRED_DIR}" in n for n in again["notes"])
    assert new.metrics()["test"]["accuracy"] == load_run(runs_dir / RETIRED_DIR, old.id).metrics()["test"][
        "accuracy"]
    assert cli(_fit_cmd(root, cache_dir, runs_dir, *knn, "--json")) == 0
    assert json.loads(capsys.readouterr().out)["skipped"] == [new.id]  # done again, once
    with pytest.raises(RunError, match=f"run '{old.id}' was moved to .*retrained by `fit --retrain`"):
        load_run(runs_dir, old.id)  # `runs show OLD` / `predict --run OLD` said "no run"
    shutil.copytree(runs_dir / RETIRED_DIR / old.id, runs_dir / old.id)  # moved back by hand
    assert cli(_fit_cmd(root, cache_dir, runs_dir, *knn, "--retrain", "--json")) == 0
    assert sorted(json.loads(capsys.readouterr().out)["retired"]) == sorted([old.id, new.id])
    assert (runs_dir / RETIRED_DIR / f"{old.id}-2" / "run.json").is_file()  # the first one is kept
    assert (runs_dir / RETIRED_DIR / old.id / "run.json").is_file()


def test_a_pad_cache_made_before_full_size_boxes_does_not_block_fit(tmp_path: Path) -> None:
    """Re-extracting with --resize pad starts a new cache (boxes from the full size: ``resize_box``) beside
    the old one, and fit refused to choose between the two with no flag that could (a reviewer's case).
    The old file is passed over; two real choices are still refused."""
    root = make_tree(tmp_path / "data")
    ds = discover(root)
    new = cache_config(ds.root, fake_backbone(), "pad", "float32")
    old = {k: v for k, v in new.items() if k != "resize_box"}
    keys = list(dict.fromkeys(sha256_file(r.path) for r in ds.records))
    paths = {sha256_file(r.path): r.relpath for r in ds.records}
    files = []
    for i, cfg in enumerate((old, new)):
        files.append(cache_path(tmp_path / "cache", cfg))
        with CacheWriter(files[-1], cfg, 6) as w:
            w.reserve(len(keys))
            w.append(keys, ["orig"] * len(keys), [paths[k] for k in keys],
                     np.random.default_rng(i).normal(size=(len(keys), 6)).astype(np.float32))
    res = fit(root, "fakenet", "logreg", opts(tmp_path / "cache", tmp_path / "runs", grid_args=["C=1"]))
    assert res.caches == {"fakenet": files[1]}
    crop = cache_config(ds.root, fake_backbone(), "crop", "float32")
    with CacheWriter(cache_path(tmp_path / "cache", crop), crop, 6) as w:
        w.reserve(len(keys))
        w.append(keys, ["orig"] * len(keys), [paths[k] for k in keys], np.zeros((len(keys), 6), np.float32))
    with pytest.raises(CacheError, match="differ in resize"):
        fit(root, "fakenet", "logreg", opts(tmp_path / "cache", tmp_path / "runs2", grid_args=["C=1"]))


def test_report_ranks_by_the_metric_the_runs_were_selected_by(setup, tmp_path: Path, capsys) -> None:
    """`fit --metric auc` then `report` ranked by accuracy: the report headlined another config than the one
    auc picks (an mlp sweep's configs are each a run) while its provenance said metric=auc (a fit audit)."""
    from featcache.report import ReportOptions, build_report

    root, cache_dir, runs_dir = setup
    for k in (1, 9):
        fit(root, "fakenet", "knn", opts(cache_dir, runs_dir, grid_args=[f"n_neighbors={k}"], metric="auc"))
    res = build_report(runs_dir, tmp_path / "rep", ReportOptions(inspect_data=False))
    text = " ".join(res.markdown.read_text(encoding="utf-8").split())
    assert res.metric == "auc" and "sorted by validation auc" in text
    assert "Ranked by validation auc, the metric these runs were selected by (fit --metric auc)" in text
    aucs = [r["val_auc"] for r in json.loads(res.json.read_text())["runs"]]
    assert aucs == sorted(aucs, reverse=True)
    res = build_report(runs_dir, tmp_path / "rep2", ReportOptions(metric="accuracy", inspect_data=False))
    assert res.metric == "accuracy" and "Ranked by validation auc" not in res.markdown.read_text()
    fit(root, "fakenet", "knn", opts(cache_dir, runs_dir, grid_args=["n_neighbors=3"]))  # by accuracy
    res = build_report(runs_dir, tmp_path / "rep3", ReportOptions(inspect_data=False))
    text = " ".join(res.markdown.read_text(encoding="utf-8").split())
    assert res.metric == "accuracy"
    assert "selected by different metrics (accuracy (1 run(s)), auc (2 run(s))); they are ranked by" in text
    assert cli(["report", "--runs-dir", str(runs_dir), "--out", str(tmp_path / "rep4"), "--no-inspect",
                "--id", "*knn*", "--tag", "x"]) == 2  # no such tag: an error, not a default metric crash
    capsys.readouterr()


def test_test_fraction_holds_out_a_patient_grouped_test_split(tmp_path: Path, capsys) -> None:
    """A folder without a test split gave validation numbers only, with no interval and no paired
    comparison, and no way to a test split but a hand-made manifest (a researcher's audit on the Kermany
    training split). --test-fraction holds out whole patients, stratified, with a seed of its own."""
    from featcache.report import ReportOptions, build_report

    root = make_tree(tmp_path / "data", n_patients=24)
    shutil.rmtree(root / "test")
    cache_dir, runs_dir = tmp_path / "cache", tmp_path / "runs"
    write_cache(root, cache_dir)
    ds = discover(root)
    groups = np.array([r.group for r in ds.records])
    tests = []
    for seed in (0, 1):
        res = fit(root, "fakenet", "knn", opts(cache_dir, runs_dir, grid_args=["n_neighbors=3"], seed=seed,
                                                test_fraction=0.25))
        run = load_run(runs_dir, res.runs[0].id)
        idx = run.indices()
        assert len(idx["test"]) and not set(groups[idx["test"]]) & set(groups[idx["pool"]])
        assert len(idx["pool"]) + len(idx["test"]) == len(ds.records)
        assert 0.15 < len(idx["test"]) / len(ds.records) < 0.35
        assert run["dataset"]["test_fraction"] == 0.25 and run.metrics()["test"]["ci"]
        assert {ds.records[i].subtype for i in idx["test"]} == set(SUBTYPES)  # stratified by subtype
        tests.append(idx["test"].tolist())
    assert tests[0] == tests[1]  # one test split whatever --seed: runs of several seeds compare
    plain = fit(root, "fakenet", "knn", opts(cache_dir, runs_dir, grid_args=["n_neighbors=3"]))
    assert plain.runs[0].id not in {r.id for r in res.runs}  # without it: another run, no test split
    text = " ".join(build_report(runs_dir, tmp_path / "rep", ReportOptions(inspect_data=False, ids=["*knn*"],
                                                                          top=1)).markdown.read_text().split())
    assert "held out of the training images by fit --test-fraction (25% of the patients requested" in text
    assert "Published Kermany results are on its official test split" in text  # 0.97 beside published 0.9
    other = fit(root, "fakenet", "knn", opts(cache_dir, runs_dir, grid_args=["n_neighbors=5"]))
    no_test = build_report(runs_dir, tmp_path / "rep-nt", ReportOptions(inspect_data=False, ids=[
        plain.runs[0].id, other.runs[0].id])).markdown.read_text()  # the paired section vanished unsaid
    assert "No paired comparison of the best runs: they have no test predictions" in " ".join(no_test.split())
    with_test = make_tree(tmp_path / "with")
    write_cache(with_test, tmp_path / "c2")
    with pytest.raises(ConfigError, match="has a test split of its own"):
        fit(with_test, "fakenet", "knn", opts(tmp_path / "c2", runs_dir, test_fraction=0.2))
    assert cli(_fit_cmd(root, cache_dir, runs_dir, "--head", "knn", "--test-fraction", "1.5")) == 2
    assert "--test-fraction must be between 0 and 1" in " ".join(capsys.readouterr().err.split())


def test_a_held_out_and_a_validation_only_run_of_one_folder_each_get_their_counts_in_the_report(
        tmp_path: Path) -> None:
    """Both runs share the folder's dataset digest, which leaves the --test-fraction split out: the report's
    Dataset section showed the held-out run's test counts for the validation-only run too."""
    from featcache.report import ReportOptions, build_report

    root = make_tree(tmp_path / "data", n_patients=24)
    shutil.rmtree(root / "test")
    cache_dir, runs_dir = tmp_path / "cache", tmp_path / "runs"
    write_cache(root, cache_dir)
    labels = np.array([r.label for r in discover(root).records])
    held = fit(root, "fakenet", "knn", opts(cache_dir, runs_dir, grid_args=["n_neighbors=3"],
                                            test_fraction=0.25))
    fit(root, "fakenet", "knn", opts(cache_dir, runs_dir, grid_args=["n_neighbors=5"]))
    test_idx = load_run(runs_dir, held.runs[0].id).indices()["test"]
    text = " ".join(build_report(runs_dir, tmp_path / "rep", ReportOptions(inspect_data=False))
                    .markdown.read_text().split())
    section = text[text.index("## Dataset"):text.index("## Methods")]
    assert len(re.findall(r"### .*data @", section)) == 1  # still one dataset
    assert section.count("| total |") == 2  # but a counts table for each split layout
    at_held = section.index("25% held out as the test split (--test-fraction 0.25, seed 0)")
    at_own = section.index("no test split (validation only)")
    held_table = section[at_held:at_own] if at_held < at_own else section[at_held:]
    own_table = section[at_own:at_held] if at_own < at_held else section[at_own:]
    for label in ("NORMAL", "PNEUMONIA"):
        in_test = int((labels[test_idx] == label).sum())
        assert f"| test | {label} | {in_test} |" in held_table
        assert f"| train | {label} | {int((labels == label).sum()) - in_test} |" in held_table
        assert f"| train | {label} | {int((labels == label).sum())} |" in own_table
    assert "| test |" not in own_table


def test_the_images_a_test_fraction_leaves_for_training_are_counted_as_train_not_all(tmp_path: Path) -> None:
    """A folder without split folders: fit records its images as split "all", and after --test-fraction
    the report's counts read "all | NORMAL | n" beside "test | NORMAL | m", n being only the training side."""
    from featcache.report import ReportOptions, build_report

    tree = make_tree(tmp_path / "tree", n_patients=24)
    root = tmp_path / "data"
    shutil.move(tree / "train", root)  # NORMAL/ and PNEUMONIA/ at the top: no split folders
    cache_dir, runs_dir = tmp_path / "cache", tmp_path / "runs"
    write_cache(root, cache_dir)
    labels = np.array([r.label for r in discover(root).records])
    held = fit(root, "fakenet", "knn", opts(cache_dir, runs_dir, grid_args=["n_neighbors=3"],
                                            test_fraction=0.25))
    test_idx = load_run(runs_dir, held.runs[0].id).indices()["test"]
    text = " ".join(build_report(runs_dir, tmp_path / "rep", ReportOptions(inspect_data=False))
                    .markdown.read_text().split())
    section = text[text.index("## Dataset"):text.index("## Methods")]
    for label in ("NORMAL", "PNEUMONIA"):
        in_test = int((labels[test_idx] == label).sum())
        assert f"| test | {label} | {in_test} |" in section
        assert f"| train | {label} | {int((labels == label).sum()) - in_test} |" in section
    assert "| all |" not in section


def test_a_test_split_without_a_class_is_noted(tmp_path: Path) -> None:
    """A test split of NORMAL images only gave test AUC blank and accuracy 1 with an interval, without a
    word (a validation hold-out lacking a class is named); the note says which class and why."""
    root = make_tree(tmp_path / "data")
    shutil.rmtree(root / "test" / "PNEUMONIA")
    write_cache(root, tmp_path / "cache")
    res = fit(root, "fakenet", "logreg", opts(tmp_path / "cache", tmp_path / "runs", grid_args=["C=1"]))
    n_test = sum(r.split == "test" for r in discover(root).records)
    said = [n for n in res.notes if n.startswith("the test split has no image of PNEUMONIA")]
    assert said and f"(its {n_test} images: NORMAL: {n_test})" in said[0] and "AUC" in said[0]
    assert load_run(tmp_path / "runs", res.runs[0].id).metrics()["test"]["auc"] is None
    whole = make_tree(tmp_path / "whole", seed=1)  # every class in the test split: no such note
    write_cache(whole, tmp_path / "c2")
    res = fit(whole, "fakenet", "logreg", opts(tmp_path / "c2", tmp_path / "r2", grid_args=["C=1"]))
    assert not [n for n in res.notes if "test split has no image" in n]


def test_a_test_fraction_that_leaves_too_few_patients_says_so(tmp_path: Path) -> None:
    """--test-fraction 0.95 left a handful of patients to train on, and the split's error said only "add
    data or lower --cv-folds" (or gave a class one patient) about a folder of many: the held-out share, the
    cause, is named with the patients it moved."""
    root = make_tree(tmp_path / "data", n_patients=24)
    shutil.rmtree(root / "test")
    write_cache(root, tmp_path / "cache")
    n = len({r.group for r in discover(root).records})
    said = rf"--test-fraction 0\.95 moved \d+ of the {n} patients to the test split, leaving \d+ for "
    for head in ("logreg", "mlp"):
        with pytest.raises(DataError, match=said + r".* a smaller --test-fraction"):
            fit(root, "fakenet", head, opts(tmp_path / "cache", tmp_path / "runs", test_fraction=0.95,
                                            grid_args=["epochs=1"] if head == "mlp" else ["C=1"]))
