"""Benchmark: featcache's logistic-regression grid search vs scikit-learn GridSearchCV (issue 5 req 4).

Both run in this process on the same features and the same patient-grouped folds, with the same grid
(C in 7 log-spaced values 1e-4..1e2 x class_weight {None, balanced}), the same LogisticRegression
max_iter/tol (scikit-learn defaults 100 / 1e-4 unless --max-iter is given) and refit=True. Reported:
raw timings, ``logreg_speedup``, both selected parameter sets, max |mean CV score difference|, and how many
reference fits hit max_iter (ConvergenceWarnings).

Features: synthetic by default, made to look like VGG16 pool5 flatten vectors (documented in
``synthetic_vgg``), or ``--features cache.h5`` (a featcache cache: labels from the NORMAL/... folder in
each row's path, patients from Kermany file names).

    python benchmarks/bench_logreg.py --quick --json
    python benchmarks/bench_logreg.py --n 2000            # mid-size, D = 25,088
    python benchmarks/bench_logreg.py                     # full: 5,232 x 25,088 (long: the reference)
    python benchmarks/bench_logreg.py --features cache.h5 --dtype float64  # real features, both float64
"""
from __future__ import annotations

import argparse
import json
import platform
import time
import warnings
from pathlib import Path

import numpy as np

CS = [1e-4, 1e-3, 1e-2, 1e-1, 1.0, 1e1, 1e2]


