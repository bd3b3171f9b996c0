"""Build the report: runs → leaderboard → document → report.html / report.md / leaderboard.csv / .json.

The page is organised so a reader gets the answer first (best run, its validation and test numbers,
the caveats that matter on this dataset), then the evidence (leaderboard, per-run plots, grid views),
then what is needed to trust and reproduce it (dataset audit, provenance).
"""

from __future__ import annotations

import datetime as _dt
import functools
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from featcache.errors import ConfigError, FeatcacheError, RunError, naming
from featcache.faults import crash_point
from featcache.fit import check_tags
from featcache.progress import ProgressFn, emit
from featcache.report import plots
from featcache.report.collect import ASSETS, Predictions, RunRecord, load_runs, select_runs
from featcache.report.document import Code, Document, Figure, Heading, Hero, Para, Stat, Table
from featcache.report.html import render_html
from featcache.report.leaderboard import (
    FALLBACK,
    build_leaderboard,
    by_group,
    config_string,
    keras_backend_of,
    top_of_groups,
    write_csv,
    write_json,
)
from featcache.report.markdown import render_markdown
from featcache.report.scores import (
    LOWER_IS_BETTER,
    THRESHOLD_FREE,
    chosen_threshold,
    macro_average,
    paired_difference,
    per_class,
    subtype_sensitivity,
)
from featcache.runs import (
    describe_trainer,
    epochs_text,
    format_value,
    grid_index,
    replay_command,
    resampled_words,
    training_settings,
)

OVERSTATE_NOTE = (
    "validation accuracy on this dataset overstates test accuracy. The official Kermany test split differs "
    "from the training split in class balance (63% vs 74% pneumonia) and in appearance, so expect test "
    "accuracy 5–15 points below validation accuracy. Runs are ranked on validation data only."
)
GENERIC_OVERSTATE_NOTE = (
    "validation numbers estimate test numbers only as far as the test images resemble the training images "
    "(same sources, same class balance). Runs are ranked on validation data only."
)
NO_TEST_NOTE = (
    "validation only; the official test split was not used. Every number below is a validation estimate "
    "(fit --test-fraction 0.2 holds out a patient-grouped test split of the training images)."
)
NO_TEST_SPLIT_NOTE = (  # data that is not the Kermany layout has no "official" test split to speak of
    "validation only: the data has no test split (no test/ folder, no split=test rows in a manifest). Every "
    "number below is a validation estimate (fit --test-fraction 0.2 holds out a patient-grouped test split)."
)
# why a validation score has no interval, where a run has no test split (the headline gave validation accuracy
# 0.951 "n=82" with no interval and no word why, so a reader could publish it as if it were a test estimate)
NO_VALIDATION_CI = (
    "validation scores get no interval, as they chose the configs and rank the runs: an interval around a "
    "score that won a comparison would not cover that optimism; fit --test-fraction 0.2 holds out a "
    "patient-grouped test split, scored once with 95% CIs"
)
DEMO_NOTE = (
    "this is featcache's bundled demo sample (96 images). Its 'test' split was carved from the official "
    "Kermany TRAINING split (patient-disjoint from the demo's train split); it is NOT the official test set, "
    "and with 24 images its numbers are very uncertain and not comparable with published results."
)


@dataclass
class ReportOptions:
    """What to include and how to rank (the `featcache report` flags)."""

    metric: str | None = None  # None: the metric the runs were selected by when they agree, else accuracy
    group_by: str | None = None  # "backbone" | "head" | "task"
    top: int | None = None  # best N runs per group in the leaderboard
    tags: Sequence[str] = ()
    ids: Sequence[str] = ()  # glob patterns (substring when no glob characters)
    run_ids: Sequence[str] | None = None  # exact run ids (e.g. the runs one `featcache run` call made)
    heatmap: tuple[str, str] | None = None
    detail: int = 3  # runs that get confusion matrices / ROC / training curves
    inspect_data: bool = True  # re-audit the dataset folder when it still exists
    notes: Sequence[str] = ()  # extra callouts (e.g. from `featcache run`)
    title: str = "featcache report"
    figure_formats: Sequence[str] = ()  # vector copies of every figure in report_files/ ("svg", "pdf")


@dataclass
class ReportResult:
    out_dir: Path
    html: Path
    markdown: Path
    csv: Path
    json: Path
    n_runs: int
    best_run_id: str | None
    skipped: list[tuple[str, str]] = field(default_factory=list)
    metric: str = "accuracy"
    leaders: list[dict] = field(default_factory=list)  # the best rows (leaderboard columns), for the terminal
    # backbones of ranked runs with --weights none: the terminal warns as the report's callout does, since
    # its leaders table alone shows their accuracy as if it measured the method
    random_weights: list[str] = field(default_factory=list)
    # task -> run id of its best, where the ranked runs are of several tasks (no one best across them)
    best_by_task: dict[str, str] = field(default_factory=dict)
    # --group-by as given: the terminal's "ranked together" warning is false where each group is one task
    group_by: str | None = None
    # the datasets of the ranked runs where there are several (and --group-by is not dataset): the report's
    # "Mixed datasets" callout, which the terminal lacked, so after `featcache demo` in the same folder the
    # demo's runs topped a user's own in the printed table without a word
    mixed_datasets: list[str] = field(default_factory=list)


def _f(value: Any, digits: int = 3) -> str:
    return "—" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{value:.{digits}f}"


def _ci(row: dict, key: str) -> str:
    """``value [lo–hi]``, or the value alone when the run has no interval for it."""
    base, interval = _f(row.get(key)), _interval(row, key, 3)
    return f"{base} [{interval}]" if interval != "—" and base != "—" else base


def _is_demo(dataset: dict) -> bool:
    """Whether a run's dataset is the bundled demo: its folder, or a copy of it anywhere (the same
    ``images_digest``: images, paths, labels, splits and patients), which a path test missed."""
    try:
        from featcache.pipeline import demo_root

        root = str(dataset.get("root") or "")
        if root and Path(root).resolve() == demo_root().resolve():
            return True
        digest = dataset.get("images_digest")
        return bool(digest) and digest == _demo_images_digest()
    except (OSError, ImportError, FeatcacheError):
        return False


@functools.lru_cache(maxsize=1)
def _demo_images_digest() -> str | None:
    """The installed demo folder's ``images_digest``, as fit computes it (96 small files: milliseconds)."""
    from featcache.datasets import discover
    from featcache.fit import _images_digest
    from featcache.hashing import sha256_file
    from featcache.pipeline import demo_root

    ds = discover(demo_root())
    return _images_digest([sha256_file(r.path) for r in ds.records], ds.records)


# --------------------------------------------------------------------------------------------- summary
def _interval(row: dict, key: str, digits: int = 2) -> str:
    """``lo–hi`` of a row's 95% interval for ``key``, or "—" when it has none."""
    lo, hi = row.get(f"{key}_lo"), row.get(f"{key}_hi")
    return "—" if lo is None or hi is None else f"{_f(lo, digits)}–{_f(hi, digits)}"


def _binary(row: dict) -> bool:
    """Whether a leaderboard row is a two-class run (its predictions name a positive class; a run without
    prediction files by its task)."""
    return "positive_class" in row or row.get("task") == "binary"


def _rule(row: dict, at: str = "") -> str:
    """How a run's labels are decided: threshold 0.5 on the positive class (binary), else argmax.
    ``at``: "at " for "accuracy at threshold 0.5" / "accuracy by the most probable class"."""
    return f"{at}threshold 0.5" if _binary(row) else f"{'by ' if at else ''}the most probable class"


def _rules(rows: Sequence[dict], at: str = "") -> str:
    """:func:`_rule` of a set of runs (both, where binary and 3-class runs are mixed)."""
    kinds = {_rule(r, at) for r in rows}
    return kinds.pop() if len(kinds) == 1 else (f"{at}threshold 0.5 if binary, else "
                                                f"{'by ' if at else ''}the most probable class")


def _hero(best: dict, metric: str, has_test: bool, kicker: str = "") -> Hero:
    thr = best.get("threshold")
    stats = [
        Stat(
            f"validation {metric}",
            _f(best.get(f"val_{metric}")),
            ("" if metric in THRESHOLD_FREE else _rule(best) + " · ")
            + f"{best.get('validation') or 'n=' + str(best.get('n_val') or '?')}",
        )
    ]
    if thr is not None:
        stats.append(
            Stat(
                "validation accuracy @ chosen threshold",
                _f(best.get("val_accuracy_thr")),
                f"threshold {plots.threshold_text(thr)}, chosen on validation",
            )
        )
    if has_test and best.get("test_accuracy") is not None:
        stats.append(
            Stat(
                "test accuracy",
                _f(best.get("test_accuracy")),
                f"95% CI {_f(best.get('test_accuracy_lo'))}–{_f(best.get('test_accuracy_hi'))}"
                f" · n={best.get('n_test')}",
            )
        )
        if best.get("test_auc") is None:  # "— (95% CI —–—)" left the reader to guess why
            stats.append(Stat("test AUC", "undefined", _undefined_auc_text(best)))
        else:
            stats.append(
                Stat(
                    "test AUC",
                    _f(best.get("test_auc")),
                    f"95% CI {_f(best.get('test_auc_lo'))}–{_f(best.get('test_auc_hi'))}",
                )
            )
        if best.get("test_sensitivity") is not None:
            positive = best.get("positive_class")
            stats.append(
                Stat(
                    "test sensitivity / specificity" + (f" ({positive} positive)" if positive else ""),
                    _sens_spec(best, ci=False),
                    f"threshold 0.5, 95% CI {_interval(best, 'test_sensitivity')} / "
                    f"{_interval(best, 'test_specificity')}"
                    + (f"; {_sens_spec(best, '_thr', ci=False)} at the chosen threshold (CI "
                       f"{_interval(best, 'test_sensitivity_thr')} / "
                       f"{_interval(best, 'test_specificity_thr')})" if thr is not None else ""),
                )
            )
    else:
        stats.append(Stat("test", "not used", "validation only, " + NO_VALIDATION_CI))
    return Hero(
        f"{best['backbone']} · {best['head']} · {best['task']}",
        best["config"] or "(default parameters)",
        stats,
        *([kicker] if kicker else []),
    )


def _undefined_auc_text(row: dict) -> str:
    """Why a leaderboard row has no test AUC, as far as the row tells: a binary run's sensitivity is
    undefined without positive images and its specificity without negative ones, so one of the two missing
    means the test split held one class."""
    positive = row.get("positive_class") or "the positive class"
    if _binary(row) and row.get("test_specificity") is None and row.get("test_sensitivity") is not None:
        return f"the test split holds {positive} images only: AUC needs both classes"
    if _binary(row) and row.get("test_sensitivity") is None and row.get("test_specificity") is not None:
        return f"the test split holds no {positive} image: AUC needs both classes"
    return "not computable from this run's test predictions"


def _heroes(doc: Document, rows: Sequence[dict], ranked: Sequence[dict], options: ReportOptions) -> None:
    """The best run, or, where the ranked runs fall into sets whose scores are not comparable (several
    tasks; with --group-by dataset, several datasets), the best of each set and a line saying why there is
    no best overall. ``ranked``: every run ranked (--top shows fewer), which the sets are told from.

    Why: the hero named a 3-class run (val accuracy 0.764) best over binary runs (0.694), under --group-by
    task too, where it took the first by overall rank across the groups."""
    by = "task" if len({r["task"] for r in ranked}) > 1 else (
        "dataset" if options.group_by == "dataset" else None)
    firsts = _firsts(ranked, by)
    if len(firsts) == 1:
        best = min(rows, key=lambda r: r["overall_rank"])
        doc.add(_hero(best, best.get("ranked_by") or options.metric,
                      any(r.get("test_accuracy") is not None for r in rows)))
        return
    shown = {r["run_id"] for r in rows}
    hidden = [v for v, r in firsts.items() if r["run_id"] not in shown]
    doc.add(Para(f"these runs are of {len(firsts)} {by}s ({', '.join(firsts)}), whose scores are not "
                 f"comparable, so no run is best overall: the best run of each {by} is shown."
                 + (f" The best of {by} {', '.join(hidden)} is not in the leaderboard (--top); --group-by "
                    f"{by} shows each {by}'s best." if hidden else ""), "note", "No single best:"))
    has_test = any(r.get("test_accuracy") is not None for r in ranked)
    for value, best in firsts.items():
        doc.add(_hero(best, best.get("ranked_by") or options.metric, has_test,
                      f"Best run of {by} {value} (ranked on validation data)"))


def _class_totals(counts: Any, split: str) -> dict[str, int]:
    """Images per class (subtypes summed) of one split of a run.json ``dataset.counts``."""
    part = counts.get(split) if isinstance(counts, dict) else None
    if not isinstance(part, dict):
        return {}
    return {str(label): sum(n for _, n in _flatten_counts(sub)) for label, sub in part.items()}


def _official_kermany(ds: Any) -> bool:
    """The official Kermany test split (234 NORMAL, 390 PNEUMONIA), whose shift the caution quotes."""
    if not isinstance(ds, dict) or ds.get("layout") != "kermany":
        return False
    totals = {k.upper(): v for k, v in _class_totals(ds.get("counts"), "test").items()}
    return totals == {"NORMAL": 234, "PNEUMONIA": 390}


def _firsts(ranked: Sequence[dict], by: str | None) -> dict[str, dict]:
    """The best row (lowest overall rank) of each value of ``by`` (one row under "" where ``by`` is None),
    in rank order: the headline's sets and the terminal's best per task."""
    firsts: dict[str, dict] = {}
    for r in sorted(ranked, key=lambda r: r["overall_rank"]):
        firsts.setdefault(str(r[by]) if by else "", r)
    return firsts


def _within_training_images(run: RunRecord) -> bool:
    """A Kermany-layout run whose every number comes from within one folder of images: no test split, or
    one held out by --test-fraction (not a test/ folder of the data's own, whose shift is measured)."""
    ds = run.run.get("dataset")
    if not isinstance(ds, dict) or ds.get("layout") != "kermany":
        return False
    return bool(ds.get("test_fraction")) or run.test is None


def _prevalence(runs: Sequence[RunRecord]) -> str:
    """" In /data: test 50% non-NORMAL, train 74%." for binary Kermany-style data: the class shift that
    the caution talks about, measured on the runs' own data instead of quoting the official split's.

    A task of more than two classes gets each class's share of each split instead. Why: a 3-class run
    read "test 55.6%, train 51.2% of images are not NORMAL", which hides the shift that matters to it
    (viral pneumonia 16.7% of the test images against 24.4% of the training ones)."""
    recorded: dict[tuple[str, str], dict] = {}  # (dataset, task) -> its run.json dataset: counts per task
    for r in runs:
        if isinstance(r.run.get("dataset"), dict):
            recorded.setdefault((r.dataset, r.task), r.run["dataset"])
    parts = []
    for (root, task), ds in sorted(recorded.items()):
        totals = {split: _class_totals(ds.get("counts"), split) for split in ("test", "train")}
        if not all(sum(t.values()) for t in totals.values()):
            continue
        if any(len(t) > 2 for t in totals.values()):
            shares = "; ".join(f"{split} " + ", ".join(f"{k} {100 * v / sum(t.values()):.1f}%"
                                                       for k, v in sorted(t.items()))
                               for split, t in totals.items())
            parts.append(f"{root}, task {task}, the classes' shares of the images are: {shares}")
            continue
        shares = []
        for split, t in totals.items():
            n = sum(t.values())
            if any(k.upper() == "NORMAL" for k in t):
                normal = sum(v for k, v in t.items() if k.upper() == "NORMAL")
                shares.append(f"{split} {100 * (n - normal) / n:.1f}%")  # .0f printed 62.5% as 62%
        if len(shares) == 2:
            parts.append(f"{root}: {', '.join(shares)} of images are not NORMAL")
    return (" In " + "; in ".join(parts) + ".") if parts else ""


def rank_text(row: dict, group_by: str | None) -> str:
    """``#3``, or ``#3 in head mlp`` with --group-by: ranks count within each group, so every group has
    its own #1 and a heading outside the group's table must say whose it is."""
    return f"#{row['rank']}" + (f" in {group_by} {row['group']}" if group_by else "")


