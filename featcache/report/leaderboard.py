"""The leaderboard: one row per run, sorted by a validation metric, with test metrics and CIs.

Runs are ranked on validation data only (the test split must not choose the model); test columns
are shown next to them so a reader sees how much the validation ranking overstates real performance.
"""

from __future__ import annotations

import csv
import json
import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from featcache.errors import ConfigError
from featcache.report.collect import RunRecord
from featcache.report.scores import LOWER_IS_BETTER, METRICS, bootstrap_ci, chosen_threshold, scores
from featcache.runs import SHEET_TRIGGERS, grid_index, params_string, training_settings

GROUP_BY = ("backbone", "head", "task", "dataset")
THR_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "sensitivity", "specificity")
CI_METRICS = ("accuracy", "macro_f1", "auc", "sensitivity", "specificity", "loss")
# fit records the loss's interval as "log_loss" (the leaderboard's column is "loss"): without the mapping a
# report ranked by loss said "no interval computed" while metrics.json and `runs show` had one
CI_KEY = {"loss": "log_loss"}
THRESHOLD_FREE_CI = {"auc", "loss"}  # scored on probabilities: no second interval at the chosen threshold
BINARY_ONLY = ("sensitivity", "specificity")
# What ranks a group (or an ungrouped leaderboard) none of whose runs has the metric asked for: these are
# defined for binary tasks only, and a 3-class group ordered by the tie-break alone named an arbitrary run
# its best. The stand-in measures the same kind of thing on every task: AUC is threshold-free like average
# precision, balanced accuracy is the mean of the per-class recalls that sensitivity and specificity are.
FALLBACK = {"average_precision": "auc", "sensitivity": "balanced_accuracy",
            "specificity": "balanced_accuracy"}


def config_string(params: dict, run: dict | None = None) -> str:
    """``key=value`` pairs in a stable order: the config column of every table; with ``run`` (run.json),
    followed by the training settings beside the head's params (``training_settings``) and the threshold
    rule where it is not the default (``threshold_setting``)."""
    pairs = [params_string(params)] if params else []
    pairs += [f"{k}={v}" for k, v in {**training_settings(run or {}), **threshold_setting(run or {})}.items()]
    return ", ".join(p for p in pairs if p)


def threshold_setting(run: dict) -> dict[str, str]:
    """``{"threshold": "sensitivity:0.9"}`` for a binary run whose threshold fit chose by another rule than
    the default Youden's J (``fit --threshold``), as the flag spells it; ``{}`` otherwise.

    Why: the same config fitted with ``--threshold youden`` and with ``--threshold sensitivity:0.9`` is two
    runs with the same scores at 0.5, and their rows read alike in the terminal's leaders table and in every
    config column of the report, though their chosen thresholds and the numbers at them differ."""
    thr = run.get("threshold")
    if not isinstance(thr, dict) or thr.get("method") in (None, "youden"):
        return {}
    target = thr.get("target_sensitivity")
    numeric = isinstance(target, int | float) and not isinstance(target, bool)
    if thr.get("method") == "sensitivity" and numeric:
        return {"threshold": f"sensitivity:{target:g}"}
    return {"threshold": str(thr.get("method"))}


def _recorded(metrics: dict, split: str) -> dict:
    block = metrics.get(split)
    return block if isinstance(block, dict) else {}


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return None if math.isnan(value) else float(value)


def _train_metrics(rec: RunRecord) -> dict[str, float | None]:
    """Training-set loss/accuracy/F1 as fit recorded them (fit keeps no training predictions)."""
    train = _recorded(rec.metrics, "train")
    hist = rec.metrics.get("history") if isinstance(rec.metrics.get("history"), dict) else {}
    loss = _num(train.get("loss", train.get("log_loss")))
    if loss is None and hist.get("loss"):
        loss = _num(hist["loss"][-1])
    acc = _num(train.get("accuracy"))
    if acc is None and hist.get("accuracy"):
        acc = _num(hist["accuracy"][-1])
    return {
        "train_loss": loss,
        "train_accuracy": acc,
        "train_macro_f1": _num(train.get("macro_f1", train.get("f1"))),
    }