def synthetic_vgg(n: int, d: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """VGG-pool5-like features: ReLU(low-rank image factors + noise - threshold) => non-negative, ~70% zeros.

    26% class 0 (the Kermany NORMAL share); a planted signal adds +0.35 to a random 5% of the
    pre-activation units for class 1, so the task is learnable but not trivial. Patients own 1-3 images.
    """
    rng = np.random.default_rng(seed)
    y = (rng.random(n) >= 0.26).astype(np.int64)
    groups = np.repeat(np.arange(n), rng.integers(1, 4, n))[:n]
    rank = 32
    basis = rng.normal(size=(rank, d)).astype(np.float32) / np.sqrt(rank)
    X = np.empty((n, d), np.float32)
    signal = (rng.random(d) < 0.05).astype(np.float32) * 0.35
    for s in range(0, n, 512):
        e = min(n, s + 512)
        z = rng.normal(size=(e - s, rank)).astype(np.float32) @ basis
        z += 0.7 * rng.normal(size=(e - s, d)).astype(np.float32) + y[s:e, None] * signal - 0.5
        X[s:e] = np.maximum(z, 0)
    return X, y, groups


def load_cache(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of a featcache cache file (view "orig"); label 0 = NORMAL folder, patient from the file name."""
    import h5py

    with h5py.File(path, "r", locking=False) as f:
        valid = f["valid"][:].astype(bool)
        views = f["views"][:][valid]
        keep = np.flatnonzero(valid)[views == b"orig"]
        X = f["features"][np.sort(keep)].astype(np.float32)
        paths = [p.decode("utf-8", "surrogateescape") for p in f["paths"][np.sort(keep)]]
    y = np.array([0 if "NORMAL" in Path(p).parts else 1 for p in paths])
    names = [Path(p).name for p in paths]
    try:
        from featcache.datasets import parse_kermany_name
        pats = [parse_kermany_name(nm)[1] or nm for nm in names]
    except Exception:  # datasets module missing: one group per image
        pats = names
    return X, y, np.unique(pats, return_inverse=True)[1]


def run(quick: bool = False, n: int | None = None, d: int | None = None, features: str | None = None,
        max_iter: int = 100, dtype: str = "float32", repeats: int = 1) -> dict:
    """Time featcache's search ``repeats`` times (median; it is the short side, so a VM's minute-to-minute
    drift moves it most) and scikit-learn's once, on the same data and folds.

    With ``repeats`` >= 2 featcache's searches bracket scikit-learn's: the first ceil(N/2) run before it
    and the rest after, so a VM that slows down or speeds up during the long reference run moves both
    sides' timings rather than only one (``t_featcache_runs_s`` keeps their order, ``featcache_after_ref``
    says which ran after).
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, StratifiedGroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from featcache.heads.logreg import FastLogisticGridSearchCV

    if repeats < 1:  # before the (slow) synthetic features are made
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    if features:
        X, y, groups = load_cache(features)
        source = features
    else:
        n = n or (400 if quick else 5232)
        d = d or (3000 if quick else 25088)
        X, y, groups = synthetic_vgg(n, d)
        source = "synthetic_vgg"
    X = X.astype(dtype, copy=False)  # both sides get the same array (float64: scikit-learn's own precision)
    folds = list(StratifiedGroupKFold(5, shuffle=True, random_state=0).split(X, y, groups))
    grid = {"C": CS, "class_weight": [None, "balanced"], "max_iter": [max_iter]}

    t_runs: list[float] = []
    scores: list[np.ndarray] = []

    def time_ours() -> FastLogisticGridSearchCV:
        t0 = time.perf_counter()
        search = FastLogisticGridSearchCV(grid, cv=folds).fit(X, y)
        t_runs.append(time.perf_counter() - t0)
        scores.append(np.asarray(search.cv_results_["mean_test_score"]))
        return search

    n_before = (repeats + 1) // 2
    for _ in range(n_before):
        ours = time_ours()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        t0 = time.perf_counter()
        ref = GridSearchCV(make_pipeline(StandardScaler(), LogisticRegression()),
                           {f"logisticregression__{k}": v for k, v in grid.items()}, cv=folds).fit(X, y)
        t_ref = time.perf_counter() - t0
    for _ in range(repeats - n_before):
        ours = time_ours()
    t_ours = float(np.median(t_runs))
    n_conv = sum(issubclass(w.category, ConvergenceWarning) for w in caught)
    ref_best = {k.split("__")[1]: v for k, v in ref.best_params_.items()}
    diff = np.abs(np.asarray(ours.cv_results_["mean_test_score"]) - ref.cv_results_["mean_test_score"])
    return {
        "benchmark": "logreg_grid", "quick": quick, "source": source, "n": int(X.shape[0]),
        "d": int(X.shape[1]), "dtype": str(X.dtype), "folds": 5, "grid_size": 14, "max_iter": max_iter,
        "tol": 1e-4, "refit": True, "t_featcache_s": round(t_ours, 3), "t_sklearn_s": round(t_ref, 3),
        "logreg_speedup": round(t_ref / t_ours, 2), "featcache_repeats": repeats,
        "t_featcache_runs_s": [round(t, 3) for t in t_runs],
        "featcache_after_ref": [i >= n_before for i in range(repeats)],
        "featcache_repeats_identical": all(np.array_equal(sc, scores[0]) for sc in scores),
        "featcache_best_params": ours.best_params_, "sklearn_best_params": ref_best,
        "same_params": ours.best_params_ == ref_best,
        "featcache_best_score": ours.best_score_, "sklearn_best_score": float(ref.best_score_),
        "max_cv_score_diff": float(diff.max()),
        # requirement 4 beside the speed: the same chosen parameters, every mean CV score within 0.005
        "logreg_agrees": bool(ours.best_params_ == ref_best and float(diff.max()) <= 0.005),
        "candidates": [{k.split("__")[1]: v for k, v in c.items()} for c in ref.cv_results_["params"]],
        "featcache_mean_test_scores": [float(v) for v in ours.cv_results_["mean_test_score"]],
        "sklearn_mean_test_scores": [float(v) for v in ref.cv_results_["mean_test_score"]],
        "sklearn_fits_not_converged": int(n_conv), "sklearn_fits": 14 * 5 + 1,
        "machine": f"{platform.processor() or platform.machine()}, {_cpus()} CPU cores",
    }


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small synthetic problem (CI smoke test, ~1 min)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--n", type=int, help="rows of synthetic features (default 5232)")
    ap.add_argument("--d", type=int, help="feature dimension of synthetic features (default 25088)")
    ap.add_argument("--features", help="a featcache cache .h5 file to use instead of synthetic features")
    ap.add_argument("--max-iter", type=int, default=100, help="LogisticRegression max_iter for BOTH sides")
    ap.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                    help="precision of the feature matrix given to BOTH sides (caches store float32)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="time featcache's search N times and use the median (scikit-learn runs once, "
                         "after the first ceil(N/2) of them and before the rest)")
    a = ap.parse_args()
    if a.repeats < 1:
        ap.error("--repeats must be at least 1")
    res = run(a.quick, a.n, a.d, a.features, a.max_iter, a.dtype, a.repeats)
    if a.json:
        print(json.dumps(res, default=str))
    else:
        for k, v in res.items():
            print(f"{k:28s} {v}")


if __name__ == "__main__":
    main()