def _ties(doc: Document, rows: Sequence[dict], options: ReportOptions) -> None:
    """Say when the best run shares its validation score: the leaderboard breaks ties by sweep and grid
    position (``leaderboard._sort_key``), which says nothing about the runs' merit, so "#1" is then one of
    several equally good choices."""
    firsts: dict[str, dict] = {}
    for r in sorted(rows, key=lambda r: r["overall_rank"]):
        firsts.setdefault(str(r.get("group") or ""), r)
    for group, best in firsts.items():
        n = best.get("tied")
        if not isinstance(n, int) or n < 2:
            continue
        shown = [f"#{r['rank']}" for r in rows if str(r.get("group") or "") == group
                 and r.get("score") == best["score"]]
        where = f" of {group}" if options.group_by else ""
        listed = f" ({', '.join(shown)}" + (f" and {n - len(shown)} not shown)" if n > len(shown) else ")")
        doc.add(Para(f"{n} runs{where} share the best validation {best.get('ranked_by') or options.metric}, "
                     f"{_f(best['score'])}"
                     f"{listed}; the leaderboard orders them by sweep and grid position, so "
                     f"#{best['rank']} is one of "
                     f"{n} equally good choices on validation. Choose among them on something other than "
                     "the test numbers (e.g. the simpler model, or another validation metric with --metric).",
                     "note", "Tie:"))


def _callouts(
    doc: Document, runs: Sequence[RunRecord], rows: Sequence[dict], skipped: Sequence, options: ReportOptions,
    ranked_runs: Sequence[RunRecord] = (), ranked_rows: Sequence[dict] = (),
) -> None:
    """The caveats above the leaderboard. ``runs``/``rows``: the runs shown; ``ranked_runs``/``ranked_rows``:
    every run ranked (--top shows fewer): whether tasks or datasets are mixed is a fact of the ranking, and
    under --top 1 a 3-class best over binary runs came without the "Mixed tasks" note."""
    ranked_runs, ranked_rows = ranked_runs or runs, ranked_rows or rows
    official = any(_official_kermany(r.run.get("dataset")) for r in runs)
    note = OVERSTATE_NOTE if official else GENERIC_OVERSTATE_NOTE + _prevalence(runs)
    if not official and any(_within_training_images(r) for r in runs):
        # the case where 0.97 meets published 0.90-0.95 (a researcher's audit on the training folder alone)
        note += (" Published Kermany results are on its official test split, which differs from the training "
                 "split in class balance (63% vs 74% pneumonia) and in appearance: expect them 5–15 points "
                 "below numbers measured within the training images.")
    doc.add(Para(note[0].upper() + note[1:], "warn", "Read with care:"))
    random = sorted({name for r in runs for name in r.random_backbones})
    if random:
        doc.add(Para(f"{', '.join(random)} features come from randomly initialised weights (--weights "
                     "none), not ImageNet: runs marked '(random weights)' test the pipeline, and their "
                     "accuracy says nothing about the method.", "warn", "Random weights:"))
    _ties(doc, rows, options)
    backends = sorted({keras_backend_of(r) or "not recorded" for r in runs if r.head == "mlp"})
    if len(backends) > 1:  # Keras draws other initial weights on another backend
        doc.add(Para(f"dense-head runs trained on {len(backends)} Keras backends ({', '.join(backends)}): "
                     "the same config and seed give other numbers on another backend, so their differences "
                     "are partly the backend's (the leaderboard CSV has a keras_backend column).", "note",
                     "Mixed backends:"))
    datasets = _mixed_datasets(ranked_runs, options.group_by)
    if datasets:
        doc.add(Para(f"runs of {len(datasets)} datasets (or versions of one folder) are ranked together: "
                     f"{'; '.join(datasets)}. They were validated and tested on different images, so their "
                     "numbers are not comparable (use --group-by dataset).", "warn", "Mixed datasets:"))
    no_ids = sorted({str(r.run["dataset"].get("root")) for r in runs if isinstance(r.run.get("dataset"), dict)
                     and r.run["dataset"].get("patient_ids") == 0})
    if no_ids:  # "patient-grouped" would claim a protection that was not possible
        text = (f"{', '.join(no_ids)} has no patient ids (neither the file names nor a manifest group column "
                "carry one), so folds, the hold-out and the bootstrap group images by file name alone "
                "(without folder and extension; mostly one image per group): images of one person may be on "
                "both sides of a split, and the CIs may be too narrow. Give a manifest with a group column "
                "to group by patient.")
        doc.add(Para(text, "warn", "No patient ids:"))
    partial = sorted(filter(None, (_without_ids(r) for r in runs)))
    if partial:
        doc.add(Para(f"some images have no patient id: {'; '.join(partial)}. Those are grouped by file name "
                     "alone in folds, the hold-out and the bootstrap, so one person's images among them may "
                     "be on both sides of a split.", "warn", "Some patient ids missing:"))
    with_test = sum(1 for r in rows if r.get("test_accuracy") is not None)
    if with_test == 0:
        kermany = all(isinstance(r.run.get("dataset"), dict) and r.run["dataset"].get("layout") == "kermany"
                      for r in runs)
        note = NO_TEST_NOTE if kermany else NO_TEST_SPLIT_NOTE
        doc.add(Para(note[0].upper() + note[1:], "warn", "No test split:"))
    elif with_test < len(rows):
        doc.add(
            Para(
                f"{len(rows) - with_test} of {len(rows)} runs have no test predictions; their test "
                "columns are empty.",
                "muted",
            )
        )
    if any(_is_demo(r.run["dataset"]) for r in runs if isinstance(r.run.get("dataset"), dict)):
        doc.add(Para(DEMO_NOTE[0].upper() + DEMO_NOTE[1:], "note", "Demo data:"))
    tasks = {r["task"] for r in ranked_rows}
    if len(tasks) > 1 and options.group_by != "task":
        doc.add(
            Para(
                f"runs of {len(tasks)} different tasks are ranked together; their metrics are not "
                "comparable (use --group-by task)."
                + (" The Brier score's scale differs too: binary runs report the mean of (p − y)² for the "
                   "positive class (0–1), multi-class runs the sum over classes (0–2)."
                   if options.metric == "brier" else ""),
                "note",
                "Mixed tasks:",
            )
        )
    for note in options.notes:
        doc.add(Para(note, "note", "Note:"))
    if skipped:
        doc.add(
            Para(
                f"{len(skipped)} run folder(s) left out because they are unfinished, failed, unreadable or "
                "changed after the fit (listed at the end).",
                "muted",
            )
        )


# ----------------------------------------------------------------------------------------- leaderboard
_CURVES_TEXT = ("loss (log scale) and accuracy per epoch in two panels, training solid, validation dashed, "
                "the epoch whose weights were kept dotted (checkpoint)")


def is_tied(row: dict) -> bool:
    """Whether the row's validation score is shared by another run of its group (``tied`` counts them before
    --top trims, so a tie with a run left out counts too)."""
    return isinstance(row.get("tied"), int) and row["tied"] > 1


def _leaderboard_table(rows: Sequence[dict], metric: str, has_test: bool) -> Table:
    # "2=": only the CSV's tied column told that #2 and #3 score the same, and the Tie note covers #1 only
    cols: list[tuple[str, Any]] = [("#", lambda r: f"{r['rank']}{'=' if is_tied(r) else ''}")]
    # a column that is the same on every row is noise: say it once in the caption instead
    keys = ("dataset", "backbone", "head", "task", "validation")
    constant = [k for k in keys if len({r.get(k) for r in rows}) == 1]
    cols += [(k, lambda r, k=k: r.get(k)) for k in keys[:4] if k not in constant]
    cols += [
        ("config", lambda r: r["config"]),
        (f"val {metric} {'▲' if metric in LOWER_IS_BETTER else '▼'}", lambda r: _f(r.get(f"val_{metric}"))),
    ]
    if "validation" not in constant:  # out-of-fold CV on all training images, or a small hold-out
        cols.append(("validated on", lambda r: r.get("validation")))
    if metric != "accuracy":
        cols.append(("val acc", lambda r: _f(r.get("val_accuracy"))))
    thresholds = any(r.get("threshold") is not None for r in rows)  # binary runs; 3-class has none
    if thresholds:
        cols += [
            ("val acc @thr", lambda r: _f(r.get("val_accuracy_thr"))),
            ("thr", lambda r: plots.threshold_text(r.get("threshold"), "—")),
        ]
    if metric != "auc":
        cols.append(("val AUC", lambda r: _f(r.get("val_auc"))))
    if has_test:
        cols += [
            ("test acc [95% CI]", lambda r: _ci(r, "test_accuracy")),
            *([("test acc @thr", lambda r: _f(r.get("test_accuracy_thr")))] if thresholds else []),
            ("test AUC [95% CI]", lambda r: _ci(r, "test_auc")),
            ("test F1 [95% CI]", lambda r: _ci(r, "test_macro_f1")),
        ]
        if any(r.get("test_sensitivity") is not None for r in rows):
            cols.append(("test sens / spec (95% CI)", lambda r: _sens_spec(r)))
        if metric not in ("accuracy", "auc", "macro_f1", "sensitivity", "specificity"):
            # the table ranks by this metric: its test value (and CI where recorded) belongs beside it
            ci = any(r.get(f"test_{metric}_lo") is not None for r in rows)
            cols.append((f"test {metric}{' [95% CI]' if ci else ''}", lambda r: _ci(r, f"test_{metric}")))
    # runs that differ only by seed, or by the values in their caches, would otherwise read the same
    if len({r.get("seed") for r in rows}) > 1:
        cols.append(("seed", lambda r: str(r.get("seed"))))
    if len({(r.get("backbone"), r.get("features")) for r in rows}) > len({r.get("backbone") for r in rows}):
        cols.append(("features", lambda r: r.get("features")))
    tag_sets = {", ".join(r["tags"]) for r in rows}
    if len(tag_sets) > 1:
        cols.append(("tags", lambda r: ", ".join(r["tags"])))
    elif tag_sets != {""}:
        constant.append("tags")
    cols.append(("run id", lambda r: r["run_id"]))
    names = [c[0] for c in cols]
    numeric = {i for i, n in enumerate(names) if n.startswith(("val", "test", "thr", "#"))}
    body = [[fn(r) for _, fn in cols] for r in rows]
    best = {i for i, r in enumerate(rows) if r["rank"] == 1}

    def shown(k: str) -> str:
        return ", ".join(rows[0][k]) if k == "tags" else str(rows[0][k])

    caption = "; ".join(f"{k}: {shown(k)}" for k in constant) + " (all runs)" if constant else ""
    if any(is_tied(r) for r in rows):
        caption += (". " if caption else "") + (
            f"'=' after a rank: the run has the same validation {metric} as another ranked run (shown or "
            "not); tied runs are ordered by sweep and grid position, which says nothing about their merit.")
    return Table(names, body, numeric, best, caption=caption, css_class="leaderboard")


PAIRED_RUNS = 5  # runs after the best that the paired comparison tests against it


def _paired_accuracy(rows: Sequence[dict]) -> str:
    """Which accuracy the paired comparison differences, as the headline labels: at 0.5 for two classes,
    the most probable class for more (a 3-class report must not speak of a 0.5 threshold)."""
    kinds = {_binary(r) for r in rows}
    if kinds == {True}:
        return "accuracy at the 0.5 threshold, as in the headline"
    if kinds == {False}:
        return "accuracy of the most probable class, as in the headline"
    return "accuracy as in the headline: at 0.5 for two classes, the most probable class for more"


def _paired_section(doc: Document, rows: list[dict], by_id: dict[str, RunRecord],
                    group_by: str | None = None, formats: Sequence[str] = ()) -> None:
    """Is the best run better than the next ones on the test images? Paired patient bootstrap.

    With ``--group-by`` each group's best is compared with the next runs of its own group: the groups
    are what the reader asked to compare within.
    """
    if len(rows) > 1 and all(by_id[r["run_id"]].test is None for r in rows):  # it vanished without a word
        doc.add(Para("No paired comparison of the best runs: they have no test predictions to compare them "
                     "on (validation only); fit --test-fraction 0.2 holds out a patient-grouped test split.",
                     "muted"))
        return
    for i, (name, ranked) in enumerate(by_group(sorted(rows, key=lambda r: r["overall_rank"])).items()):
        body, members = _paired_rows(ranked, by_id)
        if not body:
            continue
        where = f"{group_by} {name}: " if group_by else ""
        doc.add(Heading(f"{where}is #{ranked[0]['rank']} better than the next runs on the test images?", 3))
        no_auc = any(cells[3] == "—" for cells in body)
        # the resamples draw the test CSV's groups: patients, or file-name groups where there are no ids
        compared = [by_id[r["run_id"]] for r in ranked[: PAIRED_RUNS + 1]]
        doc.add(Table(
            ["#", "run", "Δ test accuracy vs best [95% CI]", "Δ test AUC vs best [95% CI]",
             "by accuracy, the run is"],
            body,
            {0, 2, 3},
            caption="Differences on the same test images (Δ = this run − the best, so a negative Δ means "
            f"the run scores lower; {_paired_accuracy(ranked[: PAIRED_RUNS + 1])}), with 95% intervals "
            "from 1000 paired bootstrap resamples of "
            f"{_resample_unit(compared)} (seed 0): both runs are scored on each resample. An interval "
            "that contains 0 means this test set cannot tell the two runs apart, whatever the validation "
            "ranking says. Each row "
            "is its own test, not corrected for the several rows"
            + (f"; {_no_paired_auc_text(by_id[ranked[0]['run_id']].test)}." if no_auc else "."),
        ))
        _comparison_figure(doc, [ranked[0], *members], by_id, f"compare-{i + 1}", formats)


def _no_paired_auc_text(test: Predictions | None) -> str:
    """Why the paired comparison has no AUC difference (—), from the best run's test predictions (the runs
    compared share its images and labels). Why: "computed for binary runs only" was said of two binary
    runs whose test split held one class, where AUC is undefined (a report audit)."""
    absent = _absent_classes(test)
    if test is not None and test.proba.shape[1] == 2 and absent:
        return (f"the test split holds no {' or '.join(absent)} image, so AUC, and the paired AUC "
                "difference, is undefined (—)")
    if test is not None and test.proba.shape[1] == 2:
        return "the paired AUC difference could not be computed (—)"
    return "the paired AUC difference is computed for binary runs only (—)"


def _absent_classes(pred: Predictions | None) -> list[str]:
    """The classes a run's predictions have no image of (an AUC needs every class present)."""
    if pred is None or not len(pred.y_true):
        return []
    present = set(np.asarray(pred.y_true).tolist())
    return [str(c) for i, c in enumerate(pred.classes) if i not in present]


def _comparison_figure(doc: Document, members: list[dict], by_id: dict[str, RunRecord], name: str,
                       formats: Sequence[str]) -> None:
    """The paired comparison's runs' test ROC and precision-recall curves on one plot (binary runs)."""
    img = plots.comparison_figure([by_id[r["run_id"]].test for r in members],
                                  [f"#{r['rank']} {r['backbone']} · {r['head']}" for r in members], formats)
    if img:
        doc.add(Figure(
            name, img.png,
            "The same runs' test ROC and precision-recall curves on the same images (AUC and average "
            "precision in the legend; dotted: the diagonal of no skill, and the positive class's share).",
            "test ROC and precision-recall curves of the runs compared above, on one plot each",
            img.vector))


def _paired_rows(ranked: list[dict], by_id: dict[str, RunRecord]) -> tuple[list[list[str]], list[dict]]:
    """Table rows comparing ``ranked[0]`` with up to PAIRED_RUNS later runs scored on its test images, and
    those runs' leaderboard rows."""
    best = ranked[0] if ranked else None
    if best is None or by_id[best["run_id"]].test is None:
        return [], []
    body, members = [], []
    for row in ranked[1:]:
        other = by_id[row["run_id"]].test
        diff = paired_difference(other, by_id[best["run_id"]].test) if other is not None else None
        if diff is None:  # another task, dataset or test set: no paired comparison
            continue
        cells = []
        for m in ("accuracy", "auc"):
            d = diff.get(m)
            cells.append("—" if d is None else f"{d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}]")
        acc = diff["accuracy"]
        verdict = "worse" if acc[2] < 0 else ("better" if acc[1] > 0 else "not distinguishable")
        body.append([str(row["rank"]), f"{row['backbone']} · {row['head']} · {row['config'] or '(defaults)'}",
                     *cells, verdict])
        members.append(row)
        if len(body) == PAIRED_RUNS:
            break
    return body, members


