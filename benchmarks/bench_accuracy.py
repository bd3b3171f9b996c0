"""Accuracy benchmark: what featcache's heads reach on real Kermany features, on a held-out patient split.

The official Kermany test split is not available here, so this benchmark holds out its own test side
of the training folder and never selects on it:

1. ``manifest.csv`` puts a seeded, stratified 20% of the *patients* of ../shared/data/kermany224/train
   on the test side (stratified by normal/bacteria/virus). Byte-identical files are kept on one side:
   patients that share a file are one group (as fit groups them; the Kermany training split's 24 sets
   of identical files each lie within one patient), so no image is on both sides under two patient
   ids. The manifest's ``group`` column carries that group, so every CV fold inside ``fit`` is grouped
   the same way.
2. ``featcache run`` per task (binary, 3class) with every head's default grid: mobilenet-0.75 with its
   genuine ImageNet weights (the only ones here), patient-grouped CV (logreg, svm, knn) or hold-out
   (mlp) selection on the training side, one test evaluation of the chosen config.
3. The table: per task and head, the selected config, its validation score, and test accuracy, AUC,
   sensitivity and specificity with the patient-bootstrap 95% CIs that ``fit`` recorded.

These numbers are not the papers' (they tested on the official test split, which differs in
distribution from the training split: validation-like numbers such as these run several points above
it; see the README). They tell a user what the frozen-feature heads reach with this backbone.

    python benchmarks/bench_accuracy.py [--quick] [--json] [--work DIR] [--tasks binary,3class]
                                        [--heads logreg,mlp,svm,knn] [--test-fraction 0.2] [--seed 0]

Everything goes under ``--work`` (default ./accuracy-work): the manifest, cache/, runs/ and one
report per task (reports-binary/report.html, ...). Rerunning resumes: cached features and finished
runs are reused, so a second run only rebuilds the table. ``--quick`` (CI smoke test, ~1 min): 120
images and the logreg and knn heads, with random weights when ../shared/weights is absent (the
numbers then mean nothing; the JSON says which weights were used).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_extract import DEFAULT_DATA, _private_keras_home, machine  # noqa: E402

HEADS = ("logreg", "mlp", "svm", "knn")
TASKS = ("binary", "3class")
QUICK_IMAGES = 120


def write_manifest(data: Path, out: Path, *, test_fraction: float, seed: int, limit: int | None) -> dict:
    """The patient-grouped train/test manifest (see the module docstring); returns its counts."""
    from featcache.datasets import SUBTYPES, discover
    from featcache.fit import merge_identical_groups  # patients that share a file become one group
    from featcache.hashing import sha256_file
    from featcache.splits import grouped_holdout

    records = [r for r in discover(data).records if r.subtype in SUBTYPES]
    if limit is not None and limit < len(records):  # quick mode: an even sample over the sorted file list
        records = [records[i] for i in np.linspace(0, len(records) - 1, limit).astype(int)]
    digests = [sha256_file(r.path) for r in records]
    groups = [str(g) for g in merge_identical_groups([r.group for r in records], digests)[0]]
    subtypes = [r.subtype for r in records]
    train_idx, test_idx = grouped_holdout(subtypes, groups, fraction=test_fraction, seed=seed)
    side = np.empty(len(records), dtype=object)
    side[train_idx], side[test_idx] = "train", "test"
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "split", "group"])
        for rec, s, g in zip(records, side, groups, strict=True):
            w.writerow([os.path.relpath(rec.path, out.parent), rec.label, s, g])
    counts = {s: {t: int(sum(1 for x, y in zip(side, subtypes, strict=True) if x == s and y == t))
                  for t in SUBTYPES} for s in ("train", "test")}
    return {"images": len(records), "patients": len(set(r.group for r in records)),
            "groups": len(set(groups)), "merged_by_identical_files": len(set(r.group for r in records))
            - len(set(groups)), "counts": counts}


def _featcache(*args: str) -> float:
    """One featcache command as a user types it; its wall time (its output goes to stderr)."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "featcache.cli.app", *args], stdout=sys.stderr,
                          stderr=sys.stderr, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"featcache {' '.join(args)} failed with exit status {proc.returncode}")
    return time.perf_counter() - t0


def _ci(row: dict, metric: str, suffix: str = "") -> list | None:
    lo, hi = row.get(f"test_{metric}{suffix}_lo"), row.get(f"test_{metric}{suffix}_hi")
    return None if lo is None or hi is None else [lo, hi]