def _split_columns(rec: RunRecord, split: str, threshold: float | None) -> dict[str, Any]:
    pred = getattr(rec, split)
    out: dict[str, Any] = {}
    if pred is not None and len(pred.y_true):
        at_half = scores(pred, 0.5)
        at_thr = scores(pred, threshold) if threshold is not None else {}
        for m in METRICS:
            out[f"{split}_{m}"] = _num(at_half.get(m))
        for m in THR_METRICS:
            out[f"{split}_{m}_thr"] = _num(at_thr.get(m))
        out[f"n_{split}"] = at_half["n"]
        if split == "test":
            test_m = rec.metrics.get("test") if isinstance(rec.metrics.get("test"), dict) else {}
            for suffix, thr in (("", 0.5), ("_thr", threshold)):
                if suffix and thr is None:
                    continue
                # the fit's own intervals (its --seed and resamples; 3-class AUC too) where recorded, so one
                # run is published with one CI; recomputed from the CSV only for runs that lack them
                where = (test_m.get("at_threshold") or {}) if suffix else test_m
                recorded = where.get("ci") if isinstance(where.get("ci"), dict) else {}
                wanted = [m for m in CI_METRICS if not (suffix and m in THRESHOLD_FREE_CI)
                          and (m not in BINARY_ONLY or pred.proba.shape[1] == 2)]
                pairs = {m: recorded[CI_KEY.get(m, m)] for m in wanted
                         if isinstance(recorded.get(CI_KEY.get(m, m)), list | tuple)
                         and len(recorded[CI_KEY.get(m, m)]) == 2}
                if len(pairs) < len(wanted):  # a run that recorded none (or not all): bootstrap the CSV
                    computed = bootstrap_ci(pred, thr)
                    pairs.update({m: computed[CI_KEY.get(m, m)] for m in wanted
                                  if m not in pairs and CI_KEY.get(m, m) in computed})
                for m, (lo, hi) in pairs.items():
                    out[f"test_{m}{suffix}_lo"], out[f"test_{m}{suffix}_hi"] = _num(lo), _num(hi)
        return out
    rec_m = _recorded(rec.metrics, split)
    for m in METRICS:
        out[f"{split}_{m}"] = _num(rec_m.get(m, rec_m.get("log_loss") if m == "loss" else None))
    out[f"n_{split}"] = rec_m.get("n")
    ci = rec_m.get("ci") if isinstance(rec_m.get("ci"), dict) else {}
    for m in CI_METRICS:
        pair = ci.get(CI_KEY.get(m, m))
        if isinstance(pair, list | tuple) and len(pair) == 2:
            out[f"test_{m}_lo"], out[f"test_{m}_hi"] = _num(pair[0]), _num(pair[1])
    return out


def features_id(rec: RunRecord) -> str:
    """The first 12 hex digits of the features digest of each cache the run trained on ('+'-joined).

    Why: two caches with the same settings can hold different values (another Keras backend, batch size or
    oneDNN setting), and runs on them differ though their backbone and config read the same."""
    caches = rec.run.get("caches") if isinstance(rec.run.get("caches"), list) else []
    return "+".join(str(c.get("features_digest") or "?")[:12] for c in caches if isinstance(c, dict))


def keras_backend_of(rec: RunRecord) -> str | None:
    """The Keras backend the run recorded (runs before it was recorded: $KERAS_BACKEND if it was set)."""
    env = rec.run.get("environment") if isinstance(rec.run.get("environment"), dict) else {}
    variables = env.get("variables") if isinstance(env.get("variables"), dict) else {}
    return env.get("keras_backend") or variables.get("KERAS_BACKEND")


def run_row(rec: RunRecord) -> dict[str, Any]:
    """All leaderboard columns of one run (unranked)."""
    thr = chosen_threshold(rec)
    row: dict[str, Any] = {
        "run_id": rec.id,
        "sweep_id": rec.run.get("sweep_id"),
        "backbone": rec.backbone + (" (random weights)" if rec.random_weights else ""),
        "dataset": rec.dataset,
        "validation": rec.validation,
        "preset": rec.run.get("preset"),
        "head": rec.head,
        "task": rec.task,
        "config": config_string(rec.params, rec.run),
        "params": rec.params,
        "training": training_settings(rec.run),
        "tags": rec.tags,
        "seed": rec.run.get("seed"),
        "features": features_id(rec),
        "keras_backend": keras_backend_of(rec),
        "created": rec.run.get("created"),
        "threshold": thr,
    }
    preds = rec.test or rec.val
    if preds is not None and len(preds.classes) == 2:
        row["positive_class"] = preds.classes[1]  # what sensitivity is of
    row.update(_split_columns(rec, "val", thr))
    row.update(_split_columns(rec, "test", thr))
    row.update(_train_metrics(rec))
    return row


def _signed(row: dict, metric: str) -> tuple[bool, float]:
    """(missing, value turned so that smaller is better) of the validation ``metric``."""
    value = row.get(f"val_{metric}")
    if value is None:
        return True, 0.0
    return False, value if metric in LOWER_IS_BETTER else -value


def _sort_key(row: dict, metric: str, run: dict) -> tuple:
    """Best validation score first; runs without it last, by the metric's FALLBACK; ties in an order the
    runs' contents fix: sweep, place in its grid (GridSearchCV's rule: the earlier config wins a tie),
    config hash. Why not the run id: it starts with the second the run was written, so the same commands
    run again could rank tied runs the other way round and name another run the best."""
    missing, signed = _signed(row, metric)
    stand_in = _signed(row, FALLBACK[metric]) if missing and metric in FALLBACK else (False, 0.0)
    index = grid_index(run)
    return (missing, signed, *stand_in, str(run.get("sweep_id") or ""), -1 if index is None else index,
            str(run.get("config_hash") or ""), row["run_id"])