def _sens_spec(row: dict, suffix: str = "", ci: bool = True) -> str:
    """``sens (lo–hi) / spec (lo–hi)``; the intervals are left out where the run has none."""
    sens, spec = row.get(f"test_sensitivity{suffix}"), row.get(f"test_specificity{suffix}")
    if sens is None:
        return "—"

    def one(value: Any, key: str) -> str:
        interval = _interval(row, key)
        return _f(value, 2) + ("" if interval == "—" or not ci else f" ({interval})")

    return f"{one(sens, f'test_sensitivity{suffix}')} / {one(spec, f'test_specificity{suffix}')}"


def _positive_text(rows: Sequence[dict], runs: Sequence[RunRecord]) -> str:
    """Which class sensitivity and specificity take as positive (the binary runs' second class), when the
    leaderboard shows them: the column alone did not say."""
    if not any(r.get("test_sensitivity") is not None for r in rows):
        return ""
    preds = [r.test if r.test is not None else r.val for r in runs]
    positive = sorted({str(p.classes[1]) for p in preds if p is not None and len(p.classes) == 2})
    if not positive:
        return ""
    return f"sensitivity and specificity take {' / '.join(positive)} as the positive class; "


def _ranking_notes(doc: Document, members: Sequence[dict], metric: str) -> None:
    """Say what ranks a group whose runs lack ``metric`` (average_precision, sensitivity or specificity of
    3-class runs): ranked by its FALLBACK instead, or, where only some lack it, listed last. Why: ordered by
    the tie-break alone, such a group named an arbitrary run its best and showed "—" as its score."""
    used = members[0].get("ranked_by") or metric
    binary_only = " (it is defined for binary tasks only)" if metric in FALLBACK else ""
    if used != metric:
        how = " (one-vs-rest, macro-averaged over the classes)" if used == "auc" else ""
        doc.add(Para(f"no run here has a validation {metric}{binary_only}, so these runs are ranked by "
                     f"validation {used}{how} instead: #1 is the best by {used}, not by {metric}.",
                     "warn", f"Ranked by {used}:"))
        return
    lacking = [r for r in members if r.get("score") is None]
    if lacking and len(lacking) < len(members):
        order = (f"in the order of their validation {FALLBACK[metric]}" if metric in FALLBACK
                 else "by sweep and grid position")
        doc.add(Para(f"{len(lacking)} of these runs have no validation {metric}{binary_only}; they are "
                     f"listed last (—), {order}.", "note", "Not ranked by it:"))


def _leaderboard_section(
    doc: Document, rows: list[dict], options: ReportOptions, has_test: bool, n_total: int,
    runs: Sequence[RunRecord] = (), searched: Sequence[RunRecord] = (),
) -> None:
    """``runs``: the runs shown; ``searched``: every run ranked (--top shows fewer), the ones the best was
    chosen among."""
    doc.section("Leaderboard", "leaderboard")
    shown = (
        f"top {options.top} per group"
        if options.top and options.group_by
        else (f"top {options.top}" if options.top else "all")
    )
    # the intervals are of test scores only: without test columns the table has none to describe (it said
    # "CIs are 95% bootstrap intervals resampling test patients" above a table without one)
    if has_test:
        ci_text = f"CIs are 95% bootstrap intervals resampling {_resample_unit(runs)}" + (
            "; a proportion or AUC observed at 0 or 1 has an exact or score-type interval instead (see "
            "Methods)."
            if any(ci.get("exact_at_bound") or ci.get("auc_score_bound") for r in runs
                   for ci in _recorded_cis(r)) else ".")
    else:
        ci_text = f"no run shown has a test split, so no confidence interval is given: {NO_VALIDATION_CI}."
    doc.add(
        Para(
            f"{n_total} run(s), {shown} shown, sorted by validation {options.metric}"
            f" ({'' if options.metric in THRESHOLD_FREE else _rules(rows) + '; '}"
            f"{'lower' if options.metric in LOWER_IS_BETTER else 'higher'} is better). "
            + ("'@thr' columns use the threshold chosen on validation data (Youden's J unless fit chose "
               "another); 'val acc @thr' is scored on the predictions that chose it, so it is optimistic "
               "(its test twin is not); " if any(r.get("threshold") is not None for r in rows) else "")
            + "F1 is macro-averaged; "
            + (BALANCED_ACCURACY_TEXT if any(_shows_balanced_accuracy(r, options) for r in rows) else "")
            + ("AUC of a task with more than two classes is one-vs-rest, macro-averaged over the classes; "
               if not all(_binary(r) for r in rows) else "")
            + _positive_text(rows, runs)
            + ("a dataset's '@' suffix is its content digest (images, paths, labels, the data's own splits, "
               "patients; not a --test-fraction hold-out, whose counts the Dataset section gives apart): one "
               "folder under two digests changed between fits; " if any("@" in str(r.get("dataset"))
                                                                        for r in rows) else "")
            + ci_text,
            "muted",
        )
    )
    n_vals = [r["n_val"] for r in rows if isinstance(r.get("n_val"), int) and r["n_val"] > 0]
    if n_vals and max(n_vals) >= 2 * min(n_vals):
        doc.add(
            Para(
                f"validation sets differ in size ({min(n_vals)} to {max(n_vals)} images: hold-out heads "
                "such as the MLP validate on a fraction, CV heads on out-of-fold predictions of all training "
                "images; see 'validated on'). A score on few images is noisy, so a hold-out run at the top "
                "may owe its rank to chance"
                + (": compare the test columns and their CIs too." if has_test else
                   " (no test split was scored to check it against)."),
                "note",
                "Validation sizes differ:",
            )
        )
    optimism = _selection_optimism(searched or runs)
    if optimism:
        doc.add(Para(optimism + ("; the test columns, scored once on images no choice saw, are the unbiased "
                                 "estimate." if has_test else "; no test split was scored, so no number here "
                                 "is free of it.")
                     + (" Within a group, the same holds for the group's best." if options.group_by else ""),
                     "note", "Best of many:"))
    _unconverged_note(doc, rows, runs, options)
    watched = [r for r in runs if _epoch_chosen_on_holdout(r)]
    if watched:
        doc.add(
            Para(
                f"{len(watched)} run(s) stop early, keep their best epoch or lower their learning rate on "
                "the validation hold-out (patience, checkpoint or reduce_lr_patience), so the hold-out chose "
                "their epoch as well as ranking them: their validation numbers are slightly optimistic."
                + (" The test columns, from images no choice saw, are not." if has_test else ""),
                "note",
                "Epochs chosen on the hold-out:",
            )
        )
    fig = plots.overview_figure(rows, options.metric, formats=options.figure_formats,
                                group_by=options.group_by)
    for name, members in by_group(rows).items():
        if options.group_by:
            doc.add(Heading(f"{options.group_by}: {name}", 3))
        _ranking_notes(doc, members, options.metric)
        doc.add(_leaderboard_table(members, members[0].get("ranked_by") or options.metric, has_test))
    if fig:
        shown_rows = plots.overview_rows(rows, options.metric)
        m = options.metric
        if not any(r.get(f"test_{m}") is not None for r in shown_rows):
            test_words = " (no test scores)."
        elif any(r.get(f"test_{m}_lo") is not None for r in shown_rows):
            test_words = (f" and test {m} with 95% CI (orange). The gap between them is the optimism of "
                          "validation numbers.")
        else:  # a metric without a bootstrap interval (Brier, balanced accuracy)
            test_words = (f" and test {m} (orange; no interval computed for {m}). The gap between them is "
                          "the optimism of validation numbers.")
        n_ranked = max(n_total, len(rows))  # every run ranked, not only the --top rows ("the 4 best of 4")
        if options.group_by:  # the rows are each group's best, in group order: not the best N of all runs
            cut = len(shown_rows) < len(plots.overview_rows(rows, m, len(rows)))
            whose = (f"The best {options.top} of each {options.group_by}" if options.top
                     else f"The runs of each {options.group_by}")
            lead = (f"{whose} ({len(shown_rows)} of {n_ranked} runs"
                    + (f", the first {len(shown_rows)} in the leaderboard's order" if cut else "") + ")")
        else:
            lead = f"The {len(shown_rows)} best of {n_ranked} runs"
        doc.add(
            Figure(
                "overview",
                fig.png,
                lead
                + (f" with a validation {m}" if any(r.get(f"val_{m}") is None for r in rows) else "")
                + f": validation {m} (blue){test_words} "
                "Labels leave out the settings that all shown runs of a head share (the table has them).",
                f"validation versus test {options.metric} of the best runs",
                fig.vector,
            )
        )


def _top_runs_section(
    doc: Document,
    rows: list[dict],
    by_id: dict[str, RunRecord],
    options: ReportOptions,
    progress: ProgressFn | None,
) -> None:
    if options.detail <= 0 or not rows:
        return
    if options.group_by:  # the best --detail runs of each group
        chosen = [r for members in by_group(rows).values() for r in members[: options.detail]]
    else:
        chosen = rows[: options.detail]
    doc.section("Top runs", "top-runs")
    binary = [r for r in chosen if _binary(r)]
    if binary:
        doc.add(Para(
            ("Binary runs: confusion" if len(binary) < len(chosen) else "Confusion")
            + " matrices at threshold 0.5 and at the validation-chosen threshold (test split when "
            "present, else validation), ROC and precision-recall curves with both operating points "
            "(● 0.5, ★ chosen; the dotted line of the precision-recall panel is the positive class's share, "
            "what a classifier without skill reaches; where every curve's AUC or average precision is "
            f"{plots.ZOOM_AUC:g} or more, the panel shows only the corner where the curves run), a "
            "reliability diagram (predicted probability against the observed fraction in 10 equal-width "
            "bins, dot area = images, grey bars = 95% Wilson intervals of each bin's fraction; on the "
            "diagonal is well calibrated, and a bin whose bar crosses it is within its noise) and the "
            f"MLP's {_CURVES_TEXT}.",
            "muted",
        ))
    if len(binary) < len(chosen):
        doc.add(Para(
            ("Runs with more than two classes: the" if binary else "The")
            + " confusion matrix of the most probable class (test split when present, else validation), "
            "each class's one-vs-rest ROC curve on the same split (their AUC is the mean of these curves' "
            "areas, the macro average) and precision-recall curve (with its average precision; dotted in its "
            "colour, the class's share of the images, what a classifier without skill reaches), a top-label "
            "reliability diagram (the predicted class's probability against the fraction of those images "
            "whose predicted class is right, in 10 equal-width bins with 95% Wilson intervals) and the "
            f"MLP's {_CURVES_TEXT}.",
            "muted",
        ))
    for i, row in enumerate(chosen):
        emit(progress, "report", i, len(chosen), f"plotting {row['run_id']}")
        rec = by_id[row["run_id"]]
        doc.add(Heading(f"{rank_text(row, options.group_by)} · {row['backbone']} · {row['head']} · "
                        f"{row['task']}", 3))
        doc.add(
            Para(
                f"config: {row['config'] or '(defaults)'} — run {row['run_id']}"
                f" — val n={row.get('n_val') or '?'}, "
                + (f"test n={row['n_test']}" if row.get("n_test") else "no test split")  # not "test n=none"
                + (f" — {epochs}" if (epochs := epochs_text(rec.run, rec.metrics.get("history"))) else ""),
                "muted",
            )
        )
        preds, split = (rec.test, "test") if rec.test is not None else (rec.val, "validation")
        if preds is not None and len(preds.y_true):
            rule = "threshold 0.5" if len(preds.classes) == 2 else "most probable class"
            rows = per_class(preds)
            recall_ci = _recorded_recall_cis(rec, split)
            doc.add(Table(
                ["class", "precision", "recall", "F1", f"{split} images"],
                [[c["class"], _f(c["precision"]), _f(c["recall"]) + _pair_text(recall_ci.get(c["class"])),
                  _f(c["f1"]), str(c["n"])]
                 for c in (*rows, macro_average(rows))],
                {1, 2, 3, 4},
                caption=f"Per class on the {split} split ({rule})" + (
                    f"; the recall of {preds.classes[1]} is the sensitivity, of {preds.classes[0]} the "
                    "specificity" if len(preds.classes) == 2 else "") + (
                    "; recall with its 95% interval as fit recorded it (patient bootstrap; exact "
                    "Clopper-Pearson where a class was found in all or none of its images)"
                    if recall_ci else "") + (
                    "; macro average: the unweighted mean over the classes (an undefined value counts 0), "
                    "as scikit-learn's average='macro'") + (
                    # the leaderboard's balanced accuracy is this row's recall, which nothing said
                    f"; its recall is the {split} balanced accuracy of the leaderboard"
                    if _shows_balanced_accuracy(row, options) and all(c["n"] for c in rows) else "") + ".",
            ))
            _subtype_table(doc, rec, preds, split)
        img = plots.run_figure(rec, chosen_threshold(rec), options.figure_formats)
        if img:
            doc.add(
                Figure(
                    f"run-{row['overall_rank']}",  # unique: each group has a #1
                    img.png,
                    f"Run {rank_text(row, options.group_by)} ({row['run_id']}).",
                    f"per-run figure of run {row['run_id']}: confusion matrices and, where they apply, ROC, "
                    "precision-recall, calibration and training curves",
                    img.vector,
                )
            )
        else:
            doc.add(Para("No predictions or training history were recorded for this run.", "muted"))


BALANCED_ACCURACY_TEXT = (
    "balanced accuracy is the unweighted mean of the classes' recalls (macro recall; with two classes "
    "(sensitivity + specificity) / 2), a class without images in the split left out of the mean; ")


def _shows_balanced_accuracy(row: dict, options: ReportOptions) -> bool:
    """Whether the leaderboard gives the row's balanced accuracy (it ranks by it, asked for or as the stand-in
    for sensitivity or specificity of a 3-class run). Why: it showed balanced accuracy beside the per-class
    tables' macro-average recall, the same number, without a word that they are one."""
    return (row.get("ranked_by") or options.metric) == "balanced_accuracy"


def _recorded_recall_cis(rec: RunRecord, split: str) -> dict[str, list[float]]:
    """{class: [lo, hi]} of each class's recall as fit recorded it for a run of more than two classes on
    its test split ({} otherwise). Why: `runs show` printed the virus recall's interval, the report's
    per-class table only the point (0.444 on 18 images)."""
    if split != "test":
        return {}
    m = rec.metrics.get("test") if isinstance(rec.metrics, dict) else None
    ci = m.get("ci") if isinstance(m, dict) else None
    per = ci.get("per_class_recall") if isinstance(ci, dict) else None
    if not isinstance(per, dict):
        return {}
    return {str(c): v for c, v in per.items()
            if isinstance(v, list) and len(v) == 2 and all(isinstance(x, int | float) for x in v)}


def _pair_text(pair: list[float] | None) -> str:
    return f" [{pair[0]:.2f}, {pair[1]:.2f}]" if pair else ""


def _subtype_table(doc: Document, rec: RunRecord, preds: Predictions, split: str) -> None:
    """A binary run's sensitivity on bacterial and on viral pneumonia, where the file names say which
    (:func:`~featcache.report.scores.subtype_sensitivity`): at 0.5 and at the validation-chosen threshold.
    The caption names what the bootstrap resampled: the CSV's groups are patients, or file names where the
    data has no patient ids ("patients resampled" said of those would misstate it)."""
    chosen = chosen_threshold(rec)
    if preds.groups is None:
        unit = "images"
    elif split == "test":
        unit = _resample_unit([rec])
    else:
        unit = resampled_words("patients" if _grouped(rec) == "patient-grouped" else "file-name groups")
    thresholds: list[float | None] = [0.5] + ([chosen] if chosen is not None and chosen != 0.5 else [])
    found = subtype_sensitivity(preds, thresholds)
    if not found:
        return
    heads = [f"threshold {plots.threshold_text(t)}" + (" (chosen)" if i else "")
             for i, t in enumerate(thresholds)]
    rows = [[s["subtype"], str(s["n"]) + (f" ({s['patients']} patients)" if s["patients"] else ""),
             *[f"{_f(a['sensitivity'])} [{_f(a['ci'][0], 2)}, {_f(a['ci'][1], 2)}] · {a['found']}/{s['n']}"
               for a in s["at"]]] for s in found]
    positive = preds.classes[1]
    counted = sum(s["n"] for s in found)
    unnamed = int(np.sum(preds.y_true == 1)) - counted
    doc.add(Table(
        ["subtype", f"{positive} images", *heads], rows, set(range(1, 2 + len(heads))),
        caption=f"Sensitivity by pneumonia subtype on the {split} split, from the Kermany file names "
        f"(person…_bacteria_… / person…_virus_…): the share of each subtype's images called {positive}, "
        f"with its 95% bootstrap interval (1000 resamples of {unit}, seed 0). A model that misses viral "
        "pneumonia more than bacterial shows it here, not in one sensitivity"
        + (f"; {unnamed} {positive} image(s) whose names carry no subtype are not counted" if unnamed else "")
        + (f". A share observed at 0 or 1 has the exact Clopper-Pearson interval over the "
           f"{'patients' if preds.groups is not None else 'images'} counted instead (every resample gives "
           "the same share, so the bootstrap interval would be a point)"
           if any(a["exact"] for s in found for a in s["at"]) else "")
        + ".",
    ))


