"""`featcache runs show ID`: what one run's record says, as the user audits it.

Runs are fake-but-well-formed folders (test_report's write_fake_run), so no cache or backbone is needed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from featcache.cli.app import run
from test_report import write_fake_run

RUN_ID = "20240101-000001-logreg-aaaaaaaa"


@pytest.fixture(autouse=True)
def _wide_tables(monkeypatch):
    """One table line per row, as test_fit pins it: in a fresh-clone CI run (xdist), the metrics table was
    laid out narrower there than alone and a cell's CI wrapped onto the next line."""
    monkeypatch.setenv("COLUMNS", "250")


def _with_at_threshold(runs: Path, threshold: float = 0.3127) -> Path:
    """A binary run whose metrics.json holds val and test metrics at 0.5 and at the chosen threshold (with
    numbers that differ, so each can be told apart in the output)."""
    folder = write_fake_run(runs, RUN_ID, threshold=threshold)
    metrics = json.loads((folder / "metrics.json").read_text())
    metrics["val"].update(sensitivity=0.7111, specificity=0.9222, at_threshold={
        "n": metrics["val"]["n"], "threshold": threshold, "accuracy": 0.8333, "sensitivity": 0.9444,
        "specificity": 0.7222})
    metrics["test"] = {"n": 60, "accuracy": 0.8111, "sensitivity": 0.6555, "specificity": 0.9666,
                       "ci": {"accuracy": [0.7, 0.9], "resampled": "patients"},
                       "at_threshold": {"n": 60, "threshold": threshold, "accuracy": 0.8777,
                                        "sensitivity": 0.9555, "specificity": 0.7999,
                                        "ci": {"sensitivity": [0.9001, 0.9901], "resampled": "patients"}}}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder


def test_runs_show_gives_the_metrics_at_the_chosen_threshold(tmp_path, capsys):
    """`runs show` gave accuracy, sensitivity and specificity at 0.5 only, while `predict` labels at the
    threshold chosen on validation, whose numbers metrics.json records (at_threshold): they are rows of
    their own now, labelled with that threshold."""
    runs = tmp_path / "runs"
    _with_at_threshold(runs)
    assert run(["runs", "show", RUN_ID, "--runs-dir", str(runs)]) == 0
    lines = [" ".join(line.replace("│", " ").split()) for line in capsys.readouterr().out.splitlines()]
    out = " ".join(lines)
    assert "metrics (threshold 0.5 and 0.3127 chosen on validation; test with 95% bootstrap CI" in out
    val_rows = [line for line in lines if line.startswith("val ")]
    test_rows = [line for line in lines if line.startswith("test ")]
    assert len(val_rows) == 2 and len(test_rows) == 2
    assert val_rows[0].startswith("val 0.5 40 ") and "0.7111" in val_rows[0]
    assert val_rows[1].startswith("val 0.3127 40 0.8333")
    assert "0.9444" in val_rows[1] and "0.7222" in val_rows[1]
    assert test_rows[0].startswith("test 0.5 60 0.8111")
    assert test_rows[1].startswith("test 0.3127 60 0.8777") and "0.9555 [0.9001–0.9901]" in test_rows[1]
    assert "0.7999" in test_rows[1]
    # --json already holds them (metrics.json whole): unchanged
    assert run(["runs", "show", RUN_ID, "--runs-dir", str(runs), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["metrics"]["test"]["at_threshold"]["sensitivity"] == 0.9555


def test_runs_show_of_a_run_without_at_threshold_metrics_is_unchanged(tmp_path, capsys):
    """Older runs (no at_threshold in metrics.json) keep the 0.5 table, without an empty threshold column."""
    runs = tmp_path / "runs"
    write_fake_run(runs, RUN_ID)
    assert run(["runs", "show", RUN_ID, "--runs-dir", str(runs)]) == 0
    lines = [" ".join(line.replace("│", " ").split()) for line in capsys.readouterr().out.splitlines()]
    assert "metrics (threshold 0.5)" in lines
    assert [line.split()[:2] for line in lines if line.startswith("val ")] == [["val", "40"]]


def _set_weights(folder: Path, weights: str, image_size: int, **config: str) -> None:
    """Give a fake run's backbone and cache the weights and input size fit records from the cache config."""
    info = json.loads((folder / "run.json").read_text())
    info["backbones"][0].update(weights=weights, image_size=image_size)
    info["caches"][0].update(name=info["backbones"][0]["name"], feature_dim=768,
                             config={"weights": weights, "image_size": image_size, **config})
    (folder / "run.json").write_text(json.dumps(info))


def test_runs_show_names_the_backbone_weights_and_image_size(tmp_path, capsys):
    """`runs show` named neither a run's backbone weights (ImageNet, random, a file) nor its image size:
    only the command line told them apart. The cache row gives both, a file by its SHA-256; a random-weights
    run says plainly that its metrics say nothing about the method (as `runs ls` and the report mark it)."""
    runs = tmp_path / "runs"
    cases = {
        "20240101-000001-logreg-aaaaaaaa": (("imagenet", 224, {}), "(ImageNet weights, 224 px; config"),
        "20240101-000002-logreg-bbbbbbbb": (("none", 160, {}),
                                            "(random weights from --weights none, 160 px;"),
        "20240101-000003-logreg-cccccccc": (("file", 192, {"weights_file_sha256": "12" * 32}),
                                            "(weights file sha256 121212121212..., 192 px;"),
    }
    for rid, ((weights, size, config), _) in cases.items():
        _set_weights(write_fake_run(runs, rid), weights, size, **config)
    for rid, (_, expected) in cases.items():
        assert run(["runs", "show", rid, "--runs-dir", str(runs)]) == 0
        out = " ".join(capsys.readouterr().out.replace("│", " ").split())
        assert "cache mobilenet-0.75 /tmp/cache/" in out and expected in out, out
        random = ("Random weights: mobilenet-0.75 features come from randomly initialised weights "
                  "(--weights none), not ImageNet: this run tests the pipeline, and its metrics say nothing "
                  "about the method")
        assert (random in out) == (rid.endswith("bbbbbbbb"))


def test_runs_show_says_where_the_threshold_was_chosen_and_shows_0_5_once(tmp_path, capsys):
    """A review: the title said "chosen on validation" of a CV head's threshold, chosen on the pooled
    out-of-fold probabilities (run.json's chosen_on says so), and a chosen threshold of exactly 0.5 got a
    second pair of rows labelled 0.5."""
    runs = tmp_path / "runs"
    folder = _with_at_threshold(runs)
    info = json.loads((folder / "run.json").read_text())
    info["threshold"]["chosen_on"] = "validation (out-of-fold)"
    (folder / "run.json").write_text(json.dumps(info))
    assert run(["runs", "show", RUN_ID, "--runs-dir", str(runs)]) == 0
    out = " ".join(capsys.readouterr().out.replace("│", " ").split())
    assert "threshold 0.5 and 0.3127 chosen on validation (out-of-fold);" in out
    half = tmp_path / "half"
    _with_at_threshold(half, threshold=0.5)
    assert run(["runs", "show", RUN_ID, "--runs-dir", str(half)]) == 0
    lines = [" ".join(line.replace("│", " ").split()) for line in capsys.readouterr().out.splitlines()]
    assert len([line for line in lines if line.startswith("test ")]) == 1


def test_scores_have_four_decimals_and_an_unfinished_run_is_named(tmp_path, capsys, monkeypatch):
    """`runs ls` and `runs show` gave scores to 4 significant digits, which drop trailing zeros: a column
    read "0.974" beside "0.9761" and "1" beside "0.9444". And `runs show ID` of a folder that `runs ls`
    lists as unfinished (no run.json) said "no run 'ID'"."""
    runs = tmp_path / "runs"
    folder = _with_at_threshold(runs)
    metrics = json.loads((folder / "metrics.json").read_text())
    metrics["val"]["accuracy"], metrics["test"]["accuracy"] = 0.974, 1.0
    (folder / "metrics.json").write_text(json.dumps(metrics))
    assert run(["runs", "ls", "--runs-dir", str(runs)]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if RUN_ID in line)
    assert " 0.9740 " in row and " 1.0000 " in row, row
    monkeypatch.setenv("COLUMNS", "80")  # a score was folded there ("0.97" over "40"); params give way
    assert run(["runs", "ls", "--runs-dir", str(runs)]) == 0
    assert " 0.9740 " in capsys.readouterr().out
    monkeypatch.setenv("COLUMNS", "250")
    assert run(["runs", "show", RUN_ID, "--runs-dir", str(runs)]) == 0
    out = capsys.readouterr().out
    assert "0.9740" in out and "1.0000 [0.7000–0.9000]" in out
    unfinished = "20240101-000002-logreg-bbbbbbbb"
    (runs / unfinished).mkdir()
    (runs / unfinished / "metrics.json").write_text("{}")
    assert run(["runs", "show", unfinished, "--runs-dir", str(runs)]) != 0
    err = " ".join(capsys.readouterr().err.split())
    assert f"run '{unfinished}' is unfinished (its folder has no run.json" in err, err
    assert run(["runs", "show", "bbbbbb", "--runs-dir", str(runs)]) != 0  # part of its id: said "no run"
    assert f"run '{unfinished}' is unfinished" in " ".join(capsys.readouterr().err.split())


def _early_stopped_mlp(runs: Path, *, refit: bool) -> str:
    """A fake mlp run asked for 200 epochs that stopped after 8 (patience 3) and kept epoch 5's weights,
    optionally refit on training + validation for those 5 epochs (as fit records it)."""
    run_id = "20240101-000003-mlp-cccccccc"
    folder = write_fake_run(runs, run_id, head="mlp", params={"layers": [8], "epochs": 200, "patience": 3,
                                                               "checkpoint": True})
    metrics = json.loads((folder / "metrics.json").read_text())
    val_loss = [0.9, 0.7, 0.6, 0.55, 0.5, 0.52, 0.51, 0.53]
    metrics["history"] = {"loss": [v - 0.1 for v in val_loss], "val_loss": val_loss,
                          "accuracy": [0.8] * 8, "val_accuracy": [0.8] * 8, "lr": [1e-3] * 8}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    info = json.loads((folder / "run.json").read_text())
    info["hyperparameters"] = {"layers": [8], "epochs": 200, "patience": 3, "checkpoint": True,
                               "reduce_lr_patience": None}
    if refit:
        info["selection"].update(refit=True, refit_n_train_images=160, refit_plan={
            "epochs": 5, "as_configured": False, "epochs_from": "best hold-out epoch (checkpoint)",
            "hold_out_epochs_run": 8, "learning_rates_replayed": False})
    (folder / "run.json").write_text(json.dumps(info))
    return run_id


@pytest.mark.parametrize("refit", [False, True])
def test_runs_show_says_how_many_epochs_an_mlp_ran_and_which_it_kept(tmp_path, capsys, refit):
    """An mlp run with epochs=200 and early stopping showed only "epochs=200": not that it stopped after 8
    epochs, kept epoch 5's weights, or (--refit) that the tested model was trained on training + validation
    images for 5 epochs. A Methods section written from `runs show` said 200 epochs."""
    runs = tmp_path / "runs"
    run_id = _early_stopped_mlp(runs, refit=refit)
    assert run(["runs", "show", run_id, "--runs-dir", str(runs)]) == 0
    lines = [" ".join(line.replace("│", " ").split()) for line in capsys.readouterr().out.splitlines()]
    row = next((line for line in lines if line.startswith("epochs ")), "")
    assert row.startswith("epochs 8 of 200 epochs (stopped early, patience 3); weights of epoch 5 kept "
                          "(lowest validation loss)"), lines
    refit_words = ("tested model: refit on 160 images (training + validation) for 5 epochs (the hold-out "
                   "model's best epoch)")
    assert (refit_words in row) == refit
    logreg = "20240101-000004-logreg-dddddddd"  # other heads have no epochs: no row
    write_fake_run(runs, logreg)
    assert run(["runs", "show", logreg, "--runs-dir", str(runs)]) == 0
    assert "epochs" not in capsys.readouterr().out


def test_the_report_heads_an_mlp_run_with_the_epochs_it_ran(tmp_path):
    """The report's per-run header named the config (epochs=200) but not the 8 epochs it ran."""
    from featcache.report import build_report

    runs = tmp_path / "runs"
    run_id = _early_stopped_mlp(runs, refit=False)
    res = build_report(runs, tmp_path / "out")
    text = " ".join(res.markdown.read_text(encoding="utf-8").split())
    assert (f"run {run_id} — val n=40, test n=60 — 8 of 200 epochs (stopped early, patience 3); weights of "
            "epoch 5 kept (lowest validation loss)") in text


def test_runs_show_gives_each_class_of_a_3class_run(tmp_path, capsys):
    """A 3-class run's sensitivity and specificity read "-" (they are binary's), so its virus recall was
    only in the report or metrics.json: `runs show` adds a per-class table. A binary run gets none."""
    runs = tmp_path / "runs"
    folder = write_fake_run(runs, RUN_ID, task="3class", threshold=None)
    metrics = json.loads((folder / "metrics.json").read_text())
    per_class = {"normal": {"precision": 0.9, "recall": 0.8, "f1": 0.847, "support": 20},
                 "bacteria": {"precision": 0.7, "recall": 0.75, "f1": 0.724, "support": 20},
                 "virus": {"precision": 0.5, "recall": 0.4444, "f1": 0.4706, "support": 18}}
    metrics["test"] = {"n": 58, "accuracy": 0.67, "per_class": per_class,
                       "ci": {"per_class_recall": {"normal": [0.6, 0.93], "bacteria": [0.55, 0.9],
                                                   "virus": [0.19, 0.71]}}}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    assert run(["runs", "show", RUN_ID, "--runs-dir", str(runs)]) == 0
    out = capsys.readouterr().out
    assert "per class (labels: the most probable class)" in out
    rows = [" ".join(line.replace("│", " ").split()) for line in out.splitlines()]
    assert "test virus 0.5000 0.4444 [0.190–0.710] 0.4706 18" in rows, out
    binary = tmp_path / "binary"
    write_fake_run(binary, RUN_ID)
    assert run(["runs", "show", RUN_ID, "--runs-dir", str(binary)]) == 0
    assert "per class" not in capsys.readouterr().out


def test_runs_show_gives_the_cv_search_its_best_score_and_unconverged_fits(tmp_path, capsys):
    """`runs show` of a CV head's run gave the selection method and split sizes only: not how many configs
    the search compared, the chosen one's mean CV score, nor run.json's ``cv_unconverged_fits`` (fit's
    note said it once; run.json and the report kept it), which a user needs to judge the run."""
    runs = tmp_path / "runs"
    params = [{"C": c} for c in (0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)]
    folder = write_fake_run(runs, RUN_ID, params=params[2])
    info = json.loads((folder / "run.json").read_text())
    info["selection"].update(best_index=2, best_score=0.81234, scoring="roc_auc", n_configs=6,
                             cv_unconverged_fits=4, cv_same_models=[[4, 5]])
    (folder / "run.json").write_text(json.dumps(info))
    metrics = json.loads((folder / "metrics.json").read_text())
    metrics["cv_results"] = {"params": params, "mean_test_score": [0.7, 0.8, 0.81234, 0.81234, 0.6, 0.6],
                             "std_test_score": [0.1, 0.1, 0.0321, 0.05, 0.1, 0.1],
                             "rank_test_score": [4, 3, 1, 1, 5, 5]}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    assert run(["runs", "show", RUN_ID, "--runs-dir", str(runs)]) == 0
    out = " ".join(capsys.readouterr().out.replace("│", " ").split())
    assert ("CV search 6 config(s) × 5 folds (30 fits); best mean CV roc_auc 0.8123 (sd 0.0321 over the "
            "folds), config 3 of 6, tied with 1 other(s) (the first of them taken, as GridSearchCV does); "
            "configs 5 and 6 ran as the same model in every fold (k capped at the folds' training rows): "
            "their scores tie by construction; 4 of the 30 fits stopped before converging (at max_iter): "
            "the scores the config was chosen by are of unconverged models") in out, out
    info["selection"]["cv_unconverged_fits"] = 0  # recorded, and none: said so
    del info["selection"]["cv_same_models"]
    (folder / "run.json").write_text(json.dumps(info))
    assert run(["runs", "show", RUN_ID, "--runs-dir", str(runs)]) == 0
    out = " ".join(capsys.readouterr().out.replace("│", " ").split())
    assert "as GridSearchCV does); every fit converged" in out, out
    mlp = "20240101-000003-mlp-cccccccc"  # a hold-out run has no CV search: no row
    write_fake_run(runs, mlp, head="mlp")
    assert run(["runs", "show", mlp, "--runs-dir", str(runs)]) == 0
    assert "CV search" not in capsys.readouterr().out
