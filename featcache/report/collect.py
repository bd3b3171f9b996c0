"""Load finished runs from a run store and select the ones a report is about.

The report reads only what ``featcache/runs.py`` wrote (run.json, metrics.json, prediction CSVs), so it
can be rebuilt at any time without the cache or the models. Metrics are recomputed from the prediction
CSVs where they exist: that makes every run comparable (same definitions, both thresholds) even when
different versions of ``fit`` recorded slightly different metric sets.
"""

from __future__ import annotations

import csv
import fnmatch
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from featcache.errors import RunError
from featcache.metrics import predict_labels
from featcache.progress import ProgressFn, emit
from featcache.runs import changed_records, edited_run_json, missing_artifacts, sheet_unquote

ASSETS = "report_files"  # the report's figure folder (report.md's links), beside report.html


@dataclass
class Predictions:
    """One prediction CSV: true class indices and class probabilities, row-aligned."""

    relpaths: list[str]
    y_true: np.ndarray  # int [n], index into ``classes``
    proba: np.ndarray  # float [n, K]
    classes: list[str]
    groups: list[str] | None = None  # patient ids (bootstrap resamples patients when present)


@dataclass
class RunRecord:
    """Everything the report needs about one finished run."""

    id: str
    path: Path
    run: dict
    metrics: dict
    val: Predictions | None = None
    test: Predictions | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def head(self) -> str:
        return str(self.run.get("head") or "?")

    @property
    def task(self) -> str:
        return str(self.run.get("task") or "?")

    @property
    def backbone(self) -> str:
        """Backbone name(s) as one string (a run may concatenate several backbones' features)."""
        bbs = self.run.get("backbones") or []
        names = [b.get("name", "?") if isinstance(b, dict) else str(b) for b in bbs]
        return "+".join(names) if names else "?"

    @property
    def random_weights(self) -> bool:
        """Any backbone with ``--weights none``: its features, and so its accuracy, mean nothing."""
        return bool(self.random_backbones)

    @property
    def random_backbones(self) -> list[str]:
        """The backbones of this run with ``--weights none``: in a fused run with one such backbone, the
        "random weights" notes named "mobilenet-0.75+mobilenet", the ImageNet one too."""
        bbs = self.run.get("backbones") or []
        return [str(b.get("name", "?")) for b in bbs if isinstance(b, dict) and b.get("weights") == "none"]

    @property
    def dataset(self) -> str:
        """The dataset folder (or manifest file) the run used, with its content digest's first 8 hex digits
        when recorded: a folder whose images changed between two fits is two datasets.

        The digest is of the images as the folder labels them (``images_digest``), so binary and 3-class
        runs of one folder are one dataset; runs fit before it was recorded fall back to the data digest,
        which includes the task's labels.
        """
        ds = self.run.get("dataset") if isinstance(self.run.get("dataset"), dict) else {}
        # a manifest is named by its file: two manifests of one folder (a subset, a relabelling) were both
        # named by the folder, told apart only by their digests
        root = str(ds.get("manifest") or ds.get("root") or "?")
        digest = ds.get("images_digest") or ds.get("digest")
        return f"{root} @{digest[:8]}" if isinstance(digest, str) and digest else root

    @property
    def validation(self) -> str:
        """How the validation numbers were made: out-of-fold CV over all training images, or a hold-out
        (which for an mlp also chose its stopping epoch): the two are not equally reliable."""
        sel = self.run.get("selection") if isinstance(self.run.get("selection"), dict) else {}
        method, n = sel.get("method"), sel.get("n_val_images")
        if method == "grouped_kfold":
            folds = sel.get("folds")
            kind = f"{len(folds) if isinstance(folds, list) else folds or '?'}-fold CV"
        elif method == "grouped_holdout":
            kind = "hold-out"
        else:
            kind = str(method or "?")
        return f"{kind}, n={n}" if isinstance(n, int) else kind

    @property
    def params(self) -> dict:
        p = self.run.get("params")
        return p if isinstance(p, dict) else {}

    @property
    def tags(self) -> list[str]:
        return [str(t) for t in (self.run.get("tags") or [])]


def _load_json(path: Path) -> dict:
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    return data


def _parse_float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan


def read_predictions(path: Path) -> Predictions:
    """Parse ``relpath,key,y_true,p_<class>...,y_pred``; y_true may be a class index or a class name."""
    with open(path, encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader)
        rows = list(reader)
    pcols = [i for i, h in enumerate(header) if h.startswith("p_")]
    if "y_true" not in header or not pcols:
        raise ValueError("missing y_true or p_<class> columns")
    classes = [header[i][2:] for i in pcols]
    yi = header.index("y_true")
    ri = header.index("relpath") if "relpath" in header else None
    y: list[int] = []
    for r in rows:
        raw = r[yi]
        if raw in classes:
            y.append(classes.index(raw))
        else:
            y.append(int(float(raw)))
    proba = np.array([[_parse_float(r[i]) for i in pcols] for r in rows], dtype=float).reshape(len(rows), -1)
    relpaths = [sheet_unquote(r[ri]) if ri is not None else "" for r in rows]
    gi = header.index("group") if "group" in header else None
    groups = [sheet_unquote(r[gi]) for r in rows] if gi is not None else None
    return Predictions(relpaths, np.asarray(y, dtype=int), proba, classes, groups)