# ---------------------------------------------------------------------------------------------- grids
def _varying(rows: Sequence[dict]) -> list[tuple[str, int]]:
    """(param, number of distinct values) for params with 2+ values, most varied first."""
    keys = sorted({k for r in rows for k in r["params"]})
    counts = [(k, len({format_value(r["params"].get(k)) for r in rows})) for k in keys]
    return sorted([c for c in counts if c[1] > 1], key=lambda c: (-c[1], c[0]))


def _sort_values(values: set[str]) -> list[str]:
    def key(v: str) -> tuple:
        try:
            return (0, float(v), v)
        except ValueError:
            return (1, 0.0, v)

    return sorted(values, key=key)


def _cells(
    rows: Sequence[dict], x: str, y: str, value_key: str, lower_better: bool = False
) -> tuple[np.ndarray, list[str], list[str]]:
    """(table, x values, y values): the best ``value_key`` per (x, y) cell of two hyperparameters."""
    xs = _sort_values({format_value(r["params"].get(x)) for r in rows})
    ys = _sort_values({format_value(r["params"].get(y)) for r in rows})
    table = np.full((len(ys), len(xs)), np.nan)
    better = min if lower_better else max
    for r in rows:
        v = r.get(value_key)
        if v is None:
            continue
        i, j = ys.index(format_value(r["params"].get(y))), xs.index(format_value(r["params"].get(x)))
        table[i, j] = v if np.isnan(table[i, j]) else better(table[i, j], v)
    return table, xs, ys


def _heatmap(
    rows: Sequence[dict], x: str, y: str, value_key: str, title: str, lower_better: bool = False,
    bar_label: str = "", chosen: dict | None = None, formats: Sequence[str] = (), metric: str = "",
) -> plots.Rendered:
    """Best value of ``value_key`` per (x, y) cell of two hyperparameters; ``chosen`` (the params of the
    selected config) gets its cell outlined; ``metric`` (the report's or scikit-learn's scoring name)
    bounds the colour scale where it is a proportion."""
    table, xs, ys = _cells(rows, x, y, value_key, lower_better)
    mark = None
    if chosen is not None:
        cx, cy = format_value(chosen.get(x)), format_value(chosen.get(y))
        if cx in xs and cy in ys:
            mark = (ys.index(cy), xs.index(cx))
    # a hold-out of 15 images moves accuracy in steps of 0.067: one image must not span the colour scale
    n_val = [r["n_val"] for r in rows if isinstance(r.get("n_val"), int) and r["n_val"] > 0]
    span = max(plots.HEATMAP_MIN_SPAN, 3.0 / min(n_val)) if n_val and value_key.endswith("accuracy") else None
    return plots.heatmap_figure(table, xs, ys, x, y, title, bar_label=bar_label, mark=mark, formats=formats,
                                min_span=span,
                                limits=_metric_limits(metric or value_key.removeprefix("val_")))


_BOUNDED = {"accuracy", "balanced_accuracy", "macro_f1", "auc", "average_precision", "sensitivity",
            "specificity", "precision", "recall"}


def _metric_limits(metric: str) -> tuple[float, float] | None:
    """(0, 1) for a metric that is a proportion (the report's names, or scikit-learn scorings such as
    roc_auc_ovr and f1_macro); None for loss, Brier (0-2 with several classes) and unknown scorings."""
    bounded = metric in _BOUNDED or metric.startswith(("roc_auc", "f1", "average_precision"))
    return (0.0, 1.0) if bounded else None


def _telling_pair(rows: Sequence[dict], names: list[str], value_key: str) -> tuple[str, str] | None:
    """The two varying parameters whose heatmap spreads the scores most (first such pair on ties).

    Why: a cell shows the best run over the other parameters, so a pair that leaves out the one that
    matters (svm's kernel, say) paints every cell the same score and hides it.
    """
    best, spread = None, -1.0
    for a in range(len(names)):
        for b in range(a + 1, len(names)):
            table = _cells(rows, names[a], names[b], value_key)[0]
            finite = table[np.isfinite(table)]
            width = float(finite.max() - finite.min()) if finite.size else 0.0
            if width > spread + 1e-12:
                best, spread = (names[a], names[b]), width
    return best


def _grid_order(rows: Sequence[dict], by_id: dict[str, RunRecord]) -> list[dict]:
    """Rows in the order of the grids that made them: sweeps by when they started, each in its grid's order.

    Why not by creation time: a fused grid trains every config at once and writes the runs as they finish,
    so "model #" would not be the config's place in the grid the user wrote (paper 000 numbers its models).
    """
    def sweep(r: dict) -> str:
        return str(by_id[r["run_id"]].run.get("sweep_id") or r["run_id"])

    def index(r: dict) -> float:
        i = grid_index(by_id[r["run_id"]].run)
        return float("inf") if i is None else float(i)

    started: dict[str, str] = {}
    for r in rows:
        started[sweep(r)] = min(started.get(sweep(r), "~"), str(r.get("created") or ""))
    return sorted(rows, key=lambda r: (started[sweep(r)], sweep(r), index(r), str(r.get("created") or ""),
                                       r["run_id"]))


def _hyper_table(rows: Sequence[dict], varying: list[str], metric: str, by_id: dict[str, RunRecord]) -> Table:
    """Paper 000 Fig. 4/5 style: every config with train/val/test loss, accuracy and F1."""
    ordered = _grid_order(rows, by_id)
    spans = len({r.get("group") for r in rows}) > 1  # a family in two groups (datasets): whose #1 is it
    cols = [
        "model #",
        *varying,
        "train loss",
        "val loss",
        "test loss",
        "train acc",
        "val acc",
        "test acc",
        "train F1",
        "val F1",
        "test F1",
        "leaderboard #",
    ]
    body = []
    for i, r in enumerate(ordered, 1):
        body.append(
            [
                str(i),
                *(format_value(r["params"].get(k)) for k in varying),
                *(_f(r.get(f"{s}_loss")) for s in ("train", "val", "test")),
                *(_f(r.get(f"{s}_accuracy")) for s in ("train", "val", "test")),
                *(_f(r.get(f"{s}_macro_f1")) for s in ("train", "val", "test")),
                str(r["rank"]) + (f" ({r['group']})" if spans else ""),
            ]
        )
    numeric = {0, *range(1 + len(varying), len(cols))}
    top = min(ordered, key=lambda r: r["overall_rank"])  # runs that tie with it are as good: all highlighted
    # without the metric in any run of the family (average_precision on a 3-class task) nothing is "best"
    scored = top.get("score") is not None
    best = {i for i, r in enumerate(ordered) if r.get("score") == top.get("score")} if scored else set()
    used = top.get("ranked_by") or metric  # a 3-class family ranked by auc when asked for average_precision
    marked = (f"Highlighted: best validation {used} (every run that ties for it)"
              + ("." if used == metric else f"; validation {metric} is defined for binary tasks only.")
              if scored else
              f"Nothing highlighted: validation {metric} is undefined for these runs (binary tasks only).")
    return Table(
        cols,
        body,
        numeric,
        best,
        caption=f"{marked} Loss = log loss; "
        f"F1 = macro F1; accuracy and F1 {_rules(rows, 'at ')}. Train metrics as recorded by fit (empty "
        "when not recorded).",
    )


def _cv_grid(rec: RunRecord) -> list[dict] | None:
    """The configs a CV head searched inside ONE run (metrics.json cv_results), as pseudo rows."""
    cv = rec.metrics.get("cv_results")
    if not isinstance(cv, dict) or not isinstance(cv.get("params"), list) or len(cv["params"]) < 2:
        return None
    out = []
    for i, params in enumerate(cv["params"]):

        def pick(key: str, i: int = i) -> Any:
            vals = cv.get(key)
            return vals[i] if isinstance(vals, list) and i < len(vals) else None

        out.append(
            {
                "params": params if isinstance(params, dict) else {"config": params},
                "cv": pick("mean_test_score"),
                "std": pick("std_test_score"),
                "rank": pick("rank_test_score"),
                "fit_time": pick("mean_fit_time"),
            }
        )
    return out


def _cv_section(doc: Document, rec: RunRecord, row: dict, options: ReportOptions) -> None:
    grid = _cv_grid(rec)
    if not grid:
        return
    scoring = str((rec.run.get("selection") or {}).get("scoring", "score"))
    folds = (rec.run.get("selection") or {}).get("folds", "?")
    doc.add(
        Heading(
            f"{rec.head} on {row['backbone']} features · task {rec.task} · grid search inside run "
            f"{rank_text(row, options.group_by)} ({len(grid)} configs × {folds} {_grouped(rec)} folds)",
            3,
        )
    )
    names = [v[0] for v in _varying(grid)]
    pair = (
        options.heatmap
        if options.heatmap and all(p in names for p in options.heatmap)
        else _telling_pair(grid, names, "cv")
    )
    if pair:
        chosen_at = (rec.run.get("selection") or {}).get("best_index")
        img = _heatmap(grid, pair[0], pair[1], "cv",
                       f"mean CV {scoring}: {rec.head} on {row['backbone']}, {rec.task}",
                       bar_label=f"mean CV {scoring}", formats=options.figure_formats, metric=scoring,
                       chosen=grid[chosen_at]["params"] if isinstance(chosen_at, int)
                       and 0 <= chosen_at < len(grid) else None)
        doc.add(
            Figure(
                f"heatmap-cv-{row['overall_rank']}",
                img.png,
                f"Mean cross-validation {scoring} over {pair[0]} × {pair[1]} (best config per cell, the "
                "chosen one outlined; "
                "unless --heatmap names them, the two parameters that spread the scores most).",
                f"heatmap of CV {scoring} over {pair[0]} and {pair[1]}",
                img.vector,
            )
        )
    # a column only where configs were timed alone: the shared-Gram logreg search splits each fold's time
    # equally over its candidates, and 14 equal "0.00" read as per-config times
    times = [g["fit_time"] for g in grid if isinstance(g["fit_time"], int | float) and g["fit_time"] > 0]
    timed = len(set(times)) > 1
    body = [
        [
            str(i),
            *(format_value(g["params"].get(k)) for k in names),
            _f(g["cv"]),
            _f(g["std"]),
            str(g["rank"] if g["rank"] is not None else "—"),
            *([_f(g["fit_time"], 2)] if timed else []),  # the shared-Gram search times no config alone
        ]
        for i, g in enumerate(grid, 1)
    ]
    tied = [i for i, g in enumerate(grid) if g["rank"] == 1]
    chosen = (rec.run.get("selection") or {}).get("best_index")
    best = {chosen} if isinstance(chosen, int) and 0 <= chosen < len(grid) else set(tied[:1])
    ties = (f" {len(tied)} configs tie at the best mean score; like GridSearchCV, the search took the first "
            "of them." if len(tied) > 1 else "")
    cols = ["config #", *names, f"mean CV {scoring}", "std", "CV rank", *(["fit s"] if timed else [])]
    doc.add(
        Table(
            cols,
            body,
            {0, *range(1 + len(names), len(cols))},
            best,
            caption="Highlighted: the config the search chose; the run's train/val/test metrics above are "
            f"for that config only. 'mean CV {scoring}' averages the per-fold scores (what GridSearchCV "
            "ranks by); the run's validation score in the leaderboard is scored on the pooled out-of-fold "
            f"predictions of the chosen config, so the two differ{_pooled_vs_mean(rec)}. Both "
            f"are the best of {len(grid)} configs on the folds that chose it, so they lean optimistic"
            # a run without a test split has no test column to point to: "the test columns do not" sent the
            # reader of a validation-only report looking for an unbiased number that is not there
            + ("; the test columns do not." if row.get("test_accuracy") is not None else
               ", and this run has no test split to check them against.") + ties
            + (f" {_unconverged_text(rec)} stopped before converging (at max_iter): these are scores of "
               "unconverged models." if _unconverged(rec) else ""),
        )
    )


def _unconverged(rec: RunRecord) -> int:
    """How many of the run's CV search fits stopped before converging (run.json's
    ``selection.cv_unconverged_fits``, counted by fit for logreg and svm), 0 where none or not recorded."""
    n = (rec.run.get("selection") or {}).get("cv_unconverged_fits")
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 0


def _unconverged_text(rec: RunRecord) -> str:
    """"6 of the search's 6 fits", the total from the run's grid and folds where it has them."""
    sel = rec.run.get("selection") or {}
    folds = sel.get("folds")
    folds = len(folds) if isinstance(folds, list) else folds
    configs = sel.get("n_configs") or len(_cv_grid(rec) or [])
    total = configs * folds if isinstance(folds, int) and isinstance(configs, int) and configs else None
    return f"{_unconverged(rec)} of the search's {total if total else '?'} fits"


def _unconverged_note(doc: Document, rows: Sequence[dict], runs: Sequence[RunRecord],
                      options: ReportOptions) -> None:
    """Name the shown runs whose grid search fitted unconverged models. Why: fit prints this as a note
    (a 3-class logreg at max_iter=100 on Kermany: 6 of 6 fits), but run.json was the only place it stayed,
    so a report that ranks the run and plots its CV heatmap said nothing about scores of models that had
    not finished fitting."""
    rank = {r["run_id"]: rank_text(r, options.group_by) for r in rows}
    hit = [rec for rec in runs if _unconverged(rec) and rec.id in rank]
    if not hit:
        return
    from featcache.grids import larger_max_iter

    configs = [g["params"] for rec in hit for g in (_cv_grid(rec) or [{"params": rec.params}])]
    doc.add(Para(
        "; ".join(f"run {rank[rec.id]} ({rec.head}, {rec.task}): {_unconverged_text(rec)}" for rec in hit)
        + " stopped before converging (at max_iter"
        + (", or rarely a failed line search" if any(rec.head == "logreg" for rec in hit) else "")
        + "). Their mean CV scores, "
        "the config chosen by them and the out-of-fold validation numbers are of unconverged models; fitting "
        f"again with a larger max_iter (e.g. --grid max_iter={larger_max_iter(configs)}) lets them converge.",
        "note", "Unconverged fits:"))


def _pooled_vs_mean(rec: RunRecord) -> str:
    """Why a CV run's pooled out-of-fold score differs from the search's mean fold score. Why per head: an
    svm's search scores the SVC's own decisions while its out-of-fold predictions are Platt-calibrated
    probabilities at the threshold, which moved accuracy by 7 points in an audit where the caption blamed
    fold sizes (weighting by them moved it 0.001)."""
    why = (": pooling weights each fold by its size, and a ranking metric (AUC) also compares scores "
           "across folds")
    if rec.head == "svm":
        why += ("; and the svm search scores the SVC's own decisions, while the out-of-fold predictions are "
                "its Platt-calibrated probabilities (each fold's calibration fitted inside the fold) at the "
                "threshold, which can move the score by several points")
    return why


def _setting(rec: RunRecord, key: str) -> Any:
    """The value of ``key`` the run trained with: run.json's ``hyperparameters`` (the head's full settings,
    defaults included, as fit resolved them), else its searched ``params`` (runs that did not record
    them)."""
    resolved = rec.run.get("hyperparameters")
    if isinstance(resolved, dict) and key in resolved:
        return resolved[key]
    return rec.params.get(key)


def _settings_of(members: list[dict], by_id: dict[str, RunRecord]) -> list[dict]:
    """Copies of a family's rows whose ``params`` hold every parameter any of them searched, each with the
    value the run trained with. Why: a run's ``params`` holds only what its grid searched, so a sweep over
    dropout beside one that left it at its default read "dropout None" in the hyperparameter table and split
    the heatmap into "0" and "None" columns, though both runs trained with dropout 0."""
    keys = sorted({k for r in members for k in r["params"]})
    return [{**r, "params": {k: _setting(by_id[r["run_id"]], k) for k in keys}} for r in members]