def by_group(rows: Sequence[dict]) -> dict[str, list[dict]]:
    """Rows by their ``group`` ("" for all of them without --group-by), in the order given."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(str(row.get("group") or ""), []).append(row)
    return groups


def build_leaderboard(
    runs: Sequence[RunRecord], metric: str = "accuracy", group_by: str | None = None, top: int | None = None
) -> list[dict[str, Any]]:
    """Rows sorted by validation ``metric`` (best first); grouped, groups ordered by their best run.

    ``ranked_by`` is the metric that ranks the row's group: ``metric``, or its FALLBACK where no run of the
    group has ``metric`` (average_precision of 3-class runs), ``score`` that metric's validation value.
    ``rank`` is the place within the row's group (1..k in each group: a grouped leaderboard is read group
    by group, and a group's best run shown as "#4" read as if three runs of that group beat it);
    ``overall_rank`` is the place among all runs (the same as ``rank`` without grouping). ``top`` keeps the
    best N of each group (of all runs without grouping).
    """
    if metric not in METRICS:
        raise ConfigError(f"--metric: unknown metric '{metric}'; choose one of: {', '.join(METRICS)}.")
    if group_by is not None and group_by not in GROUP_BY:
        raise ConfigError(f"--group-by: cannot group by '{group_by}'; choose one of: {', '.join(GROUP_BY)}.")
    if top is not None and top < 1:
        raise ConfigError("--top must be at least 1.")
    pairs = sorted(((run_row(r), r.run) for r in runs), key=lambda p: _sort_key(p[0], metric, p[1]))
    rows = [row for row, _ in pairs]
    for i, row in enumerate(rows, 1):
        row["overall_rank"] = i
        row["score"] = row.get(f"val_{metric}")
        row["group"] = str(row[group_by]) if group_by else ""
    groups = by_group(rows)  # rows are sorted: each group's first row is its best, dict order = group order
    out: list[dict] = []
    for members in groups.values():
        stand_in = FALLBACK.get(metric)
        without = all(r["score"] is None for r in members)
        has_stand_in = stand_in is not None and any(r.get(f"val_{stand_in}") is not None for r in members)
        ranked_by = stand_in if without and has_stand_in else metric
        for i, r in enumerate(members, 1):
            r["rank"] = i
            r["ranked_by"] = ranked_by
            r["score"] = r.get(f"val_{ranked_by}")
        scores = Counter(r["score"] for r in members if r["score"] is not None)
        for r in members:  # before --top trims: a tie with a run left out is still a tie
            r["tied"] = scores[r["score"]] if r["score"] is not None else None
        out.extend(members)
    return top_of_groups(out, top)


def top_of_groups(rows: list[dict[str, Any]], top: int | None) -> list[dict[str, Any]]:
    """The best ``top`` rows of each group of a built leaderboard (all of them when ``top`` is None).

    Why apart from ``build_leaderboard``: the report ranks every selected run once and shows the top ones,
    while its methods and grid views describe every run that was searched, not only those shown.
    """
    if not top:
        return list(rows)
    seen: Counter = Counter()
    out = []
    for row in rows:
        seen[row["group"]] += 1
        if seen[row["group"]] <= top:
            out.append(row)
    return out


CSV_FIRST = ("rank", "overall_rank", "group", "run_id", "dataset", "backbone", "head", "task", "config",
             "tags", "validation", "ranked_by", "score", "tied", "threshold")


def csv_columns(rows: Sequence[dict]) -> list[str]:
    """Stable column order: identity first, then every metric column any row has."""
    rest: list[str] = []
    for row in rows:
        for key in row:
            if key not in CSV_FIRST and key not in rest and key != "params":
                rest.append(key)
    return [*CSV_FIRST, *sorted(rest), "params"]


def csv_cell(value: Any) -> str:
    """Cells as text; strings that a spreadsheet would run as a formula get a leading quote."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, dict | list):
        value = json.dumps(value, sort_keys=True)
    text = str(value)
    if text[:1] in SHEET_TRIGGERS and not _is_number(text):
        text = "'" + text
    return text


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def write_csv(rows: Sequence[dict], path: Path) -> Path:
    """leaderboard.csv (RFC 4180 quoting keeps commas, quotes and newlines in one cell)."""
    cols = csv_columns(rows)
    with open(path, "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(cols)
        for row in rows:
            writer.writerow([csv_cell(row.get(c)) for c in cols])
    return path


def write_json(rows: Sequence[dict], path: Path, meta: dict) -> Path:
    """leaderboard.json: ``{"meta": {...}, "runs": [...]}``; NaN becomes null so any parser reads it."""

    def clean(v: Any) -> Any:
        if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
            return None
        if isinstance(v, dict):
            return {str(k): clean(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [clean(x) for x in v]
        return v

    with open(path, "w", encoding="utf-8") as fh:
        json.dump(clean({"meta": meta, "runs": list(rows)}), fh, indent=2, default=str)
        fh.write("\n")
    return path