def best_per_head(board: list[dict]) -> list[dict]:
    """Per head, the run validation ranks first (the leaderboard is sorted by it), with its test numbers."""
    out: dict[str, dict] = {}
    for row in board:
        if row["head"] in out:
            continue
        binary = row.get("positive_class") is not None
        out[row["head"]] = {
            "head": row["head"], "config": row["config"], "run_id": row["run_id"],
            "validation": row["validation"], "runs_of_head": sum(r["head"] == row["head"] for r in board),
            "val_accuracy": row.get("val_accuracy"), "val_auc": row.get("val_auc"),
            "test_accuracy": row.get("test_accuracy"), "test_accuracy_ci": _ci(row, "accuracy"),
            "test_auc": row.get("test_auc"), "test_auc_ci": _ci(row, "auc"),
            "test_macro_f1": row.get("test_macro_f1"),
            "threshold": row.get("threshold") if binary else None,
            "test_accuracy_thr": row.get("test_accuracy_thr") if binary else None,
            "test_sensitivity_thr": row.get("test_sensitivity_thr") if binary else None,
            "test_specificity_thr": row.get("test_specificity_thr") if binary else None,
            "n_test": row.get("n_test"),
        }
    return list(out.values())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="CI smoke mode: 120 images, logreg and knn")
    ap.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="Kermany-layout training folder")
    ap.add_argument("--work", type=Path, default=Path("accuracy-work"), help="manifest, cache, runs, reports")
    ap.add_argument("--tasks", default=",".join(TASKS), help="comma-separated: binary,3class")
    ap.add_argument("--heads", default=None, help="comma-separated (default: logreg,mlp,svm,knn)")
    ap.add_argument("--backbone", default="mobilenet-0.75")
    ap.add_argument("--test-fraction", type=float, default=0.2, help="patients held out for the test side")
    ap.add_argument("--seed", type=int, default=0, help="the test split's and every fit's seed")
    args = ap.parse_args(argv)

    real = _private_keras_home()
    weights = "imagenet" if real else "none"
    heads = args.heads or ("logreg,knn" if args.quick else ",".join(HEADS))
    tasks = [t for t in args.tasks.split(",") if t]
    data = args.data if args.data.is_dir() else None
    if data is None:
        raise SystemExit(f"no dataset at {args.data}: pass --data (a Kermany-layout folder such as "
                         "../shared/data/kermany224/train)")
    work = args.work.resolve()
    manifest = work / "manifest.csv"
    split = write_manifest(data, manifest, test_fraction=args.test_fraction, seed=args.seed,
                           limit=QUICK_IMAGES if args.quick else None)
    result: dict = {"benchmark": "accuracy", "quick": args.quick, "data": str(data),
                    "backbone": args.backbone, "weights": weights, "seed": args.seed,
                    "test_fraction": args.test_fraction, "split": split, "work": str(work), "tasks": {}}
    common = ["--data", str(manifest), "--backbone", args.backbone, "--weights", weights, "--head", heads,
              "--seed", str(args.seed), "--cache-dir", str(work / "cache"), "--runs-dir", str(work / "runs")]
    if args.quick:
        common += ["--cv-folds", "3"]
    for task in tasks:
        seconds = _featcache("run", *common, "--task", task, "--out", str(work / f"reports-{task}"))
        board = json.loads((work / f"reports-{task}" / "leaderboard.json").read_text())["runs"]
        result["tasks"][task] = {"seconds": round(seconds, 1), "report": str(work / f"reports-{task}"),
                                 "heads": best_per_head(board)}
    from quiet_start import quiet_backend_start

    quiet_backend_start()  # machine() imports TensorFlow: without its start-up lines on stderr
    result["machine"] = machine()
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _print_table(result)
    return 0


def _fmt(x: float | None, ci: list | None = None) -> str:
    if x is None:
        return "-"
    return f"{x:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def _print_table(result: dict) -> None:
    s = result["split"]
    print(f"{result['backbone']} ({result['weights']} weights) on {result['data']}: {s['images']} images, "
          f"{s['patients']} patients; test side {result['test_fraction']:.0%} of the patient groups "
          f"(seed {result['seed']}): {s['counts']['test']}")
    for task, t in result["tasks"].items():
        print(f"\n{task} ({t['seconds']:.0f} s, report: {t['report']}/report.html)")
        for h in t["heads"]:
            line = (f"  {h['head']:7s} {h['config']:40s} val acc {_fmt(h['val_accuracy'])} "
                    f"({h['validation']}) | test acc {_fmt(h['test_accuracy'], h['test_accuracy_ci'])} "
                    f"AUC {_fmt(h['test_auc'], h['test_auc_ci'])}")
            if h["threshold"] is not None:
                line += (f" | at threshold {h['threshold']:.3f}: acc {_fmt(h['test_accuracy_thr'])} sens "
                         f"{_fmt(h['test_sensitivity_thr'])} spec {_fmt(h['test_specificity_thr'])}")
            print(line)


if __name__ == "__main__":
    sys.exit(main())