def _grid_section(
    doc: Document, rows: list[dict], options: ReportOptions, by_id: dict[str, RunRecord],
    shown: set[str] | None = None,
) -> None:
    """Each CV run's grid, and each family's (backbone, head, task) hold-out configs: every ranked run of
    it, also those --top leaves out of the leaderboard (``shown``: the run ids it keeps)."""
    families: dict[tuple[str, str, str], list[dict]] = {}
    for r in rows:
        families.setdefault((r["backbone"], r["head"], r["task"]), []).append(r)
    families = {k: _settings_of(v, by_id) for k, v in families.items() if len(v) >= 2}
    # a CV run holds its whole grid: only the shown ones get theirs (another CV run is another search)
    cv_rows = [r for r in rows if _cv_grid(by_id[r["run_id"]]) and (shown is None or r["run_id"] in shown)]
    if not families and not cv_rows:
        return
    doc.section("Grid views", "grids")
    for r in cv_rows:
        _cv_section(doc, by_id[r["run_id"]], r, options)
    for (backbone, head, task), members in families.items():
        n_shown = len([r for r in members if shown is None or r["run_id"] in shown])
        doc.add(Heading(f"{head} on {backbone} features · task {task} · {len(members)} configs"
                        + (f" ({n_shown} in the leaderboard)" if n_shown < len(members) else ""), 3))
        varying = _varying(members)
        names = [v[0] for v in varying]
        fixed = sorted({k for r in members for k in r["params"]} - set(names))
        if fixed:
            doc.add(
                Para(
                    "fixed: " + ", ".join(f"{k}={format_value(members[0]['params'].get(k))}" for k in fixed),
                    "muted",
                )
            )
        pair: tuple[str, str] | None = None
        if options.heatmap and all(p in {k for r in members for k in r["params"]} for p in options.heatmap):
            pair = options.heatmap
        elif len(names) >= 2:
            pair = _telling_pair(members, names, f"val_{options.metric}")
        if pair and all(r.get(f"val_{options.metric}") is None for r in members):
            pair = None  # the metric is undefined for this family: an empty map with a "chosen" outline
        if pair:
            img = _heatmap(
                members,
                pair[0],
                pair[1],
                f"val_{options.metric}",
                f"validation {options.metric}: {head} on {backbone}, {task}",
                options.metric in LOWER_IS_BETTER,
                bar_label=f"validation {options.metric}",
                chosen=min(members, key=lambda r: r["overall_rank"])["params"],
                formats=options.figure_formats,
            )
            doc.add(
                Figure(
                    f"heatmap-{head}-{backbone}-{task}",
                    img.png,
                    f"Validation {options.metric} over {pair[0]} × {pair[1]} (best run per cell, the "
                    "top-ranked run outlined"
                    + ("; other parameters vary inside a cell" if set(names) - set(pair) else "")
                    + ("; unless --heatmap names them, the two parameters that spread the scores most)."
                       if len(names) > 2 else ")."),
                    f"heatmap of {options.metric} over {pair[0]} and {pair[1]}",
                    img.vector,
                )
            )
        doc.add(_hyper_table(members, names, options.metric, by_id))


# -------------------------------------------------------------------------------------------- dataset
def _flatten_counts(counts: Any, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], int]]:
    if isinstance(counts, dict):
        out: list[tuple[tuple[str, ...], int]] = []
        for k in sorted(counts, key=str):
            out += _flatten_counts(counts[k], (*prefix, str(k)))
        return out
    if isinstance(counts, int | float) and not isinstance(counts, bool):
        return [(prefix, int(counts))]
    return []


def _inspect(root: str, manifest: str | None, progress: ProgressFn | None) -> dict | None:
    """Re-audit the dataset (patients, duplicates, cross-split leaks) when it still exists; a manifest's
    runs are audited from the manifest (its folder read as class folders would give other labels, splits
    and patients), and not at all when the manifest is gone."""
    if not root or not Path(root).is_dir() or (manifest and not Path(manifest).is_file()):
        return None
    try:
        from featcache.datasets import discover, inspect
    except ImportError:
        return None
    try:
        return inspect(discover(root, manifest or None), progress=progress)
    except (FeatcacheError, OSError, ValueError):
        return None


def _dataset_section(
    doc: Document, runs: Sequence[RunRecord], options: ReportOptions, progress: ProgressFn | None
) -> None:
    datasets: dict[str, dict] = {}
    # fit records counts per task class (binary and 3-class differ) and per split layout: the dataset's
    # digest is of the images as the folder splits them, so a --test-fraction run and a validation-only run
    # of one folder are one dataset whose runs split it differently (one table showed the first's test split)
    layouts: dict[str, dict[tuple[str, tuple], dict]] = {}
    for r in runs:  # one entry per dataset version (folder + content digest) the runs used
        ds = r.run.get("dataset") if isinstance(r.run.get("dataset"), dict) else {}
        datasets.setdefault(r.dataset, ds)
        layouts.setdefault(r.dataset, {}).setdefault((r.task, _split_layout(ds)), ds)
    doc.section("Dataset", "dataset")
    for name, ds in datasets.items():
        root = str(ds.get("root", "?"))
        # runs of a manifest fit before its path was recorded cannot be re-audited: skip rather than misread
        readable = ds.get("layout") != "manifest" or ds.get("manifest")
        info = _inspect(root, ds.get("manifest"), progress) if options.inspect_data and readable else None
        recorded = ds.get("counts") or {}
        source = "as the runs used them (recorded by fit)" if recorded else "audited now from the folder"
        doc.add(Heading(name, 3))
        doc.add(
            Para(
                f"layout: {ds.get('layout') or (info or {}).get('layout') or '?'}; counts {source}.", "muted"
            )
        )
        if info and recorded and _changed_since_fit(info.get("counts") or {}, ds):
            doc.add(Para(f"the folder now holds other images or labels than when these runs were fit "
                         f"({info.get('n_images', '?')} images now, {ds.get('n_images', '?')} then). The "
                         "counts below are what the runs used; the audit after them is of the folder now.",
                         "warn", "Changed since the fit:"))
        tables = layouts.get(name, {})
        several_tasks = len({task for task, _ in tables}) > 1
        several_layouts = len({layout for _, layout in tables}) > 1
        # one table per task and split layout the runs used (the first run's counts were shown alone)
        for (task, layout), tds in tables.items():
            counts = _held_out_rest_as_train(tds.get("counts") or {})
            flat = _flatten_counts(counts or (info or {}).get("counts") or {})
            if flat:
                depth = max(len(p) for p, _ in flat)
                names = ["split", "class", "subtype", "level 4", "level 5"][:depth]
                body = [[*p, *([""] * (depth - len(p))), str(n)] for p, n in flat]
                body.append(["total", *([""] * (depth - 1)), str(sum(n for _, n in flat))])
                said = [f"task {task}"] if several_tasks else []
                if several_layouts or layout:  # a held-out test split is not the folder's: always say so
                    said.append(_split_layout_text(tds, bool(counts.get("test"))))
                if said:
                    doc.add(Para(f"{', '.join(said)}: images per split and class, as its runs used them",
                                 "muted"))
                doc.add(Table([*names, "images"], body, {depth}))
        left_out = ds.get("left_out") or []
        if left_out:  # undecodable images: no features, so no run saw them
            shown = ", ".join(f"{e.get('path')} ({e.get('reason')})" for e in left_out[:5])
            more = f" and {len(left_out) - 5} more" if len(left_out) > 5 else ""
            doc.add(Para(f"{len(left_out)} image(s) could not be decoded and were left out of training and "
                         f"testing: {shown}{more}.", "warn", "Left out:"))
        if info:
            _audit(doc, info)


def _held_out_rest_as_train(counts: dict) -> dict:
    """Counts with the split fit records as "all" renamed "train" where a test split sits beside it.

    Why: fit names the images of a folder without split folders "all", and a --test-fraction hold-out
    leaves that name on the rest, so the table read "all | bacteria | 64" above "test | bacteria | 16":
    64 is the training side, not the folder's 80 bacteria images."""
    if not isinstance(counts, dict) or "all" not in counts or not counts.get("test") or "train" in counts:
        return counts
    return {("train" if k == "all" else k): v for k, v in counts.items()}


def _split_layout(ds: dict) -> tuple:
    """What, beyond the images, decided a run's splits: the ``--test-fraction`` hold-out and its seed, which
    run.json's ``dataset`` records and the dataset's digest leaves out (empty: the data's own splits)."""
    fraction = ds.get("test_fraction")
    if not isinstance(fraction, int | float) or isinstance(fraction, bool):
        return ()
    return (float(fraction), ds.get("test_split_seed"))


def _split_layout_text(ds: dict, has_test: bool) -> str:
    """The split layout of a Dataset counts table in words (``has_test``: its counts have a test split)."""
    layout = _split_layout(ds)
    if layout:
        fraction, seed = layout
        drawn = f", seed {seed}" if seed is not None else ""
        # not "of patients": data without patient ids holds out file-name groups
        return f"{100 * fraction:g}% held out as the test split (--test-fraction {fraction:g}{drawn})"
    return "the data's own splits" if has_test else "no test split (validation only)"


def _changed_since_fit(now: dict, ds: dict) -> bool:
    """Whether the folder's images (in all, and NORMAL ones) differ in number from what the runs used.

    Coarse on purpose: fit records counts per task class (normal/bacteria/virus for 3class) and leaves
    out undecodable images, inspect counts folder labels and subtypes, so only totals compare across
    tasks. Adding, removing or relabelling NORMAL images shows; a fit's data digest has the rest.
    """
    then = ds.get("counts") or {}
    total_then = sum(sum(_class_totals(then, s).values()) for s in then) + len(ds.get("left_out") or [])
    total_now = sum(sum(_class_totals(now, s).values()) for s in now)
    if total_now != total_then:
        return True
    if ds.get("left_out"):  # their labels are not recorded: the NORMAL count cannot be compared
        return False

    def normal(counts: dict) -> int:
        return sum(n for s in counts for k, n in _class_totals(counts, s).items() if k.upper() == "NORMAL")

    return normal(now) != normal(then)


def _audit(doc: Document, info: dict) -> None:
    cross = info.get("cross_split_patients") or {}
    dups = info.get("duplicates") or []
    xdups = info.get("cross_split_duplicates") or []
    pps = info.get("patients_per_split") or {}
    missing = info.get("n_without_patient_id") or 0
    # the audit counts an image without a patient id as its own patient: with none, "patients 68" and
    # "patients in test" would claim ids the data does not have
    no_ids = bool(missing) and missing == info.get("n_images")
    who = "images" if no_ids else "patients"
    rows = [["images", str(info.get("n_images", "?"))],
            ["patients", "— (no image has a patient id)" if no_ids else str(info.get("n_patients", "?"))]]
    if missing and not no_ids:
        rows.append(["images without a patient id (each counted as a patient)", str(missing)])
    # inspect names a flat folder's one split "-", which read as a slip ("patients in -") below counts
    # tables that call it "all", as fit does
    rows += [[f"{who} in {'all' if k == '-' else k}", str(v)]
             for k, v in sorted(pps.items(), key=lambda kv: str(kv[0]))]
    rows += [
        ["byte-identical duplicate groups", str(len(dups))],
        ["patients in more than one split", "— (no patient ids)" if no_ids else str(len(cross))],
        ["duplicates across splits", str(len(xdups))],
        ["duplicates with different labels", str(len(info.get("conflicting_duplicates") or []))],
        ["files skipped (not images, unreadable or undecodable)", str(len(info.get("skipped") or []))],
    ]
    doc.add(Table(["audit", "value"], rows, {1}))
    if cross or xdups:
        examples = ", ".join([f"{p} ({'/'.join(map(str, s))})" for p, s in list(cross.items())[:5]]
                             + [" = ".join(map(str, g)) for g in xdups[: max(0, 5 - len(cross))]])
        doc.add(
            Para(
                f"{len(cross)} patient(s) and {len(xdups)} duplicate group(s) span several splits: test "
                f"numbers may be optimistic. Examples: {examples or '—'}",
                "warn",
                "Leak:",
            )
        )
    elif no_ids:
        doc.add(Para("No byte-identical image appears in more than one split; without patient ids, images "
                     "of one patient in two splits cannot be found.", "muted"))
    else:
        doc.add(Para("No patient and no byte-identical image appears in more than one split.", "muted"))
    clashes = info.get("conflicting_duplicates") or []
    if clashes:
        doc.add(Para(f"{len(clashes)} group(s) of byte-identical images carry different labels, so at least "
                     "one label of each is wrong: " + "; ".join(" = ".join(map(str, g)) for g in clashes[:5]),
                     "warn", "Label conflict:"))
    if dups:
        doc.add(Para("duplicate examples: " + "; ".join(" = ".join(map(str, g)) for g in dups[:5]), "muted"))


# ----------------------------------------------------------------------------------------- provenance
SELECTION_KEYS = (
    "method",
    "group_by",
    "folds",
    "fraction",
    "scoring",
    "metric",
    "refit",
    "test_used_for_selection",
)


def _resampled_units(runs: Sequence[RunRecord]) -> set[str]:
    """The "resampled" values the runs' test CIs recorded: fit records "patients", "file-name groups"
    (no image had a patient id), "images" (no groups) or "patients and file-name groups (...)". A CI dict
    without the key says nothing (older fits wrote it only beside the 0.5 CI, not the at-threshold one,
    and defaulting that to "patients" contradicted a recorded "file-name groups"); runs recording none
    at all are older runs, which resampled patients whatever the data had."""
    return ({str(ci["resampled"]) for r in runs for ci in _recorded_cis(r) if ci.get("resampled")}
            or {"patients"})


def _resample_unit(runs: Sequence[RunRecord]) -> str:
    """What the runs' test bootstraps resampled, in words (see ``_resampled_units``)."""
    return "; ".join(resampled_words(u, detail=True) for u in sorted(_resampled_units(runs)))


def _grouped(run: RunRecord) -> str:
    """How a run's folds and hold-out were grouped, in words: by patient, or by file name where the
    dataset recorded no patient id at all (``patient_ids`` 0), which "patient-grouped" would misstate."""
    ds = run.run.get("dataset") if isinstance(run.run.get("dataset"), dict) else {}
    return "file-name-grouped" if ds.get("patient_ids") == 0 else "patient-grouped"


def _without_ids(run: RunRecord) -> str | None:
    """'<root> (N of M images)' when some, not all, of a run's images have no patient id."""
    ds = run.run.get("dataset") if isinstance(run.run.get("dataset"), dict) else {}
    with_ids, n = ds.get("patient_ids"), ds.get("n_images")
    if not isinstance(with_ids, int) or not isinstance(n, int) or not 0 < with_ids < n:
        return None
    return f"{ds.get('root')} ({n - with_ids} of {n} images)"


def _epoch_chosen_on_holdout(run: RunRecord) -> bool:
    """Whether a hold-out run's training watched its validation rows (early stopping, best-epoch
    checkpoint, learning-rate reduction): then the hold-out chose its epoch, not only its rank."""
    from featcache.heads.mlp import watches_holdout

    sel, params = run.run.get("selection"), run.run.get("params")
    return (isinstance(sel, dict) and sel.get("method") == "grouped_holdout" and isinstance(params, dict)
            and watches_holdout(params))


# what fixes the models a run's search scored on validation; --threshold is not among them: it only moves
# the operating point on the same validation predictions
_SEARCH_RUN_KEYS = ("head", "task", "classes", "seed", "metric", "balance", "train_views", "tta", "tta_views",
                    "aug_views")
_SEARCH_SELECTION_KEYS = ("method", "folds", "fraction", "group_by", "seed", "refit", "train_indices_digest",
                          "val_indices_digest")


def _search_setting(run: RunRecord) -> str:
    """The canonical text of what, besides its configs, decided the validation scores a run's search
    compared: its head, task, features (their digests), training settings and validation splits."""
    import json

    caches = run.run.get("caches") if isinstance(run.run.get("caches"), list) else []
    setting = {**{k: run.run.get(k) for k in _SEARCH_RUN_KEYS},
               **{f"selection.{k}": _selection_of(run).get(k) for k in _SEARCH_SELECTION_KEYS},
               "features": [c.get("features_digest") or c.get("config_hash") for c in caches
                            if isinstance(c, dict)]}
    return json.dumps(setting, sort_keys=True, default=str)