def load_run(path: Path) -> RunRecord:
    """Read one run folder; raises ValueError/OSError when run.json itself is unusable."""
    run = _load_json(path / "run.json")
    rec = RunRecord(id=str(run.get("id") or path.name), path=path, run=run, metrics={})
    mpath = path / "metrics.json"
    if mpath.is_file():
        try:
            rec.metrics = _load_json(mpath)
        except (OSError, ValueError) as exc:
            rec.problems.append(f"metrics.json unreadable ({exc})")
    for split in ("val", "test"):
        ppath = path / f"predictions_{split}.csv"
        if ppath.is_file():
            try:
                setattr(rec, split, read_predictions(ppath))
            except (OSError, ValueError, IndexError, StopIteration) as exc:
                rec.problems.append(f"predictions_{split}.csv unreadable ({exc})")
    rec.problems += changed_records(path, run) if run.get("records") else _disagreements(rec)
    rec.problems += missing_artifacts(path, run)  # as `runs ls`: a run without its model is not a result
    if not rec.problems:
        rec.problems += edited_run_json(run, rec.metrics)
    return rec


def _disagreements(rec: RunRecord) -> list[str]:
    """Prediction CSVs that contradict metrics.json, for runs written before run.json had ``records``.

    Why: the report recomputes its numbers from the CSVs; one cut short or edited would otherwise be
    published beside the fit's recorded confidence interval.
    """
    problems = []
    for split in ("val", "test"):
        preds, recorded = getattr(rec, split), rec.metrics.get(split)
        if preds is None or not isinstance(recorded, dict):
            continue
        n = recorded.get("n")
        if isinstance(n, int) and n != len(preds.y_true):
            problems.append(f"predictions_{split}.csv has {len(preds.y_true)} rows, metrics.json says {n}")
            continue
        acc = recorded.get("accuracy")
        if isinstance(acc, float) and len(preds.y_true) and not np.isnan(preds.proba).any():
            mine = float(np.mean(predict_labels(preds.proba) == preds.y_true))  # fit's rule at 0.5
            if abs(mine - acc) > 1e-9:
                problems.append(f"predictions_{split}.csv gives accuracy {mine:.4f}, metrics.json {acc:.4f}")
    return problems


def load_runs(
    runs_dir: Path, progress: ProgressFn | None = None
) -> tuple[list[RunRecord], list[tuple[str, str]]]:
    """All runs with ``status == "done"``, plus (folder, reason) for every folder left out.

    Unfinished and failed runs are left out on purpose: a report must never mix a half-trained
    model into a leaderboard; listing them tells the reader why a run is missing.
    """
    runs_dir = Path(runs_dir)
    if runs_dir.exists() and not runs_dir.is_dir():
        raise RunError(f"--runs-dir {runs_dir} is a file, not a folder; point --runs-dir at the folder "
                       "`featcache fit` wrote its runs into.")
    if not runs_dir.is_dir():
        raise RunError(
            f"runs folder {runs_dir} does not exist; train heads with `featcache fit` first "
            "or point --runs-dir at an existing runs folder."
        )
    folders = sorted(p for p in runs_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    runs: list[RunRecord] = []
    skipped: list[tuple[str, str]] = []
    for i, folder in enumerate(folders):
        emit(progress, "report", i, len(folders), f"reading {folder.name}")
        if not (folder / "run.json").is_file():
            if folder.name != ASSETS:  # a report written into the runs folder: not a run
                skipped.append((folder.name, "no run.json"))
            continue
        try:
            rec = load_run(folder)
        except (OSError, ValueError) as exc:
            skipped.append((folder.name, f"run.json unreadable ({exc})"))
            continue
        status = rec.run.get("status")
        if status != "done":
            skipped.append((folder.name, f"status {status!r}"))
            continue
        if not rec.metrics:  # a done run always has its metrics: without them it has no leaderboard row
            skipped.append((folder.name, "; ".join(rec.problems) or "metrics.json missing or empty"))
            continue
        if rec.problems:  # changed or damaged result files: its numbers cannot be trusted
            skipped.append((folder.name, "; ".join(rec.problems) + "; restore the files or fit it again"))
            continue
        runs.append(rec)
    emit(progress, "report", len(folders), len(folders), "runs read")
    return runs, skipped


def select_runs(
    runs: Sequence[RunRecord], tags: Sequence[str] = (), ids: Sequence[str] = ()
) -> list[RunRecord]:
    """Keep runs carrying any of ``tags`` and whose id matches any glob in ``ids`` (empty = no filter).

    A pattern without glob characters matches as a substring, so ``--id mlp`` does what users expect.
    """

    def id_ok(run_id: str) -> bool:
        if not ids:
            return True
        for pat in ids:
            if any(ch in pat for ch in "*?["):
                if fnmatch.fnmatchcase(run_id, pat):
                    return True
            elif pat in run_id:
                return True
        return False

    wanted = set(tags)
    return [r for r in runs if id_ok(r.id) and (not wanted or wanted.intersection(r.tags))]
