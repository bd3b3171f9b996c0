"""Reports: files, self-containment, leaderboard order, selection, escaping, CSV/JSON.

Runs are generated here as fake-but-well-formed run folders (the run store contract of
docs/ARCHITECTURE.md), so these tests need neither a cache nor a backbone.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from featcache.cli.app import run

from featcache.errors import ConfigError, RunError
from featcache.report import ReportOptions, build_report
from featcache.report.markdown import md

INJECT = "<img src=x onerror=alert(1)>"
CLASSES = ("NORMAL", "PNEUMONIA")


def write_fake_run(
    runs_dir: Path,
    run_id: str,
    *,
    head: str = "logreg",
    backbone: str = "mobilenet-0.75",
    task: str = "binary",
    params: dict | None = None,
    quality: float = 1.0,
    seed: int = 0,
    tags: tuple[str, ...] = (),
    status: str = "done",
    test: bool = True,
    threshold: float | None = 0.4,
    relpath_prefix: str = "img",
    dataset_root: str = "/nonexistent/featcache-data",
    created: str = "2024-01-01T00:00:00Z",
    n_val: int = 40,
    n_test: int = 60,
) -> Path:
    """Write run.json, metrics.json and prediction CSVs like runs.py does; higher quality = better scores."""
    rng = np.random.default_rng(seed)
    folder = runs_dir / run_id
    folder.mkdir(parents=True)

    recorded: dict[str, dict] = {}

    def preds(split: str, n: int) -> None:
        y = np.arange(n) % 2
        logits = quality * (2 * y - 1) + rng.normal(0, 1.0, n)
        p = 1 / (1 + np.exp(-logits))
        # what fit records beside the CSV (from the written, rounded probabilities: they must agree)
        written = np.array([float(f"{v:.6f}") for v in p])
        recorded[split] = {"n": n, "accuracy": float(np.mean((written >= 0.5) == (y == 1)))}
        with open(folder / f"predictions_{split}.csv", "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["relpath", "key", "y_true", *(f"p_{c}" for c in CLASSES), "y_pred"])
            for i in range(n):
                w.writerow(
                    [
                        f"{split}/{CLASSES[y[i]]}/{relpath_prefix}{i}.jpeg",
                        f"{i:064x}",
                        int(y[i]),
                        f"{1 - p[i]:.6f}",
                        f"{p[i]:.6f}",
                        int(p[i] >= 0.5),
                    ]
                )

    preds("val", n_val)
    if test:
        preds("test", n_test)
    history = None
    if head == "mlp":
        ep = np.arange(1, 11)
        history = {
            "loss": list(0.7 / ep),
            "val_loss": list(0.7 / ep + 0.1),
            "accuracy": list(1 - 0.3 / ep),
            "val_accuracy": list(0.95 - 0.3 / ep),
            "lr": [1e-3] * 10,
        }
    metrics = {
        "val": recorded["val"],
        "test": None,
        "cv_results": None,
        "history": history,
        "train": {"loss": 0.2 / quality, "accuracy": min(1.0, 0.8 + 0.05 * quality), "macro_f1": 0.8},
    }
    (folder / "metrics.json").write_text(json.dumps(metrics))
    run_json = {
        "id": run_id,
        "sweep_id": "sweep-1",
        "status": status,
        "created": created,
        "finished": created,
        "head": head,
        "task": task,
        "params": params or {},
        "config_hash": run_id[-8:],
        "seed": seed,
        "backbones": [
            {
                "name": backbone,
                "weights": "imagenet",
                "pooling": "avg",
                "image_size": 224,
                "weights_digest": "ab" * 32,
            }
        ],
        "selection": ({"method": "grouped_holdout", "fraction": 0.2, "achieved_fraction": 0.2167,
                       "group_by": "patient", "refit": False, "n_val_images": n_val} if head == "mlp" else
                      {"method": "grouped_kfold", "folds": 5, "group_by": "patient", "refit": True,
                       "n_val_images": n_val}),
        "dataset": {
            "root": dataset_root,
            "layout": "kermany",
            "counts": {"train": {"NORMAL": {"normal": 20}, "PNEUMONIA": {"bacteria": 10, "virus": 10}}},
        },
        "caches": [
            {
                "path": f"/tmp/cache/data__{backbone}-avg-224__0123456789ab.h5",
                "config_hash": "0123456789ab",
                "n_rows": 100,
                "weights_digest": "ab" * 32,
            }
        ],
        "versions": {"python": "3.11", "featcache": "0.1.0"},
        "command": ["featcache", "fit", "--head", head, "--tag", *tags],
        "tags": list(tags),
        "threshold": {"youden": threshold, "chosen": threshold},
    }
    if head == "mlp":  # as train_many records it: fused in chunks of 3, one run resumed from a checkpoint
        fused = {"path": "fused", "precision": "bfloat16", "group_size": 3}
        selected = {**fused, "resumed_from_epoch": 4} if seed % 3 == 0 else fused
        run_json["trainer"] = {"selection": selected, "saved_model": selected}
    (folder / "run.json").write_text(json.dumps(run_json))
    return folder


def write_fake_sweep(runs_dir: Path) -> list[str]:
    """A realistic mix: logreg C x class_weight, an mlp lr x batch grid, and two svm runs (14 runs)."""
    ids = []
    k = 0
    for c in (0.01, 0.1, 1.0):
        for cw in (None, "balanced"):
            k += 1
            rid = f"20240101-0000{k:02d}-logreg-{k:08x}"
            write_fake_run(
                runs_dir,
                rid,
                params={"C": c, "class_weight": cw},
                quality=1 + c + (cw is None),
                seed=k,
                tags=("baseline",),
            )
            ids.append(rid)
    for lr in (0.1, 0.01, 0.001):
        for bs in (32, 64):
            k += 1
            rid = f"20240101-0000{k:02d}-mlp-{k:08x}"
            write_fake_run(
                runs_dir,
                rid,
                head="mlp",
                params={"lr": lr, "batch_size": bs, "layers": [1024, 512]},
                quality=1.0 + 5 * lr * (bs == 32),
                seed=k,
                tags=("mlp-grid",),
            )
            ids.append(rid)
    for c in (1.0, 10.0):
        k += 1
        rid = f"20240101-0000{k:02d}-svm-{k:08x}"
        write_fake_run(runs_dir, rid, head="svm", params={"kernel": "rbf", "C": c}, quality=c / 5, seed=k)
        ids.append(rid)
    return ids


CLASSES_3 = ("bacteria", "normal", "virus")


def write_3class_run(runs_dir: Path, run_id: str, *, quality: float, seed: int,
                     params: dict | None = None) -> Path:
    """A 3-class run: write_fake_run's record with 3-class prediction CSVs (higher quality = better)."""
    folder = write_fake_run(runs_dir, run_id, task="3class", params=params, seed=seed, threshold=None)
    rng = np.random.default_rng(seed)
    for split, n in (("val", 45), ("test", 60)):
        y = np.arange(n) % 3
        logits = rng.normal(0, 1, (n, 3)) + quality * np.eye(3)[y]
        p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        with open(folder / f"predictions_{split}.csv", "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["relpath", "key", "y_true", *(f"p_{c}" for c in CLASSES_3), "y_pred"])
            for i in range(n):
                w.writerow([f"{split}/{CLASSES_3[y[i]]}/img{i}.jpeg", f"{i:064x}", int(y[i]),
                            *(f"{v:.6f}" for v in p[i]), int(p[i].argmax())])
    metrics = json.loads((folder / "metrics.json").read_text())
    metrics["val"] = {"n": 45}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder


def _read_preds(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with open(path, encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    cols = [c for c in rows[0] if c.startswith("p_")]
    return np.array([int(r["y_true"]) for r in rows]), np.array([[float(r[c]) for c in cols] for r in rows])


def _accuracy(path: Path, thr: float = 0.5) -> float:
    with open(path, encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    return float(np.mean([(float(r["p_PNEUMONIA"]) >= thr) == (int(r["y_true"]) == 1) for r in rows]))


@pytest.fixture
def sweep(tmp_path: Path) -> tuple[Path, list[str]]:
    runs = tmp_path / "runs"
    return runs, write_fake_sweep(runs)


def test_report_files_are_written_and_self_contained(sweep, tmp_path):
    runs, ids = sweep
    res = build_report(runs, tmp_path / "out")
    for p in (res.html, res.markdown, res.csv, res.json):
        assert p.is_file() and p.stat().st_size > 0
    html = res.html.read_text(encoding="utf-8")
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", html, re.I)
    assert "<script" not in html.lower() and '<link rel="stylesheet"' not in html
    assert html.count('src="data:image/png;base64,') >= 4  # overview, top runs, heatmaps
    for rid in ids:
        assert rid in html
    md_text = res.markdown.read_text(encoding="utf-8")
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md_text)
    assert images and all((res.markdown.parent / img).is_file() for img in images)
    assert "Read with care:" in html and "Read with care:" in md_text
    methods = " ".join(md_text[md_text.index("## Methods"):md_text.index("## Provenance")].split())
    assert "patient-grouped stratified 5-fold cross-validation" in methods and "hold-out of 20%" in methods
    assert "21.7% achieved" in methods  # whole patients move: the share asked for is not the share got
    assert "logreg (6 run(s)), mlp (6 run(s)), svm (2 run(s))" in methods
    assert "5-fold CV, n=40" in html  # each run says how it was validated
    assert "validation only" not in html.lower()  # these runs have a test split
    assert "Provenance" in html and "ab" * 8 in html  # weights digest shown
    assert "model #" in html and "train loss" in html  # paper-000-style hyperparameter table
    assert "| mlp training | fused (bfloat16): 6 run(s) |" in md_text  # precision shapes the numbers
    flat = " ".join(md_text.split())
    assert "sensitivity and specificity take PNEUMONIA as the positive class" in flat  # said nowhere before


def test_leaderboard_order_matches_independent_accuracy(sweep, tmp_path):
    runs, ids = sweep
    res = build_report(runs, tmp_path / "out")
    data = json.loads(res.json.read_text())
    got = [r["run_id"] for r in data["runs"]]
    expected = sorted(ids, key=lambda rid: (-_accuracy(runs / rid / "predictions_val.csv"), rid))
    assert got == expected
    assert [r["rank"] for r in data["runs"]] == list(range(1, len(ids) + 1))
    first = data["runs"][0]
    assert first["val_accuracy"] == pytest.approx(_accuracy(runs / got[0] / "predictions_val.csv"))
    assert first["val_accuracy_thr"] == pytest.approx(_accuracy(runs / got[0] / "predictions_val.csv", 0.4))
    assert first["test_accuracy_lo"] <= first["test_accuracy"] <= first["test_accuracy_hi"]
    assert first["test_auc_lo"] <= first["test_auc"] <= first["test_auc_hi"]
    assert any(r["test_auc_lo"] < r["test_auc_hi"] for r in data["runs"])
    with open(res.csv, encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["run_id"] for r in rows] == got
    assert {"val_accuracy", "test_accuracy", "test_accuracy_lo", "threshold", "params"} <= set(rows[0])
    assert json.loads(rows[0]["params"]) == first["params"]
    assert res.best_run_id == got[0]


def test_group_top_tag_and_id_selection(sweep, tmp_path):
    runs, ids = sweep
    res = build_report(runs, tmp_path / "g", ReportOptions(group_by="head", top=2))
    data = json.loads(res.json.read_text())["runs"]
    heads = [r["head"] for r in data]
    assert len(data) == 6 and all(heads.count(h) == 2 for h in ("logreg", "mlp", "svm"))
    best_per_group = [data[i]["rank"] for i in range(0, 6, 2)]
    assert best_per_group == sorted(best_per_group)  # groups ordered by their best run
    for i in range(0, 6, 2):
        assert data[i]["rank"] < data[i + 1]["rank"]
    html = res.html.read_text()
    assert "head: mlp" in html and "head: svm" in html
    # methods and grid views describe every run ranked, not only the top ones shown (they said "mlp (2
    # run(s))" and listed a searched parameter as fixed)
    md_text = res.markdown.read_text(encoding="utf-8")
    methods = " ".join(md_text[md_text.index("## Methods"):md_text.index("## Provenance")].split())
    assert "logreg (6 run(s)), mlp (6 run(s)), svm (2 run(s))" in methods
    assert "leaderboard shows 6 of these 14 runs (--top)" in methods
    assert re.search(r"mlp on \S+ features · task \S+ · 6 configs \(2 in the leaderboard\)", md_text)

    res = build_report(runs, tmp_path / "t", ReportOptions(tags=["mlp-grid"]))
    assert {r["head"] for r in json.loads(res.json.read_text())["runs"]} == {"mlp"}
    res = build_report(runs, tmp_path / "i", ReportOptions(ids=["*-svm-*"]))
    assert sorted(r["run_id"] for r in json.loads(res.json.read_text())["runs"]) == [
        i for i in ids if "-svm-" in i
    ]
    res = build_report(runs, tmp_path / "s", ReportOptions(ids=["logreg"], top=1))
    assert [r["head"] for r in json.loads(res.json.read_text())["runs"]] == ["logreg"]
    with pytest.raises(RunError, match="matches the --tag/--id selection"):
        build_report(runs, tmp_path / "n", ReportOptions(tags=["nope"]))
    # an empty tag beside a real one was dropped without a word; an empty --id selected every run
    with pytest.raises(ConfigError, match="--tag needs a name"):
        build_report(runs, tmp_path / "e", ReportOptions(tags=["mlp-grid", " "]))
    with pytest.raises(ConfigError, match="--id needs a glob or part of a run id"):
        build_report(runs, tmp_path / "e", ReportOptions(ids=[""]))
    assert not (tmp_path / "e").exists()
    with pytest.raises(ConfigError, match="unknown metric"):
        build_report(runs, tmp_path / "m", ReportOptions(metric="bogus"))


def test_grouped_ranks_count_within_each_group(sweep, tmp_path):
    """With --group-by the "#" of each run was its place among all runs (mlp's best read "#3", as if two
    mlp runs beat it); ranks now count 1..k within each group, the overall place kept as overall_rank."""
    runs, ids = sweep
    res = build_report(runs, tmp_path / "g", ReportOptions(group_by="head"))
    data = json.loads(res.json.read_text())["runs"]
    overall = sorted(ids, key=lambda rid: (-_accuracy(runs / rid / "predictions_val.csv"), rid))
    by_head: dict[str, list[str]] = {}
    for rid in overall:
        by_head.setdefault(rid.split("-")[2], []).append(rid)
    for r in data:
        assert r["rank"] == by_head[r["group"]].index(r["run_id"]) + 1
        assert r["overall_rank"] == overall.index(r["run_id"]) + 1
    assert sorted(r["rank"] for r in data if r["group"] == "mlp") == list(range(1, 7))
    with open(res.csv, encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["rank"], r["overall_rank"]) for r in rows] == [(str(r["rank"]), str(r["overall_rank"]))
                                                                for r in data]
    md_text = res.markdown.read_text(encoding="utf-8")
    for head, members in by_head.items():  # each group's table numbers its rows 1..k, its best in bold
        table = md_text[md_text.index(f"### head: {head}"):]
        table = table[:table.index("\n\n*")]
        assert re.findall(r"^\| \**(\d+)=?\**", table, re.M) == [str(i) for i in range(1, len(members) + 1)]
        assert re.search(r"^\| \*\*1=?\*\* \|", table, re.M)  # "1=" where another run ties with it
        assert f"### \\#1 in head {head} · mobilenet-0.75 · {head} · binary" in md_text  # top-run heading
    figures = re.findall(r"\(report_files/(run-\d+)\.png\)", md_text)
    assert len(figures) == len(set(figures)) == 8  # 3 + 3 + 2: every group's #1 its own file
    ungrouped = json.loads(build_report(runs, tmp_path / "u").json.read_text())["runs"]
    assert all(r["rank"] == r["overall_rank"] for r in ungrouped)


def test_unfinished_runs_are_left_out_and_listed(tmp_path):
    runs = tmp_path / "runs"
    write_fake_run(runs, "20240101-000001-logreg-aaaaaaaa", quality=2)
    write_fake_run(runs, "20240101-000002-logreg-bbbbbbbb", quality=3, status="running")
    (runs / "junk").mkdir()
    res = build_report(runs, tmp_path / "out")
    assert [r["run_id"] for r in json.loads(res.json.read_text())["runs"]] == [
        "20240101-000001-logreg-aaaaaaaa"
    ]
    html = res.html.read_text()
    assert "Runs left out" in html and "20240101-000002-logreg-bbbbbbbb" in html and "running" in html


def test_runs_whose_result_files_changed_after_the_fit_are_left_out(tmp_path):
    """The report recomputes its numbers from the prediction CSVs: one cut short or edited must not be
    published (beside the fit's recorded CI) as the run's result."""
    from featcache.hashing import sha256_file

    runs = tmp_path / "runs"
    good = write_fake_run(runs, "20240101-000001-logreg-aaaaaaaa", quality=2)
    recorded = write_fake_run(runs, "20240101-000002-logreg-bbbbbbbb", quality=3)
    legacy = write_fake_run(runs, "20240101-000003-logreg-cccccccc", quality=4)
    info = json.loads((recorded / "run.json").read_text())  # as runs.finish writes it
    info["records"] = {n: sha256_file(recorded / n) for n in ("metrics.json", "predictions_test.csv")}
    (recorded / "run.json").write_text(json.dumps(info))
    res = build_report(runs, tmp_path / "before")
    assert len(json.loads(res.json.read_text())["runs"]) == 3
    text = (recorded / "predictions_test.csv").read_text().replace(",0,", ",1,", 1)  # one y_true flipped
    (recorded / "predictions_test.csv").write_text(text)
    lines = (legacy / "predictions_val.csv").read_text().splitlines(keepends=True)
    (legacy / "predictions_val.csv").write_text("".join(lines[:20]))  # cut short; no records: older run
    modelless = write_fake_run(runs, "20240101-000004-logreg-dddddddd", quality=5)
    info = json.loads((modelless / "run.json").read_text())
    info["artifacts"] = {"model/sklearn.joblib": "0" * 64}  # recorded, then deleted: `runs ls` left it out
    (modelless / "run.json").write_text(json.dumps(info))
    res = build_report(runs, tmp_path / "after")
    assert [r["run_id"] for r in json.loads(res.json.read_text())["runs"]] == [good.name]
    flat = " ".join(res.html.read_text().split())
    assert "predictions_test.csv was changed after the fit" in flat
    assert "predictions_val.csv has 19 rows, metrics.json says 40" in flat
    assert "model file model/sklearn.joblib is missing" in flat
    shutil.rmtree(good)  # every run left is damaged: say so, not "train heads first"
    with pytest.raises(RunError, match=r"no usable runs in .*: 3 run folder\(s\) were left out as damaged"):
        build_report(runs, tmp_path / "none")


def test_markdown_figures_have_one_file_each_and_no_stale_ones(tmp_path):
    """A binary and a 3-class grid of one head and backbone: each heatmap gets its own PNG (the second
    overwrote the first), and a later report into the same folder leaves no figure of the earlier one."""
    runs = tmp_path / "runs"
    k = 0
    for task in ("binary", "3class"):
        for lr in (0.1, 0.01):
            for bs in (32, 64):
                k += 1
                write_fake_run(runs, f"20240101-0000{k:02d}-mlp-{k:08x}", head="mlp", task=task, seed=k,
                               params={"lr": lr, "batch_size": bs}, quality=1 + k / 4)
    res = build_report(runs, tmp_path / "out")
    text = res.markdown.read_text()
    links = re.findall(r"report_files/(heatmap-[^)]+\.png)", text)
    assert len(links) == 2 and len(set(links)) == 2 and all("3class" in n or "binary" in n for n in links)
    pngs = {p.name for p in (tmp_path / "out" / "report_files").glob("*.png")}
    assert set(links) <= pngs
    build_report(runs, tmp_path / "out", ReportOptions(ids=["*-00000[1-4]-*"]))  # the binary grid only
    again = {p.name for p in (tmp_path / "out" / "report_files").glob("*.png")}
    linked = set(re.findall(r"report_files/([^)]+\.png)", res.markdown.read_text()))
    assert again == linked and not any("3class" in n for n in again)


def test_cv_grid_table_highlights_only_the_config_the_search_chose(tmp_path):
    """Configs tied at the best CV score all have rank 1; only the one the search took is its choice."""
    runs = tmp_path / "runs"
    folder = write_fake_run(runs, "20240101-000001-svm-aaaaaaaa", head="svm", params={"C": 1.0})
    m = json.loads((folder / "metrics.json").read_text())
    m["cv_results"] = {"params": [{"C": 0.1}, {"C": 1.0}, {"C": 10.0}], "mean_test_score": [0.9, 0.9, 0.8],
                       "std_test_score": [0.01, 0.02, 0.03], "rank_test_score": [1, 1, 3],
                       "mean_fit_time": [0.0, 0.0, 0.0]}
    (folder / "metrics.json").write_text(json.dumps(m))
    info = json.loads((folder / "run.json").read_text())
    info["selection"].update(best_index=1, scoring="accuracy")
    (folder / "run.json").write_text(json.dumps(info))
    html = build_report(runs, tmp_path / "out").html.read_text()
    grid = html[html.index("grid search inside run"):]
    grid = grid[:grid.index("</table>")]
    highlighted = re.findall(r'<tr class="best">(.*?)</tr>', grid, re.S)
    assert len(highlighted) == 1 and ">2<" in highlighted[0]  # config #2, C=1, not the first tie
    assert "2 configs tie at the best mean score" in " ".join(html.split())
    assert "fit s" not in grid  # no config was timed alone: no column of zeros
    # the caption blamed fold sizes for a 7-point gap an svm's calibrated out-of-fold predictions made
    text = " ".join(html.split())
    assert "folds differ in size" not in text and "Platt-calibrated probabilities" in text


def test_runs_whose_cv_search_did_not_converge_are_named_in_the_report(tmp_path):
    """A 3-class logreg on Kermany at max_iter=100: fit noted "6 of the search's 6 fits stopped before
    converging" and recorded cv_unconverged_fits in run.json, but the report ranked the run and tabled its
    CV scores without a word."""
    from html import unescape

    runs = tmp_path / "runs"
    folder = write_fake_run(runs, "20240101-000001-logreg-aaaaaaaa", params={"C": 1.0})
    write_fake_run(runs, "20240101-000002-logreg-bbbbbbbb", params={"C": 0.1}, seed=1, quality=2.0)
    m = json.loads((folder / "metrics.json").read_text())
    m["cv_results"] = {"params": [{"C": 0.1}, {"C": 1.0}], "mean_test_score": [0.8, 0.9],
                       "std_test_score": [0.01, 0.02], "rank_test_score": [2, 1]}
    (folder / "metrics.json").write_text(json.dumps(m))
    info = json.loads((folder / "run.json").read_text())
    info["selection"].update(best_index=1, scoring="accuracy", folds=3, n_configs=2, cv_unconverged_fits=4)
    (folder / "run.json").write_text(json.dumps(info))
    res = build_report(runs, tmp_path / "out")
    rank = next(r["rank"] for r in json.loads(res.json.read_text())["runs"]
                if r["run_id"] == "20240101-000001-logreg-aaaaaaaa")
    for text in (" ".join(res.html.read_text().split()), " ".join(res.markdown.read_text().split())):
        text = unescape(text).replace("\\", "")  # HTML entities; Markdown's escaped '#'
        assert "Unconverged fits:" in text, text
        assert f"#{rank} (logreg, binary): 4 of the search's 6 fits stopped before converging" in text
        assert text.count("4 of the search's 6 fits stopped before converging") == 2  # note + grid caption
        note = text.split("Unconverged fits:")[1].split("lets them converge.")[0]
        assert note.count("(logreg, binary)") == 1  # the other run's search converged: not named
        assert "e.g. --grid max_iter=1000" in note  # ten times scikit-learn's 100, which the grid left


def test_validation_only_statement_when_no_test_split(tmp_path):
    runs = tmp_path / "runs"
    write_fake_run(runs, "20240101-000001-logreg-aaaaaaaa", test=False)
    write_fake_run(runs, "20240101-000002-mlp-bbbbbbbb", head="mlp", test=False, seed=3)
    res = build_report(runs, tmp_path / "out")
    for text in (res.html.read_text(), res.markdown.read_text()):
        assert "validation only; the official test split was not used" in text.lower()
        assert "Read with care:" in text
    assert "test acc [95% CI]" not in res.html.read_text()  # no empty test columns
    for run_json in runs.glob("*/run.json"):  # class folders of the user's own: no "official" split
        info = json.loads(run_json.read_text())
        info["dataset"]["layout"] = "folders"
        run_json.write_text(json.dumps(info))
    text = build_report(runs, tmp_path / "out2").markdown.read_text()
    assert "official" not in text and "Validation only: the data has no test split" in text


def test_markdown_escape_function():
    assert md("a|b") == r"a\|b"
    assert md(INJECT) == "&lt;img src=x onerror=alert(1)&gt;"
    assert md("[x](javascript:1) `c` *e* _u_") == r"\[x\](javascript:1) \`c\` \*e\* \_u\_"
    assert md("line1\nline2") == "line1 line2"


def test_injected_strings_are_escaped(tmp_path):
    runs = tmp_path / "runs"
    for i, q in enumerate((1.0, 2.0)):
        write_fake_run(
            runs,
            f"20240101-00000{i}-logreg-{i:08x}",
            params={"C": q, "note": "a|b", "t": "$x"},
            tags=(INJECT, "a|b"),
            relpath_prefix=INJECT,
            dataset_root=f"/data/{INJECT}|x",
            seed=i,
        )
    res = build_report(runs, tmp_path / "out")
    html = res.html.read_text()
    assert "<img src=x" not in html and "onerror=alert(1)>" not in html
    assert "&lt;img src=x onerror=alert(1)&gt;" in html
    md_text = res.markdown.read_text()
    # raw text may appear only inside fenced code blocks (command lines), which Markdown never renders as HTML
    fences = [ln for ln in md_text.splitlines() if ln.startswith("~~~~")]
    assert len(fences) % 2 == 0
    outside = re.sub(r"^~~~~\n.*?^~~~~$", "", md_text, flags=re.M | re.S)
    assert "<img" not in outside
    table_lines = [ln for ln in md_text.splitlines() if ln.startswith("| ")]
    assert table_lines
    # each table keeps a constant number of (unescaped) column separators
    blocks: list[list[str]] = []
    prev = None
    for n, ln in enumerate(md_text.splitlines()):
        if ln.startswith("| "):
            if prev != n - 1:
                blocks.append([])
            blocks[-1].append(ln)
            prev = n
    for block in blocks:
        widths = {len(re.findall(r"(?<!\\)\|", ln)) for ln in block}
        assert len(widths) == 1, block
    assert r"a\|b" in md_text
    with open(res.csv, encoding="utf-8") as fh:
        row = next(csv.DictReader(fh))
    assert INJECT in row["tags"]  # CSV keeps the raw value (quoted), it is data, not markup


def test_cli_report(sweep, tmp_path, capsys):
    runs, _ = sweep
    out = tmp_path / "rep"
    code = run(
        [
            "report",
            "--runs-dir",
            str(runs),
            "--out",
            str(out),
            "--group-by",
            "head",
            "--top",
            "3",
            "--metric",
            "auc",
            "--heatmap",
            "lr,batch_size",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert (out / "report.html").is_file() and "report.html" in captured.out.replace("\n", "")
    # no empty line from the progress bar; the best run of each head first (grouped), then the paths
    assert captured.out.startswith("best run of each group by validation auc"), captured.out
    lines = captured.out.splitlines()
    board = sorted(json.loads((out / "leaderboard.json").read_text())["runs"], key=lambda r: r["rank"])
    firsts: dict = {}
    for r in board:
        firsts.setdefault(r["group"], r)
    # every row is its group's #1 (ranks count within groups): no rank column, the group first
    assert len(firsts) == 3 and [ln.split()[0] for ln in lines[2:5]] == list(firsts)
    assert lines[1].split()[0] == "group"
    assert "Report written" in lines[5]
    assert f"{board[0]['test_auc']:.3f} [{board[0]['test_auc_lo']:.3f}–" in lines[2]
    code = run(["report", "--runs-dir", str(tmp_path / "missing"), "--out", str(out)])
    err = " ".join(capsys.readouterr().err.split())  # rich wraps long lines
    assert code != 0 and "does not exist" in err and "Traceback" not in err
    code = run(["report", "--runs-dir", str(runs), "--out", str(out), "--group-by", "colour"])
    assert code != 0
    code = run(["report", "--runs-dir", str(runs), "--out", str(out), "--heatmap", "lr,batchsize"])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2 and "--heatmap names 'batchsize'" in err and "batch_size" in err
    a_file = tmp_path / "leaderboard.csv"
    a_file.write_text("x")
    code = run(["report", "--runs-dir", str(runs), "--out", str(a_file)])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2 and "is a file, not a folder" in err and a_file.read_text() == "x"


def test_overview_labels_keep_the_settings_that_tell_runs_apart() -> None:
    """Cut at 47 characters, two mlp rows both read "dropout=0.5, epochs=50, layers=1024-512, lr=0.0…"."""
    from featcache.report.plots import overview_labels

    rows = [{"head": "mlp", "config": "dropout=0.5, epochs=50, layers=1024-512, lr=0.0001"},
            {"head": "mlp", "config": "dropout=0.5, epochs=50, layers=1024-512, lr=0.001"},
            {"head": "logreg", "config": "C=1, class_weight={0: 3.0, 1: 1.0}"},
            {"head": "svm", "config": "C=1"}, {"head": "svm", "config": "C=1"}]
    assert overview_labels(rows) == ["lr=0.0001", "lr=0.001", "C=1, class_weight={0: 3.0, 1: 1.0}", "C=1",
                                     "C=1"]  # one logreg: all of it; identical svm configs: kept
    assert overview_labels(rows[:1], width=10) == ["dropout=0…"]


def test_figures_are_print_quality_files_shown_at_screen_size(sweep, tmp_path):
    """Figures were 90-dpi PNGs (a heatmap 323 px wide): they are 150 dpi in report_files/, and the HTML
    gives each the width it had at 90 dpi, so the page looks as designed."""
    import base64
    import struct

    runs, _ = sweep
    res = build_report(runs, tmp_path / "out")
    html = res.html.read_text()
    shown = re.findall(r'<img alt="[^"]*" width="(\d+)" src="data:image/png;base64,([^"]+)"', html)
    assert shown and len(shown) == html.count("<img ")
    for width, data in shown:
        png = base64.b64decode(data)
        assert int(width) == round(struct.unpack(">I", png[16:20])[0] * 90 / 150)
    overview = (tmp_path / "out" / "report_files" / "overview.png").read_bytes()
    assert struct.unpack(">I", overview[16:20])[0] > 1400  # 11 inches at 150 dpi, less the trimmed margin


def test_dataset_audit_from_existing_folder(tmp_path, kermany_tree):
    pytest.importorskip("featcache.datasets")
    runs = tmp_path / "runs"
    from featcache.datasets import discover, inspect

    folder = write_fake_run(runs, "20240101-000001-logreg-aaaaaaaa", dataset_root=str(kermany_tree))
    res = build_report(runs, tmp_path / "out")
    html = " ".join(res.html.read_text().split())
    assert "as the runs used them" in html and "patients in more than one split" in html
    assert "Changed since the fit:" in html  # the fake run recorded 40 images; the folder holds 24
    now = inspect(discover(kermany_tree))["counts"]  # what a fit of this folder records (binary classes)
    info = json.loads((folder / "run.json").read_text())
    info["dataset"]["counts"] = {s: {("NORMAL" if lab == "NORMAL" else "PNEUMONIA"): sum(sub.values())
                                     for lab, sub in c.items()} for s, c in now.items()}
    (folder / "run.json").write_text(json.dumps(info))
    html = " ".join(build_report(runs, tmp_path / "out").html.read_text().split())
    assert "as the runs used them" in html and "Changed since the fit:" not in html


def test_recorded_cis_and_dataset_notes_follow_the_runs(tmp_path):
    """A run's published CI is the one its fit recorded (its seed and resamples, 3-class AUC included); a
    run without one gets a recomputed CI. The Kermany caution appears for Kermany data only, and a dataset
    without patient ids is said to have none."""
    runs = tmp_path / "runs"
    recorded = write_fake_run(runs, "20240101-000001-logreg-aaaaaaaa", quality=2)
    m = json.loads((recorded / "metrics.json").read_text())
    m["test"] = {"ci": {"accuracy": [0.123, 0.456], "auc": [0.2, 0.3]},
                 "at_threshold": {"ci": {"accuracy": [0.321, 0.654]}}}
    (recorded / "metrics.json").write_text(json.dumps(m))
    write_fake_run(runs, "20240101-000002-logreg-bbbbbbbb", quality=2, seed=1)
    res = build_report(runs, tmp_path / "out")
    rows = {r["run_id"]: r for r in json.loads(res.json.read_text())["runs"]}
    first, second = rows["20240101-000001-logreg-aaaaaaaa"], rows["20240101-000002-logreg-bbbbbbbb"]
    assert (first["test_accuracy_lo"], first["test_accuracy_hi"]) == (0.123, 0.456)
    assert (first["test_auc_lo"], first["test_accuracy_thr_lo"]) == (0.2, 0.321)
    assert second["test_accuracy_lo"] <= second["test_accuracy"] <= second["test_accuracy_hi"]
    md = " ".join(res.markdown.read_text().split())
    # Kermany layout, but not the official test split: the caution gives this data's own class shares
    assert "63% vs 74%" not in md and "No patient ids" not in md
    for folder in (recorded, runs / "20240101-000002-logreg-bbbbbbbb"):
        info = json.loads((folder / "run.json").read_text())
        info["dataset"]["counts"]["test"] = {"NORMAL": 30, "PNEUMONIA": 90}
        (folder / "run.json").write_text(json.dumps(info))
    md = " ".join(build_report(runs, tmp_path / "out1").markdown.read_text().split())
    assert "63% vs 74%" not in md and "test 75.0%, train 50.0% of images are not NORMAL" in md
    for folder in (recorded, runs / "20240101-000002-logreg-bbbbbbbb"):  # the official test split
        info = json.loads((folder / "run.json").read_text())
        info["dataset"]["counts"]["test"] = {"NORMAL": 234, "PNEUMONIA": 390}
        (folder / "run.json").write_text(json.dumps(info))
    md = build_report(runs, tmp_path / "out1").markdown.read_text()
    assert "63% vs 74% pneumonia" in md
    for folder in (recorded, runs / "20240101-000002-logreg-bbbbbbbb"):
        info = json.loads((folder / "run.json").read_text())
        info["dataset"].update(layout="folders", patient_ids=0)
        (folder / "run.json").write_text(json.dumps(info))
    md = build_report(runs, tmp_path / "out2").markdown.read_text()
    assert "63% vs 74%" not in md and "resemble the training images" in md
    assert "has no patient ids" in " ".join(md.split())


def test_default_heatmap_shows_the_parameters_that_matter():
    """svm's C x class_weight heatmap painted every cell 0.937 (each cell's best is a linear kernel) and
    hid the kernel, the one parameter that moved the score."""
    from featcache.report.build import _telling_pair

    grid = [{"params": {"C": c, "class_weight": w, "kernel": k},
             "cv": 0.937 if k == "linear" else 0.8 + c / 100}
            for c in (0.1, 1, 10) for w in ("none", "balanced") for k in ("linear", "rbf")]
    pair = _telling_pair(grid, ["C", "class_weight", "kernel"], "cv")
    assert pair is not None and "kernel" in pair


def test_paired_difference_is_of_the_same_images_resampled_together():
    from featcache.report.collect import Predictions
    from featcache.report.scores import paired_difference

    n = 200
    y = np.arange(n) % 2
    groups = [str(i // 2) for i in range(n)]  # two images per patient
    good = np.where(y == 1, 0.9, 0.1)
    noisy = good.copy()
    noisy[:40] = 1 - noisy[:40]  # 40 images wrong: 0.2 accuracy lower

    def preds(p1: np.ndarray, order: np.ndarray) -> Predictions:
        return Predictions([f"img{i}" for i in order], y[order], np.c_[1 - p1, p1][order], list(CLASSES),
                           [groups[i] for i in order])

    same = np.arange(n)
    shuffled = np.random.default_rng(0).permutation(n)  # rows in another order: still the same images
    diff = paired_difference(preds(noisy, shuffled), preds(good, same))
    point, lo, hi = diff["accuracy"]
    assert point == pytest.approx(-0.2) and lo < point < hi < 0  # worse, and the interval says so
    assert paired_difference(preds(good, shuffled), preds(good, same))["accuracy"] == (0.0, 0.0, 0.0)
    other = preds(good, same)
    other.relpaths[0] = "elsewhere.png"
    assert paired_difference(other, preds(good, same)) is None  # not the same test images


def test_report_compares_the_best_run_with_the_next_on_the_same_test_images(sweep, tmp_path):
    html = " ".join(build_report(sweep[0], tmp_path / "out").html.read_text().split())
    assert "better than the next runs on the test images?" in html and "paired bootstrap" in html
    assert "accuracy at the 0.5 threshold, as in the headline" in html  # which accuracy was not said


def test_leaderboard_gives_sensitivity_and_specificity_with_intervals(sweep, tmp_path):
    md_text = build_report(sweep[0], tmp_path / "out").markdown.read_text(encoding="utf-8")
    assert "test sens / spec (95% CI)" in md_text
    number = r"(\d\.\d\d)"
    cells = re.findall(rf"{number} \({number}–{number}\) / {number} \({number}–{number}\)", md_text)
    assert len(cells) == len(sweep[1])  # one per run (the best one's in bold)
    for sens, s_lo, s_hi, spec, p_lo, p_hi in cells:
        assert float(s_lo) <= float(sens) <= float(s_hi) and float(p_lo) <= float(spec) <= float(p_hi)


def test_threshold_free_metric_and_mixed_task_brier_wording(sweep, tmp_path):
    runs, _ = sweep
    write_fake_run(runs, "20240102-000001-logreg-3c000001", task="3class", quality=2.0, seed=40)
    res = build_report(runs, tmp_path / "out", ReportOptions(metric="brier"))
    md_text = " ".join(res.markdown.read_text(encoding="utf-8").split())
    assert "The Brier score's scale differs too" in md_text  # binary mean vs multi-class sum
    assert "sorted by validation brier (lower is better)" in md_text
    assert "threshold 0.5 ·" not in md_text  # the hero's validation Brier uses no threshold
    assert "no interval computed for brier" in md_text  # the overview promises no CI it does not draw
    plain = " ".join(build_report(runs, tmp_path / "acc").markdown.read_text(encoding="utf-8").split())
    assert "threshold 0.5 ·" in plain and "with 95% CI (orange)" in plain
    assert "Brier score's scale" not in plain


def test_paired_comparison_is_made_within_each_group(sweep, tmp_path):
    runs, _ = sweep
    for k in range(3):
        write_fake_run(runs, f"20240102-00000{k}-logreg-3c00000{k}", task="3class", quality=1.0 + k,
                       seed=50 + k)
    grouped = build_report(runs, tmp_path / "out", ReportOptions(group_by="task"))
    html = " ".join(grouped.html.read_text().split())
    assert "task binary: is #" in html and "task 3class: is #" in html
    ungrouped = " ".join(build_report(runs, tmp_path / "all").html.read_text().split())
    assert ungrouped.count("better than the next runs on the test images?") == 1


def test_brier_and_calibration_bins():
    from featcache.report.collect import Predictions
    from featcache.report.scores import calibration_bins, scores

    y = np.array([0, 0, 1, 1])
    p1 = np.array([0.1, 0.3, 0.7, 0.95])
    pred = Predictions(["a", "b", "c", "d"], y, np.c_[1 - p1, p1], list(CLASSES))
    assert scores(pred)["brier"] == pytest.approx(np.mean((p1 - y) ** 2))  # the binary Brier score
    mean_p, observed, counts = calibration_bins(pred, n_bins=2)
    assert mean_p.tolist() == pytest.approx([0.2, 0.825]) and observed.tolist() == [0.0, 1.0]
    assert counts.tolist() == [2, 2]
    # 0, 0.1, ..., 1 (a 10-nn's probabilities) fill all ten bins: linspace's 0.30000000000000004 edges put
    # 0.3, 0.6 and 0.7 in the bin below (8 bins)
    tenths = np.arange(11) / 10
    steps = Predictions([str(i) for i in range(11)], np.arange(11) % 2, np.c_[1 - tenths, tenths],
                        list(CLASSES))
    assert calibration_bins(steps)[2].tolist() == [1] * 9 + [2]
    three = Predictions(["a", "b"], np.array([0, 2]), np.array([[1.0, 0, 0], [0.5, 0, 0.5]]), ["x", "y", "z"])
    assert scores(three)["brier"] == pytest.approx((0 + 0.5) / 2)  # (0.25 + 0.25) for the second image
    # each bin's fraction gets a Wilson interval: 0 of 12 is not "exactly 0", 50 of 100 is +-0.096
    from featcache.report.plots import wilson_interval

    lo, hi = wilson_interval(np.array([0.0, 1.0, 0.5]), np.array([12, 12, 100]))
    assert lo.tolist() == pytest.approx([0.0, 12 / (12 + 1.96**2), 0.4038], abs=1e-4)
    assert hi.tolist() == pytest.approx([1.96**2 / (12 + 1.96**2), 1.0, 0.5962], abs=1e-4)


def test_provenance_gives_the_working_folder_and_source_revision(tmp_path):
    """A command with relative paths reruns only from its folder; an editable install's version number does
    not change with its code, so the git revision is shown where fit recorded one."""
    runs = tmp_path / "runs"
    folder = write_fake_run(runs, "20240101-000001-logreg-aaaaaaaa")
    info = json.loads((folder / "run.json").read_text())
    info["environment"] = {"cwd": "/home/me/study one", "cpus": 2, "source_revision": "0123456789ab-dirty",
                           "variables": {"TF_ENABLE_ONEDNN_OPTS": "0"}}
    (folder / "run.json").write_text(json.dumps(info))
    md = " ".join(build_report(runs, tmp_path / "out").markdown.read_text().split())
    assert "cd '/home/me/study one' && TF_ENABLE_ONEDNN_OPTS=0 featcache fit --head logreg --tag" in md
    assert "0123456789ab-dirty" in md and "TF\\_ENABLE\\_ONEDNN\\_OPTS" in md
    assert "featcache 0.1.0 (git 0123456789ab-dirty)" in md  # in the Methods paragraph
    assert "source had uncommitted changes when some runs were made" in md  # a revision that pins nothing
    assert "byte-identical files share a row" in md  # why a cache can have fewer rows than images


def test_recomputed_intervals_hold_metric_pairs_only():
    """The names of the exact intervals are not an interval (two names read as a (lo, hi) pair)."""
    from featcache.report.collect import Predictions
    from featcache.report.scores import bootstrap_ci

    y = np.array([0, 0, 0, 1, 1, 1])
    p1 = np.array([0.9, 0.8, 0.7, 0.9, 0.8, 0.7])  # every positive found, every negative missed
    ci = bootstrap_ci(Predictions([f"i{i}" for i in range(6)], y, np.c_[1 - p1, p1], list(CLASSES)), 0.5)
    assert "exact_at_bound" not in ci and ci["sensitivity"][1] == 1.0 and ci["specificity"][0] == 0.0


def test_a_perfect_test_auc_is_reported_with_its_bound_and_method(tmp_path):
    """A run that separates its test images perfectly showed "AUC 1.000 (95% CI 1.000–1.000)"; its recorded
    interval is the score-type bound now, and the Methods paragraph and leaderboard.json say how."""
    from featcache.metrics import auc_score_bound, bootstrap_ci
    from featcache.report.collect import read_predictions

    runs = tmp_path / "runs"
    folder = write_fake_run(runs, "20240101-000001-logreg-aaaaaaaa", quality=60.0, n_test=60)
    pred = read_predictions(folder / "predictions_test.csv")
    metrics = json.loads((folder / "metrics.json").read_text())
    metrics["test"] = {"n": 60, "accuracy": 1.0, "auc": 1.0,
                       "ci": bootstrap_ci(pred.y_true, pred.proba, list(CLASSES), n_boot=200, seed=0)}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    res = build_report(runs, tmp_path / "out")
    md_text = " ".join(res.markdown.read_text().split())
    assert f"**test AUC:** 1.000 (95% CI {auc_score_bound(30, 30, 1.959963984540054):.3f}–1.000)" in md_text
    assert "score-type bound 1 - θ = 1.96 SE(θ) with Hanley and McNeil" in md_text
    assert "a macro F1 of exactly 1 (or 0) is the same in every resample" in md_text
    assert "a proportion or AUC observed at 0 or 1 has an exact or score-type interval instead" in md_text
    meta = json.loads(res.json.read_text())["meta"]
    assert "Hanley-McNeil score-type bound" in meta["confidence_intervals"]["method"]


def test_epochs_chosen_on_the_hold_out_are_disclosed(tmp_path):
    """An MLP with early stopping had its epoch chosen by the same hold-out that ranks it; the report
    said so only when validation sizes differed twofold, never for an MLP-only report."""
    runs = tmp_path / "runs"
    write_fake_run(runs, "20240101-000001-mlp-aaaaaaaa", head="mlp", params={"layers": [8], "epochs": 9})
    md_text = " ".join(build_report(runs, tmp_path / "a").markdown.read_text().split())
    assert "Epochs chosen on the hold-out" not in md_text and "also chose its epoch" not in md_text
    write_fake_run(runs, "20240101-000002-mlp-bbbbbbbb", head="mlp", seed=1,
                   params={"layers": [8], "epochs": 9, "patience": 3})
    md_text = " ".join(build_report(runs, tmp_path / "b").markdown.read_text().split())
    assert "Epochs chosen on the hold-out:** 1 run(s) stop early" in md_text
    assert "the hold-out also chose its epoch, so its validation numbers are slightly optimistic" in md_text
    assert "with --refit" not in md_text
    # a refit mlp, a sensitivity target: the Methods said "trained on the rest" and "the target sensitivity"
    folder = runs / "20240101-000002-mlp-bbbbbbbb"
    info = json.loads((folder / "run.json").read_text())
    info["selection"].update(refit=True, refit_plan={"epochs": 4, "as_configured": False})
    info["threshold"].update(method="sensitivity", target_sensitivity=0.95)
    (folder / "run.json").write_text(json.dumps(info))
    md_text = " ".join(build_report(runs, tmp_path / "c").markdown.read_text().split())
    assert ("with --refit the model tested was trained again on all training images, hold-out included (for "
            "the hold-out model's number of epochs, without validation callbacks), while its validation "
            "numbers, threshold and training curves are the hold-out model's") in md_text
    assert "the highest threshold reaching validation sensitivity 0.95" in md_text


def test_images_without_patient_ids_are_not_called_patients(tmp_path):
    """The bootstrap resampled file-name groups where images had no patient id, but run.json and the
    Methods said "patients"; a dataset with some ids missing got no warning (only one with none did)."""
    from featcache.metrics import bootstrap_ci
    from featcache.report.collect import read_predictions

    runs = tmp_path / "runs"
    folder = write_fake_run(runs, "20240101-000001-logreg-aaaaaaaa")
    info = json.loads((folder / "run.json").read_text())
    info["dataset"].update(patient_ids=30, n_images=40)
    (folder / "run.json").write_text(json.dumps(info))
    pred = read_predictions(folder / "predictions_test.csv")
    metrics = json.loads((folder / "metrics.json").read_text())
    ci = bootstrap_ci(pred.y_true, pred.proba, list(CLASSES), n_boot=200, seed=0)
    ci["resampled"] = "patients and file-name groups (10 image(s) without a patient id)"
    acc = float(np.mean((pred.proba[:, 1] >= 0.5) == pred.y_true))
    metrics["test"] = {"n": 60, "accuracy": acc, "ci": ci}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    md_text = " ".join(build_report(runs, tmp_path / "out").markdown.read_text().split())
    assert ("Some patient ids missing:** some images have no patient id: /nonexistent/featcache-data (10 "
            "of 40") in md_text
    assert ("resamples of test patients and file-name groups (10 image(s) without a patient id): patients "
            "together, the rest by file name, seed 0") in md_text
    assert "CIs are 95% bootstrap intervals resampling test patients and file-name groups" in md_text
    ci["resampled"] = "file-name groups"  # no image has an id
    (folder / "metrics.json").write_text(json.dumps(metrics))
    md_text = " ".join(build_report(runs, tmp_path / "out2").markdown.read_text().split())
    assert "resamples of test images grouped by file name (the data has no patient ids), seed 0" in md_text


def test_provenance_is_per_run_not_pooled(tmp_path):
    """Runs on two caches of one file name (another backend's values) and two Keras backends: the report
    says which run had what, instead of one pooled list that reads as if it applied to every run (before:
    "$KERAS_BACKEND jax" for all runs, one cache row for two contents, no seed or features column)."""
    runs = tmp_path / "runs"
    for k, (backend, digest, seed) in enumerate([("tensorflow", "aa", 0), ("tensorflow", "aa", 1),
                                                  ("jax", "bb", 0)]):
        folder = write_fake_run(runs, f"20240101-00000{k}-mlp-0000000{k}", head="mlp", seed=seed,
                                params={"lr": 0.01})
        info = json.loads((folder / "run.json").read_text())
        info["environment"] = {"cwd": "/w", "cpus": 2, "keras_backend": backend,
                               "variables": {"KERAS_BACKEND": "jax"} if backend == "jax" else {}}
        info["caches"][0].update(features_digest=digest * 32, extracted_with={"backend": backend},
                                 extraction_sessions=[{"first_row": 0, "batch_size": 32,
                                                       "versions": {"backend": backend}}])
        (folder / "run.json").write_text(json.dumps(info))
    res = build_report(runs, tmp_path / "out")
    md = " ".join(res.markdown.read_text().split())
    assert "$KERAS\\_BACKEND | jax (1 of 3 runs)" in md
    assert "Keras backend | jax (1 of 3 runs), tensorflow (2 of 3 runs)" in md
    assert "Mixed backends:" in md
    assert md.count("| " + "aa" * 6 + " | tensorflow (batch 32) |") == 1
    assert md.count("| " + "bb" * 6 + " | jax (batch 32) |") == 1
    with open(res.csv, encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert sorted((r["keras_backend"], r["features"], r["seed"]) for r in rows) == [
        ("jax", "bb" * 6, "0"), ("tensorflow", "aa" * 6, "0"), ("tensorflow", "aa" * 6, "1")]
    leaderboard = md[md.index("Leaderboard"):]
    assert "| seed |" in leaderboard and "| features |" in leaderboard


def test_a_file_name_that_is_not_utf8_does_not_stop_the_report(tmp_path):
    """An undecodable image named with a non-UTF-8 byte is listed as left out (Python keeps the byte as a
    lone surrogate); writing the report failed with UnicodeEncodeError."""
    runs = tmp_path / "runs"
    folder = write_fake_run(runs, "20240101-000001-logreg-aaaaaaaa")
    info = json.loads((folder / "run.json").read_text())
    info["dataset"]["left_out"] = [{"path": "train/NORMAL/bad-\udcffname.jpeg", "reason": "not an image"},
                                   {"path": "train/NORMAL/odd-\ud800.jpeg", "reason": "not an image"}]
    (folder / "run.json").write_text(json.dumps(info))
    res = build_report(runs, tmp_path / "out")
    md = res.markdown.read_text(encoding="utf-8")
    assert "bad-\ufffdname.jpeg" in md and "odd-" in md
    assert "bad-\ufffdname.jpeg" in res.html.read_text(encoding="utf-8")


def test_runs_show_gives_the_grid_position_folder_and_revision(tmp_path, capsys):
    runs = tmp_path / "runs"
    folder = write_fake_run(runs, "20240101-000001-mlp-aaaaaaaa", head="mlp", params={"lr": 0.01})
    info = json.loads((folder / "run.json").read_text())
    info["grid"] = {"index": 2, "size": 4, "configs": [{"lr": v} for v in (1.0, 0.1, 0.01, 0.001)]}
    info["environment"] = {"cwd": "/home/me/study", "cpus": 2, "source_revision": "0123456789ab",
                           "variables": {"KERAS_BACKEND": "jax"}}
    (folder / "run.json").write_text(json.dumps(info))
    assert run(["runs", "show", folder.name, "--runs-dir", str(runs)]) == 0
    out = " ".join(capsys.readouterr().out.replace("│", " ").split())
    assert "cd /home/me/study && KERAS_BACKEND=jax featcache fit" in out and "config 3 of 4" in out
    assert "git 0123456789ab" in out and "KERAS_BACKEND=jax" in out


def test_a_none_parameter_reads_the_same_in_runs_ls_runs_show_and_the_report(tmp_path, capsys, monkeypatch):
    """class_weight=None was "class_weight=-" in `runs ls`/`runs show` (the tables' mark for a missing
    metric) and "class_weight=None" in the report's config column."""
    monkeypatch.setenv("COLUMNS", "250")  # a whole cell per line (xdist workers run at 80 columns)
    runs = tmp_path / "runs"
    write_fake_run(runs, "20240101-000001-logreg-aaaaaaaa", params={"C": 1.0, "class_weight": None})
    write_fake_run(runs, "20240101-000002-logreg-bbbbbbbb", params={"C": 1.0, "class_weight": "balanced"})
    res = build_report(runs, tmp_path / "out", ReportOptions(detail=0))
    assert "| **C=1, class\\_weight=None** |" in res.markdown.read_text(encoding="utf-8")  # the best
    assert run(["runs", "ls", "--runs-dir", str(runs)]) == 0
    listed = capsys.readouterr().out
    assert run(["runs", "show", "20240101-000001-logreg-aaaaaaaa", "--runs-dir", str(runs)]) == 0
    shown = capsys.readouterr().out
    for out in (listed, shown):
        assert "class_weight=None" in out and "class_weight=-" not in out


def test_precision_recall_points_and_average_precision_match_scikit_learn():
    from sklearn.metrics import average_precision_score, precision_recall_curve

    from featcache.report.scores import average_precision, pr_points

    rng = np.random.default_rng(3)
    for n, ties in ((50, False), (200, True)):
        y = (rng.random(n) < 0.3).astype(int)
        score = rng.random(n) + 0.4 * y
        if ties:
            score = np.round(score, 1)  # many equal scores: one point per distinct threshold
        recall, precision, thr = pr_points(y, score)
        p_ref, r_ref, t_ref = precision_recall_curve(y, score)
        # scikit-learn lists thresholds ascending and appends the (recall 0, precision 1) end point
        assert np.allclose(recall, r_ref[:-1][::-1]) and np.allclose(precision, p_ref[:-1][::-1])
        assert np.allclose(thr, t_ref[::-1])
        assert average_precision(y, score) == pytest.approx(average_precision_score(y, score))
    assert np.isnan(average_precision(np.zeros(5, dtype=int), rng.random(5)))


def test_macro_average_row_is_scikit_learns_macro_and_fits_macro_f1():
    """Paper 003 reports macro precision / recall / F1: the per-class table's last row gives them, an
    absent or never-predicted class counting 0 as in scikit-learn and in fit's metrics.json."""
    from sklearn.metrics import precision_recall_fscore_support

    from featcache.metrics import classification_metrics
    from featcache.report.collect import Predictions
    from featcache.report.scores import macro_average, per_class

    rng = np.random.default_rng(5)
    for y in (rng.integers(0, 3, 60), np.array([0, 1] * 20), rng.integers(0, 2, 40) * 2):  # class 1 absent
        proba = rng.dirichlet(np.ones(3), len(y))
        proba[np.arange(len(y)), y] += 0.3 * rng.random(len(y))
        proba /= proba.sum(1, keepdims=True)
        pred = Predictions([f"i{i}" for i in range(len(y))], y, proba, ["normal", "bacteria", "virus"])
        row = macro_average(per_class(pred))
        ref = precision_recall_fscore_support(y, proba.argmax(1), labels=[0, 1, 2], average="macro",
                                              zero_division=0)
        assert row["class"] == "macro average" and row["n"] == len(y)
        assert [row["precision"], row["recall"], row["f1"]] == pytest.approx(list(ref[:3]))
        assert row["f1"] == pytest.approx(classification_metrics(y, proba, pred.classes)["macro_f1"])


def test_report_tables_end_with_the_macro_average(sweep, tmp_path):
    md_text = build_report(sweep[0], tmp_path / "out").markdown.read_text(encoding="utf-8")
    assert "| macro average |" in md_text and "as scikit-learn's average='macro'" in md_text


def test_runs_can_be_ranked_by_average_precision(sweep, tmp_path):
    from sklearn.metrics import average_precision_score

    runs, ids = sweep
    res = build_report(runs, tmp_path / "out", ReportOptions(metric="average_precision"))
    data = json.loads(res.json.read_text())["runs"]

    def ap(rid: str) -> float:
        with open(runs / rid / "predictions_val.csv", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
        y, p = [int(r["y_true"]) for r in rows], [float(r["p_PNEUMONIA"]) for r in rows]
        return average_precision_score(y, p)

    assert [r["run_id"] for r in data] == sorted(ids, key=lambda rid: (-ap(rid), rid))
    assert data[0]["val_average_precision"] == pytest.approx(ap(data[0]["run_id"]))
    assert data[0]["test_average_precision"] is not None


def test_a_group_without_the_metric_is_ranked_by_a_stand_in_it_has_and_says_so(sweep, tmp_path):
    """--group-by task --metric average_precision: average precision is binary-only, so the 3-class group's
    "best" was whichever run the tie-break put first, shown with "—". The group is now ranked by its
    macro one-vs-rest AUC, and the report, JSON and terminal say so."""
    from featcache.cli.report_cmd import _leaders_table
    from rich.console import Console
    from sklearn.metrics import roc_auc_score

    runs, _ = sweep
    # the worst run has the config hash the tie-break puts first
    for k, quality in enumerate((0.2, 3.0, 1.0)):
        write_3class_run(runs, f"20240102-00000{k}-logreg-3c00000{k}", quality=quality, seed=60 + k,
                         params={"C": 10.0 ** -k})
    res = build_report(runs, tmp_path / "out", ReportOptions(group_by="task", metric="average_precision"))
    data = json.loads(res.json.read_text())["runs"]
    three = [r for r in data if r["group"] == "3class"]

    def auc(rid: str) -> float:
        y, p = _read_preds(runs / rid / "predictions_val.csv")
        return roc_auc_score(y, p, multi_class="ovr", average="macro")

    assert [r["run_id"] for r in three] == sorted((r["run_id"] for r in three), key=lambda rid: -auc(rid))
    assert three[0]["run_id"] == "20240102-000001-logreg-3c000001" and three[0]["rank"] == 1
    assert all(r["ranked_by"] == "auc" and r["val_average_precision"] is None for r in three)
    assert [r["score"] for r in three] == pytest.approx([auc(r["run_id"]) for r in three])
    assert all(r["ranked_by"] == "average_precision" for r in data if r["group"] == "binary")
    md_text = res.markdown.read_text(encoding="utf-8")
    section = md_text[md_text.index("### task: 3class"):]
    section = " ".join(section[:section.index("*dataset")].split())
    assert ("**Ranked by auc:** no run here has a validation average\\_precision (it is defined for binary "
            "tasks only), so these runs are ranked by validation auc") in section
    assert "val auc ▼" in section and "| **1** | **C=0.1** |" in section
    out = Console(record=True, width=200)
    out.print(_leaders_table(res))
    line = next(ln for ln in out.export_text().splitlines() if ln.startswith("3class"))
    assert f"{three[0]['score']:.3f} (auc)" in line


def test_a_tie_for_the_best_validation_score_is_said(tmp_path):
    """Three runs with the same validation accuracy: the leaderboard breaks the tie by run id, and the
    report says so (it named one of them "best" as if it had won), also when --top hides the others."""
    runs = tmp_path / "runs"
    for k in range(3):  # same seed and quality: the same predictions
        write_fake_run(runs, f"20240101-00000{k}-logreg-{k:08x}", params={"C": 10.0 ** -k}, quality=2, seed=7)
    write_fake_run(runs, "20240101-000009-logreg-00000009", params={"C": 100.0}, quality=0.1, seed=1)
    res = build_report(runs, tmp_path / "out", ReportOptions(top=1))
    text = res.markdown.read_text()
    assert "**Tie:** 3 runs share the best validation accuracy" in text
    assert r"(\#1 and 2 not shown)" in text
    with open(res.csv, encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["tied"] for r in rows] == ["3"]
    res = build_report(runs, tmp_path / "out2", ReportOptions(ids=["-000000-", "-000009-"]))
    assert "Tie:" not in res.markdown.read_text()


def test_tied_runs_rank_by_sweep_and_grid_place_not_by_when_they_were_written(tmp_path):
    """Run ids start with the second a run was written: the same commands run again ranked tied runs the
    other way round and called another run the best. Ties now follow the sweep and the grid order."""
    runs = tmp_path / "runs"
    written = [("20240101-000000-logreg-cccccccc", "sweep-b", 0),
               ("20240101-000001-logreg-bbbbbbbb", "sweep-a", 1),
               ("20240101-000002-logreg-aaaaaaaa", "sweep-a", 0)]
    for run_id, sweep, index in written:  # same seed and quality: the same predictions, a three-way tie
        folder = write_fake_run(runs, run_id, params={"C": 1.0}, quality=2, seed=7)
        info = json.loads((folder / "run.json").read_text())
        info.update(sweep_id=sweep, grid={"index": index, "size": 2, "configs": []})
        (folder / "run.json").write_text(json.dumps(info))
    with open(build_report(runs, tmp_path / "out").csv, encoding="utf-8") as fh:
        order = [r["run_id"] for r in csv.DictReader(fh)]
    assert order == [written[2][0], written[1][0], written[0][0]]


def test_hyperparameter_table_numbers_models_in_grid_order_and_highlights_every_tie(tmp_path):
    """A fused grid writes its runs as they finish: "model #" followed the creation time, not the grid the
    user wrote, and only one of the runs tying for the best validation score was highlighted."""
    runs = tmp_path / "runs"
    lrs = (0.1, 0.01, 0.001, 0.0001)
    for i, lr in enumerate(lrs):  # grid index i, written in the reverse order
        folder = write_fake_run(runs, f"20240101-00000{i}-mlp-{i:08x}", head="mlp", params={"lr": lr},
                                quality=3 if i in (1, 3) else 0.2, seed=5 if i in (1, 3) else i,
                                created=f"2024-01-01T00:00:0{9 - i}Z")
        run = json.loads((folder / "run.json").read_text())
        run["grid"] = {"index": i, "size": len(lrs), "configs": [{"lr": v} for v in lrs]}
        (folder / "run.json").write_text(json.dumps(run))
    text = build_report(runs, tmp_path / "out").markdown.read_text()
    table = text[text.index(r"| model \# |"):].split("\n\n")[0].splitlines()[2:]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in table]
    assert [c[1].strip("*") for c in cells] == [str(v) for v in lrs]
    assert [c[0].startswith("**") for c in cells] == [False, True, False, True]


def test_a_report_killed_while_writing_leaves_the_previous_report_whole(sweep, tmp_path):
    """Files were replaced one by one, so a kill midway left the new HTML beside the old Markdown, CSV and
    figures. Now the new report is written in a staging folder and published by renames: a kill before
    them leaves the old report whole, and the next report removes the dead staging folder."""
    import os
    import signal
    import subprocess
    import sys

    runs, _ = sweep
    out = tmp_path / "out"
    build_report(runs, out, ReportOptions(top=3))

    def published() -> dict:
        meta = json.loads((out / "leaderboard.json").read_text())["meta"]
        md_runs = int(re.search(r"^(\d+) run\(s\) from", (out / "report.md").read_text(), re.M).group(1))
        html = (out / "report.html").read_text()
        with open(out / "leaderboard.csv", encoding="utf-8") as fh:
            n_csv = sum(1 for _ in csv.DictReader(fh))
        pngs = sorted(p.name for p in (out / "report_files").glob("*.png"))
        linked = sorted(set(re.findall(r"report_files/([^)]+\.png)", (out / "report.md").read_text())))
        return {"json": meta["n_runs"], "md": md_runs, "html": f"{meta['n_runs']} run(s) from" in html,
                "csv": n_csv, "figures": pngs == linked}

    before = published()
    assert before == {"json": 3, "md": 3, "html": True, "csv": 3, "figures": True}
    env = dict(os.environ, FEATCACHE_CRASH_AT="report.staged")
    cmd = [sys.executable, "-m", "featcache.cli.app", "report", "--runs-dir", str(runs), "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert published() == before and list(out.glob(".staging-*"))
    assert run(["report", "--runs-dir", str(runs), "--out", str(out)]) == 0
    assert published() == {"json": 14, "md": 14, "html": True, "csv": 14, "figures": True}
    assert not list(out.glob(".staging-*"))
    clash = tmp_path / "clash"
    (clash / "report.md").mkdir(parents=True)  # checked before anything is published
    with pytest.raises(ConfigError, match=r"report.md is a folder; the report writes a file of that name"):
        build_report(runs, clash)
    assert sorted(p.name for p in clash.iterdir()) == ["report.md"]


def test_a_full_disk_while_writing_names_the_report_folder_and_keeps_the_previous_report(sweep, tmp_path,
                                                                                       monkeypatch, capsys):
    """A write() that fails on a full disk raises OSError(28) with no file name: the CLI's sentence said
    "refused a file operation: No space left on device" without saying where. It names --out now, the
    previous report stays whole and no staging folder is left."""
    import featcache.report.build as build_mod

    runs, _ = sweep
    out = tmp_path / "out"
    build_report(runs, out, ReportOptions(top=3))
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    real = build_mod.write_csv

    def disk_full(rows, path):
        real(rows, path)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(build_mod, "write_csv", disk_full)
    assert run(["report", "--runs-dir", str(runs), "--out", str(out)]) == 1
    raw = capsys.readouterr().err
    assert raw.count("\n") == 1 and "Traceback" not in raw
    assert " ".join(raw.split()) == (f"error: the operating system refused a file operation ({out}): No "
                                     "space left on device. The previous report is kept whole.")
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert not list(out.glob(".staging-*"))


def test_roc_and_pr_panels_show_their_corner_when_every_curve_is_near_perfect():
    """At AUC 0.996 the whole-square ROC was a corner and nothing else; the markers' legend entries were
    blue only although the test markers are orange."""
    from types import SimpleNamespace

    from featcache.report import plots
    from featcache.report.collect import Predictions

    plt = plots._plt()
    rng = np.random.default_rng(0)
    y = np.arange(400) % 2

    def rec(noise: float):
        p1 = 1 / (1 + np.exp(-(4 * (2 * y - 1) + rng.normal(0, noise, 400))))
        pred = Predictions([f"i{i}" for i in range(400)], y, np.c_[1 - p1, p1], list(CLASSES))
        return SimpleNamespace(val=pred, test=pred)

    for noise, zoomed in ((1.0, True), (6.0, False)):
        fig, (roc, pr) = plt.subplots(1, 2)
        plots._roc_ax(roc, rec(noise), 0.5)
        plots._pr_ax(pr, rec(noise), 0.5)
        assert (roc.get_xlim()[1] < 0.5) == zoomed and (roc.get_ylim()[0] > 0.5) == zoomed
        assert (pr.get_xlim()[0] > 0.5) == zoomed and roc.get_title().endswith(", corner") == zoomed
        assert pr.get_ylim()[0] < 0.5  # the prevalence line (0.5 here) the caption explains stays in view
        faces = {h.get_markerfacecolor() for h in roc.get_legend().legend_handles if h.get_marker() in "o*"}
        assert faces == {"white"}  # neutral: they stand for the markers of both splits
        plt.close(fig)


def test_interval_cells_wrap_between_value_and_interval_only(sweep, tmp_path):
    """The leaderboard ran past 1400 px (sens/spec and run id behind a scroll bar): interval cells may now
    wrap, at the space before "[", never inside "0.875–1.000" (word joiners around the dash)."""
    runs, _ = sweep
    html = build_report(runs, tmp_path / "out").html.read_text()
    cells = re.findall(r'<td class="num ci">([^<]*)</td>', html)
    assert cells and all(c.count("–") == c.count("\u2060–\u2060") for c in cells)
    assert any(" [" in c and "\u2060–\u2060" in c for c in cells)
    assert not re.search(r'<td class="num">[^<]*\[', html)  # every interval cell is marked


def test_vector_copies_of_every_figure_for_papers(sweep, tmp_path):
    """`report --figures svg,pdf`: each PNG gets SVG and PDF copies of the same stem, linked from the
    Markdown and the HTML; the same runs give the same bytes; a report without the flag removes them."""
    runs, _ = sweep
    out = tmp_path / "out"
    assert run(["report", "--runs-dir", str(runs), "--out", str(out), "--figures", "SVG,pdf"]) == 0
    files = out / "report_files"
    pngs = sorted(p.stem for p in files.glob("*.png"))
    assert pngs and sorted(p.stem for p in files.glob("*.svg")) == pngs == sorted(p.stem for p in
                                                                               files.glob("*.pdf"))
    first = {p.name: p.read_bytes() for p in files.iterdir()}
    for stem in pngs:
        assert first[f"{stem}.svg"].lstrip().startswith(b"<?xml") and b"<svg" in first[f"{stem}.svg"]
        assert first[f"{stem}.pdf"].startswith(b"%PDF-")
    md_links = set(re.findall(r"report_files/([^)]+\.(?:svg|pdf))", (out / "report.md").read_text()))
    html = (out / "report.html").read_text()
    html_links = set(re.findall(r'href="report_files/([^"]+\.(?:svg|pdf))"', html))
    assert md_links == html_links == {n for n in first if n.endswith((".svg", ".pdf"))}
    build_report(runs, out, ReportOptions(figure_formats=("svg", "pdf")))
    assert {p.name: p.read_bytes() for p in files.iterdir()} == first  # no dates, fixed ids
    build_report(runs, out)
    assert not list(files.glob("*.svg")) and not list(files.glob("*.pdf"))
    assert "Vector copies" not in (out / "report.md").read_text()


def test_unknown_figure_formats_are_refused_before_any_work(sweep, tmp_path, capsys):
    runs, _ = sweep
    assert run(["report", "--runs-dir", str(runs), "--out", str(tmp_path / "o"), "--figures", "svg,eps"]) == 2
    assert "--figures takes svg and/or pdf" in capsys.readouterr().err and not (tmp_path / "o").exists()
    with pytest.raises(ConfigError, match="not 'png'"):
        build_report(runs, tmp_path / "o", ReportOptions(figure_formats=("png",)))


def test_a_report_written_into_the_runs_folder_is_not_a_run(tmp_path):
    """`report --out runs` left report_files/ there, and the next report counted it as a run folder
    "left out (unfinished, failed or unreadable)"."""
    runs = tmp_path / "runs"
    write_fake_run(runs, "20240101-000001-logreg-aaaaaaaa")
    build_report(runs, runs)
    assert (runs / "report_files").is_dir()
    from featcache.report.collect import load_runs

    kept, left_out = load_runs(runs)
    assert len(kept) == 1 and left_out == []


def test_a_copy_of_the_demo_folder_still_gets_the_demo_note(tmp_path):
    """The demo's test side is carved from Kermany's training split; a report on a copy of the folder (same
    images, paths, labels) lost the "Demo data" note, which was keyed on the installed path only."""
    from featcache.pipeline import demo_root
    from featcache.report.build import _demo_images_digest, _is_demo

    digest = _demo_images_digest()
    assert digest and len(digest) == 16
    assert _is_demo({"root": str(demo_root())})
    assert _is_demo({"root": str(tmp_path / "copy"), "images_digest": digest})
    assert not _is_demo({"root": str(tmp_path / "other"), "images_digest": "0" * 16})
    assert not _is_demo({"root": str(tmp_path / "other")})


def test_markdown_escapes_dollars_and_tildes():
    """GitHub renders $x$ in a title or tag as math and ~~x~~ struck through."""
    from featcache.report.markdown import md

    assert md("$x$ ~~y~~") == "\\$x\\$ \\~\\~y\\~\\~"


def test_methods_state_the_settings_every_run_of_a_head_shared(sweep, tmp_path):
    """The grid views show only searched values: batch size, optimizer, solver, max_iter... were nowhere in
    a report a reader would reproduce the work from. Methods lists the shared, unsearched ones."""
    runs, ids = sweep
    for rid in ids:
        path = runs / rid / "run.json"
        run = json.loads(path.read_text())
        if run["head"] == "logreg":
            run["hyperparameters"] = {**run["params"], "solver": "lbfgs", "max_iter": 100, "verbose": 0,
                                      "penalty": "deprecated",  # scikit-learn 1.8+'s placeholder
                                      "tol": 1e-4 if rid != ids[0] else 1e-3,
                                      # a searched key under a wrapped estimator's name (svm's estimator__C)
                                      **{f"estimator__{k}": 1 for k in run["params"]}}
            path.write_text(json.dumps(run))
    res = build_report(runs, tmp_path / "out")
    md_text = " ".join(res.markdown.read_text(encoding="utf-8").split())
    methods = md_text[md_text.index("## Methods"):md_text.index("## Provenance")]
    assert "logreg: max\\_iter=100, solver=lbfgs" in methods
    assert "verbose" not in methods and "tol=" not in methods  # noise, and a setting that differed
    assert "deprecated" not in methods  # "penalty=deprecated" stated no setting
    assert "estimator" not in methods  # searched, under another name: not a shared setting
    assert "mlp:" not in methods  # no run of it recorded its settings: nothing claimed


def test_a_mixed_task_report_shows_each_tasks_class_counts(tmp_path):
    """Binary and 3-class runs of one folder: the Dataset table showed the first run's NORMAL/PNEUMONIA
    counts only; the 3-class n per class appeared nowhere."""
    runs = tmp_path / "runs"
    for i, (task, counts) in enumerate((("binary", {"test": {"NORMAL": 8, "PNEUMONIA": 16}}),
                                        ("3class", {"test": {"bacteria": 8, "normal": 8, "virus": 8}}))):
        folder = write_fake_run(runs, f"2024010{i}-000000-logreg-0000000{i}", task=task, seed=i)
        run = json.loads((folder / "run.json").read_text())
        run["dataset"] = {"root": "/nonexistent/featcache-data", "layout": "kermany", "counts": counts,
                          "images_digest": "ab" * 8}
        (folder / "run.json").write_text(json.dumps(run))
    res = build_report(runs, tmp_path / "out")
    md_text = " ".join(res.markdown.read_text(encoding="utf-8").split())
    section = md_text[md_text.index("## Dataset"):md_text.index("## Methods")]
    assert "task binary: images per split and class" in section and "task 3class" in section
    assert "| test | virus | 8 |" in section and "| test | PNEUMONIA | 16 |" in section


def test_heatmap_colour_span_covers_more_than_one_image_of_a_small_hold_out(monkeypatch):
    """0.667 against 0.733 is one image of 15, yet it was drawn as the full purple-to-yellow scale."""
    from featcache.report import build, plots

    seen = {}
    monkeypatch.setattr(plots, "heatmap_figure", lambda *a, **kw: seen.update(kw))
    rows = [{"params": {"lr": lr, "dropout": d}, "val_accuracy": acc, "n_val": 15, "rank": i}
            for i, (lr, d, acc) in enumerate(((0.1, 0.0, 0.733), (0.01, 0.0, 0.667), (0.1, 0.5, 0.667)))]
    build._heatmap(rows, "lr", "dropout", "val_accuracy", "t")
    assert seen["min_span"] == pytest.approx(3 / 15)
    build._heatmap([{**r, "n_val": 3000} for r in rows], "lr", "dropout", "val_accuracy", "t")
    assert seen["min_span"] == pytest.approx(plots.HEATMAP_MIN_SPAN)


def test_training_curves_mark_the_epoch_whose_weights_were_kept():
    """With checkpoint the model keeps its best-validation epoch; the curves did not say which."""
    from types import SimpleNamespace

    from featcache.report.plots import kept_epoch

    history = {"val_loss": [0.9, 0.4, float("nan"), 0.5]}
    assert kept_epoch(SimpleNamespace(run={"hyperparameters": {"checkpoint": True}}), history) == 2
    assert kept_epoch(SimpleNamespace(run={"hyperparameters": {"checkpoint": False}}), history) is None
    assert kept_epoch(SimpleNamespace(run={}), history) is None


def test_multi_class_runs_get_each_classes_one_vs_rest_roc():
    """A 3-class run's figure had a confusion matrix and nothing else: its macro AUC could not be read back
    to the class that drags it down. Each class's one-vs-rest curve is drawn, and their areas are the
    report's per-class AUCs, whose mean is the recorded macro AUC."""
    from types import SimpleNamespace

    from featcache.report import plots
    from featcache.report.collect import Predictions
    from featcache.report.scores import auc_binary, scores

    rng = np.random.default_rng(3)
    y = np.arange(300) % 3
    logits = rng.normal(0, 1, (300, 3)) + np.eye(3)[y] * np.array([3.0, 1.0, 0.3])  # class 2 hardest
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    pred = Predictions([f"i{i}" for i in range(300)], y, p, ["normal", "bacteria", "virus"])
    per_class = [auc_binary((y == c).astype(int), p[:, c]) for c in range(3)]
    assert per_class[0] > per_class[1] > per_class[2]

    plt = plots._plt()
    fig, ax = plt.subplots()
    plots._roc_ovr_ax(ax, pred, "test")
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == [f"{c} (AUC {a:.3f})" for c, a in zip(pred.classes, per_class, strict=True)]
    assert ax.get_title().endswith(f"macro AUC {scores(pred)['auc']:.3f}")
    assert abs(np.mean(per_class) - scores(pred)["auc"]) < 1e-12
    plt.close(fig)

    # no image of "virus"
    missing = Predictions([f"i{i}" for i in range(200)], y[:200] % 2, p[:200], pred.classes)
    fig, ax = plt.subplots()
    plots._roc_ovr_ax(ax, missing, "test")
    assert len(ax.get_legend().get_texts()) == 2 and "no macro AUC" in ax.get_title()
    plt.close(fig)

    rendered = plots.run_figure(SimpleNamespace(val=None, test=pred, metrics={}, run={}), None)
    assert rendered is not None and rendered.png.startswith(b"\x89PNG")


def test_multi_class_runs_get_each_classes_one_vs_rest_precision_recall(tmp_path, monkeypatch):
    """Binary runs had a precision-recall panel, 3-class runs none: a class with few images can look good on
    its ROC while most images called that class are not. Each class's one-vs-rest PR curve is drawn in the
    run's figure, its legend AP scikit-learn's average_precision_score on the run's stored predictions."""
    from sklearn.metrics import average_precision_score

    from featcache.report import plots
    from featcache.report.collect import Predictions, load_runs

    runs = tmp_path / "runs"
    write_3class_run(runs, "20240102-000000-logreg-3c000000", quality=1.0, seed=70)
    (rec,), _ = load_runs(runs)
    drawn = []
    real = plots._pr_ovr_ax

    def spy(ax, pred, split):
        real(ax, pred, split)
        drawn.append(([t.get_text() for t in ax.get_legend().get_texts()], ax.get_title(), split))

    monkeypatch.setattr(plots, "_pr_ovr_ax", spy)
    assert plots.run_figure(rec, None) is not None
    assert len(drawn) == 1  # in the run's figure, once
    labels, title, split = drawn[0]
    y, p = _read_preds(runs / rec.id / "predictions_test.csv")
    expected = [average_precision_score(y == c, p[:, c]) for c in range(3)]
    assert split == "test" and "precision-recall, one class vs rest" in title
    assert [lab.rsplit(" (AP ", 1)[0] for lab in labels] == list(CLASSES_3)
    got = [float(lab.rsplit(" (AP ", 1)[1].rstrip(")")) for lab in labels]
    assert got == pytest.approx(expected, abs=5e-4)  # the legend's 3 decimals
    ours = [plots.average_precision((y == c).astype(int), plots.rank_score(p, c)) for c in range(3)]
    assert ours == pytest.approx(expected, abs=1e-12)  # the number the legend rounds
    assert len(set(np.round(expected, 3))) == 3  # the classes differ: a swapped legend would show

    plt = plots._plt()
    fig, ax = plt.subplots()
    real(ax, Predictions([f"i{i}" for i in range(40)], y[:40] % 2, p[:40], list(CLASSES_3)), "test")
    assert len(ax.get_legend().get_texts()) == 2  # no image of "virus": no curve, no AP
    plt.close(fig)


def test_overview_validation_dots_say_their_size_and_that_they_were_selected_on():
    """The overview's validation dots carried neither n nor a note: a 40-image hold-out and CV over 4,000
    images read alike, and beside the test CIs the dots looked like unbiased estimates."""
    from featcache.report import plots

    plt = plots._plt()
    rows = [{"val_accuracy": 0.9, "test_accuracy": 0.85, "n_val": 40}, {"val_accuracy": 0.8, "n_val": 40}]
    fig, ax = plt.subplots()
    plots._overview_panel(ax, rows, ["a", "b"], "accuracy", "binary", legend=True)
    texts = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "validation accuracy (selected on, n=40)" in texts
    plt.close(fig)
    fig, ax = plt.subplots()
    plots._overview_panel(ax, [{**rows[0], "n_val": 41}, rows[1]], ["a", "b"], "accuracy", "binary", True)
    assert "validation accuracy (selected on)" in [t.get_text() for t in ax.get_legend().get_texts()]
    plt.close(fig)


def test_the_best_of_many_configs_is_called_optimistic_without_early_stopping(tmp_path):
    """An mlp grid without patience is ranked on one hold-out: its best validation score is a maximum over
    noisy estimates. The report called it optimistic only when the hold-out also chose an epoch."""
    runs = tmp_path / "runs"
    for k, lr in enumerate((0.1, 0.01, 0.001), 1):
        write_fake_run(runs, f"20240101-00000{k}-mlp-{k:08x}", head="mlp", seed=k,
                       params={"layers": [8], "epochs": 9, "lr": lr})
    res = build_report(runs, tmp_path / "out", ReportOptions(detail=0))
    for text in (res.html.read_text(encoding="utf-8"), res.markdown.read_text(encoding="utf-8")):
        text = " ".join(re.sub(r"<[^>]+>", "", text).split())
        methods = text[text.rindex("Methods"):text.rindex("Provenance")]
        board = text[text.rindex("Leaderboard"):text.rindex("Grid views")]
        for part in (board, methods):
            assert "the best validation score is the best of 3 configs scored on validation" in part.lower()
            assert "optimistic (selection bias)" in part and "unbiased estimate" in part
        assert "Epochs chosen on the hold-out" not in text  # no patience: that note is not the reason
    assert "best of 3 configs" in json.loads(res.json.read_text())["meta"]["selection_optimism"]
    # one config compared: nothing was chosen among, nothing to disclose
    solo = tmp_path / "solo"
    write_fake_run(solo, "20240101-000001-mlp-aaaaaaaa", head="mlp", params={"layers": [8], "epochs": 9})
    solo_md = build_report(solo, tmp_path / "out2", ReportOptions(detail=0)).markdown
    assert "selection bias" not in solo_md.read_text(encoding="utf-8")


def _methods_md(runs: Path, out: Path) -> str:
    """The markdown report's Methods paragraph, whitespace collapsed (no detail figures: fast)."""
    text = build_report(runs, out, ReportOptions(detail=0)).markdown.read_text(encoding="utf-8")
    text = " ".join(text.split())
    return text[text.index("## Methods"):text.index("## Provenance")]


def test_balance_and_train_views_are_shown_beside_the_config(tmp_path, capsys):
    """Three logreg runs, plain, undersampled and trained on flipped copies too, each read "C=1,
    class_weight=None" in every table, in `runs show` and in Methods, with different numbers (a
    reproducibility audit): the settings now follow the config, and Methods counts them."""
    from featcache.cli.app import run as cli

    runs = tmp_path / "runs"
    setups = [{}, {"balance": "undersample"}, {"train_views": ["orig", "hflip"]}]
    for i, extra in enumerate(setups):
        folder = write_fake_run(runs, f"2024010{i + 1}-000000-logreg-0000000{i}", params={"C": 1.0}, seed=i)
        info = json.loads((folder / "run.json").read_text())
        info.update({"balance": "none", "train_views": ["orig"], "aug_views": [], **extra})
        (folder / "run.json").write_text(json.dumps(info))
    build_report(runs, tmp_path / "out", ReportOptions(detail=0))
    board = {r["run_id"]: r for r in json.loads((tmp_path / "out" / "leaderboard.json").read_text())["runs"]}
    assert board["20240101-000000-logreg-00000000"]["config"] == "C=1"
    assert board["20240102-000000-logreg-00000001"]["config"] == "C=1, balance=undersample"
    assert board["20240103-000000-logreg-00000002"]["training"] == {"train_views": "orig+hflip"}
    methods = _methods_md(runs, tmp_path / "md")
    assert ("balance=undersample (each training set's larger classes cut at random to the smallest class) "
            "in 1 of 3 run(s)") in methods
    assert "train\\_views=orig+hflip (each training image also seen as its cached orig, hflip views)" in \
        methods
    assert cli(["runs", "show", "20240102-000000-logreg-00000001", "--runs-dir", str(runs)]) == 0
    assert "balance=undersample" in capsys.readouterr().out


def test_methods_names_views_whose_names_hold_a_plus(tmp_path):
    """`--train-views orig,rot+20` read "each training image also seen as its cached orig, rot, 20 views" in
    Methods (the short form 'orig+rot+20' was split at every '+'), and oversampling's rot+20 read "rot,
    20": Methods now lists the views as the run recorded them."""
    runs = tmp_path / "runs"
    setups = [{"train_views": ["orig", "rot+20"]},
              {"balance": "oversample", "aug_views": ["bright+0.2", "rot-20"]}]
    for i, extra in enumerate(setups):
        folder = write_fake_run(runs, f"2024010{i + 1}-000000-logreg-0000000{i}", params={"C": 1.0}, seed=i)
        info = json.loads((folder / "run.json").read_text())
        info.update({"balance": "none", "train_views": ["orig"], "aug_views": [], **extra})
        (folder / "run.json").write_text(json.dumps(info))
    methods = _methods_md(runs, tmp_path / "md")
    assert "each training image also seen as its cached orig, rot+20 views" in methods
    assert "drawn from the cached views bright+0.2, rot-20" in methods
    assert "rot, 20" not in methods and "bright, 0.2" not in methods


def test_methods_says_which_runs_fused_backbones(tmp_path):
    """A fused run (fit --backbone mobilenet-0.75,densenet121) beside a single-backbone one: Methods named
    both backbones in one list, "extracted once by frozen densenet121 (...); mobilenet-0.75 (...)", as for
    `run --separate`, and never said that a head saw their features concatenated."""
    runs = tmp_path / "runs"
    write_fake_run(runs, "20240101-000000-logreg-00000000", params={"C": 1.0})
    fused = write_fake_run(runs, "20240102-000000-logreg-00000001", params={"C": 1.0}, seed=1)
    info = json.loads((fused / "run.json").read_text())
    first = info["backbones"][0]
    info["backbones"] = [{**first, "feature_dim": 768},
                         {**first, "name": "densenet121", "feature_dim": 1024}]
    (fused / "run.json").write_text(json.dumps(info))
    methods = _methods_md(runs, tmp_path / "md")
    assert ("Feature fusion: in 1 of 2 run(s) each image's cached features of mobilenet-0.75 (768-d) and "
            "densenet121 (1024-d), 1792-d in all, were concatenated in that order") in methods
    # runs each on one backbone (run --separate) fuse nothing
    (fused / "run.json").write_text(json.dumps({**info, "backbones": [info["backbones"][1]]}))
    assert "Feature fusion" not in _methods_md(runs, tmp_path / "md2")


def test_tta_runs_say_they_were_chosen_on_one_view_and_reported_on_the_average(tmp_path):
    """fit's CV search and an mlp's early stopping score the orig view only, while the predictions, threshold
    and ranking average the TTA views: the Methods never said so."""
    runs = tmp_path / "runs"
    cv = write_fake_run(runs, "20240101-000001-logreg-aaaaaaaa", params={"C": 1.0})
    mlp = write_fake_run(runs, "20240101-000002-mlp-bbbbbbbb", head="mlp", seed=1,
                         params={"layers": [8], "epochs": 9, "patience": 3})
    assert "single-view" not in _methods_md(runs, tmp_path / "a")
    for folder in (cv, mlp):
        info = json.loads((folder / "run.json").read_text())
        info.update(tta=True, tta_views=["hflip", "rot+20"])
        (folder / "run.json").write_text(json.dumps(info))
    methods = _methods_md(runs, tmp_path / "b")
    assert "With test-time augmentation (2 of 2 run(s))" in methods
    assert "average the class probabilities over the views orig, hflip, rot+20" in methods
    assert ("a CV head's search scored its configs on the validation folds and an mlp's early stopping"
            in methods)
    assert "on single-view (orig) predictions only" in methods


def test_a_cv_heads_threshold_is_said_to_move_from_the_fold_models_to_the_refit(tmp_path):
    """A CV head's threshold is chosen on the pooled out-of-fold probabilities of K fold models and applied
    to the refit model: README said so for the mlp's --refit only, the Methods not at all."""
    runs = tmp_path / "runs"
    write_fake_run(runs, "20240101-000001-logreg-aaaaaaaa", params={"C": 1.0}, threshold=0.5)
    assert "out-of-fold probabilities of the" not in _methods_md(runs, tmp_path / "a")  # 0.5: nothing moved
    write_fake_run(runs, "20240101-000002-logreg-bbbbbbbb", params={"C": 0.1}, threshold=0.37, seed=1)
    methods = _methods_md(runs, tmp_path / "b")
    assert ("For CV heads (1 run(s) with a threshold other than 0.5) the threshold was chosen on the pooled "
            "out-of-fold probabilities of the 5 fold models and then applied unchanged to another model, the "
            "model refit on all training images") in methods


def test_methods_state_that_im_and_normal2_im_numbers_are_different_patients(tmp_path):
    """Kermany's IM-k and NORMAL2-IM-k are grouped as different patients, an assumption nothing checks."""
    plain, named = tmp_path / "plain", tmp_path / "named"
    write_fake_run(plain, "20240101-000001-logreg-aaaaaaaa")
    assert "NORMAL2-IM-k" not in _methods_md(plain, tmp_path / "a")  # no IM- file names: not this data
    write_fake_run(named, "20240101-000001-logreg-aaaaaaaa", relpath_prefix="NORMAL2-IM-1427-000")
    methods = _methods_md(named, tmp_path / "b")
    assert "IM-k and NORMAL2-IM-k were taken as different patients: an assumption" in methods
    # the count is of these runs' images; 211 is the official folder's, and said to be (it was stated as
    # this data's whatever the data: a reproducibility audit)
    assert "Among these runs' validation and test images 0 number(s) k occur under both prefixes" in methods
    assert "in the official training NORMAL folder 211 do" in methods


def test_methods_name_intervals_without_width_and_left_out_resamples(tmp_path):
    """A statistics audit: a [0.75, 0.75] interval away from 0 and 1, and resamples left out where a metric
    was undefined, went unmentioned; fit records both now and Methods says what they mean."""
    runs = tmp_path / "runs"
    folder = write_fake_run(runs, "20240101-000001-logreg-aaaaaaaa")
    assert "no measure of certainty" not in _methods_md(runs, tmp_path / "a")
    from featcache.metrics import bootstrap_ci
    from featcache.report.collect import read_predictions

    pred = read_predictions(folder / "predictions_test.csv")
    m = json.loads((folder / "metrics.json").read_text())
    m["test"] = {"n": len(pred.y_true),
                 "ci": bootstrap_ci(pred.y_true, pred.proba, list(CLASSES), n_boot=200, seed=0)}
    m["test"]["ci"].update(no_width=["sensitivity"], undefined_resamples={"sensitivity": 111, "auc": 111})
    (folder / "metrics.json").write_text(json.dumps(m))
    methods = _methods_md(runs, tmp_path / "b")
    n_boot = 200
    assert "an interval of no width away from 0 and 1 (sensitivity) means every resample gave" in methods
    assert f"left out of its interval (at most, of {n_boot}: auc 111, sensitivity 111)" in methods


def test_numbers_under_both_im_prefixes_are_counted() -> None:
    from featcache.datasets import im_numbers_under_both_prefixes

    names = ["train/NORMAL/IM-0115-0001.jpeg", "train/NORMAL/NORMAL2-IM-0115-0001.jpeg",
             "test/NORMAL/IM-0007-0001 (1).jpeg", "test/NORMAL/NORMAL2-IM-7-0001.jpeg",  # 7 == 0007
             "train/NORMAL/IM-0200-0001.jpeg", "train/NORMAL/NORMAL2-IM-0300-0001.jpeg",
             "train/PNEUMONIA/person1_virus_6.jpeg"]
    assert im_numbers_under_both_prefixes(names) == 2


def _no_id_runs(tmp_path: Path) -> Path:
    """Two logreg runs (one with a CV grid) on a folder whose file names carry no patient id, their test
    CIs recorded as fit records them there: the 0.5 CI says "file-name groups"; the at-threshold CI, as
    fits before the fix wrote it, says nothing."""
    from featcache.metrics import bootstrap_ci
    from featcache.report.collect import read_predictions
    from tests.conftest import write_xray

    data = tmp_path / "noid"
    for split in ("train", "test"):
        for k, label in enumerate(CLASSES * 3):
            write_xray(data / split / label / f"scan{k}.jpeg", k + 10 * (split == "test"), 32)
    runs = tmp_path / "runs"
    for k in (1, 2):
        folder = write_fake_run(runs, f"20240101-00000{k}-logreg-{k:08x}", quality=2 + k, seed=k,
                                dataset_root=str(data), params={"C": float(k)})
        info = json.loads((folder / "run.json").read_text())
        info["dataset"].update(layout="folders", patient_ids=0, n_images=12)
        info["selection"].update(best_index=0, scoring="accuracy", folds=3)
        (folder / "run.json").write_text(json.dumps(info))
        pred = read_predictions(folder / "predictions_test.csv")
        ci = bootstrap_ci(pred.y_true, pred.proba, list(CLASSES), n_boot=50, seed=0)
        metrics = json.loads((folder / "metrics.json").read_text())
        metrics["test"] = {"n": 60, "accuracy": float(np.mean(pred.proba.argmax(1) == pred.y_true)),
                           "ci": {**ci, "resampled": "file-name groups"}, "at_threshold": {"ci": dict(ci)}}
        metrics["cv_results"] = {"params": [{"C": float(k)}, {"C": 0.1}], "mean_test_score": [0.9, 0.8],
                                 "std_test_score": [0.01, 0.02], "rank_test_score": [1, 2],
                                 "mean_fit_time": [0.0, 0.0]}
        (folder / "metrics.json").write_text(json.dumps(metrics))
    return runs


def test_data_without_patient_ids_is_never_called_patients_in_the_report(tmp_path):
    """On data without patient ids the report said both "test images grouped by file name" and "test
    patients" (the at-threshold CI had no "resampled" key and defaulted to patients), and the paired
    test, the grid headings, the footer and the audit table spoke of patients."""
    res = build_report(_no_id_runs(tmp_path), tmp_path / "out", ReportOptions(detail=0))
    html = " ".join(re.sub(r"<[^>]+>", " ", res.html.read_text(encoding="utf-8")).split())
    assert "test images grouped by file name" in html
    for claim in ("test patients", "patient-grouped", "patients in test", "patients in train"):
        assert claim not in html, claim
    assert "resamples of test images grouped by file name (the data has no patient ids) (seed 0)" in html
    assert "2 configs × 3 file-name-grouped folds" in html
    assert "images in test 6" in html and "patients — (no image has a patient id)" in html
    meta = json.loads(res.json.read_text())["meta"]["confidence_intervals"]["method"]
    assert "test images grouped by file name" in meta and "patients" not in meta


def test_runs_show_names_what_the_ci_resampled_and_how_a_3class_run_labels(tmp_path, capsys):
    """`runs show` said "threshold 0.5; ... CI over patients" for every run: a 3-class run labels by its
    most probable class, and on data without patient ids fit resampled file-name groups."""
    runs = _no_id_runs(tmp_path)
    assert run(["runs", "show", "20240101-000001-logreg-00000001", "--runs-dir", str(runs)]) == 0
    out = " ".join(capsys.readouterr().out.replace("│", " ").split())
    assert "threshold 0.5; test with 95% bootstrap CI over images grouped by file name" in out
    assert "over patients" not in out
    folder = write_3class_run(runs, "20240101-000009-logreg-99999999", quality=2, seed=9)
    info = json.loads((folder / "run.json").read_text())
    info["classes"] = list(CLASSES_3)
    (folder / "run.json").write_text(json.dumps(info))
    assert run(["runs", "show", folder.name, "--runs-dir", str(runs)]) == 0
    out = " ".join(capsys.readouterr().out.replace("│", " ").split())
    assert "metrics (label: most probable class)" in out and "threshold 0.5" not in out


def test_the_ranking_metric_has_its_test_column_and_the_losss_recorded_interval(tmp_path):
    """Ranked by loss or average precision, the HTML leaderboard had no test column for that metric; and
    under loss the figure said "no interval computed for loss" though fit recorded test.ci.log_loss."""
    runs = _no_id_runs(tmp_path)
    res = build_report(runs, tmp_path / "out", ReportOptions(metric="loss", detail=0))
    rows = {r["run_id"]: r for r in json.loads(res.json.read_text())["runs"]}
    folder = runs / "20240101-000001-logreg-00000001"
    recorded = json.loads((folder / "metrics.json").read_text())["test"]["ci"]["log_loss"]
    row = rows[folder.name]
    assert [row["test_loss_lo"], row["test_loss_hi"]] == pytest.approx(recorded)
    html = " ".join(re.sub(r"<[^>]+>", " ", res.html.read_text(encoding="utf-8")).split())
    assert "test loss [95% CI]" in html and f"{row['test_loss']:.3f} [{recorded[0]:.3f}" in html
    assert "no interval computed for loss" not in html and "test loss with 95% CI (orange)" in html
    res = build_report(runs, tmp_path / "out2", ReportOptions(metric="average_precision", detail=0))
    html = " ".join(re.sub(r"<[^>]+>", " ", res.html.read_text(encoding="utf-8")).split())
    header = html[html.index("Leaderboard"):]
    header = header[header.index(" # "):header.index(" run id ")]
    assert "test average_precision seed" in header  # no interval is computed for it: none promised


def test_heatmap_colour_scale_stays_inside_the_metrics_range(monkeypatch):
    """Near-perfect accuracies widened to the minimum span around their middle put 1.05 on the colour
    bar, a value no accuracy can take; a loss keeps its centred span."""
    from featcache.report import build, plots

    seen = {}

    def fake_imshow(self, data, **kw):
        seen.update(kw)
        raise RuntimeError("stop")  # the colour limits are all this test needs

    import matplotlib.axes

    monkeypatch.setattr(matplotlib.axes.Axes, "imshow", fake_imshow)
    rows = [{"params": {"lr": lr, "dropout": d}, "val_accuracy": acc, "val_loss": acc, "n_val": 3000,
             "rank": i} for i, (lr, d, acc) in enumerate(((0.1, 0.0, 1.0), (0.01, 0.0, 0.99)))]
    for key, lo, hi in (("val_accuracy", 1 - plots.HEATMAP_MIN_SPAN, 1.0),
                        ("val_loss", 0.995 - plots.HEATMAP_MIN_SPAN / 2, 0.995 + plots.HEATMAP_MIN_SPAN / 2)):
        with pytest.raises(RuntimeError):
            build._heatmap(rows, "lr", "dropout", key, "t")
        assert (seen["vmin"], seen["vmax"]) == pytest.approx((lo, hi)), key
    import matplotlib.pyplot as plt

    plt.close("all")


def test_selection_optimism_counts_the_whole_sweep_and_each_task_apart(tmp_path):
    """`--id` on one run of a 4-config sweep dropped the "best of many" warning (its grid's other configs
    were not in the report), and a binary and a 3-class run were added into one count."""
    runs = tmp_path / "runs"
    for k, lr in enumerate((0.1, 0.01, 0.001, 0.0001)):
        folder = write_fake_run(runs, f"20240101-00000{k}-mlp-{k:08x}", head="mlp", seed=k,
                                params={"layers": [8], "epochs": 9, "lr": lr})
        info = json.loads((folder / "run.json").read_text())
        info["grid"] = {"index": k, "size": 4}
        (folder / "run.json").write_text(json.dumps(info))
    res = build_report(runs, tmp_path / "out", ReportOptions(detail=0, ids=("00000002",)))
    optimism = json.loads(res.json.read_text())["meta"]["selection_optimism"]
    assert optimism and "best of 4 configs (1 run(s) here" in optimism
    write_3class_run(runs, "20240101-000009-logreg-99999999", quality=2, seed=9)
    write_3class_run(runs, "20240101-000008-logreg-88888888", quality=1, seed=8)
    res = build_report(runs, tmp_path / "out2", ReportOptions(detail=0, ids=("00000002", "logreg")))
    optimism = json.loads(res.json.read_text())["meta"]["selection_optimism"]
    assert "4 configs (1 run(s) here" in optimism and "for task binary" in optimism
    assert "2 configs for task 3class" in optimism
    # a task with one config had nothing chosen among: it is not listed ("best of 1 configs for task ...")
    res = build_report(runs, tmp_path / "out3", ReportOptions(detail=0, ids=("00000002", "99999999")))
    optimism = json.loads(res.json.read_text())["meta"]["selection_optimism"]
    assert "for task binary" in optimism and "3class" not in optimism and "1 configs" not in optimism


def test_without_a_test_split_no_note_points_to_the_test_columns(tmp_path):
    """With no test split the notes on unequal validation sizes and on epochs chosen on the hold-out still
    sent the reader to "the test columns and their CIs", which the report does not have."""
    runs = tmp_path / "runs"
    write_fake_run(runs, "20240101-000001-logreg-aaaaaaaa", test=False, n_val=100)
    write_fake_run(runs, "20240101-000002-mlp-bbbbbbbb", head="mlp", test=False, seed=3, n_val=20,
                   params={"patience": 3})
    text = build_report(runs, tmp_path / "out", ReportOptions(detail=0)).markdown.read_text()
    text = " ".join(text.split())
    assert "Validation sizes differ:" in text and "Epochs chosen on the hold-out:" in text
    assert "test columns" not in text and "no test split was scored to check it against" in text


def test_the_overview_of_a_top_n_report_counts_every_run_ranked(sweep, tmp_path):
    """Under --top 4 the overview said "The 4 best of 4 runs" though 14 runs were ranked."""
    runs, _ = sweep
    text = build_report(runs, tmp_path / "out", ReportOptions(top=4, detail=0)).markdown.read_text()
    assert "The 4 best of 14 runs" in " ".join(text.split())


def test_a_loss_set_by_the_clip_is_said_to_be() -> None:
    """A kNN gave 3 of 59 test images probability 0 for their true class: its log loss (2.159) was the
    clip's doing (0.424 without those 3), shown and ranked by --metric loss without a word."""
    from featcache.report.build import _clipped_loss_text
    from featcache.report.collect import Predictions, RunRecord

    y = np.array([0, 1, 1, 0])
    soft = Predictions(list("abcd"), y, np.array([[.9, .1], [.2, .8], [.3, .7], [.6, .4]]), list(CLASSES))
    hard = Predictions(list("abcd"), y, np.array([[1., 0.], [0., 1.], [1., 0.], [1., 0.]]), list(CLASSES))
    runs = [RunRecord("r1", Path("r1"), {}, {}, val=soft, test=soft),
            RunRecord("r2", Path("r2"), {}, {}, val=soft, test=hard)]
    assert _clipped_loss_text(runs[:1]) == ""
    text = _clipped_loss_text(runs)
    assert text.startswith("In 1 of 2 run(s) some validation or test image got probability 0")
    assert "(34.5 per such image" in text


def test_top_below_one_is_refused(tmp_path: Path) -> None:
    """`report --top -1` ended in a traceback (IndexError in build.py); `--top 0` showed every run."""
    for top in (-1, 0):
        with pytest.raises(ConfigError, match=f"--top must be at least 1, got {top}"):
            build_report(tmp_path / "runs", tmp_path / "rep", ReportOptions(top=top))
    assert not (tmp_path / "rep").exists()


def test_the_terminal_lists_the_best_run_of_every_group() -> None:
    """`report --group-by backbone` over 6 groups printed 5 rows under "best run of each group": the sixth
    group's winner was left out without a word."""
    from featcache.report.build import TERMINAL_ROWS, terminal_leaders

    rows = [{"run_id": f"r{g}{i}", "group": f"g{g}", "overall_rank": 10 * i + g} for g in range(6)
            for i in range(2)]
    assert [r["run_id"] for r in terminal_leaders(rows, True)] == [f"r{g}0" for g in range(6)]
    assert [r["run_id"] for r in terminal_leaders(rows, False)] == [f"r{g}0" for g in range(TERMINAL_ROWS)]


def test_a_threshold_is_never_shown_rounded_onto_0_0_5_or_1() -> None:
    """A report audit: a chosen threshold of 0.9999969 read "1.000", "1.00" and "chosen 1" (p >= 1 calls
    nothing positive, while sensitivity at it was 0.88), and 0.4988 read "0.50", the default."""
    from featcache.report.plots import threshold_text

    assert threshold_text(0.9999969) == "0.999997"
    assert threshold_text(0.4988) == "0.4988"
    assert threshold_text(0.50004) == "0.50004"
    assert threshold_text(3e-7) == "3e-07"
    assert [threshold_text(v) for v in (0.5, 0.37, 1.0, 0.0)] == ["0.5", "0.37", "1", "0"]
    assert threshold_text(0.371234567) == "0.3712"
    assert threshold_text(None) == "n/a" and threshold_text(None, "—") == "—"


def test_the_hero_and_leaderboard_show_a_threshold_below_1_as_below_1(tmp_path):
    runs = tmp_path / "runs"
    write_fake_run(runs, "20240101-000001-logreg-aaaaaaaa", threshold=0.9999969)
    text = build_report(runs, tmp_path / "out", ReportOptions(detail=0)).markdown.read_text(encoding="utf-8")
    assert "threshold 0.999997, chosen on validation" in text
    assert "| **0.999997** |" in text  # the leaderboard's thr column (the best row is bold)
    assert "1.000, chosen" not in text and "**1.00**" not in text


def test_the_terminal_warns_when_a_ranked_run_has_random_weights(tmp_path, capsys):
    """A report audit: `featcache report` printed the test accuracy of --weights none runs with no word,
    while the HTML has a callout; the terminal says it now, also when that run is not among the leaders."""
    runs = tmp_path / "runs"
    write_fake_run(runs, "20240101-000001-logreg-aaaaaaaa", quality=3.0)
    args = ["report", "--runs-dir", str(runs), "--out", str(tmp_path / "out"), "--detail", "0", "--top", "1"]
    assert run(args) == 0
    assert "Random weights" not in capsys.readouterr().out
    folder = write_fake_run(runs, "20240101-000002-logreg-bbbbbbbb", quality=0.1, seed=1)
    info = json.loads((folder / "run.json").read_text())
    info["backbones"][0]["weights"] = "none"
    (folder / "run.json").write_text(json.dumps(info))
    assert run(args) == 0
    out = " ".join(capsys.readouterr().out.split())
    # beside an ImageNet run of the same backbone: the random runs are meant, not every mobilenet-0.75 run
    assert ("Random weights: the runs on randomly initialised mobilenet-0.75 weights (--weights none), not "
            "ImageNet, test the pipeline only: their accuracy says nothing about the method." in out)
    # a fused run of ImageNet mobilenet-0.75 and a random densenet121: only densenet121 is called random
    # (it said "randomly initialised mobilenet-0.75+densenet121 weights")
    info["backbones"] = [{**info["backbones"][0], "weights": "imagenet"},
                         {**info["backbones"][0], "name": "densenet121", "weights": "none"}]
    (folder / "run.json").write_text(json.dumps(info))
    assert run([*args, "--id", "bbbbbbbb"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "Random weights: the runs on randomly initialised densenet121 weights (--weights none)" in out
    md = " ".join((tmp_path / "out" / "report.md").read_text().split())
    assert "densenet121 features come from randomly initialised weights" in md and "mobilenet-0.75+" not in (
        md[md.index("Random weights:"):md.index("Random weights:") + 200])


def _rewrite_test_csv(folder: Path, keep=lambda row: True, change=lambda row: row) -> None:
    """Keep (and change) rows of a fake run's test predictions, as if fit had written those."""
    path = folder / "predictions_test.csv"
    with open(path, encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    rows = [change(dict(r)) for r in rows if keep(r)]
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def _record_no_width(folder: Path, names: list[str]) -> None:
    """metrics.json as fit writes it where the bootstrap intervals of ``names`` had no width."""
    m = json.loads((folder / "metrics.json").read_text())
    n = len(_read_preds(folder / "predictions_test.csv")[0])
    m["test"] = {"n": n, "ci": {"n_boot": 200, "resampled": "patients", "no_width": names}}
    (folder / "metrics.json").write_text(json.dumps(m))


def test_a_test_split_of_one_class_is_named_as_why_auc_is_undefined(tmp_path):
    """A report audit: two binary runs tested on PNEUMONIA images only read "test AUC: — (95% CI —–—)",
    "the paired AUC difference is computed for binary runs only (—)" and, for their F1 [0.5–0.5], "few
    patients, such as one holding every test image of a class"; each now names the absent class."""
    runs = tmp_path / "runs"
    for i in range(2):
        folder = write_fake_run(runs, f"2024010{i + 1}-000000-logreg-0000000{i}", quality=2 - i, seed=i)
        _rewrite_test_csv(folder, keep=lambda r: r["y_true"] == "1")
        _record_no_width(folder, ["macro_f1"])
    text = build_report(runs, tmp_path / "out", ReportOptions(detail=0)).markdown.read_text(encoding="utf-8")
    text = " ".join(text.split())
    assert ("**test AUC:** undefined (the test split holds PNEUMONIA images only: AUC needs both classes)"
            in text)
    assert ("the test split holds no NORMAL image, so AUC, and the paired AUC difference, is undefined (—)"
            in text)
    assert "binary runs only" not in text
    assert ("(macro\\_f1) means every resample gave the same value (macro\\_f1: no NORMAL image in the test "
            "split) and is no measure of certainty") in text
    assert "such as one holding" not in text


def test_an_interval_without_width_is_explained_by_what_the_predictions_show(tmp_path):
    """A report audit: a model giving every test image the same score (AUC [0.5–0.5]) was explained as
    "few patients, such as one holding every test image of a class"; that cause is now said only where
    the test predictions show it, and nothing is guessed where they show none."""
    flat, one, plain = tmp_path / "flat", tmp_path / "one", tmp_path / "plain"
    folder = write_fake_run(flat, "20240101-000000-mlp-00000000", head="mlp")
    _rewrite_test_csv(folder, change=lambda r: {**r, "p_NORMAL": "0.470258", "p_PNEUMONIA": "0.529742"})
    _record_no_width(folder, ["auc"])
    folder = write_fake_run(one, "20240101-000000-logreg-00000000")
    _rewrite_test_csv(folder, change=lambda r: {
        **r, "group": "patient-1" if r["y_true"] == "0" else r["relpath"]})
    _record_no_width(folder, ["specificity"])
    folder = write_fake_run(plain, "20240101-000000-logreg-00000000")
    _record_no_width(folder, ["sensitivity"])
    assert "(auc: a model gave every test image the same score)" in _methods_md(flat, tmp_path / "a")
    assert "(specificity: one patient holding every NORMAL test image)" in _methods_md(one, tmp_path / "b")
    methods = _methods_md(plain, tmp_path / "c")
    assert "(sensitivity) means every resample gave the same value and is no measure of certainty" in methods


def test_methods_say_how_each_head_is_built(tmp_path):
    """A report audit: Methods never said that logreg, svm and knn standardise the features (and mlp does
    not), that a linear svm is LinearSVC and an RBF one SVC, nor what "method=sigmoid, ensemble=auto"
    among svm's settings meant; one sentence per head now names its estimators and preprocessing."""
    runs, solo = tmp_path / "runs", tmp_path / "solo"
    write_fake_run(runs, "20240101-000001-logreg-aaaaaaaa", params={"C": 1.0})
    write_fake_run(runs, "20240101-000002-svm-bbbbbbbb", head="svm", params={"kernel": "linear", "C": 1.0})
    write_fake_run(runs, "20240101-000003-svm-cccccccc", head="svm", params={"kernel": "rbf", "C": 1.0})
    write_fake_run(runs, "20240101-000004-knn-dddddddd", head="knn", params={"n_neighbors": 5})
    write_fake_run(runs, "20240101-000005-mlp-eeeeeeee", head="mlp", params={"layers": [8], "dropout": 0.5})
    methods = _methods_md(runs, tmp_path / "a")
    assert ("logreg is scikit-learn's LogisticRegression on features standardised by a StandardScaler "
            "fitted on the images each model is trained on (each CV fold's training part, then the final "
            "model's).") in methods
    assert ("svm is scikit-learn's LinearSVC for kernel=linear (liblinear, squared hinge loss) and SVC for "
            "kernel=rbf (libsvm) on features standardised in the same way") in methods
    assert ("probabilities come from Platt scaling (CalibratedClassifierCV, method=sigmoid) over 3 "
            "patient-grouped folds") in methods
    assert "knn is scikit-learn's KNeighborsClassifier on features standardised in the same way" in methods
    assert "a class's probability is its share of the k nearest" in methods  # uniform weights
    assert ("mlp is a Keras model: Dense hidden layers (relu activation, Glorot-uniform initialised, Dropout "
            "after each where a config sets dropout), then a Dense output with softmax, trained by minibatch "
            "Adam on sparse categorical cross-entropy (computed from the logits), on the cached features as "
            "they are (not standardised).") in methods
    write_fake_run(solo, "20240101-000001-mlp-aaaaaaaa", head="mlp", params={"layers": [8]})
    methods = _methods_md(solo, tmp_path / "b")
    assert "StandardScaler" not in methods and "Dropout" not in methods and "mlp is a Keras model" in methods


def test_grid_views_give_the_value_a_run_left_at_its_default(tmp_path, monkeypatch):
    """A dropout sweep beside runs that left dropout at its default: the hyperparameter table read
    "dropout None" and the heatmap had "0" and "None" columns, though run.json's hyperparameters say every
    such run trained with dropout 0 (and batch_size 64)."""
    from featcache.report import plots

    runs = tmp_path / "runs"
    configs = [({"dropout": 0.5}, 0.5, 64), ({"batch_size": 16}, 0.0, 16), ({"dropout": 0.0}, 0.0, 64)]
    for i, (params, dropout, batch) in enumerate(configs):
        folder = write_fake_run(runs, f"20240101-00000{i}-mlp-{i:08x}", head="mlp", params=params, seed=i,
                                quality=1 + i)
        info = json.loads((folder / "run.json").read_text())
        info["hyperparameters"] = {"dropout": dropout, "batch_size": batch, "lr": 0.001}
        (folder / "run.json").write_text(json.dumps(info))
    seen: list[tuple] = []
    drawn = plots.heatmap_figure
    monkeypatch.setattr(plots, "heatmap_figure", lambda table, xs, ys, *a, **kw: (
        seen.append((list(xs), list(ys))), drawn(table, xs, ys, *a, **kw))[1])
    text = build_report(runs, tmp_path / "out", ReportOptions(detail=0)).markdown.read_text()
    table = text[text.index(r"| model \# |"):].split("\n\n")[0].splitlines()
    assert not [line for line in table if "None" in line]
    assert table[0].split("|")[2:4] == [" batch\\_size ", " dropout "]
    cells = sorted([c.strip().strip("*") for c in line.strip("|").split("|")][1:3] for line in table[2:])
    assert cells == [["16", "0"], ["64", "0"], ["64", "0.5"]]
    assert seen and all("None" not in xs + ys for xs, ys in seen)


def test_the_overview_of_a_grouped_top_n_report_says_it_shows_each_groups_best(sweep, tmp_path):
    """Under --group-by head --top 2 the overview said "The 6 best of 14 runs" while it showed the best 2
    of each head (an svm run that 3 logreg and 2 mlp runs beat among them)."""
    runs, _ = sweep
    options = ReportOptions(group_by="head", top=2, detail=0)
    text = " ".join(build_report(runs, tmp_path / "out", options).markdown.read_text().split())
    assert "The best 2 of each head (6 of 14 runs)" in text
    assert "The 6 best of 14 runs" not in text


def test_ties_below_the_best_are_marked_in_the_leaderboard(tmp_path):
    """#2 and #3 with the same validation accuracy read as distinct ranks in the HTML and Markdown; only the
    CSV's tied column told, and the Tie note covers #1 only."""
    runs = tmp_path / "runs"
    write_fake_run(runs, "20240101-000000-logreg-00000000", params={"C": 1.0}, quality=4, seed=1)
    for k in (1, 2):  # same seed and quality: the same predictions
        write_fake_run(runs, f"20240101-00000{k}-logreg-{k:08x}", params={"C": 10.0 ** -k}, quality=1, seed=7)
    write_fake_run(runs, "20240101-000009-logreg-00000009", params={"C": 100.0}, quality=0.1, seed=3)
    res = build_report(runs, tmp_path / "out", ReportOptions(detail=0))
    with open(res.csv, encoding="utf-8") as fh:
        assert [r["tied"] for r in csv.DictReader(fh)] == ["1", "2", "2", "1"]
    text = res.markdown.read_text()
    table = text[text.index(r"| \# | config"):].split("\n\n")[0].splitlines()[2:]
    assert [line.split("|")[1].strip().strip("*") for line in table] == ["1", "2=", "3=", "4"]
    assert "'=' after a rank: the run has the same validation accuracy as another" in " ".join(text.split())
    assert "<td>2=</td>" in res.html.read_text().replace(' class="num"', "")
    # the terminal's table too: it read 1, 2, 3, 4 while report.md said 1, 2=, 3=, 4
    from featcache.cli.report_cmd import _leaders_table
    from rich.console import Console

    out = Console(record=True, width=200)
    out.print(_leaders_table(res))
    lines = out.export_text().splitlines()
    assert [ln.split()[0] for ln in lines[2:6]] == ["1", "2=", "3=", "4"]


def test_the_terminal_tie_note_is_one_unbroken_line_under_a_narrow_table(tmp_path):
    """As the leaders table's caption, "'=' after a rank: the same validation accuracy as another run" was
    wrapped at the narrow table's width, breaking the sentence over two lines in a wide terminal."""
    from featcache.cli.report_cmd import print_outputs
    from rich.console import Console

    runs = tmp_path / "runs"
    for k in (1, 2):  # same seed and quality: the same predictions, a tie
        write_fake_run(runs, f"20240101-00000{k}-logreg-{k:08x}", params={"C": 10.0 ** -k}, quality=1, seed=7,
                       test=False)
    res = build_report(runs, tmp_path / "out", ReportOptions(detail=0))
    out = Console(record=True, width=200)
    print_outputs(res, out)
    lines = [ln.strip() for ln in out.export_text().splitlines()]
    assert max(len(ln) for ln in lines[:4]) < 60  # the table is narrower than the note
    assert "'=' after a rank: the same validation accuracy as another run" in lines
    untied = build_report(runs, tmp_path / "out2", ReportOptions(ids=["-000001-"], detail=0))
    out = Console(record=True, width=200)
    print_outputs(untied, out)
    assert "'=' after a rank" not in out.export_text()


def test_the_terminal_test_column_says_95_ci_only_when_its_cells_have_one(tmp_path):
    """`report --metric balanced_accuracy` headed the terminal's test column "test balanced_accuracy
    [95% CI]" above bare scores: balanced accuracy, like average precision and Brier, gets no interval."""
    from featcache.cli.report_cmd import _leaders_table
    from rich.console import Console

    runs = tmp_path / "runs"
    for k in (1, 2):
        write_fake_run(runs, f"20240101-00000{k}-logreg-{k:08x}", params={"C": float(k)}, quality=k, seed=k)
    for metric, has_ci in (("balanced_accuracy", False), ("accuracy", True)):
        res = build_report(runs, tmp_path / metric, ReportOptions(metric=metric, detail=0))
        leaders = json.loads(res.json.read_text())["runs"]
        assert any(r.get(f"test_{metric}_lo") is not None for r in leaders) == has_ci
        out = Console(record=True, width=200)
        out.print(_leaders_table(res))
        header = out.export_text().splitlines()[1]
        assert f"test {metric}" in header
        assert ("[95% CI]" in header) == has_ci


def test_the_audit_of_a_flat_folder_names_its_one_split_all_not_a_dash(tmp_path):
    """A folder without split folders is one split that inspect names "-": report.md's audit read
    "| patients in - | 70 |" under counts tables that call it "all"."""
    from conftest import make_kermany_tree

    data = make_kermany_tree(tmp_path / "flat", n_normal=3, n_pneu=3, splits=("",), size=32)
    runs = tmp_path / "runs"
    write_fake_run(runs, "20240101-000001-logreg-00000001", dataset_root=str(data))
    text = build_report(runs, tmp_path / "out", ReportOptions(detail=0)).markdown.read_text()
    assert "| patients in all | 6 |" in text
    assert "patients in -" not in text


def test_mixed_tasks_and_datasets_are_told_from_every_run_ranked_and_each_task_gets_its_best(tmp_path):
    """Under --top 1 a 3-class run was named the best over binary runs with no "Mixed tasks" note (the
    note looked at the runs shown), the same for "Mixed datasets", and with --group-by task the best run
    was still one of all tasks by overall rank, though the groups' scores are not comparable."""
    runs = tmp_path / "runs"
    write_3class_run(runs, "20240101-000000-logreg-00000000", quality=4, seed=1)
    write_fake_run(runs, "20240101-000001-logreg-00000001", quality=0.5, seed=2)
    write_fake_run(runs, "20240101-000002-logreg-00000002", quality=0.3, seed=3,
                   dataset_root="/nonexistent/b")
    for top, group_by in ((1, None), (None, "task")):
        res = build_report(runs, tmp_path / f"out-{group_by}", ReportOptions(top=top, group_by=group_by,
                                                                            detail=0))
        text = " ".join(res.markdown.read_text().split())
        assert ("**Mixed tasks:**" in text) == (group_by is None)
        assert "**Mixed datasets:** runs of 2 datasets" in text
        assert "**No single best:** these runs are of 2 tasks (3class, binary)" in text
        heroes = re.findall(r"\*\*(Best run[^*]*)\*\*", text)
        assert [h.split(":")[0] for h in heroes] == ["Best run of task 3class (ranked on validation data)",
                                                    "Best run of task binary (ranked on validation data)"]
        assert ("is not in the leaderboard (--top)" in text) == (top == 1)
        assert 'class="kicker">Best run of task binary' in res.html.read_text()
        # the terminal named one "best" across the tasks (a researcher's audit): each task's best now
        binary_best = build_report(runs, tmp_path / "b", ReportOptions(ids=["-000001-", "-000002-"],
                                                                     detail=0)).best_run_id
        assert res.best_by_task == {"3class": "20240101-000000-logreg-00000000", "binary": binary_best}
        from featcache.cli.report_cmd import print_outputs
        from rich.console import Console

        console = Console(record=True, width=300)
        print_outputs(res, console)
        said = " ".join(console.export_text().split())
        # with --group-by task no group mixes tasks: the warning (and its advice to pass that flag) was false
        assert ("Mixed tasks: runs of 3class, binary are ranked together" in said) == (group_by is None)
        assert f"best per task 3class 20240101-000000-logreg-00000000, binary {binary_best}" in said
    one_task = build_report(runs, tmp_path / "one", ReportOptions(ids=["-000001-", "-000002-"], detail=0))
    text = one_task.markdown.read_text()
    assert "No single best" not in text and "**Best run (ranked on validation data):" in text
    assert not one_task.best_by_task
    by_dataset = build_report(runs, tmp_path / "ds", ReportOptions(ids=["-000001-", "-000002-"], detail=0,
                                                                   group_by="dataset"))
    text = " ".join(by_dataset.markdown.read_text().split())
    assert "**No single best:** these runs are of 2 datasets" in text
    assert len(re.findall(r"\*\*Best run of dataset /nonexistent/", text)) == 2


def test_the_terminal_and_json_say_when_runs_of_several_datasets_are_ranked_together(tmp_path):
    """A new user ran `featcache demo`, then fit their own data in the same folder: `featcache report`
    printed the demo's runs as the best of each head over theirs with no word that these are two datasets
    (only the report file's "Mixed datasets" callout said so)."""
    from featcache.cli.report_cmd import print_outputs, report_dict
    from rich.console import Console

    runs = tmp_path / "runs"
    write_fake_run(runs, "20240101-000001-logreg-00000001", quality=0.5, seed=2)
    write_fake_run(runs, "20240101-000002-logreg-00000002", quality=0.3, seed=3,
                   dataset_root="/nonexistent/b")
    for group_by, mixed in ((None, True), ("head", True), ("dataset", False)):
        res = build_report(runs, tmp_path / f"out-{group_by}", ReportOptions(group_by=group_by, detail=0))
        console = Console(record=True, width=300)
        print_outputs(res, console)
        said = " ".join(console.export_text().split())
        assert ("Mixed datasets: runs of 2 datasets are ranked together" in said) == mixed
        assert not mixed or "/nonexistent/b" in said.split("Mixed datasets:")[1]  # which: named
        assert len(report_dict(res)["mixed_datasets"]) == (2 if mixed else 0)
    one = build_report(runs, tmp_path / "one", ReportOptions(ids=["-000001-"], detail=0))
    console = Console(record=True, width=300)
    print_outputs(one, console)
    assert "Mixed datasets" not in console.export_text() and report_dict(one)["mixed_datasets"] == []


def test_sensitivity_by_pneumonia_subtype_counts_each_subtypes_positives() -> None:
    from featcache.report.collect import Predictions
    from featcache.report.scores import subtype_sensitivity

    names = ["test/NORMAL/IM-0001-0001.jpeg", "test/PNEUMONIA/person1_bacteria_1.jpeg",
             "test/PNEUMONIA/person1_bacteria_2.jpeg", "test/PNEUMONIA/person2_bacteria_3.jpeg",
             "test/PNEUMONIA/person3_virus_4.jpeg", "test/PNEUMONIA/person4_virus_5.jpeg",
             "test/PNEUMONIA/other.jpeg"]
    y = np.array([0, 1, 1, 1, 1, 1, 1])
    p1 = np.array([0.9, 0.8, 0.3, 0.6, 0.45, 0.1, 0.9])  # bacteria 2/3 at 0.5, virus 0/2; at 0.4: 1/2
    pred = Predictions(names, y, np.c_[1 - p1, p1], ["NORMAL", "PNEUMONIA"],
                       ["IM-0001", "person1", "person1", "person2", "person3", "person4", "other"])
    out = {s["subtype"]: s for s in subtype_sensitivity(pred, [0.5, 0.4])}
    assert set(out) == {"bacteria", "virus"}  # the unnamed positive and the normal image count nowhere
    assert (out["bacteria"]["n"], out["bacteria"]["patients"]) == (3, 2)
    assert [a["found"] for a in out["bacteria"]["at"]] == [2, 2]
    assert [a["found"] for a in out["virus"]["at"]] == [0, 1]
    assert out["virus"]["at"][1]["sensitivity"] == 0.5
    lo, hi = out["bacteria"]["at"][0]["ci"]
    assert 0.0 <= lo <= 2 / 3 <= hi <= 1.0
    three = Predictions(names, np.array([0, 1, 1, 1, 2, 2, 1]), np.full((7, 3), 1 / 3), ["a", "b", "c"])
    assert subtype_sensitivity(three, [0.5]) == []


def test_a_subtype_found_in_every_or_no_image_gets_an_exact_interval_not_a_point() -> None:
    """8 of 8 viral images found: every bootstrap resample finds them all, so the percentile interval was
    [1.00, 1.00]; the leaderboard's proportions give Clopper-Pearson there, and so must this table."""
    from featcache.report.collect import Predictions
    from featcache.report.scores import subtype_sensitivity

    names = [f"test/PNEUMONIA/person{i // 2}_virus_{i}.jpeg" for i in range(8)]  # 8 images, 4 patients
    names += [f"test/PNEUMONIA/person{10 + i}_bacteria_{i}.jpeg" for i in range(5)]  # 5 patients
    p1 = np.array([0.9] * 8 + [0.2] * 5)  # every virus image found, no bacterial one
    pred = Predictions(names, np.ones(13, dtype=int), np.c_[1 - p1, p1], ["NORMAL", "PNEUMONIA"],
                       [n.split("/")[-1].split("_")[0] for n in names])
    out = {s["subtype"]: s["at"][0] for s in subtype_sensitivity(pred, [0.5])}
    assert (out["virus"]["found"], out["bacteria"]["found"]) == (8, 0)
    assert out["virus"]["exact"] and out["bacteria"]["exact"]
    assert out["virus"]["ci"] == pytest.approx((0.025 ** (1 / 4), 1.0))  # over the 4 patients, not 8 images
    assert out["bacteria"]["ci"] == pytest.approx((0.0, 1 - 0.025 ** (1 / 5)))


def test_the_subtype_table_names_its_exact_intervals(tmp_path):
    runs = tmp_path / "runs"
    write_fake_run(runs, "20240101-000000-logreg-aaaaaaaa", relpath_prefix="person7_virus_", threshold=0.4)

    def found(row: dict) -> dict:  # every viral image called PNEUMONIA, at 0.5 and at the chosen 0.4
        p = 0.9 if row["y_true"] == "1" else 0.1
        return {**row, "p_NORMAL": f"{1 - p:.6f}", "p_PNEUMONIA": f"{p:.6f}", "y_pred": row["y_true"]}

    _rewrite_test_csv(runs / "20240101-000000-logreg-aaaaaaaa", change=found)
    text = build_report(runs, tmp_path / "rep", ReportOptions()).markdown.read_text(encoding="utf-8")
    row = next(ln for ln in text.splitlines() if ln.startswith("| virus |"))
    assert row.count(r"1.000 \[0.88, 1.00\] · 30/30") == 2, row  # Clopper-Pearson, 30 images: 0.025^(1/30)
    assert "A share observed at 0 or 1 has the exact Clopper-Pearson interval over the images counted" in (
        " ".join(text.split()))


def test_binary_top_runs_show_sensitivity_by_subtype_when_the_names_carry_it(tmp_path):
    runs = tmp_path / "runs"
    write_fake_run(runs, "20240101-000000-logreg-aaaaaaaa", relpath_prefix="person7_virus_", threshold=0.4)
    write_fake_run(runs, "20240101-000001-logreg-bbbbbbbb", relpath_prefix="img", seed=1)
    res = build_report(runs, tmp_path / "rep", ReportOptions(detail=2))
    text = res.markdown.read_text(encoding="utf-8")
    assert text.count("Sensitivity by pneumonia subtype on the test split") == 1  # "img" names: no table
    assert "| subtype | PNEUMONIA images | threshold 0.5 | threshold 0.4 (chosen) |" in text
    y, p = _read_preds(runs / "20240101-000000-logreg-aaaaaaaa" / "predictions_test.csv")
    found = int(np.sum(p[y == 1, 1] >= 0.5))
    assert f"· {found}/{int(np.sum(y == 1))} |" in text
    assert f"| virus | {int(np.sum(y == 1))} |" in text  # no group column: images, not patients
    assert not [ln for ln in text.splitlines() if ln.startswith("| bacteria |") and "·" in ln]


def test_three_class_confidence_bins_score_the_predicted_class() -> None:
    from featcache.report.collect import Predictions
    from featcache.report.scores import confidence_bins

    proba = np.array([[0.9, 0.05, 0.05],   # predicts 0, right
                      [0.1, 0.85, 0.05],   # predicts 1, wrong (truth 2)
                      [0.4, 0.35, 0.25],   # predicts 0, right
                      [0.2, 0.2, 0.6],     # predicts 2, wrong (truth 0)
                      [0.45, 0.45, 0.1]])  # a tie: the first class (0), as fit decides; truth 1 -> wrong
    pred = Predictions(list("abcde"), np.array([0, 2, 0, 0, 1]), proba, ["x", "y", "z"])
    mean_c, correct, counts = confidence_bins(pred, n_bins=2)
    # bin [0, 0.5): confidences 0.4, 0.45 (1 of 2 right); bin [0.5, 1]: 0.9, 0.85, 0.6 (1 of 3 right)
    assert counts.tolist() == [2, 3]
    assert mean_c.tolist() == pytest.approx([0.425, (0.9 + 0.85 + 0.6) / 3])
    assert correct.tolist() == pytest.approx([0.5, 1 / 3])


def test_three_class_top_runs_get_a_top_label_reliability_diagram(tmp_path, monkeypatch):
    from featcache.report import plots

    runs = tmp_path / "runs"
    write_3class_run(runs, "20240101-000000-logreg-aaaaaaaa", quality=2.0, seed=0)
    titles: list[str] = []
    original = plots._calibration_ax

    def spy(ax, pred, split):
        original(ax, pred, split)
        titles.append(ax.get_title())

    monkeypatch.setattr(plots, "_calibration_ax", spy)
    res = build_report(runs, tmp_path / "rep", ReportOptions(detail=1))
    assert len(titles) == 1 and "top-label calibration (multi-class Brier" in titles[0]
    assert "top-label reliability diagram" in res.markdown.read_text(encoding="utf-8")


def test_runs_show_does_not_round_a_threshold_onto_1(tmp_path, capsys):
    """The report's threshold rule (threshold_text) was not the CLI's: `runs show` gave 0.9999969 as "1"
    (4 significant digits), fit's table too, and predict's title "1.000"."""
    runs = tmp_path / "runs"
    write_fake_run(runs, "20240101-000001-logreg-aaaaaaaa", threshold=0.9999969)
    assert run(["runs", "show", "20240101-000001-logreg-aaaaaaaa", "--runs-dir", str(runs)]) == 0
    out = " ".join(capsys.readouterr().out.replace("│", " ").split())
    assert "threshold 0.999997 (" in out


def test_the_paired_comparison_draws_its_runs_roc_curves_on_one_plot(sweep, tmp_path, monkeypatch):
    from featcache.report import plots

    runs, _ = sweep
    drawn: list[list[str]] = []
    original = plots.comparison_figure

    def spy(preds, labels, formats=()):
        drawn.append(list(labels))
        return original(preds, labels, formats)

    monkeypatch.setattr(plots, "comparison_figure", spy)
    res = build_report(runs, tmp_path / "out", ReportOptions(detail=0, group_by="head"))
    text = res.markdown.read_text(encoding="utf-8")
    # one figure per group with a paired table (svm: 2 runs, logreg: 6, mlp: 6), the group's best first
    assert len(drawn) == 3 and all(labels[0].startswith("#1 ") for labels in drawn)
    assert sorted(len(labels) for labels in drawn) == [2, 6, 6]
    for i in (1, 2, 3):
        assert f"](report_files/compare-{i}.png)" in text
        assert (res.out_dir / "report_files" / f"compare-{i}.png").stat().st_size > 1000
    # one run, or runs of three classes: no figure
    from featcache.report.collect import Predictions

    two = Predictions(["a", "b"], np.array([0, 1]), np.array([[0.8, 0.2], [0.3, 0.7]]), list(CLASSES))
    assert original([two], ["#1"]) is None
    three = Predictions(["a", "b"], np.array([0, 2]), np.full((2, 3), 1 / 3), list(CLASSES_3))
    assert original([three, three], ["#1", "#2"]) is None


def test_report_json_prints_the_files_best_run_and_leaders_alone_on_stdout(sweep, tmp_path, capsys):
    runs, _ = sweep
    assert run(["report", "--runs-dir", str(runs), "--out", str(tmp_path / "o"), "--detail", "0",
                "--json"]) == 0
    out = json.loads(capsys.readouterr().out)  # nothing but the JSON on stdout
    board = json.loads((tmp_path / "o" / "leaderboard.json").read_text())["runs"]
    assert out["n_runs"] == len(board) == 14 and out["metric"] == "accuracy"
    assert Path(out["html"]).is_file() and out["best_run_id"] == board[0]["run_id"]
    first = out["leaders"][0]
    assert (first["rank"], first["run_id"], first["val"]) == (1, board[0]["run_id"], board[0]["val_accuracy"])
    assert first["test_ci"] == [board[0]["test_accuracy_lo"], board[0]["test_accuracy_hi"]]
    assert [r["rank"] for r in out["leaders"]] == list(range(1, len(out["leaders"]) + 1))


def test_a_held_out_test_split_and_a_validation_only_run_of_one_folder_get_their_own_counts(tmp_path):
    """A --test-fraction run and a validation-only run of one folder share the dataset digest, which leaves
    the held-out split out: the Dataset section showed the first run's "test 270/776" for both."""
    runs = tmp_path / "runs"
    held_out = {"train": {"NORMAL": 6, "PNEUMONIA": 18}, "test": {"NORMAL": 2, "PNEUMONIA": 6}}
    for i, (extra, counts) in enumerate((({"test_fraction": 0.25, "test_split_seed": 0}, held_out),
                                         ({}, {"train": {"NORMAL": 8, "PNEUMONIA": 24}}))):
        folder = write_fake_run(runs, f"2024010{i}-000000-logreg-0000000{i}", seed=i, test=bool(extra))
        run = json.loads((folder / "run.json").read_text())
        run["dataset"] = {"root": "/nonexistent/featcache-data", "layout": "kermany", "counts": counts,
                          "images_digest": "ab" * 8, **extra}
        (folder / "run.json").write_text(json.dumps(run))
    md_text = " ".join(build_report(runs, tmp_path / "out").markdown.read_text(encoding="utf-8").split())
    section = md_text[md_text.index("## Dataset"):md_text.index("## Methods")]
    assert "| train | PNEUMONIA | 24 |" in section  # the validation-only run's counts, not the first run's
    held = section.index("25% held out as the test split (--test-fraction 0.25, seed 0)")
    own = section.index("no test split (validation only)")
    held_table, own_table = (section[held:own], section[own:]) if held < own else (section[held:],
                                                                                  section[own:held])
    assert "| test | PNEUMONIA | 6 |" in held_table and "| train | PNEUMONIA | 18 |" in held_table
    assert "| train | PNEUMONIA | 24 |" in own_table and "| test |" not in own_table
    assert "not a --test-fraction hold-out" in md_text  # the '@' digest does not claim to cover it


def test_a_run_without_a_test_split_is_headed_no_test_split(tmp_path):
    """The per-run header read "test n=none" for a validation-only run."""
    runs = tmp_path / "runs"
    write_fake_run(runs, "20240101-000001-logreg-aaaaaaaa", test=False, n_val=40)
    write_fake_run(runs, "20240101-000002-logreg-bbbbbbbb", seed=2, n_val=40, n_test=60)
    res = build_report(runs, tmp_path / "out")
    for text in (res.html.read_text(encoding="utf-8"), res.markdown.read_text(encoding="utf-8")):
        assert "run 20240101-000001-logreg-aaaaaaaa — val n=40, no test split" in text
        assert "run 20240101-000002-logreg-bbbbbbbb — val n=40, test n=60" in text
        assert "test n=none" not in text


def _leaderboard_md(res) -> str:
    text = " ".join(res.markdown.read_text(encoding="utf-8").split())
    start = text.index("## Leaderboard")
    return text[start:text.index("## ", start + 3)]


def test_the_leaderboard_caption_describes_intervals_only_when_it_shows_test_columns(tmp_path):
    """A report with no test split said "CIs are 95% bootstrap intervals resampling test patients" above a
    leaderboard without a single interval."""
    runs = tmp_path / "runs"
    write_fake_run(runs, "20240101-000001-logreg-aaaaaaaa", test=False)
    write_fake_run(runs, "20240101-000002-logreg-bbbbbbbb", test=False, seed=2)
    caption = _leaderboard_md(build_report(runs, tmp_path / "out"))
    assert "| test acc" not in caption  # no test column, so no interval in the table
    assert "CIs are" not in caption
    assert "no run shown has a test split, so no confidence interval is given: validation scores" in caption
    write_fake_run(runs, "20240101-000003-logreg-cccccccc", seed=3)  # one run with a test split: CIs shown
    caption = _leaderboard_md(build_report(runs, tmp_path / "out2"))
    assert "| test acc" in caption and "CIs are 95% bootstrap intervals resampling" in caption
    assert "no confidence interval is given" not in caption


def test_the_terminal_says_1_run_not_1_runs(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    runs = tmp_path / "runs"
    write_fake_run(runs, "20240101-000001-logreg-aaaaaaaa")
    assert run(["report", "--runs-dir", str(runs), "--out", str(tmp_path / "one")]) == 0
    out = capsys.readouterr().out
    assert "Report written (1 run; best 20240101-000001-logreg-aaaaaaaa)" in out
    write_fake_run(runs, "20240101-000002-logreg-bbbbbbbb", seed=2)
    assert run(["report", "--runs-dir", str(runs), "--out", str(tmp_path / "two")]) == 0
    assert "Report written (2 runs; best " in capsys.readouterr().out


def test_the_per_class_table_gives_a_3class_runs_recall_interval_as_fit_recorded_it(tmp_path):
    """`runs show` printed a 3-class run's per-class recall intervals (fit records them), the report's
    per-class table only the points: it gives them now, and says where they come from; a run that recorded
    none (fit before them) keeps its table as it was."""
    runs = tmp_path / "runs"
    folder = write_3class_run(runs, "20240102-000000-logreg-3c000000", quality=1.5, seed=71)
    res = build_report(runs, tmp_path / "before", ReportOptions(detail=1))
    assert "recall with its 95% interval" not in " ".join(res.markdown.read_text().split())
    metrics = json.loads((folder / "metrics.json").read_text())
    metrics["test"] = {**(metrics.get("test") or {"n": 60}), "ci": {"per_class_recall": {
        "bacteria": [0.41, 0.82], "normal": [0.52, 0.9], "virus": [0.53, 0.9]}}}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    info = json.loads((folder / "run.json").read_text())
    info.get("records", {}).pop("metrics.json", None)  # the fake's record of the old file: not a hand edit
    (folder / "run.json").write_text(json.dumps(info))
    res = build_report(runs, tmp_path / "after", ReportOptions(detail=1))
    text = " ".join(res.markdown.read_text().split())
    assert "recall with its 95% interval as fit recorded it (patient bootstrap; exact Clopper-Pearson" in text
    y, p = _read_preds(folder / "predictions_test.csv")
    virus = CLASSES_3.index("virus")
    recall = float(np.mean(p[y == virus].argmax(axis=1) == virus))
    assert f"{recall:.3f} \\[0.53, 0.90\\] |" in text  # Markdown escapes the brackets
    assert f"{recall:.3f} [0.53, 0.90]" in res.html.read_text()


def test_the_caution_gives_a_3class_run_each_class_share_not_the_non_normal_one(tmp_path):
    """The "Read with care" line of a 3-class run on data with its own test split read "test 55.6%, train
    51.2% of images are not NORMAL": a binary task's words, hiding the class shift a 3-class run meets
    (virus 16.7% of the test images, 24.4% of the training ones). A binary run of the folder keeps them."""
    runs = tmp_path / "runs"
    counts = {"binary": {"train": {"NORMAL": 40, "PNEUMONIA": 42}, "test": {"NORMAL": 16, "PNEUMONIA": 20}},
              "3class": {"train": {"normal": 40, "bacteria": 22, "virus": 20},
                         "test": {"normal": 16, "bacteria": 14, "virus": 6}}}
    for i, task in enumerate(("binary", "3class")):
        rid = f"2024010{i}-000000-logreg-0000000{i}"
        folder = (write_3class_run(runs, rid, quality=2, seed=i) if task == "3class"
                  else write_fake_run(runs, rid, seed=i))
        run = json.loads((folder / "run.json").read_text())
        run["dataset"].update(counts=counts[task], images_digest="ab" * 8)
        (folder / "run.json").write_text(json.dumps(run))
    md_text = " ".join(build_report(runs, tmp_path / "out").markdown.read_text(encoding="utf-8").split())
    caution = md_text.split("**Read with care:**")[1].split("> **")[0]
    assert ("task 3class, the classes' shares of the images are: test bacteria 38.9%, normal 44.4%, virus "
            "16.7%; train bacteria 26.8%, normal 48.8%, virus 24.4%") in caution
    assert "test 55.6%, train 51.2% of images are not NORMAL" in caution  # the binary run's, as it was
    assert caution.count("not NORMAL") == 1


def test_a_validation_only_report_says_why_its_validation_scores_have_no_interval(tmp_path, capsys,
                                                                                  monkeypatch):
    """Validation-only runs: the headline gave "validation accuracy 0.951 (5-fold CV, n=82)" and "test: not
    used", and the terminal a "test accuracy [95% CI]" column of "—", with no word on why the validation
    score had no interval; both say it now, and a report with a test split keeps its interval column."""
    monkeypatch.setenv("COLUMNS", "250")
    runs = tmp_path / "runs"
    write_fake_run(runs, "20240101-000001-logreg-aaaaaaaa", test=False)
    write_fake_run(runs, "20240101-000002-logreg-bbbbbbbb", test=False, seed=2)
    assert run(["report", "--runs-dir", str(runs), "--out", str(tmp_path / "out")]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "test accuracy [95% CI]" not in out  # no column of "—"
    assert "No test split: validation scores get no interval, as they chose the configs" in out
    text = " ".join((tmp_path / "out" / "report.md").read_text().split())
    hero = text[:text.index("**Read with care:**")]
    assert "**test:** not used (validation only, validation scores get no interval, as they chose" in hero
    write_fake_run(runs, "20240101-000003-logreg-cccccccc", seed=3, quality=3)  # tested: as it was
    assert run(["report", "--runs-dir", str(runs), "--out", str(tmp_path / "out2")]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "test accuracy [95% CI]" in out and "No test split" not in out


def test_balanced_accuracy_is_said_to_be_the_macro_average_recall(tmp_path):
    """Ranked by balanced accuracy, the leaderboard's 0.833 and the per-class table's macro-average recall
    0.833 were one number shown twice, and nothing said so; the caption says what balanced accuracy is, and
    each per-class table that its recall is that score. Ranked by accuracy, neither sentence appears."""
    runs = tmp_path / "runs"
    for i in range(2):
        write_3class_run(runs, f"2024010{i}-000000-logreg-3c00000{i}", quality=1.0 + i, seed=80 + i)
    res = build_report(runs, tmp_path / "out", ReportOptions(metric="balanced_accuracy", detail=2))
    text = " ".join(res.markdown.read_text().split())
    assert "balanced accuracy is the unweighted mean of the classes' recalls (macro recall" in text
    assert text.count("its recall is the test balanced accuracy of the leaderboard") == 2
    for row in json.loads(res.json.read_text())["runs"]:  # the sentence is true: the two numbers agree
        y, proba = _read_preds(runs / row["run_id"] / "predictions_test.csv")
        recalls = [np.mean(proba[y == c].argmax(axis=1) == c) for c in range(3)]
        assert abs(row["test_balanced_accuracy"] - np.mean(recalls)) < 1e-12
        assert re.search(rf"\| macro average \| [0-9.]+ \| {np.mean(recalls):.3f} \|", text)
    plain = " ".join(build_report(runs, tmp_path / "acc").markdown.read_text().split())
    assert "balanced accuracy is" not in plain and "its recall is the" not in plain


def test_a_threshold_rule_other_than_youden_is_in_the_config_that_tells_runs_apart(tmp_path):
    """One config fitted with --threshold youden and with --threshold sensitivity:0.9: the same scores at
    0.5, and the terminal's leaders table and the report's config columns read the same for both, while
    their chosen thresholds and the numbers at them differ."""
    from featcache.cli.report_cmd import _leaders_table
    from rich.console import Console

    runs = tmp_path / "runs"
    write_fake_run(runs, "20240101-000001-logreg-00000001", params={"C": 1.0}, seed=5, threshold=0.5)
    folder = write_fake_run(runs, "20240101-000002-logreg-00000002", params={"C": 1.0}, seed=5,
                            threshold=0.2)
    info = json.loads((folder / "run.json").read_text())
    info["threshold"] = {"method": "sensitivity", "target_sensitivity": 0.9, "youden": 0.5, "chosen": 0.2}
    (folder / "run.json").write_text(json.dumps(info))
    res = build_report(runs, tmp_path / "out", ReportOptions(detail=0))
    configs = {r["run_id"]: r["config"] for r in json.loads(res.json.read_text())["runs"]}
    assert configs == {"20240101-000001-logreg-00000001": "C=1",
                       "20240101-000002-logreg-00000002": "C=1, threshold=sensitivity:0.9"}
    out = Console(record=True, width=200)
    out.print(_leaders_table(res))
    rows = [ln.split() for ln in out.export_text().splitlines() if ln[:1].isdigit()]
    assert len(rows) == 2 and len({" ".join(r[1:]) for r in rows}) == 2  # the two rows no longer read alike
    assert all("C=1" in " ".join(r) for r in rows)  # the Youden run's, all shared, did not read "(defaults)"
    assert "| C=1, threshold=sensitivity:0.9 |" in res.markdown.read_text()


def test_a_validation_only_report_speaks_of_no_test_column_or_test_interval(tmp_path):
    """A validation-only report's CV grid caption said the leaderboard's "test columns do not" lean
    optimistic, and its footer that the 95% CIs resample test patients: there was no test column and no
    test interval. With a test split both say what they said before."""
    for tested in (False, True):
        runs = tmp_path / f"runs-{tested}"
        folder = write_fake_run(runs, "20240101-000001-logreg-aaaaaaaa", params={"C": 1.0}, test=tested)
        m = json.loads((folder / "metrics.json").read_text())
        m["cv_results"] = {"params": [{"C": 0.1}, {"C": 1.0}], "mean_test_score": [0.8, 0.9],
                           "std_test_score": [0.01, 0.02], "rank_test_score": [2, 1]}
        (folder / "metrics.json").write_text(json.dumps(m))
        res = build_report(runs, tmp_path / f"out-{tested}")
        text = " ".join(res.markdown.read_text().split()).replace("\\", "")
        caption = text[text.index("Highlighted: the config the search chose"):]
        caption = caption[:caption.index("*", 1)]
        footer = text[text.index("Generated by featcache"):]
        assert ("the test columns do not" in caption) == tested
        assert ("no test split to check them against" in caption) == (not tested)
        assert ("resampling test patients" in footer) == tested
        assert ("No run has a test split, so no score has a confidence interval" in footer) == (not tested)


def test_best_of_n_configs_counts_a_search_fitted_again_with_another_threshold_rule_once(tmp_path):
    """A logreg search fitted under --threshold youden and again under sensitivity:0.9 scored the same
    configs on the same validation folds, but "Best of many" (and Methods) said "the best of 4 configs" for
    its 2. Searches that differ in what they score (here the seed, which draws other folds) still add up."""
    def search(runs: Path, run_id: str, seed: int, rule: str) -> None:
        folder = write_fake_run(runs, run_id, params={"C": 1.0}, seed=seed)
        m = json.loads((folder / "metrics.json").read_text())
        m["cv_results"] = {"params": [{"C": 0.1}, {"C": 1.0}], "mean_test_score": [0.8, 0.9],
                           "std_test_score": [0.01, 0.02], "rank_test_score": [2, 1]}
        (folder / "metrics.json").write_text(json.dumps(m))
        info = json.loads((folder / "run.json").read_text())
        info["threshold"] = {"method": rule, "target_sensitivity": 0.9 if rule == "sensitivity" else None,
                             "youden": 0.4, "chosen": 0.4}
        (folder / "run.json").write_text(json.dumps(info))

    for seed, n in ((5, 2), (6, 4)):
        runs = tmp_path / f"runs-{seed}"
        search(runs, "20240101-000001-logreg-00000001", 5, "youden")
        search(runs, "20240101-000002-logreg-00000002", seed, "sensitivity")
        text = " ".join(build_report(runs, tmp_path / f"out-{seed}", ReportOptions(detail=0))
                        .markdown.read_text().split())
        assert text.count(f"The best validation score is the best of {n} configs ") == 2  # note, Methods