def _compared(runs: Sequence[RunRecord]) -> tuple[int, int]:
    """(runs, configs) behind the best validation score of ``runs``: a CV run scored every config of its
    grid on its folds, and a hold-out run was chosen from its sweep's whole grid (run.json's grid size),
    whether or not `--id`, `--tag` or `--top` keeps the other configs' runs in the report; each sweep
    counts once (as many configs as its grid, or as its runs here where no size was recorded).

    A search fitted again with only another --threshold rule scored the same models on the same validation
    images, so it counts once. Why: fitted under youden and under sensitivity:0.9, the 20 configs of a
    logreg and a knn search read "the best of 40 configs" in the report and its Methods."""
    import json

    searches: dict[str, int] = {}  # CV searches: one grid each
    sweeps: dict[str, tuple[int, set[str]]] = {}  # hold-out sweeps: grid size, configs of their runs here
    for r in runs:
        setting = _search_setting(r)
        cv = _cv_grid(r)
        if cv:
            searches[json.dumps([setting, [g["params"] for g in cv]], sort_keys=True, default=str)] = len(cv)
            continue
        grid = r.run.get("grid") if isinstance(r.run.get("grid"), dict) else {}
        size = grid.get("size") if isinstance(grid.get("size"), int) and grid["size"] > 0 else 0
        listed = grid.get("configs") if isinstance(grid.get("configs"), list) and grid["configs"] else None
        params = json.dumps(r.params, sort_keys=True, default=str)
        if listed is not None:  # the sweep's grid as fit recorded it
            key = json.dumps([setting, listed], sort_keys=True, default=str)
        elif size > 1:  # a grid recorded by its size alone (older runs): by sweep, as before
            key = str(r.run.get("sweep_id") or r.id)
        else:
            key = json.dumps([setting, params], sort_keys=True, default=str)
        grid_size, shown = sweeps.get(key, (0, set()))
        sweeps[key] = (max(grid_size, size), shown | {params})
    return len(runs), sum(searches.values()) + sum(max(size, len(shown)) for size, shown in sweeps.values())


def _selection_optimism(runs: Sequence[RunRecord]) -> str:
    """Why the best validation score is optimistic, when it is the best of several: a maximum over noisy
    estimates on the same validation images is biased upward (selection bias), whether or not a
    hold-out also chose an epoch. Empty for a single config: nothing was chosen among. Counted per task:
    a binary and a 3-class run are never compared with each other."""
    by_task: dict[str, list[RunRecord]] = {}
    for r in runs:
        by_task.setdefault(str(r.task), []).append(r)
    counts = {task: _compared(members) for task, members in sorted(by_task.items())}
    if all(n_configs < 2 for _, n_configs in counts.values()):
        return ""

    def what(n_runs: int, n_configs: int) -> str:
        return (f"{n_configs} configs" if n_configs == n_runs
                else f"{n_configs} configs ({n_runs} run(s) here; each CV run's and each sweep's grid "
                     "counted)")

    chosen = {task: c for task, c in counts.items() if c[1] >= 2}  # one config: nothing chosen among
    if len(counts) == 1:
        best_of = what(*next(iter(counts.values())))
    else:
        best_of = "; ".join(f"{what(*c)} for task {task}" for task, c in chosen.items())
    return (f"The best validation score is the best of {best_of} scored on validation data from the same "
            "training images (hold-out or out-of-fold predictions), a maximum over noisy estimates, so it is "
            "optimistic (selection bias), the more so the more configs were compared")


def _selection_of(run: RunRecord) -> dict:
    return run.run["selection"] if isinstance(run.run.get("selection"), dict) else {}


_SETUP_WORDS = {
    "balance=undersample": "each training set's larger classes cut at random to the smallest class",
    "balance=undersample-subtypes": "each training set's Kermany subtypes (normal, bacteria, virus) cut at "
                                    "random to the smallest",
    "balance=oversample": "each training set's smaller classes topped up with cached augmented views",
}


def _training_setup_text(runs: Sequence[RunRecord]) -> str:
    """What some runs trained on besides their configs (--balance, --train-views, --aug-views), counted.

    Why: a run trained on an undersampled set or on flipped copies too read like a plain one in every table
    and in Methods ("one model per config, trained on the rest"), with other numbers. Validation and test
    images are never resampled; TTA has its own sentence (``_tta_text``).
    """
    counts: dict[str, int] = {}
    named: dict[str, str] = {}  # setting -> its views as recorded, listed
    for r in runs:
        for k, v in training_settings(r.run).items():
            if k != "tta":
                counts[f"{k}={v}"] = counts.get(f"{k}={v}", 0) + 1
                if isinstance(r.run.get(k), list):
                    # from the recorded list, never by splitting the short form at '+': view names hold
                    # '+' themselves (rot+20 read "orig, rot, 20 views")
                    named[f"{k}={v}"] = ", ".join(map(str, r.run[k]))
    if not counts:
        return ""

    def said(setting: str, n: int) -> str:
        views = named.get(setting, setting.split("=", 1)[1])
        what = _SETUP_WORDS.get(setting) or (
            f"each training image also seen as its cached {views} views" if setting.startswith("train_views=")
            else f"drawn from the cached views {views}")
        return f"{setting} ({what}) in {n} of {len(runs)} run(s)"

    return ("Training rows were changed besides the configs (the config columns list it per run; validation "
            "and test images were not resampled): " + "; ".join(said(k, n) for k, n in sorted(counts.items()))
            + ". ")


def _fusion_text(runs: Sequence[RunRecord]) -> str:
    """Which runs fed their head several backbones' features, concatenated, and in which order.

    Why: Methods listed every backbone extracted ("frozen mobilenet (...); mobilenet-0.75 (...)") in one
    sentence whether a run fused them (fit --backbone a,b) or each was fitted alone (run --separate), so a
    paper following it could not tell the fused head from two single ones; only the leaderboard's
    'a+b' said so.
    """
    fused: dict[str, int] = {}
    for r in runs:
        bbs = [b for b in (r.run.get("backbones") or []) if isinstance(b, dict)]
        if len(bbs) > 1:
            dims = [b.get("feature_dim") for b in bbs]
            key = " and ".join(f"{b.get('name')} ({b.get('feature_dim', '?')}-d)" for b in bbs)
            if all(isinstance(d, int) for d in dims):
                key += f", {sum(dims)}-d in all,"
            fused[key] = fused.get(key, 0) + 1
    if not fused:
        return ""
    return ("Feature fusion: " + "; ".join(
        f"in {n} of {len(runs)} run(s) each image's cached features of {key} were concatenated in that "
        "order into the one vector the head was trained and evaluated on"
        for key, n in sorted(fused.items())) + ". ")


def _tta_text(runs: Sequence[RunRecord]) -> str:
    """With --tta, fit's CV search scores validation folds and an mlp's callbacks watch its hold-out on the
    orig view alone, while every prediction it reports (and the threshold) averages the views: the rule
    chosen under is not the rule reported, and a paper's reader must be told."""
    tta = [r for r in runs
           if r.run.get("tta") and isinstance(r.run.get("tta_views"), list) and r.run["tta_views"]]
    if not tta:
        return ""
    views = sorted({", ".join(["orig", *map(str, r.run["tta_views"])]) for r in tta})
    chosen = []
    if any(_selection_of(r).get("method") == "grouped_kfold" for r in tta):
        chosen.append("a CV head's search scored its configs on the validation folds")
    if any(_epoch_chosen_on_holdout(r) for r in tta):
        chosen.append("an mlp's early stopping, checkpoint or learning-rate reduction watched its hold-out")
    text = (f"With test-time augmentation ({len(tta)} of {len(runs)} run(s)) the validation (out-of-fold or "
            "hold-out) and test predictions reported, the threshold chosen on them and the ranking of runs "
            f"average the class probabilities over the views {'; '.join(views)}")
    if chosen:
        text += (f", while {' and '.join(chosen)} on single-view (orig) predictions only: those choices were "
                 "made under one prediction rule and are reported under another")
    return text + ". "


def _threshold_transfer_text(runs: Sequence[RunRecord]) -> str:
    """A CV head's threshold comes from the pooled out-of-fold probabilities of its K fold models and is
    applied to another model (the refit, or the first fold's): a transfer the reader should know of."""
    moved = [r for r in runs if _selection_of(r).get("method") == "grouped_kfold"
             and isinstance(r.run.get("threshold"), dict)
             and isinstance(r.run["threshold"].get("chosen"), int | float)
             and r.run["threshold"]["chosen"] != 0.5]
    if not moved:
        return ""
    folds = "/".join(sorted({str(_selection_of(r).get("folds", "K")) for r in moved}))
    models = []
    if any(_selection_of(r).get("refit", True) for r in moved):
        models.append("the model refit on all training images")
    if any(not _selection_of(r).get("refit", True) for r in moved):
        models.append("the first fold's model (--no-refit)")
    return (f"For CV heads ({len(moved)} run(s) with a threshold other than 0.5) the threshold was chosen on "
            f"the pooled out-of-fold probabilities of the {folds} fold models and then applied unchanged to "
            f"another model, {' or '.join(models)}, whose probabilities need not be scaled like theirs, so "
            "its test numbers at that threshold rest on that transfer. ")


def _patient_naming_text(runs: Sequence[RunRecord]) -> str:
    """The one patient-grouping assumption featcache cannot check: Kermany's IM-k and NORMAL2-IM-k are
    taken as different patients (datasets._IM_RE), though 211 numbers occur under both prefixes."""
    from featcache.datasets import im_numbers_under_both_prefixes, is_im_name

    def paths(r: RunRecord) -> list[str]:
        return [path for p in (r.val, r.test) if p is not None for path in p.relpaths]

    kermany = [r for r in runs if (r.run.get("dataset") or {}).get("layout") == "kermany"
               and any(is_im_name(path) for path in paths(r))]
    if not kermany:
        return ""
    both = im_numbers_under_both_prefixes({path for r in kermany for path in paths(r)})
    return ("Patients were identified from Kermany file names (person447, IM-0115, NORMAL2-IM-1427), and "
            "IM-k and NORMAL2-IM-k were taken as different patients: an assumption. Among these runs' "
            f"validation and test images {both} number(s) k occur under both prefixes; in the official "
            "training NORMAL folder 211 do, and a pixel comparison there neither confirmed nor ruled out "
            "that they are the same people (were they, patient-grouped selection could put one person on "
            "both sides). ")


def _head_construction_text(runs: Sequence[RunRecord]) -> str:
    """One sentence per head in the runs: the estimator classes and the preprocessing featcache builds
    around them (featcache/heads/*.py). Why: Methods named heads only by featcache's names, so a reader
    could not tell that logreg, svm and knn standardise the features and mlp does not, that a linear svm is
    LinearSVC (squared hinge) and an RBF one SVC, or that "method=sigmoid" among svm's settings is Platt
    scaling."""
    heads = {r.head for r in runs}
    first = next((h for h in ("logreg", "svm", "knn") if h in heads), None)
    scaled = ("on features standardised by a StandardScaler fitted on the images each model is trained on "
              "(each CV fold's training part, then the final model's)")

    def again(head: str) -> str:  # the StandardScaler said once, by the first head that has one
        return scaled if head == first else "on features standardised in the same way"

    out = []
    if "logreg" in heads:
        out.append(f"logreg is scikit-learn's LogisticRegression {again('logreg')}.")
    if "svm" in heads:
        mine = [r for r in runs if r.head == "svm"]
        kernels = {str(_setting(r, "kernel") or "rbf") for r in mine}
        models = [m for k, m in (("linear", "LinearSVC for kernel=linear (liblinear, squared hinge loss)"),
                                 ("rbf", "SVC for kernel=rbf (libsvm)")) if k in kernels]
        grouped = " or ".join(sorted({_grouped(r) for r in mine}))
        units = " or ".join(sorted({"file-name groups" if _grouped(r) == "file-name-grouped" else "patients"
                                    for r in mine}))
        out.append(f"svm is scikit-learn's {' and '.join(models) or 'SVM'} {again('svm')}; the CV search "
                   "scores the uncalibrated SVM, and the final model's probabilities come from Platt scaling "
                   f"(CalibratedClassifierCV, method=sigmoid) over 3 {grouped} folds (fewer where a class "
                   f"has fewer {units}), averaging the calibrated models of the folds (ensemble=auto).")
    if "knn" in heads:  # "distance-weighted" only where a run used it (it read so beside uniform weights)
        weighted = any(_setting(r, "weights") == "distance" for r in runs if r.head == "knn")
        out.append(f"knn is scikit-learn's KNeighborsClassifier {again('knn')}; a class's probability is its "
                   + ("(weights=distance: distance-weighted) " if weighted else "")
                   + "share of the k nearest training images, k capped at the images a model is trained on.")
    if "mlp" in heads:
        from featcache.heads.mlp import DEFAULTS

        hps = [{**DEFAULTS, **(r.run.get("hyperparameters") or r.run.get("params") or {})}
               for r in runs if r.head == "mlp"]

        names = {"adam": "Adam", "sgd": "SGD", "nadam": "Nadam", "rmsprop": "RMSprop"}

        def said(key: str) -> str:
            return "/".join(sorted({names.get(str(h.get(key)), str(h.get(key))) for h in hps}))

        extras = [text for key, text in (("dropout", ", Dropout after each where a config sets dropout"),
                                         ("l2", ", an L2 weight penalty where a config sets l2"))
                  if any(h.get(key) for h in hps)]
        losses = sorted({"binary cross-entropy" if h.get("output_activation") == "sigmoid"
                         else "sparse categorical cross-entropy" for h in hps})
        out.append(f"mlp is a Keras model: Dense hidden layers ({said('activation')} activation, "
                   f"Glorot-uniform initialised{''.join(extras)}), then a Dense output with "
                   f"{said('output_activation')}, trained by minibatch {said('optimizer')} on "
                   f"{' / '.join(losses)} (computed from the logits), on the cached features as they are "
                   "(not standardised).")
    return " ".join(out) + (" " if out else "")


_UNSTATED_SETTINGS = {"verbose", "n_jobs", "random_state"}  # no effect on the numbers, or the seed (said)


def _head_settings(runs: Sequence[RunRecord]) -> str:
    """Each head's settings that every one of its runs shared and no grid searched, from run.json's
    resolved ``hyperparameters``: what a reader needs to reproduce the head (batch size, optimizer,
    activation, solver, max_iter...), which the grid views, showing only searched values, left out."""
    parts = []
    for head in sorted({r.head for r in runs}):
        mine = [r for r in runs if r.head == head]
        hps = [r.run["hyperparameters"] for r in mine if isinstance(r.run.get("hyperparameters"), dict)]
        if not hps or len(hps) < len(mine):
            continue
        searched: set[str] = set()
        for r in mine:
            searched |= set(r.run.get("params") or {})
            searched |= {k for g in (_cv_grid(r) or []) for k in g["params"]}
        shared = [k for k in sorted(hps[0]) if k not in searched
                  and k.rsplit("__", 1)[-1] not in searched  # svm's estimator__C is its searched C
                  and k.rsplit("__", 1)[-1] not in _UNSTATED_SETTINGS  # estimator__random_state too
                  and hps[0][k] != "deprecated"  # scikit-learn's placeholder (penalty in 1.8+): no setting
                  and all(h.get(k) == hps[0][k] for h in hps)]
        if shared:
            parts.append(f"{head}: " + ", ".join(f"{k}={format_value(hps[0][k])}" for k in shared))
    if not parts:
        return ""
    return ("Settings every run of a head shared, beside the searched ones in the grid views: "
            + "; ".join(parts) + ". ")


def _methods_text(runs: Sequence[RunRecord]) -> str:
    """A methods paragraph a reader can adapt for a paper, written from what the runs recorded."""
    weights_word = {"imagenet": "ImageNet-pretrained", "none": "randomly initialised, --weights none"}
    def weights(b: dict) -> str:
        return weights_word.get(str(b.get("weights")), f"weights from {b.get('weights')}")

    backbones = sorted({
        f"{b.get('name')} ({weights(b)}, {b.get('pooling')} pooling at {b.get('image_size')} px, "
        f"{b.get('feature_dim', '?')}-d)"
        for r in runs for b in (r.run.get("backbones") or []) if isinstance(b, dict)
    })
    heads: dict[str, int] = {}
    for r in runs:
        heads[r.head] = heads.get(r.head, 0) + 1
    sel = [r.run.get("selection") for r in runs if isinstance(r.run.get("selection"), dict)]
    protocols = []
    grouped = " or ".join(sorted({_grouped(r) for r in runs}))  # file-name-grouped where no patient ids
    cv_folds = sorted({str(s.get("folds")) for s in sel if s.get("method") == "grouped_kfold"})
    if cv_folds:
        refit = any(s.get("refit") for s in sel if s.get("method") == "grouped_kfold")
        protocols.append(f"{grouped} stratified {'/'.join(cv_folds)}-fold cross-validation over each "
                         "head's grid (out-of-fold predictions of the chosen config are its validation "
                         "predictions)" + (", the chosen config then refit on all training images" if refit
                                           else ""))
    fractions = sorted({f"{100 * s['fraction']:g}%" for s in sel if s.get("method") == "grouped_holdout"
                        and isinstance(s.get("fraction"), int | float)})
    achieved = sorted({f"{100 * s['achieved_fraction']:.1f}%" for s in sel
                       if s.get("method") == "grouped_holdout"
                       and isinstance(s.get("achieved_fraction"), int | float)})
    if fractions:  # whole patients move, so the hold-out's share is near the one asked for, not equal
        got = f"; {'/'.join(achieved)} achieved, keeping each patient's images together" if achieved else ""
        watched = ("; where a config stopped early, kept its best epoch or lowered its learning rate on "
                   "the hold-out, the hold-out also chose its epoch, so its validation numbers are slightly "
                   "optimistic" if any(_epoch_chosen_on_holdout(r) for r in runs) else "")
        held = [s for s in sel if s.get("method") == "grouped_holdout"]
        replanned = any(isinstance(s.get("refit_plan"), dict) and not s["refit_plan"].get("as_configured")
                        for s in held)
        refit_text = ""
        if any(s.get("refit") for s in held):
            plan = (" (for the hold-out model's number of epochs, without validation callbacks)"
                    if replanned else "")
            refit_text = ("; with --refit the model tested was trained again on all training images, "
                          f"hold-out included{plan}, while its validation numbers, threshold and training "
                          "curves are the hold-out model's")
        protocols.append(f"a {grouped} stratified hold-out of {'/'.join(fractions)} of the training "
                         f"images requested{got} (one model per config, trained on the rest{watched})"
                         + refit_text)

    def rule(t: dict) -> str:
        target = t.get("target_sensitivity")
        if t.get("method") == "sensitivity":
            return ("the highest threshold reaching validation sensitivity "
                    + (f"{target:g}" if isinstance(target, int | float) else "(target not recorded)"))
        return "Youden's J" if t.get("method") == "youden" else str(t.get("method"))

    thr = sorted({rule(r.run["threshold"]) for r in runs if isinstance(r.run.get("threshold"), dict)
                  and r.run["threshold"].get("method") and r.run["threshold"].get("chosen") is not None})
    boots = sorted({str(((r.metrics.get("test") or {}).get("ci") or {}).get("n_boot")) for r in runs
                    if isinstance(r.metrics.get("test"), dict)} - {"None"})
    seeds = sorted({str(r.run.get("seed")) for r in runs})
    versions = next((r.run.get("versions") for r in runs if isinstance(r.run.get("versions"), dict)), {})
    software = ", ".join(f"{k} {versions[k]}" for k in ("featcache", "keras", "tensorflow", "jax",
                                                         "scikit-learn", "numpy", "python") if k in versions)
    revisions = _source_revisions(runs)
    if revisions and software:
        software = software.replace(f"featcache {versions.get('featcache')}",
                                    f"featcache {versions.get('featcache')} (git {', '.join(revisions)})", 1)
    text = (f"Features were extracted once by frozen {'; '.join(backbones) or 'backbones'} and cached. "
            f"Heads were trained on the cached features: "
            f"{', '.join(f'{h} ({n} run(s))' for h, n in sorted(heads.items()))}. ")
    text += _fusion_text(runs) + _head_construction_text(runs) + _head_settings(runs)
    if protocols:
        text += "Models were chosen on the training split only, by " + "; or ".join(protocols) + ". "
        text += _patient_naming_text(runs)  # the grouping those patient-grouped splits rest on
    has_test = any(r.test is not None or isinstance(r.metrics.get("test"), dict) for r in runs)
    optimism = _selection_optimism(runs)
    if optimism:
        text += optimism + ("; the test-split numbers of the chosen models are the unbiased estimate. "
                            if has_test else ". ")
    if thr:
        text += (f"For binary tasks a decision threshold was chosen on the validation predictions "
                 f"({', '.join(thr)}); headline metrics use 0.5 and the chosen threshold is reported beside "
                 "it. ")
    text += _training_setup_text(runs)
    text += _threshold_transfer_text(runs) + _tta_text(runs) + _clipped_loss_text(runs)
    if not has_test:
        return text + "No test split was used: every number is a validation estimate." + (
            f" Software: {software}." if software else "")
    held = sorted({f"{100 * d['test_fraction']:g}%" for d in (r.run.get("dataset") for r in runs)
                   if isinstance(d, dict) and isinstance(d.get("test_fraction"), int | float)})
    if held:  # a test split featcache carved: say how, as a reader would otherwise take it for the data's
        text += ("The test split was held out of the training images by fit --test-fraction "
                 f"({'/'.join(held)} of the patients requested, whole patients, stratified by Kermany "
                 "subtype or class, seed 0) before any choice. ")
    text += ("The chosen model of each run was evaluated once on the test split, which played no part in "
             "any choice")
    if boots:
        text += (f"; 95% confidence intervals are percentile bootstrap intervals over {'/'.join(boots)} "
                 f"resamples of {_resample_unit(runs)}, seed {'/'.join(seeds)}")
        units = _resampled_units(runs)  # what the exact and score-type intervals counted
        counted = (next(iter(units)) if len(units) == 1 and next(iter(units)) in
                   ("patients", "images", "file-name groups") else "groups (patients, or file names)")
        exact = sorted({name for r in runs for ci in _recorded_cis(r)
                        for name in ci.get("exact_at_bound") or ()})
        if exact:
            text += (f"; where a proportion ({', '.join(exact)}) was observed at 0 or 1, every resample "
                     "gives the same value and the percentile interval is a point, so the exact "
                     f"Clopper-Pearson interval over the {counted} counted is shown instead")
        if any(ci.get("auc_score_bound") for r in runs for ci in _recorded_cis(r)):
            text += ("; an AUC of exactly 1 (perfect separation, the same in every resample) gets the "
                     "score-type bound 1 - θ = 1.96 SE(θ) with Hanley and McNeil's standard error in "
                     f"Newcombe's symmetric form over the positive and negative {counted} counted (a "
                     "multi-class AUC: the mean of the classes' one-vs-rest bounds)")
        if any("macro_f1" in (ci.get("point_at_bound") or ()) for r in runs for ci in _recorded_cis(r)):
            text += ("; a macro F1 of exactly 1 (or 0) is the same in every resample and has no exact "
                     "interval: its [1, 1] is a point, not a measure of certainty")
        text += _degenerate_ci_text(runs, counted)
    return text + (f". Software: {software}." if software else ".")


def _clipped_loss_text(runs: Sequence[RunRecord]) -> str:
    """A sentence when some run gave an image probability 0 for its true class (a kNN's votes, a saturated
    float32 output): log loss is infinite there, and the number shown is set by the clip at
    LOG_LOSS_CLIP (-log(1e-15) = 34.5 per such image), not by the model; --metric loss then ranks by it."""
    from featcache.metrics import LOG_LOSS_CLIP

    hit = 0
    for r in runs:
        preds = [p for p in (r.val, r.test) if p is not None and len(p.y_true)]
        if any((p.proba[np.arange(len(p.y_true)), p.y_true] < LOG_LOSS_CLIP).any() for p in preds):
            hit += 1
    if not hit:
        return ""
    return (f"In {hit} of {len(runs)} run(s) some validation or test image got probability 0 for its true "
            f"class (hard votes such as kNN's, or a saturated output), where log loss is infinite: the "
            f"loss shown clips that probability at {LOG_LOSS_CLIP:g} ({-np.log(LOG_LOSS_CLIP):.1f} per such "
            "image; scikit-learn clips at float64's machine epsilon, 2.2e-16), so it measures the clip, not "
            "the model, and is not comparable with a calibrated head's. ")


def _source_revisions(runs: Sequence[RunRecord]) -> list[str]:
    """The git revisions of featcache's source the runs recorded (editable installs), sorted."""
    envs = [r.run["environment"] for r in runs if isinstance(r.run.get("environment"), dict)]
    return sorted({str(env["source_revision"]) for env in envs if env.get("source_revision")})


def _degenerate_ci_text(runs: Sequence[RunRecord], counted: str) -> str:
    """Methods' words for intervals the percentile bootstrap could not make whole: those of no width away
    from 0 and 1 (every resample gave the same value), and those some resamples could not score (no image
    of a class the metric needs was drawn: those resamples are left out, so the interval is conditional on
    drawing both). Why: a statistics audit found [0.75, 0.75] for the sensitivity of a test split whose
    positives were one patient, and n_boot 1000 where 111 resamples had no positive."""
    causes: dict[str, set[str]] = {}  # metric -> why its interval had no width, per run where it can be told
    for r in runs:
        for name in {name for ci in _recorded_cis(r) for name in ci.get("no_width") or ()}:
            causes.setdefault(name, set()).add(_no_width_cause(r, counted))
    flat = sorted(causes)
    left: dict[str, int] = {}
    boots: set[int] = set()
    for r in runs:
        for ci in _recorded_cis(r):
            for name, n in (ci.get("undefined_resamples") or {}).items():
                left[name] = max(left.get(name, 0), int(n))
                boots.add(int(ci.get("n_boot") or 0))
    text = ""
    if flat:
        told = "; ".join(f"{name}: {', '.join(sorted(c for c in causes[name] if c))}" for name in flat
                         if any(causes[name]))
        text += (f"; an interval of no width away from 0 and 1 ({', '.join(flat)}) means every resample gave "
                 f"the same value{f' ({told})' if told else ''} and is no measure of certainty")
    if left:
        most = ", ".join(f"{name} {n}" for name, n in sorted(left.items()))
        text += (f"; resamples that drew no image of a class a metric needs leave it undefined and are left "
                 f"out of its interval (at most, of {'/'.join(map(str, sorted(boots)))}: {most}), so such an "
                 "interval assumes every class is drawn")
    return text


def _no_width_cause(run: RunRecord, counted: str) -> str:
    """Why every bootstrap resample of a run's test split gave one value, where its test predictions tell
    ("" where they do not): a class absent from the split, one score for every image, or one group (a
    patient) holding every test image of a class. Why: Methods gave the last cause for all of them, also
    for a model that scored every image alike (AUC [0.5, 0.5]) and for a split of one class."""
    pred = run.test
    if pred is None or not len(pred.y_true):
        return ""
    absent = _absent_classes(pred)
    if absent:
        return f"no {' or '.join(absent)} image in the test split"
    if np.ptp(pred.proba, axis=0).max() == 0:
        return "a model gave every test image the same score"
    unit = {"patients": "patient", "file-name groups": "file-name group"}.get(counted, "group")
    for i, name in enumerate(pred.classes):
        members = np.flatnonzero(np.asarray(pred.y_true) == i)
        if len(members) == 1:
            return f"one {name} image in the test split"
        if pred.groups is not None and len({pred.groups[j] for j in members}) == 1:
            return f"one {unit} holding every {name} test image"
    return ""


def _recorded_cis(run: RunRecord) -> list[dict]:
    """The CI dicts a run recorded for its test split (at 0.5 and at its chosen threshold)."""
    test = run.metrics.get("test") if isinstance(run.metrics.get("test"), dict) else {}
    at_thr = test.get("at_threshold") if isinstance(test.get("at_threshold"), dict) else {}
    return [ci for ci in (test.get("ci"), at_thr.get("ci")) if isinstance(ci, dict)]


def _counted(values: dict[str, int], n_runs: int) -> str:
    """'2.21.0' when every run has it; else each value with its number of runs ('jax (7 of 21 runs)'):
    a pooled list would read as if every value applied to every run."""
    if len(values) == 1 and next(iter(values.values())) == n_runs:
        return next(iter(values))
    runs = f"run{'s' if n_runs != 1 else ''}"
    return ", ".join(f"{v} ({n} of {n_runs} {runs})" for v, n in sorted(values.items()))


def _extracted_with(cache: dict) -> str:
    """The Keras backend(s) that computed a cache's rows, with the batch sizes where recorded."""
    sessions = cache.get("extraction_sessions") if isinstance(cache.get("extraction_sessions"), list) else []
    created = cache.get("extracted_with") if isinstance(cache.get("extracted_with"), dict) else {}
    seen: list[str] = []
    if not sessions or (sessions[0] if isinstance(sessions[0], dict) else {}).get("first_row", 0) > 0:
        seen.append(str(created.get("backend", "?")))  # rows added before sessions were recorded
    for s in sessions:
        if isinstance(s, dict):
            backend = str((s.get("versions") or {}).get("backend", "?"))
            seen.append(backend + (f" (batch {s['batch_size']})" if "batch_size" in s else ""))
    return ", ".join(dict.fromkeys(seen)) or "?"


def _provenance_section(doc: Document, runs: Sequence[RunRecord]) -> None:
    doc.section("Provenance", "provenance")
    caches: dict[str, list[str]] = {}
    for r in runs:
        bbs = r.run.get("backbones") or []
        for i, c in enumerate(r.run.get("caches") or []):
            if not isinstance(c, dict):
                continue
            bb = bbs[i] if i < len(bbs) and isinstance(bbs[i], dict) else {}
            digest = str(c.get("weights_digest") or bb.get("weights_digest") or "")
            features = str(c.get("features_digest") or "")
            caches.setdefault(  # one file holds other values after a re-extraction: one row per content
                f"{c.get('path')}|{features}",
                [
                    str(bb.get("name", r.backbone)),
                    str(bb.get("weights", "?")),
                    str(bb.get("pooling", "?")),
                    str(bb.get("image_size", bb.get("input_size", "?"))),
                    digest[:16],
                    Path(str(c.get("path"))).name,
                    str(c.get("n_rows", "?")),
                    str(c.get("config_hash", ""))[:12],
                    features[:12] or "?",
                    _extracted_with(c),
                ],
            )
    if caches:
        doc.add(Heading("Feature caches", 3))
        doc.add(
            Table(
                [
                    "backbone",
                    "weights",
                    "pooling",
                    "size",
                    "weights sha256",
                    "cache file",
                    "rows",
                    "config hash",
                    "features sha256",
                    "extracted with",
                ],
                list(caches.values()),
                {6},
                caption="rows: one per distinct image content and view, so byte-identical files share a "
                "row and a cache can hold fewer rows than the folder has images.",
            )
        )
    selections = sorted(
        {
            config_string({k: v for k, v in r.run["selection"].items() if k in SELECTION_KEYS})
            for r in runs
            if isinstance(r.run.get("selection"), dict)
        }
    )
    seeds = sorted({str(r.run.get("seed")) for r in runs if r.run.get("seed") is not None})
    # how dense heads were trained: fused bfloat16 and keras.fit float32 give (slightly) different numbers
    trained: dict[str, int] = {}
    for r in runs:
        if isinstance(r.run.get("trainer"), dict):
            how = describe_trainer(r.run["trainer"], detail=False)
            trained[how] = trained.get(how, 0) + 1
    doc.add(Heading("Model selection and seeds", 3))
    doc.add(
        Table(
            ["item", "value"],
            [["selection", s] for s in selections]
            + [["seeds", ", ".join(seeds) or "—"]]
            + [["mlp training", f"{how}: {n} run(s)"] for how, n in sorted(trained.items())],
        )
    )
    versions: dict[str, dict[str, int]] = {}  # item -> value -> runs
    for r in runs:
        env = r.run.get("environment") if isinstance(r.run.get("environment"), dict) else {}
        items = {str(k): v for k, v in (r.run.get("versions") or {}).items()}
        if env.get("source_revision"):  # an editable install: the version number does not pin the code
            items["featcache source (git)"] = env["source_revision"]
        items.update({f"${k}": v for k, v in (env.get("variables") or {}).items()})
        items["Keras backend"] = keras_backend_of(r) or "not recorded"
        for k, v in items.items():
            counts = versions.setdefault(k, {})
            counts[str(v)] = counts.get(str(v), 0) + 1
    if versions:
        doc.add(Heading("Versions", 3))
        doc.add(Table(["package", "version(s)"],
                      [[k, _counted(v, len(runs))] for k, v in sorted(versions.items())]))
        dirty = sorted(v for v in versions.get("featcache source (git)", {}) if v.endswith("-dirty"))
        if dirty:  # the revision alone does not pin the code these runs ran
            doc.add(Para(f"featcache's source had uncommitted changes when some runs were made "
                         f"({', '.join(dirty)}): that revision alone does not reproduce them.", "note"))
    commands: list[str] = []
    for r in runs:
        text = replay_command(r.run)
        if text and text not in commands:
            commands.append(text)
    if commands:
        doc.add(Heading("Command lines", 3))
        doc.add(Code(commands[:30] + ([f"... and {len(commands) - 30} more"] if len(commands) > 30 else [])))


# ----------------------------------------------------------------------------------------------- main
REPORT_FILES = ("report.html", "report.md", "leaderboard.csv", "leaderboard.json")
STAGING_PREFIX = ".staging-"


def _remove_stale_staging(out_dir: Path) -> None:
    """Remove staging folders that killed report commands left (their process is gone)."""
    import shutil

    for d in out_dir.glob(f"{STAGING_PREFIX}*"):
        pid = d.name[len(STAGING_PREFIX):].split("-")[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except OSError:  # exists, another user's: leave it
            pass


def _publish(staging: Path, out_dir: Path) -> None:
    """Move a fully written report from ``staging`` into ``out_dir``, replacing the previous one.

    Why a staging folder: writing the four files and the figures one by one in place meant a kill midway
    left an HTML of the new report beside the Markdown, CSV and figures of the old one. Now everything is
    written first, and only renames (milliseconds) touch the published files.
    """
    import shutil

    crash_point("report.staged")
    old_assets = out_dir / ASSETS
    if old_assets.is_dir():
        os.rename(old_assets, staging / f"{ASSETS}.old")
    os.rename(staging / ASSETS, old_assets)
    for name in REPORT_FILES:
        os.replace(staging / name, out_dir / name)
    shutil.rmtree(staging, ignore_errors=True)


def build_document(
    runs: Sequence[RunRecord],
    rows: list[dict],
    skipped: Sequence[tuple[str, str]],
    options: ReportOptions,
    runs_dir: Path,
    progress: ProgressFn | None = None,
    n_selected: int | None = None,
    searched: tuple[Sequence[RunRecord], list[dict]] | None = None,
) -> Document:
    """Assemble every section (format-neutral) from the selected runs and their leaderboard rows.

    ``searched``: every run ranked and its rows, when ``--top`` shows fewer: the grid views, methods and
    provenance describe all of them (a methods paragraph and grid view written from the top runs only
    understated the search the winner came from: "2 configs, fixed lr" of a 16-config lr sweep).
    """
    from featcache import __version__

    all_runs, all_rows = searched if searched is not None else (runs, rows)

    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    has_test = any(r.get("test_accuracy") is not None for r in rows)
    doc = Document(
        options.title,
        f"{len(rows)} run(s) from {runs_dir} · ranked by validation {options.metric} · generated {now}",
    )
    _heroes(doc, rows, all_rows, options)
    _callouts(doc, runs, rows, skipped, options, all_runs, all_rows)
    _leaderboard_section(doc, rows, options, has_test, n_selected or len(runs), runs, all_runs)
    by_id = {r.id: r for r in runs}
    _paired_section(doc, rows, by_id, options.group_by, options.figure_formats)
    _top_runs_section(doc, sorted(rows, key=lambda r: r["overall_rank"]), by_id, options, progress)
    shown = {r["run_id"] for r in rows}
    _grid_section(doc, all_rows, options, {r.id: r for r in all_runs}, shown)
    _dataset_section(doc, runs, options, progress)
    doc.section("Methods", "methods")
    methods = _methods_text(all_runs)
    if len(all_runs) > len(runs):
        methods += (f" This report's leaderboard shows {len(runs)} of these {len(all_runs)} runs (--top); "
                    "its grid views show every hold-out config.")
    doc.add(Para(methods))
    _provenance_section(doc, all_runs)
    if skipped:
        doc.add(Heading("Runs left out", 3))
        doc.add(Table(["folder", "reason"], [[a, b] for a, b in skipped]))
    doc.footer = f"Generated by featcache {__version__} on {now}. " + _footer_text(all_runs)
    return doc


def _footer_text(runs: Sequence[RunRecord]) -> str:
    """What the report's numbers are recomputed from and what its 95% intervals are.

    Why: a validation-only report's footer spoke of the "bootstrap intervals resampling test patients" of
    runs that had no test split; there the only intervals are the subtype tables' over the validation
    predictions, and the footer says so."""
    if any(r.test is not None or isinstance(r.metrics.get("test"), dict) for r in runs):
        return ("Metrics are recomputed from each run's prediction CSVs; 95% CIs are the fit's percentile "
                f"bootstrap intervals resampling {_resample_unit(runs)}, with the run's --seed and number of "
                "resamples (recomputed with 1000 resamples and seed 0 only for runs that did not record "
                "them).")
    return ("Metrics are recomputed from each run's prediction CSVs. No run has a test split, so no score "
            "has a confidence interval; the 95% intervals of the sensitivity-by-subtype tables, where there "
            "are any, bootstrap the validation predictions (1000 resamples, seed 0).")


def _check_heatmap_names(pair: tuple[str, str] | None, rows: list[dict], runs: Sequence[RunRecord]) -> None:
    """ConfigError when --heatmap names a parameter that no selected run has (a typo such as
    ``batchsize`` would otherwise fall back to the default heatmaps without a word)."""
    if not pair:
        return
    names = {k for r in rows for k in r["params"]}
    for rec in runs:
        names |= {k for g in (_cv_grid(rec) or []) for k in g["params"]}
    missing = [p for p in pair if p not in names]
    if missing:
        raise ConfigError(
            f"--heatmap names '{missing[0]}', a parameter none of the selected runs has; "
            f"theirs are: {', '.join(sorted(names)) or 'none'}."
        )


_SURROGATE = re.compile("[\ud800-\udfff]")


def _utf8(text: str) -> str:
    """Text that encodes as UTF-8: a file name that is not valid UTF-8 (kept by Python as lone surrogates,
    e.g. an undecodable image listed as left out) is shown with U+FFFD for its bad bytes instead of
    failing the whole report."""
    return _SURROGATE.sub("\ufffd", text)


def parse_figure_formats(text: str | None) -> tuple[str, ...]:
    """``"svg,pdf"`` -> ("svg", "pdf") for `report --figures`, case-insensitive, each once."""
    if text is None:
        return ()
    from featcache.grids import parse_names

    return tuple(dict.fromkeys(p.lower() for p in parse_names(text, "--figures")))  # build_report checks


def check_figure_formats(formats: Sequence[str]) -> None:
    """ConfigError for a vector format the report cannot write (PNG is always written)."""
    bad = [f for f in formats if f not in plots.VECTOR_FORMATS]
    if bad:
        raise ConfigError(f"--figures takes {' and/or '.join(plots.VECTOR_FORMATS)} (comma-separated; every "
                          f"figure is always written as PNG too), not {', '.join(map(repr, bad))}.")


def _metric_of_runs(options: ReportOptions, runs: Sequence[RunRecord]) -> ReportOptions:
    """``options`` ranking by the metric every run was selected by (`fit --metric`), else by accuracy.

    Why: `fit --metric auc` then `report` ranked by accuracy, so the report headlined another config than
    the one the user's metric picks (an mlp sweep, whose configs are each a run, most visibly) while its
    provenance said metric=auc. A note says which metric ranks, and why.
    """
    from collections import Counter

    recorded = Counter(str(r.run.get("metric") or "accuracy") for r in runs)
    if len(recorded) == 1:
        metric = next(iter(recorded))
        notes = [] if metric == "accuracy" else [
            f"Ranked by validation {metric}, the metric these runs were selected by (fit --metric "
            f"{metric}); report --metric ranks by another."]
    else:
        metric = "accuracy"
        listed = ", ".join(f"{m} ({n} run(s))" for m, n in sorted(recorded.items()))
        notes = [f"These runs were selected by different metrics ({listed}); they are ranked by validation "
                 "accuracy; report --metric chooses another."]
    return replace(options, metric=metric, notes=(*options.notes, *notes))


def build_report(
    runs_dir: str | Path = "runs",
    out_dir: str | Path = "reports",
    options: ReportOptions | None = None,
    progress: ProgressFn | None = None,
) -> ReportResult:
    """Write report.html, report.md (+ report_files/), leaderboard.csv and leaderboard.json to ``out_dir``."""
    options = options or ReportOptions()
    if options.heatmap is not None and len(options.heatmap) != 2:
        raise ConfigError(
            "--heatmap takes two parameter names separated by a comma, e.g. --heatmap lr,batch_size."
        )
    if options.top is not None and options.top < 1:  # -1 ended in an IndexError, 0 showed every run
        raise ConfigError(f"--top must be at least 1, got {options.top}.")
    check_tags(options.tags)  # `--tag ""` beside a real tag would otherwise be dropped without a word
    check_figure_formats(options.figure_formats)  # before the metrics, not after them
    if any(not str(i).strip() for i in options.ids):  # "" is a substring of every id: it would select all
        raise ConfigError("--id needs a glob or part of a run id (an empty one was given).")
    runs_dir, out_dir = Path(runs_dir), Path(out_dir)
    all_runs, skipped = load_runs(runs_dir, progress)
    damaged = [(name, why) for name, why in skipped if not why.startswith(("status", "no run.json"))]
    if not all_runs and damaged:  # "train heads first" would hide that there were runs
        name, why = damaged[0]
        raise RunError(f"no usable runs in {runs_dir}: {len(damaged)} run folder(s) were left out as damaged "
                       f"(e.g. {name}: {why}); delete them and rerun their fit commands.")
    if not all_runs:
        raise RunError(
            f"no finished runs in {runs_dir}; train heads with `featcache fit` (or `featcache run`) first."
        )
    runs = select_runs(all_runs, options.tags, options.ids)
    if options.run_ids is not None:
        wanted = set(options.run_ids)
        runs = [r for r in runs if r.id in wanted]
    if not runs:
        raise RunError(
            f"none of the {len(all_runs)} finished runs in {runs_dir} matches the --tag/--id selection; "
            "list run ids and tags with `featcache runs ls`."
        )
    if options.metric is None:
        options = _metric_of_runs(options, runs)
    emit(progress, "report", 0, len(runs), "computing metrics")
    ranked = build_leaderboard(runs, options.metric, options.group_by)
    rows = top_of_groups(ranked, options.top)
    _check_heatmap_names(options.heatmap, ranked, runs)
    selected = {r["run_id"] for r in rows}
    searched = list(runs)  # every run ranked: what methods, grid views and provenance describe
    runs = [r for r in runs if r.id in selected]
    doc = build_document(runs, rows, skipped, options, runs_dir, progress, len(searched),
                         searched=(searched, ranked))
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {out_dir} is a file, not a folder; choose a folder for the report files.")
    out_dir.mkdir(parents=True, exist_ok=True)
    emit(progress, "report", 0, 4, "writing files")
    if (out_dir / ASSETS).exists() and not (out_dir / ASSETS).is_dir():
        raise ConfigError(f"{out_dir / ASSETS} is a file; the report's figures go in a folder of that name: "
                          "move the file or choose another --out.")
    for name in REPORT_FILES:  # checked before anything is published: a half-published report is worse
        if (out_dir / name).is_dir():
            raise ConfigError(f"{out_dir / name} is a folder; the report writes a file of that name: move "
                              "the folder or choose another --out.")
    _remove_stale_staging(out_dir)
    import tempfile

    with naming(out_dir):  # a full disk names the report folder, not an anonymous write()
        staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-", dir=out_dir))
        try:
            _write_report_files(doc, rows, runs, options, runs_dir, staging, searched)
            _publish(staging, out_dir)
        finally:  # an error (disk full, say) leaves the previous report as it was, and no staging folder
            if staging.exists():
                import shutil

                shutil.rmtree(staging, ignore_errors=True)
    emit(progress, "report", 4, 4, "report written")
    best = min(rows, key=lambda r: r["overall_rank"])
    leaders = terminal_leaders(rows, bool(options.group_by))
    return ReportResult(out_dir, out_dir / "report.html", out_dir / "report.md", out_dir / "leaderboard.csv",
                        out_dir / "leaderboard.json", len(rows), best["run_id"], skipped, options.metric,
                        leaders, sorted({name for r in searched for name in r.random_backbones}),
                        _best_by_task(ranked), options.group_by, _mixed_datasets(searched, options.group_by))


def _mixed_datasets(ranked_runs: Sequence[RunRecord], group_by: str | None) -> list[str]:
    """The datasets of the ranked runs where several are ranked together ([] where one, or grouped by
    dataset): the same rule as the report's "Mixed datasets" callout, so the terminal says what it says."""
    datasets = sorted({r.dataset for r in ranked_runs})
    return datasets if len(datasets) > 1 and group_by != "dataset" else []


def _best_by_task(ranked: Sequence[dict]) -> dict[str, str]:
    """Each task's best run id by overall rank, where the ranked runs are of several tasks ({} where one):
    the terminal named one "best" across binary and 3-class runs while the report said there is none."""
    firsts = {task: str(r["run_id"]) for task, r in _firsts(ranked, "task").items()}
    return firsts if len(firsts) > 1 else {}


TERMINAL_ROWS = 5  # best runs the CLI prints after writing an ungrouped report (grouped: each group's best)


def terminal_leaders(rows: Sequence[dict], grouped: bool) -> list[dict]:
    """The rows the CLI prints after a report: the TERMINAL_ROWS best, or with --group-by the best run of
    every group (build_leaderboard lists each group's rows together, best first, groups ordered by their
    best). Why every group's: the table is titled "best run of each group", and a cap of 5 left a sixth
    group out without a word."""
    if not grouped:
        return sorted(rows, key=lambda r: r["overall_rank"])[:TERMINAL_ROWS]
    firsts: dict[str, dict] = {}
    for r in rows:
        firsts.setdefault(r["group"], r)
    return list(firsts.values())


def _featcache_version() -> str:
    from featcache import __version__

    return str(__version__)


def _write_report_files(doc: Document, rows: list[dict], runs: Sequence[RunRecord], options: ReportOptions,
                        runs_dir: Path, folder: Path, searched: Sequence[RunRecord] = ()) -> None:
    """The report's four files and its figure folder, written into ``folder`` (a staging folder);
    ``searched``: every run ranked, which the best was chosen among."""
    (folder / "report.html").write_text(_utf8(render_html(doc, ASSETS)), encoding="utf-8")
    (folder / "report.md").write_text(_utf8(render_markdown(doc, folder / ASSETS, ASSETS)), encoding="utf-8")
    meta = {
        "runs_dir": str(runs_dir),
        "metric": options.metric,
        "group_by": options.group_by,
        "top": options.top,
        "tags": list(options.tags),
        "ids": list(options.ids),
        "n_runs": len(rows),
        "generated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "featcache_version": _featcache_version(),
        # how the test CIs were made, so a CSV/JSON read alone can be traced (each run's own record too)
        "confidence_intervals": {
            "method": f"percentile bootstrap resampling {_resample_unit(runs)}; a proportion observed at 0 "
                      "or 1 gets the exact Clopper-Pearson interval; an AUC of 1 "
                      "a Hanley-McNeil score-type bound (Newcombe's symmetric variance); a macro F1 of 1 "
                      "keeps its point",
            "level": 0.95,
            "n_boot": sorted({int(ci["n_boot"]) for r in runs for ci in _recorded_cis(r)
                              if isinstance(ci.get("n_boot"), int)}),
            "seed": sorted({r.run.get("seed") for r in runs if isinstance(r.run.get("seed"), int)}),
        },
        "source_revisions": _source_revisions(runs),
        # a CSV/JSON read alone must not pass the best validation score off as an unbiased estimate
        "selection_optimism": _selection_optimism(searched or runs) or None,
    }
    write_csv(rows, folder / "leaderboard.csv")
    write_json(rows, folder / "leaderboard.json", meta)
