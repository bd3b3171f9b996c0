"""Logistic-regression head: standardisation + LogisticRegression, tuned like GridSearchCV -- only faster.

How the speed is obtained (and why the answers stay scikit-learn's)
-------------------------------------------------------------------
The reference is ``GridSearchCV(make_pipeline(StandardScaler(), LogisticRegression()), grid, cv=folds)``.
Each of its fits runs scipy's L-BFGS-B on ``mean_sw(loss) + ||w||^2 / (2 C sw_sum)`` in D dimensions, and
every iteration streams the whole [n_train, D] matrix twice (two matrix-vector products): with VGG16
flatten features (D = 25,088 > n) that is memory-bound work repeated for every C, class weighting and fold.

1. *Same standardisation.* Per fold we standardise with the fold's training mean and (population) std, as
   the Pipeline's StandardScaler does (same statistics in float64, scikit-learn's constant-feature rule),
   so the model sees the same standardised rows Z. The folds' training sets overlap, so the moments are
   computed once per group of rows with the same fold membership (K groups for K-fold) and combined per
   fold with Chan's pairwise update (``_FoldScalers``): one pass over X instead of one per fold.
2. *A smaller, isometric problem.* L-BFGS started at w = 0 only ever moves inside the span of Z's rows (the
   gradient is Z^T r + w / C'). Pick any F with F F^T = Z Z^T = K (we use the Cholesky factor of the Gram
   matrix, pivoted and cut at rank r <= n when K is singular): the map gamma -> w = Q gamma with Q = Z^T
   L^-T is an isometry onto that span, so the objective, its gradient norms, all inner products and
   therefore **the L-BFGS iterates themselves are the same** in exact arithmetic. We run the very same scipy
   L-BFGS-B with scikit-learn's options (maxiter, gtol = tol, ftol, maxls=50) on [n, r] instead of [n, D].
   scipy's stop test max|grad_i| <= tol is not rotation invariant, so in kernel space we switch it off and
   apply scikit-learn's test to the D-space gradient ourselves: the bounds ||g||_2/sqrt(D) <= ||g||_inf <=
   ||g||_2 decide most iterations; the undecided ones are queued, the run goes on, and every few rounds
   one shared pass over Z tests all queued iterates at once; a run whose earlier iterate passed is
   stopped and returns that iterate (L-BFGS never looks ahead, so this is the result of testing at once).
   Result: the same iterates AND the same stopping iteration in exact arithmetic; on the float64 test
   problems decision values agree to ~1e-12. In floating point
   the two trajectories are not bit-identical, and over ~100 unconverged iterations of an ill-conditioned
   problem a rounding difference can tip a line-search test and send L-BFGS down another path: on real
   VGG16 features (5,206 x 25,088, 31 of 71 fits stopping at max_iter) 11 of 14 mean CV scores equalled
   float64 scikit-learn's and the other 3 moved by up to 0.001 -- less than scikit-learn's own
   float32-vs-float64 difference on the same data. When D <= n the "factor" is Z itself
   (no Gram needed) and only step 3 applies. On float32 inputs scikit-learn evaluates its loss in float32
   while we solve in float64 (on a float32 Gram, factored in float32), so small differences remain there.
3. *All candidates at once.* The 7 C x 2 class-weight problems of a fold share F. Each runs its own
   scipy L-BFGS-B, all stepped by one thread through scipy's reverse-communication ``setulb``
   (``_Lbfgsb``), and every round evaluates all objectives together (``_Evaluator``): one product
   ``F @ [g_1 ... g_k]`` (a triangular multiply: F is kept as its Cholesky factor, half the memory
   traffic of a dense GEMM), one vectorised loss/gradient pass and one ``F.T @ R``. A fold's test rows
   are scored through the coefficients w = Q g (one pass over Z for all candidates), not through
   test-row kernel products.
4. *Both cores, no idle one.* The Grams ``Z Z^T`` are the only O(n^2 D) work (float32, the fold's own
   mean/std applied as the Pipeline would). The solves are Python-driven and keep one core busy, so the
   next fold's rows are standardised and its Gram built on a background thread meanwhile
   (``_Prefetcher``), in pieces that the solving thread takes too when it would wait (``_Tasks``); the
   BLAS calls that run beside Python code release the GIL (numpy's matmul; ``_blas`` for the
   triangular routines).
   Two sets of buffers alternate (``_Workspace``); the refit's statistics come from the same moments.

Measured on the 2-core dev box: see benchmarks/bench_logreg.py. Unsupported settings (a non-lbfgs solver,
l1/elastic-net, a scorer we do not compute) fall back to real ``GridSearchCV`` -- still correct, slower.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from functools import partial
from typing import Any, ClassVar

import numpy as np

from featcache.errors import ConfigError
from featcache.heads import _blas
from featcache.heads.base import (
    CVHead,
    Folds,
    SearchResult,
    SklearnHead,
    build_cv_results,
    normalize_class_weight,
    result_from_cv,
    sample_weights,
)
from featcache.progress import ProgressFn, emit

DEFAULT_CS = [1e-4, 1e-3, 1e-2, 1e-1, 1.0, 1e1, 1e2]
_FAST_SCORERS = ("accuracy", "balanced_accuracy", "roc_auc", "f1_macro", "neg_log_loss")


def _lr_params(params: dict) -> dict:
    """Complete LogisticRegression parameters (library defaults + the candidate's own)."""
    from sklearn.linear_model import LogisticRegression

    defaults = LogisticRegression().get_params()
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise ConfigError(f"unknown parameter '{unknown[0]}' for head 'logreg'; valid ones are: "
                          f"{', '.join(sorted(defaults))}.")
    out = {**defaults, **params}
    if "class_weight" in params:
        out["class_weight"] = normalize_class_weight(params["class_weight"])
    return out


def _fast_supported(p: dict) -> bool:
    """True when the candidate is plain L2 lbfgs, which the kernel-space solver reproduces."""
    return (p["solver"] == "lbfgs" and p["penalty"] in ("l2", "deprecated")
            and p["l1_ratio"] in (None, 0, 0.0) and not p["dual"] and np.isfinite(p["C"]) and p["C"] > 0)


# ---------------------------------------------------------------- batched evaluation

def _available_memory(meminfo: str = "/proc/meminfo") -> float:
    """Bytes of memory available for new allocations now; infinity where the OS does not say.

    Linux's MemAvailable counts the page cache that can be dropped, which ``SC_AVPHYS_PAGES`` (free
    pages only) leaves out: after reading a large feature cache most memory is page cache, and free pages
    alone would make the search choose its slower one-workspace path without need.
    """
    import os

    try:
        with open(meminfo, encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return float("inf")


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class _Lbfgsb:
    """One scipy L-BFGS-B run stepped from outside: scipy's own ``setulb`` inside ``minimize``'s loop.

    Why not ``scipy.optimize.minimize``: it owns the loop and calls the objective itself, so solving many
    problems with shared products needed one thread per problem, meeting at a barrier -- a thread hand-off
    and GIL traffic for every evaluation of every problem. ``setulb`` is reverse communication: it returns
    whenever it wants f and g at ``x``. So one thread steps all runs and evaluates them together.
    ``advance`` is the loop of ``scipy.optimize._lbfgsb_py._minimize_lbfgsb`` without bounds (maxcor 10,
    maxfun 15,000, factr = ftol / eps, the callback and max_iter tests in its order; an x equal to the
    last evaluated one reuses f and g, as its ``ScalarFunction`` does), so the iterates, iteration counts
    and stops are those scikit-learn gets through ``minimize``.
    """

    def __init__(self, n: int, *, maxiter: int, gtol: float, ftol: float, maxls: int = 50,
                 maxcor: int = 10, maxfun: int = 15000):
        from scipy.optimize import _lbfgsb

        m = maxcor
        self._setulb = _lbfgsb.setulb
        self.m, self.maxls, self.maxiter, self.maxfun = m, maxls, maxiter, maxfun
        self.factr, self.pgtol = ftol / np.finfo(float).eps, gtol
        self.x = np.zeros(n)
        self.f: Any = np.array(0.0)
        self.g = np.zeros(n)
        self.low, self.up, self.nbd = np.zeros(n), np.zeros(n), np.zeros(n, np.int32)
        self.wa = np.zeros(2 * m * n + 5 * n + 11 * m * m + 8 * m)
        self.iwa = np.zeros(3 * n, np.int32)
        self.task, self.ln_task = np.zeros(2, np.int32), np.zeros(2, np.int32)
        self.lsave, self.isave, self.dsave = np.zeros(4, np.int32), np.zeros(44, np.int32), np.zeros(29)
        self.nit = 0
        self.nfev = 0
        self._seen: tuple[np.ndarray, float, np.ndarray] | None = None  # last evaluated (x, f, g)

    def tell(self, x: np.ndarray, f: float, g: np.ndarray) -> None:
        """f and g at ``x`` (a copy of the ``x`` the run asked about)."""
        self.f, self.g = f, g
        self.nfev += 1
        self._seen = (x, f, g)

    def advance(self, accept) -> bool:
        """Step until the run wants f and g at ``self.x`` (True) or has ended (False).

        ``accept(x)`` is called at every accepted iterate (``minimize``'s callback); True stops the run there.
        """
        while True:
            self.g = self.g.astype(np.float64)  # minimize hands setulb a fresh copy every time
            self._setulb(self.m, self.x, self.low, self.up, self.nbd, self.f, self.g, self.factr,
                         self.pgtol, self.wa, self.iwa, self.task, self.lsave, self.isave, self.dsave,
                         self.maxls, self.ln_task)
            if self.task[0] == 3:  # wants f, g at x
                if self._seen is None or not np.array_equal(self.x, self._seen[0]):
                    return True
                self.f, self.g = self._seen[1], self._seen[2]
            elif self.task[0] == 1:  # a new iterate
                self.nit += 1
                if accept(self.x):
                    self.task[:] = (5, 505)
                if self.nit >= self.maxiter:
                    self.task[:] = (5, 504)
                elif self.nfev > self.maxfun:
                    self.task[:] = (5, 502)
            else:
                return False


class _Evaluator:
    """Objectives of k L-BFGS runs evaluated together, and scikit-learn's stop test applied to them.

    Why together: every run needs ``F @ G`` and ``F.T @ R`` per evaluation. One product with F for all of
    them, and the loss and gradient arithmetic as one vectorised pass, cost little more than one run's.
    Each run's numbers are those it would get alone.

    scikit-learn's stop test (kernel space only): max|D-space gradient| <= tol at an accepted iterate.
    Cheap bounds decide it on most iterations. When they cannot, the exact test needs a pass over all
    of Z -- memory-bound, 45-150 ms whether it is for one gradient or forty. So undecided iterates are
    queued and the run goes on; every few rounds (``_due``) every queued iterate is tested in one shared
    pass, and a run whose earliest converged iterate is found is stopped and returns *that* iterate and
    iteration count. Runs that end anyway (max_iter, f stalled, or the bounds' own stop) leave their
    queued iterates for one last pass (``resolve``). L-BFGS never looks ahead, so every result is the one
    an immediate test would have given; the price is a few extra rounds for a run that converged unseen.
    """

    CHECK_AGE = 8

    def __init__(self, space: _Space, y: np.ndarray, n_cls: int, problems: list[dict], n_features: int):
        self.space, self.y = space, y
        self.k = 1 if n_cls == 2 else n_cls
        self.r = space.r
        self.onehot = None if self.k == 1 else np.eye(self.k)[y]
        self.n_features = n_features
        self.specs = []
        for p in problems:
            sw = sample_weights(y, p["class_weight"], n_cls)
            sw = np.ones(len(y)) if sw is None else sw
            sw_sum = float(sw.sum())
            self.specs.append({"swn": sw / sw_sum, "l2": 1.0 / (float(p["C"]) * sw_sum),
                               "intercept": bool(p["fit_intercept"]), "tol": float(p["tol"])})
        # per problem: the last evaluated point, its stop-test verdict (gmax, or None: undecided), gG,
        # max|gb| and ||gG||_2
        self.state: dict[int, tuple[np.ndarray, float | None, np.ndarray, float, float]] = {}
        self.iters = [0] * len(problems)
        # queued undecided iterates: (i, iteration, x, gG, max|gb|, ||gG||_2)
        self.queue: list[tuple[int, int, np.ndarray, np.ndarray, float, float]] = []
        self.queued_at = 0
        self.rho = 0.0  # largest max|g| / ||g||_2 seen in exact tests (predicts when to test)
        self.running = set(range(len(problems)))
        self.rounds = 0
        self.exact_checks = 0
        self.final: dict[int, tuple[np.ndarray, int]] = {}

    def n_params(self, i: int) -> int:
        return self.r * self.k + (self.k if self.specs[i]["intercept"] else 0)

    def ended(self, i: int) -> None:
        """Problem i's run is over (its queued iterates, if any, wait for ``resolve``)."""
        self.running.discard(i)

    def accepted(self, i: int, x: np.ndarray) -> bool:
        """scikit-learn's stop test at problem i's accepted iterate ``x``: True means stop here.

        A run stopped here may still get an earlier queued iterate as its result from ``resolve``.
        """
        self.iters[i] += 1
        last = self.state.get(i)
        if last is None or not np.array_equal(last[0], x):
            return False
        gmax = last[1]
        if gmax is None:  # undecided: test it later, together with others
            if not self.queue:
                self.queued_at = self.rounds
            self.queue.append((i, self.iters[i], x.copy(), last[2], last[3], last[4]))
            return False
        return gmax <= self.specs[i]["tol"]

    def evaluate(self, xs: dict[int, np.ndarray]) -> dict[int, tuple[float, np.ndarray]]:
        """(loss, gradient) of each problem i at ``xs[i]``, all in one batch; may test queued iterates."""
        from scipy.special import expit, logsumexp

        keys = sorted(xs)
        r, k = self.r, self.k
        Gs = [xs[i][: r * k].reshape(r, k) for i in keys]
        raw = self.space.mul(np.hstack(Gs) if len(Gs) > 1 else Gs[0])
        for j, i in enumerate(keys):
            if self.specs[i]["intercept"]:
                raw[:, j * k:(j + 1) * k] += xs[i][r * k:]
        SW = np.column_stack([self.specs[i]["swn"] for i in keys])           # [n, m]
        if k == 1:
            yc = self.y[:, None]
            loss_i = np.logaddexp(0.0, raw) - yc * raw
            D = expit(raw) - yc
            losses = np.einsum("ij,ij->j", SW, loss_i)
        else:
            D = np.empty_like(raw)
            losses = np.empty(len(keys))
            rows = np.arange(len(self.y))
            for j in range(len(keys)):
                blk = raw[:, j * k:(j + 1) * k]
                lse = logsumexp(blk, axis=1)
                losses[j] = SW[:, j] @ (lse - blk[rows, self.y])
                D[:, j * k:(j + 1) * k] = np.exp(blk - lse[:, None]) - self.onehot
        D *= np.repeat(SW, k, axis=1) if k > 1 else SW
        gG_all = self.space.tmul(D)
        results = {}
        for j, i in enumerate(keys):
            spec, G = self.specs[i], Gs[j]
            cols = slice(j * k, (j + 1) * k)
            gG = gG_all[:, cols] + spec["l2"] * G
            loss = float(losses[j]) + 0.5 * spec["l2"] * float(np.sum(G * G))
            gb = D[:, cols].sum(axis=0)
            grad = np.concatenate([gG.ravel(), gb]) if spec["intercept"] else gG.ravel()
            results[i] = (loss, grad)
            if not self.space.primal:
                gb_max = float(np.max(np.abs(gb))) if spec["intercept"] else 0.0
                norm2 = float(np.sqrt(np.sum(gG * gG)))
                self.state[i] = (xs[i], self._gradient_max(spec, norm2, gb_max), gG, gb_max, norm2)
        self.rounds += 1
        if self.queue and self._due():
            self.resolve()
        return results

    def _due(self) -> bool:
        """Whether to test the queued iterates now (one shared pass over Z costs about 4-8 rounds).

        Passes are spaced ``CHECK_AGE`` rounds apart, but only when some queued iterate of a running
        problem is likely to pass: max|g| / ||g||_2 has been nearly constant (0.022-0.032 on VGG-like
        features), so its largest value seen so far predicts the test from ||g||_2, which is free. When
        every run still going likely converged, waiting gains nothing and the pass runs at once. Only
        *when* to test depends on the prediction; every queued iterate is tested exactly before any result
        is used. Iterates of runs that have ended wait for the last pass.
        """
        live = self.running - set(self.final)
        queued = [q for q in self.queue if q[0] in live]
        if not queued:
            return False
        age = self.rounds - self.queued_at
        if self.rho <= 0.0:  # nothing learnt yet: test on the age rule alone
            return age >= self.CHECK_AGE
        likely = {q[0] for q in queued if self.rho * q[5] <= self.specs[q[0]]["tol"]}
        if likely and likely >= live:
            return True
        return age >= (self.CHECK_AGE if likely else 3 * self.CHECK_AGE)

    def resolve(self) -> None:
        """The exact D-space stop test for every queued iterate, with one shared product."""
        queue, self.queue = self.queue, []
        if not queue:
            return
        k = self.k
        self.exact_checks += 1
        gw_all = self.space.to_w(np.hstack([q[3] for q in queue]))
        for c, (i, it, x, _g, gb_max, norm2) in enumerate(queue):  # iteration order within a problem
            gw_max = float(np.max(np.abs(gw_all[:, c * k:(c + 1) * k])))
            if norm2 > 0:
                self.rho = max(self.rho, gw_max / norm2)
            if i in self.final:
                continue
            gmax = max(gb_max, gw_max)
            if gmax <= self.specs[i]["tol"]:
                self.final[i] = (x, it)

    def _gradient_max(self, spec: dict, norm2: float, gb_max: float) -> float | None:
        """max|grad| of the D-space gradient where cheap bounds decide the stop test; None: undecided.

        ||g||_inf lies in [||g||_2 / sqrt(D), ||g||_2] (``norm2`` = ||gG||_2 = ||g||_2: an isometry).
        """
        tol = spec["tol"]
        if norm2 <= tol or norm2 / np.sqrt(self.n_features) > tol:
            return max(gb_max, norm2 if norm2 <= tol else np.inf)
        if gb_max > tol:
            return gb_max
        return None


def _never(x: np.ndarray) -> bool:
    """The stop test of a primal run: none of ours (scipy's own gtol applies there, as in scikit-learn)."""
    return False


def _solve_many(space: _Space, y: np.ndarray, n_cls: int, problems: list[dict],
                progress_cb=None, n_features: int = 0, stats: dict | None = None,
                threads: int = 1) -> list[tuple]:
    """Run one scipy L-BFGS-B per problem (identical options to scikit-learn) sharing the products.

    All runs are stepped by this one thread (``_Lbfgsb``); each round evaluates every run that is still
    going in one batch (``_Evaluator``). Returns (G [r, k], intercept [k], n_iter) per problem.
    ``stats`` (optional) receives the numbers of evaluation rounds and of exact stop-test passes.
    ``threads``: BLAS threads, more than one only where nothing else runs (see below).
    """
    from threadpoolctl import threadpool_limits

    r = space.r
    exact = not space.primal  # kernel space: apply the tol test in D-space ourselves
    ev = _Evaluator(space, y, n_cls, problems, n_features)
    runs = [_Lbfgsb(ev.n_params(i), maxiter=int(p["max_iter"]), gtol=0.0 if exact else float(p["tol"]),
                    ftol=64 * np.finfo(float).eps) for i, p in enumerate(problems)]

    accepts = [partial(ev.accepted, i) if exact else _never for i in range(len(runs))]

    def end(i: int) -> None:
        ev.ended(i)
        if progress_cb is not None:
            progress_cb()

    def step(i: int, want: dict) -> None:
        """Advance run i to its next evaluation (queued in ``want``) or to its end."""
        if runs[i].advance(accepts[i]):
            want[i] = runs[i].x.copy()
        else:
            end(i)

    # One BLAS thread for a search's folds: their shared products are triangular multiplies that measured
    # fastest on one thread here (6.8 ms against 10.7 ms on two for 4,186 rows x 14 columns), and
    # multi-threaded OpenBLAS spin-waits between the many small calls of L-BFGS-B (25x slower on a busy
    # 2-core box). A lone fit (one column: ?trmv) may use more: nothing else is running then.
    with threadpool_limits(threads, user_api="blas"):
        want: dict[int, np.ndarray] = {}
        for i in range(len(runs)):
            step(i, want)
        while want:
            results = ev.evaluate(want)
            asked, want = want, {}
            for i, (f, g) in results.items():
                if i in ev.final:  # an earlier iterate passed the stop test: this run is over
                    end(i)
                else:
                    runs[i].tell(asked[i], f, g)
                    step(i, want)
        ev.resolve()  # iterates still queued by runs that ended on their own
    if stats is not None:
        stats["rounds"] = stats.get("rounds", 0) + ev.rounds
        stats["exact_checks"] = stats.get("exact_checks", 0) + ev.exact_checks
    out = []
    for i, (p, run) in enumerate(zip(problems, runs, strict=True)):
        x, nit = ev.final.get(i, (run.x, run.nit))
        G = x[: r * ev.k].reshape(r, ev.k)
        b = x[r * ev.k:] if p["fit_intercept"] else np.zeros(ev.k)
        out.append((G, b, nit))
    return out


# ---------------------------------------------------------------- standardisation statistics

_CHUNK_ROWS = 64  # rows per float64 statistics step: small temporaries stay in cache (2.2x faster than 512)
_GATHER_ROWS = 256  # rows per gather-and-standardise step: few GIL hand-offs, second pass still cached


def _rows(X: np.ndarray, rows: np.ndarray | None, s: int, e: int) -> np.ndarray:
    return X[s:e] if rows is None else X[rows[s:e]]


def _moments(X: np.ndarray, rows: np.ndarray | None = None) -> tuple[int, np.ndarray, np.ndarray]:
    """(count, mean, sum of squared deviations) of X[rows] per feature, float64, two chunked passes."""
    n = X.shape[0] if rows is None else len(rows)
    total = np.zeros(X.shape[1])
    for s in range(0, n, _CHUNK_ROWS):
        total += _rows(X, rows, s, s + _CHUNK_ROWS).sum(axis=0, dtype=np.float64)
    mean = total / max(n, 1)
    m2 = np.zeros(X.shape[1])
    for s in range(0, n, _CHUNK_ROWS):
        dev = _rows(X, rows, s, s + _CHUNK_ROWS).astype(np.float64) - mean
        m2 += np.einsum("ij,ij->j", dev, dev)
    return n, mean, m2


def _combine(parts: Sequence[tuple[int, np.ndarray, np.ndarray]]) -> tuple[int, np.ndarray, np.ndarray]:
    """Moments of a union of disjoint row sets (Chan et al.'s pairwise update: additions only, stable)."""
    n, mean, m2 = parts[0]
    for nb, mb, m2b in parts[1:]:
        tot = n + nb
        delta = mb - mean
        mean = mean + delta * (nb / tot)
        m2 = m2 + m2b + delta * delta * (n * nb / tot)
        n = tot
    return n, mean, m2


def _scaler(n: int, mean: np.ndarray, m2: np.ndarray) -> Any:
    """A fitted ``StandardScaler`` from moments: population variance, scikit-learn's constant-feature rule."""
    from sklearn.preprocessing import StandardScaler

    var = m2 / n
    eps = np.finfo(np.float64).eps
    constant = var <= n * eps * var + (n * mean * eps) ** 2  # sklearn's _is_constant_feature
    scale = np.sqrt(var)
    scale[constant] = 1.0
    sc = StandardScaler()
    sc.mean_, sc.var_, sc.scale_ = mean, var, scale
    sc.n_samples_seen_ = np.int64(n)
    sc.n_features_in_ = len(mean)
    return sc


def fit_scaler(X: np.ndarray) -> Any:
    """A fitted ``StandardScaler`` equal to ``StandardScaler().fit(X)`` up to float rounding, made faster.

    Why: scikit-learn's incremental mean/variance makes float64 temporaries of the whole matrix (about 16 s
    for five 4,186 x 25,088 folds here); two chunked passes with float64 accumulators give the same
    statistics (population variance, zero variances scaled by 1) in a fraction of that.
    """
    return _scaler(*_moments(X))


class _FoldScalers:
    """Every fold's training-set scaler, and the all-rows one, from one pass of statistics over X.

    Why: the Pipeline standardises each fold with its own training rows' mean and std. Those sets overlap
    (K-fold: each row is in K-1 of them), so the moments are computed once per group of rows that share
    fold membership and combined per fold, instead of re-reading the training rows for every fold.
    """

    MAX_GROUPS = 64
    PIECE = 1024

    def __init__(self, X: np.ndarray, folds: Sequence[tuple[np.ndarray, np.ndarray]]):
        self.X, self.folds = X, folds
        member = np.zeros((X.shape[0], len(folds)), dtype=bool)
        for j, (tr, _) in enumerate(folds):
            member[tr, j] = True
        patterns, codes = np.unique(member, axis=0, return_inverse=True)
        self.parts: list | None = None
        if len(patterns) <= self.MAX_GROUPS:
            from concurrent.futures import ThreadPoolExecutor

            codes = codes.ravel()
            self.patterns = patterns
            # each group in pieces of PIECE rows, on every core (numpy releases the GIL), then combined
            groups = [np.flatnonzero(codes == g) for g in range(len(patterns))]
            pieces = [(g, rows[s:s + self.PIECE]) for g, rows in enumerate(groups)
                      for s in range(0, len(rows), self.PIECE)]
            with ThreadPoolExecutor(_cpus()) as pool:
                moments = list(pool.map(lambda piece: _moments(X, piece[1]), pieces))
            self.parts = [_combine([m for (g2, _), m in zip(pieces, moments, strict=True) if g2 == g])
                          for g in range(len(groups))]

    def fold(self, j: int) -> Any:
        if self.parts is None:  # unusual CV with many membership patterns: plain per-fold statistics
            return fit_scaler(self.X[self.folds[j][0]])
        return _scaler(*_combine([p for p, pat in zip(self.parts, self.patterns, strict=True) if pat[j]]))

    def all_rows(self) -> Any:
        return fit_scaler(self.X) if self.parts is None else _scaler(*_combine(self.parts))


def standardize(scaler: Any, X: np.ndarray, rows: np.ndarray | None = None,
                out: np.ndarray | None = None) -> np.ndarray:
    """``scaler.transform(X[rows])`` in X's dtype, gathered and standardised in small chunks.

    Why chunked: no float64 copy of the whole matrix, and the gathered rows are still in the CPU cache
    when they are standardised. ``out`` (a reusable buffer) avoids fresh allocations for every fold.
    """
    out, tasks = _standardize_tasks(scaler, X, rows, out)
    for task in tasks:
        task()
    return out


def _standardize_tasks(scaler: Any, X: np.ndarray, rows: np.ndarray | None = None,
                       out: np.ndarray | None = None) -> tuple[np.ndarray, list]:
    """``standardize`` as independent chunk tasks (for ``_Tasks``): (the output array, the tasks)."""
    if rows is not None and len(rows):  # valid, none negative: the gather below clips instead of checking
        rows, rows_x = np.asarray(rows, dtype=np.intp), X.shape[0]
        lo, hi = int(rows.min()), int(rows.max())
        if lo < -rows_x or hi >= rows_x:
            raise IndexError(f"row indices must lie in [{-rows_x}, {rows_x}) for {rows_x} rows")
        if lo < 0:
            rows = np.where(rows < 0, rows + rows_x, rows)
    n = X.shape[0] if rows is None else len(rows)
    dtype = X.dtype if X.dtype in (np.float32, np.float64) else np.float64
    out = np.empty((n, X.shape[1]), dtype=dtype) if out is None else out[:n]
    mean, scale = scaler.mean_.astype(out.dtype), scaler.scale_.astype(out.dtype)

    def chunk(s: int) -> None:
        blk = out[s:s + _GATHER_ROWS]
        if rows is None or X.dtype != out.dtype:
            np.subtract(_rows(X, rows, s, s + _GATHER_ROWS), mean, out=blk, casting="unsafe")
        else:  # gather straight into the buffer: no temporary (a fresh one page-faults every time).
            # mode="clip": with the default "raise" numpy buffers ``out`` (a hidden temporary and a second
            # copy: 0.15 s against 0.065 s for a fold's 4,186 rows here); the indices were checked above.
            np.take(X, rows[s:s + _GATHER_ROWS], axis=0, out=blk, mode="clip")
            blk -= mean
        blk /= scale

    return out, [partial(chunk, s) for s in range(0, n, _GATHER_ROWS)]


# ---------------------------------------------------------------- the isometric space

def _gram_tol(dtype: np.dtype, diag_max: float) -> float:
    """Pivots below this are rounding noise of the float32 Gram (relative error ~ sqrt(D) * eps32)."""
    return diag_max * (1e-5 if dtype == np.float32 else 1e-11)


class _Tasks:
    """Independent pieces of work that any thread may take: the prefetch thread or a consumer that waits.

    Why: the next fold's preparation (standardising rows, then the Gram) runs on a background thread
    while the current fold solves; when the consumer would otherwise wait for it, it takes pieces
    itself, so both cores stay busy, each on one BLAS thread. An error in a piece is raised by ``run``.
    """

    def __init__(self, tasks: list):
        self._tasks = tasks
        self._next = 0
        self._running = 0
        self._cond = threading.Condition()
        self._error: BaseException | None = None

    def run_one(self) -> bool:
        """Run one piece nobody has taken yet; False when none is left to take (or one failed)."""
        with self._cond:
            if self._next >= len(self._tasks) or self._error is not None:
                return False
            task = self._tasks[self._next]
            self._next += 1
            self._running += 1
        try:
            task()
        except BaseException as exc:  # raised by run(), in the thread that owns the job
            with self._cond:
                self._error = self._error or exc
        finally:
            with self._cond:
                self._running -= 1
                self._cond.notify_all()
        return True

    def run(self) -> None:
        """Take pieces until none is left, wait for the ones other threads are running, raise an error."""
        while self.run_one():
            pass
        with self._cond:
            while self._running:
                self._cond.wait()
        if self._error is not None:
            raise self._error


class _GramJob(_Tasks):
    """Z Z^T in blocks that any thread may compute (see ``_Tasks``).

    The upper triangle of a C-ordered array is filled block by block with numpy's matmul; read as
    Fortran order the same memory holds the lower triangle (``K()``). Why numpy: scipy's BLAS wrappers
    (SYRK) hold the GIL for the whole call, numpy's matmul releases it, so a Gram can be built while the
    L-BFGS runs are stepped. Same FLOPs as SYRK: diagonal blocks are A @ A.T (numpy calls SYRK for those),
    the others lie right of the diagonal.
    """

    SIDE = 3  # blocks per side: 6 pieces; bigger blocks ran 10% faster than 1,024-row ones (4,186 rows)

    def __init__(self, Z: np.ndarray, out: np.ndarray | None = None):
        n = Z.shape[0]
        b = max(256, -(-n // self.SIDE))
        self.Z = Z
        self.C = (np.empty((n, n), dtype=Z.dtype) if out is None or out.size < n * n
                  else out[: n * n].reshape(n, n))
        super().__init__([partial(self._block, s, min(n, s + b), c, min(n, c + b))
                          for s in range(0, n, b) for c in range(s, n, b)])

    def _block(self, s: int, e: int, c: int, d: int) -> None:
        np.matmul(self.Z[s:e], self.Z[c:d].T, out=self.C[s:e, c:d])

    def K(self) -> np.ndarray:
        return self.C.T


def _gram(Z: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Z Z^T: its lower triangle, in a Fortran-ordered [n, n] array in Z's precision."""
    job = _GramJob(Z, out)
    job.run()
    return job.K()


class _Workspace:
    """Buffers reused across a search's folds and its refit.

    Why: a fresh half-gigabyte array per fold costs page faults (measured 0.3 s just to convert one
    4,186-row Gram to float64 into new memory), and the folds run one after another anyway. ``chol`` (the
    float64 factor) may be shared by workspaces whose factors are never needed at the same time.
    """

    def __init__(self, rows: int, d: int, dtype: np.dtype, gram_rows: int, chol: np.ndarray | None = None):
        self.rows = np.empty((rows, d), dtype=dtype)          # standardised rows of a fold
        small = gram_rows < d
        self.gram_in = np.empty(gram_rows * gram_rows, dtype=dtype) if small else None  # Z Z^T
        self.chol = chol if chol is not None or not small else np.empty(gram_rows * gram_rows)

    def square(self, n: int) -> np.ndarray:
        """An [n, n] float64 Fortran-ordered view of the factor buffer (or a new array)."""
        if self.chol is None or self.chol.size < n * n:
            return np.empty((n, n), order="F")
        return self.chol[: n * n].reshape((n, n), order="F")


def _float64_square(K: np.ndarray, m: int, work: _Workspace | None, copy: bool = True) -> np.ndarray:
    """An [m, m] float64 Fortran array in ``work``'s factor buffer (or new), holding K[:m, :m] if ``copy``."""
    A = work.square(m) if work is not None else np.empty((m, m), order="F")
    if copy:
        np.copyto(A, K[:m, :m])
    return A


_WIDEN_COLS = 256  # columns per step of _potrf's in-place float32 -> float64 widening (4 MB temporaries)


def _potrf(K: np.ndarray, m: int, work: _Workspace | None) -> tuple[np.ndarray, int]:
    """(lower Cholesky factor of K[:m, :m] as a float64 [m, m] Fortran array, LAPACK's info).

    K is not modified. The factor lands in ``work``'s factor buffer (``_Workspace.square``).

    Why float32 for a float32 K: ``spotrf`` takes half the time of ``dpotrf`` (0.28-0.44 s against
    0.69-0.90 s at 4,185 rows here), and its rounding is of the same order as the Gram's own: on a
    synthetic VGG fold, ||L L^T - K_exact|| / ||K|| measured 3.9e-7 with ``spotrf`` against 1.2e-7 with
    ``dpotrf`` (the float32 Gram's own error), and the refit's coefficients moved by 3.9e-6 relative,
    against 9.4e-5 between ours and scikit-learn's. On real VGG16 features, where many fits stop at
    max_iter unconverged, 5 of 14 mean CV scores moved by 0.0002-0.0015 (scikit-learn's own float32
    and float64 runs differ by up to 0.0017 there). The solves still run in float64 (the factor is
    widened). No extra memory: the float32 copy is factored in the second half of the float64 buffer
    and widened into it column block by column block, left to right: writing float64 columns [a, b)
    overwrites float32 columns [2a - m, 2b - m), all left of b, so none that is still to be read.
    """
    c = _float64_square(K, m, work, copy=K.dtype != np.float32)
    if K.dtype != np.float32:
        return c, _blas.potrf(c)  # GIL-free: the prefetch thread keeps running
    s = c.reshape(-1, order="F").view(np.float32)[m * m:].reshape((m, m), order="F")
    np.copyto(s, K[:m, :m])
    info = _blas.potrf(s)
    # Whole columns. The upper triangle is never read (the triangular routines take the lower one), and
    # a Gram built block by block leaves it unwritten: it may hold any bit pattern, NaN included, whose
    # widening would only raise numpy's "invalid value encountered in cast" warning.
    with np.errstate(invalid="ignore"):
        for a in range(0, m, _WIDEN_COLS):
            b = min(m, a + _WIDEN_COLS)
            c[:, a:b] = s[:, a:b]  # numpy buffers the overlap of these two blocks
    return c, info


def _cholesky(K: np.ndarray, tol: float, work: _Workspace | None = None, centered: bool = False
              ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, int]:
    """(L11 [r, r] lower, L21 [n-r, r] or None, pivot order, rank) with F F^T = K for F[piv] = [L11; L21].

    K's lower triangle is read (in any float precision) and not modified; the factor is float64. Plain
    Cholesky when K is clearly positive definite (no pivoting: about half the time of the pivoted one);
    pivoted Cholesky, stopping at rank r, when it is not (duplicate or collinear rows). A float32 K is
    factored in float32 (see ``_potrf``).

    ``centered``: the rows of Z sum to zero, as a training set standardised with its own mean does. Then
    Z Z^T 1 = 0: the rank is at most n - 1, and the last pivot of a plain Cholesky is rounding noise of
    either sign. Its noise is a sum over all n^2 Gram entries (the null vector is all ones), so about n
    times ``tol``: on the 4,186-row synthetic VGG folds it measured -460 to +460, against tol = 0.52.
    Left to chance, that pivot either failed ``potrf`` at the very last row (the fold then paid a wasted
    ``potrf`` plus the GIL-holding pivoted one, about 1 s) or was kept as a spurious direction made of
    noise. So the first n - 1 rows are factored and the last row of F is their exact continuation,
    F_n = K[n, :n-1] L11^-T. The pivot left over, K[n, n] - |F_n|^2, must lie within n * tol (measured at
    most 0.21 n * tol); otherwise, as when rows standardised with another set's mean are passed, the
    general path below runs.
    """
    from scipy.linalg.lapack import dpstrf

    n = K.shape[0]
    if centered and n > 2:
        m = n - 1
        c, info = _potrf(K, m, work)
        if info == 0 and float(np.min(np.diag(c))) ** 2 > tol:
            last = _blas.trsm(c, np.asarray(K[m, :m], dtype=np.float64).reshape(m, 1)).T
            if abs(float(K[m, m]) - float(last[0] @ last[0])) <= n * tol:
                return c, last, np.arange(n), m
    c, info = _potrf(K, n, work)
    if info == 0 and float(np.min(np.diag(c))) ** 2 > tol:
        return c, None, np.arange(n), n
    c, piv, rank, info = dpstrf(_float64_square(K, n, work), lower=1, tol=tol, overwrite_a=1)
    if info < 0:
        raise RuntimeError(f"pivoted Cholesky failed (info={info})")
    L21 = np.ascontiguousarray(c[rank:, :rank]) if rank < n else None
    return np.asfortranarray(c[:rank, :rank]), L21, piv - 1, rank


class _Space:
    """F (training rows) with F F^T = Z Z^T, plus the map back to coefficients.

    F is kept as its triangular Cholesky factor: products with it are triangular multiplies (TRMM),
    which read half the matrix (measured 6.8 ms against 27 ms for a dense GEMM at 4,186 rows).
    """

    def __init__(self, Z: np.ndarray, work: _Workspace | None = None, K: np.ndarray | None = None,
                 centered: bool = False):
        n, D = Z.shape
        self.n = n
        self.primal = n >= D
        if self.primal:  # the rows themselves are the cheapest factor
            self.F = Z.astype(np.float64)
            self.r = D
            return
        K = _gram(Z, None if work is None else work.gram_in) if K is None else K
        tol = _gram_tol(Z.dtype, float(np.max(np.diag(K))))
        self.L11, self.L21, piv, self.r = _cholesky(K, tol, work, centered)
        del K
        self.piv, self.rest = piv[:self.r], piv[self.r:]
        self.prefix = bool(np.all(self.piv == np.arange(self.r)))
        self.at_piv = slice(0, self.r) if self.prefix else self.piv  # a slice indexes without a gather
        self.identity = self.L21 is None and self.prefix
        self.Z = Z

    def _alpha(self, G: np.ndarray) -> np.ndarray:
        """[n, k] row weights with Z^T alpha = Q G (Q = Z_p^T L11^-T)."""
        return self._scatter(_blas.trsm(self.L11, G, trans=True))

    PASS_ROWS = 64        # rows of Z per product in a pass for few columns (see to_w)
    PASS_COLUMNS = (2, 24)  # the column counts for which those products are used

    def to_w(self, G: np.ndarray) -> np.ndarray:
        """Q @ G: the D-space vectors of F-space ones (kernel space; one pass over Z, in Z's precision).

        Why in 64-row pieces for 2-24 columns: one sgemm over the whole of Z first packs all of it (a
        copy of the fold's 420 MB); pieces are packed while they are in the cache. Measured alone at 4,186
        x 25,088, one thread: 46-56 ms against 76-79 ms for 2-8 columns, 76-102 against 92-115 for 14-24;
        the same for 1 (sgemv) and 28, slower for 30 (130 against 115 ms). Inside a search the passes
        took 2.39-2.47 s against 2.79-2.83 s (26 passes; 32-, 48- and 96-row pieces were no better alone).
        """
        a = self._alpha(G).astype(self.Z.dtype)
        lo, hi = self.PASS_COLUMNS
        if not lo <= a.shape[1] <= hi:
            # alpha^T Z, not Z^T alpha: OpenBLAS runs this orientation 1.6-2.6x faster for 14-112 columns
            return (a.T @ self.Z).T
        out = np.zeros((a.shape[1], self.Z.shape[1]), dtype=self.Z.dtype)
        piece = np.empty_like(out)
        for s in range(0, self.n, self.PASS_ROWS):
            np.matmul(a[s:s + self.PASS_ROWS].T, self.Z[s:s + self.PASS_ROWS], out=piece)
            out += piece
        return out.T

    def decisions(self, Zte: np.ndarray, G: np.ndarray) -> np.ndarray:
        """Zte @ w for the solutions G (columns side by side), w = Q G: the fold's test-row decision values.

        Why through w: Zte Z^T (the test-row kernel) would cost n_te * n * D multiply-adds per fold; w
        costs one pass over Z for all candidates together, and Zte @ w one pass over Zte.
        """
        if self.primal:
            return Zte @ G
        return (Zte @ self.to_w(G)).astype(np.float64)

    NARROW = 2  # right-hand columns up to which one ?trmv per column beats ?trmm (see _blas.trmv)

    def _tri(self, B: np.ndarray, trans: bool) -> np.ndarray:
        """L11 @ B (or L11.T @ B)."""
        if B.shape[1] > self.NARROW:
            return _blas.trmm(self.L11, B, trans=trans)
        return np.column_stack([_blas.trmv(self.L11, B[:, c], trans=trans) for c in range(B.shape[1])])

    def mul(self, G: np.ndarray) -> np.ndarray:
        """F @ G."""
        if self.primal:
            return self.F @ G
        top = self._tri(G, False)
        if self.identity:
            return top
        out = np.empty((self.n, G.shape[1]))
        out[self.at_piv] = top
        if self.L21 is not None:
            out[self.rest] = self.L21 @ G
        return out

    def tmul(self, R: np.ndarray) -> np.ndarray:
        """F.T @ R."""
        if self.primal:
            return self.F.T @ R
        if self.identity:
            return self._tri(R, True)
        out = self._tri(R[self.at_piv], True)
        if self.L21 is not None:
            out += self.L21.T @ R[self.rest]
        return out

    def _scatter(self, alpha: np.ndarray) -> np.ndarray:
        """[n, k] with ``alpha`` on the pivot rows: Z_p^T alpha == Z^T scatter(alpha)."""
        if self.identity:
            return alpha
        out = np.zeros((self.n, alpha.shape[1]))
        out[self.at_piv] = alpha
        return out

    def coefficients(self, Z: np.ndarray, G: np.ndarray) -> np.ndarray:
        """w (D x k) for the solution G: w = Z_p^T L11^-T G (or G itself in the primal case)."""
        if self.primal:
            return G
        a = self._alpha(G)
        w = np.zeros((Z.shape[1], a.shape[1]))
        for s in range(0, Z.shape[0], _CHUNK_ROWS):  # float64 products without a float64 copy of Z
            w += Z[s:s + _CHUNK_ROWS].T.astype(np.float64) @ a[s:s + _CHUNK_ROWS]
        return w


def _score(scoring: str, y: np.ndarray, raw: np.ndarray, classes: np.ndarray) -> float:
    """The scorer applied to decision values exactly as scikit-learn's would use predict/proba."""
    from scipy.special import expit, softmax
    from sklearn import metrics

    if raw.shape[1] == 1:
        pred = classes[(raw[:, 0] > 0).astype(int)]
        p1 = expit(raw[:, 0])
        proba = np.column_stack([1 - p1, p1])
    else:
        pred = classes[np.argmax(raw, axis=1)]
        proba = softmax(raw, axis=1)
    if scoring == "accuracy":
        return float(np.mean(pred == y))
    if scoring == "balanced_accuracy":
        return float(metrics.balanced_accuracy_score(y, pred))
    if scoring == "f1_macro":
        return float(metrics.f1_score(y, pred, average="macro"))
    if scoring == "roc_auc":
        return float(metrics.roc_auc_score(y == classes[1], raw[:, 0]))
    if scoring == "neg_log_loss":
        return float(-metrics.log_loss(y, proba, labels=classes))
    raise ValueError(scoring)


class _Prefetcher:
    """Prepares the next fold (standardised rows and Gram) on a background thread while this one solves.

    Why: a fold's 14 solves are Python-driven L-BFGS that keep about one core busy (1.7 s at 4,186 rows),
    while the next fold's Gram is BLAS that releases the GIL. The consumer, when it has to wait, computes
    blocks of the Gram being prepared itself (``_GramJob``), so the two cores share whatever is left.
    Two workspaces alternate: job i is prepared in ``works[i % 2]`` once the consumer has released job
    i-2's. A context manager, so that an error on either side stops the other.

    ``make(job, work)`` returns ``(payload, phases)``: ``phases`` (``_Tasks``, each needing the ones
    before it) are run here, with the consumer's help, before the payload is handed over.
    """

    def __init__(self, make, jobs: list, works: list[_Workspace]):
        import queue

        self._queue: Any = queue.Queue()
        self._free = threading.Semaphore(len(works))
        self._closed = False
        self._current: _Tasks | None = None
        self._thread = threading.Thread(target=self._produce, args=(make, jobs, works), daemon=True)

    def __enter__(self) -> _Prefetcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._closed = True
        self._free.release()  # a producer waiting for a workspace wakes up and sees _closed
        self._thread.join()

    def _produce(self, make, jobs: list, works: list[_Workspace]) -> None:
        try:
            for i, job in enumerate(jobs):
                self._free.acquire()
                if self._closed:
                    return
                payload, phases = make(job, works[i % len(works)])
                for phase in phases:
                    self._current = phase
                    phase.run()
                self._current = None
                self._queue.put((True, payload))
        except BaseException as exc:  # handed to the consumer, raised there
            self._queue.put((False, exc))

    def get(self) -> Any:
        """The next prepared payload; while it is not ready, help prepare it."""
        import queue

        while True:
            try:
                ok, value = self._queue.get(timeout=0.005)
                break
            except queue.Empty:
                phase = self._current
                while phase is not None and phase.run_one():
                    pass
        if not ok:
            raise value
        return value

    def release(self) -> None:
        """The consumer is done with the oldest job it got: its workspace may be reused."""
        self._free.release()


# ---------------------------------------------------------------- public search class

class FastLogisticGridSearchCV:
    """GridSearchCV over StandardScaler + LogisticRegression, with the interface users know.

    ``param_grid`` holds LogisticRegression parameter names (``C``, ``class_weight``, ``max_iter``...) as
    a dict of lists or a list of such dicts; candidates come in ``ParameterGrid`` order, so
    ``cv_results_`` lines up with GridSearchCV's. ``best_estimator_`` is a real fitted
    ``Pipeline(StandardScaler, LogisticRegression)``.
    """

    def __init__(self, param_grid: dict | list[dict], *, cv: Any = 5, scoring: str = "accuracy",
                 refit: bool = True, progress: ProgressFn | None = None):
        self.param_grid = param_grid
        self.cv = cv
        self.scoring = scoring
        self.refit = refit
        self.progress = progress

    # --- helpers
    def _folds(self, X: np.ndarray, y: np.ndarray, groups: np.ndarray | None) -> list:
        from sklearn.model_selection import check_cv

        if isinstance(self.cv, (list, tuple)):
            return [(np.asarray(a), np.asarray(b)) for a, b in self.cv]
        return list(check_cv(self.cv, y, classifier=True).split(X, y, groups))

    def _fallback(self, X, y, groups, folds, candidates) -> None:
        from sklearn.linear_model import LogisticRegression
        from sklearn.model_selection import GridSearchCV
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        grid = [{f"logisticregression__{k}": [v] for k, v in c.items()} for c in candidates]
        gs = GridSearchCV(make_pipeline(StandardScaler(), LogisticRegression()), grid, cv=folds,
                          scoring=self.scoring, refit=self.refit)
        gs.fit(X, y, groups=groups)
        self.used_fallback_ = True
        cvr = dict(gs.cv_results_)
        cvr["params"] = [dict(c) for c in candidates]
        self.cv_results_ = cvr
        self.best_index_ = int(gs.best_index_)
        self.best_params_ = dict(candidates[self.best_index_])
        self.best_score_ = float(gs.best_score_)
        if self.refit:
            self.best_estimator_ = gs.best_estimator_

    def fit(self, X: np.ndarray, y: np.ndarray, groups: np.ndarray | None = None) -> FastLogisticGridSearchCV:
        from sklearn.model_selection import ParameterGrid
        from threadpoolctl import threadpool_limits

        X, y = np.asarray(X), np.asarray(y)
        if X.dtype not in (np.float32, np.float64):
            X = X.astype(np.float64)
        candidates = [dict(c) for c in ParameterGrid(self.param_grid)]
        full = [_lr_params(c) for c in candidates]
        folds = self._folds(X, y, groups)
        self.n_splits_ = len(folds)
        fast = self.scoring in _FAST_SCORERS and all(_fast_supported(p) for p in full)
        fast = fast and all(len(np.unique(y[tr])) >= 2 for tr, _ in folds)
        if fast and self.scoring == "roc_auc" and len(np.unique(y)) != 2:
            fast = False
        if not fast:
            self._fallback(X, y, groups, folds, candidates)
            return self
        self.used_fallback_ = False
        scores = np.zeros((len(full), len(folds)))
        fit_t = np.zeros_like(scores)
        score_t = np.zeros_like(scores)
        total, done = len(full) * len(folds), [0]
        scalers = _FoldScalers(X, folds)
        n, d = X.shape
        jobs: list[tuple] = [(j, tr, te) for j, (tr, te) in enumerate(folds)]
        if self.refit:  # the refit's rows and Gram do not depend on the winner: prepare them in turn
            jobs.append((None, None, np.empty(0, dtype=np.intp)))
        need = max([len(tr) + len(te) for tr, te in folds] + [n if self.refit else 0])
        train = max([len(tr) for tr, _ in folds] + [n if self.refit else 0])
        chol = np.empty(train * train) if train < d else None  # one factor is in use at a time
        # two workspaces let the next fold be prepared during this one's solve; one when memory is tight
        sets = 2 if len(jobs) > 1 and 2 * need * d * X.dtype.itemsize < 0.5 * _available_memory() else 1
        works = [_Workspace(need, d, X.dtype, train, chol) for _ in range(sets)]

        def prepare(job: tuple, work: _Workspace) -> tuple:
            j, tr, te = job
            scaler = scalers.all_rows() if j is None else scalers.fold(j)
            Z, std_tr = _standardize_tasks(scaler, X, tr, work.rows)
            Zte, std_te = _standardize_tasks(scaler, X, te, work.rows[len(Z):])
            gram = _GramJob(Z, work.gram_in) if len(Z) < d else None
            phases = [_Tasks(std_tr + std_te)] + ([gram] if gram is not None else [])
            return (scaler, Z, Zte, gram, work), phases

        # One BLAS thread throughout: this thread and the prefetcher's each keep a core busy.
        with threadpool_limits(1, user_api="blas"), _Prefetcher(prepare, jobs, works) as ready:
            for j, (tr, te) in enumerate(folds):
                t0 = time.perf_counter()
                _scaler, Z, Zte, gram, work = ready.get()
                space = _Space(Z, work, None if gram is None else gram.K(), centered=True)
                classes, yi = np.unique(y[tr], return_inverse=True)

                def tick(j=j) -> None:
                    done[0] += 1
                    emit(self.progress, "fit", done[0], total, f"fold {j + 1}/{len(folds)}")

                sols = _solve_many(space, yi, len(classes), full, tick, d)
                t1 = time.perf_counter()
                k = sols[0][0].shape[1]
                raw = space.decisions(Zte, np.hstack([G for G, _, _ in sols]))
                for i, (_G, b, _nit) in enumerate(sols):
                    scores[i, j] = _score(self.scoring, y[te], raw[:, i * k:(i + 1) * k] + b, classes)
                # fold-level cost shared equally by its candidates (they were solved together)
                fit_t[:, j] = (t1 - t0) / len(full)
                score_t[:, j] = (time.perf_counter() - t1) / len(full)
                del space, Z, Zte, gram, work
                ready.release()
            self.cv_results_ = build_cv_results(candidates, scores, fit_t, score_t)
            res = result_from_cv(candidates, self.cv_results_)
            self.best_index_, self.best_params_ = res.best_index, res.best_params
            self.best_score_ = res.best_score
            if self.refit:
                scaler, Z, _Zte, gram, work = ready.get()
        if self.refit:  # outside the one-thread limit: nothing runs beside the refit
            space = _Space(Z, work, None if gram is None else gram.K(), centered=True)
            self.best_estimator_ = _fit_in_space(space, Z, y, _lr_params(self.best_params_), scaler)
        return self

    def search_result(self) -> SearchResult:
        from featcache.heads.base import jsonable

        cvr = {k: jsonable(v) for k, v in self.cv_results_.items()}
        return SearchResult(best_params=dict(self.best_params_), best_index=int(self.best_index_),
                            best_score=float(self.best_score_), cv_results=cvr)


def fit_pipeline(X: np.ndarray, y: np.ndarray, params: dict) -> Any:
    """A fitted Pipeline(StandardScaler, LogisticRegression) for ``params``.

    Plain lbfgs/L2 candidates are solved in the isometric space (same iterates as scikit-learn's own fit)
    and the coefficients mapped back; anything else is fitted by scikit-learn itself.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    p = _lr_params(params)
    X, y = np.asarray(X), np.asarray(y)
    if not _fast_supported(p) or len(np.unique(y)) < 2:
        return make_pipeline(StandardScaler(), LogisticRegression(**p)).fit(X, y)
    scaler = fit_scaler(X)
    Z = standardize(scaler, X)
    return _fit_in_space(_Space(Z, centered=True), Z, y, p, scaler)


def _fit_in_space(space: _Space, Z: np.ndarray, y: np.ndarray, p: dict, scaler: Any) -> Any:
    """The Pipeline for complete LogisticRegression parameters ``p``, solved in ``space`` (built on Z)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline

    classes, yi = np.unique(y, return_inverse=True)
    # All cores but at most 4: a lone fit's products are memory-bound ?trmv (two threads: 2x here), and
    # idle OpenBLAS threads spin between L-BFGS-B's small calls.
    (G, b, nit), = _solve_many(space, yi, len(classes), [p], None, Z.shape[1], threads=min(_cpus(), 4))
    W = space.coefficients(Z, G)
    lr = LogisticRegression(**p)
    lr.classes_ = classes
    lr.coef_ = np.ascontiguousarray(W.T)
    lr.intercept_ = np.asarray(b, dtype=np.float64)
    lr.n_features_in_ = Z.shape[1]
    lr.n_iter_ = np.array([nit], dtype=np.int32)
    return Pipeline([("standardscaler", scaler), ("logisticregression", lr)])


# ---------------------------------------------------------------- the head

class LogRegHead(CVHead):
    """``logreg``: standardisation + LogisticRegression; any LogisticRegression parameter may be gridded."""

    name: ClassVar[str] = "logreg"
    schema: ClassVar[dict[str, str]] = {
        "C": "float", "class_weight": "class_weight", "penalty": "str?", "solver": "str",
        "max_iter": "int", "tol": "float", "fit_intercept": "bool", "l1_ratio": "float?",
        "intercept_scaling": "float", "dual": "bool", "warm_start": "bool", "random_state": "int?",
    }
    default_grid: ClassVar[dict[str, list]] = {"C": list(DEFAULT_CS), "class_weight": [None, "balanced"]}

    def search(self, X: np.ndarray, y: np.ndarray, folds: Folds, grid: list[dict], *,
               scoring: str = "accuracy", seed: int = 0, progress: ProgressFn | None = None) -> SearchResult:
        grid = [self.check(p) for p in grid]
        for p in grid:
            _lr_params(p)
        gs = FastLogisticGridSearchCV([{k: [v] for k, v in p.items()} for p in grid],
                                      cv=list(folds), scoring=scoring, refit=False, progress=progress)
        try:
            gs.fit(X, y)
        except ValueError as exc:  # e.g. an invalid solver/penalty pair in the grid
            raise ConfigError(f"logistic regression rejected the grid: {exc}".rstrip(".") + ".") from None
        res = gs.search_result()
        res.best_params = dict(grid[res.best_index])
        return res

    def fit(self, X: np.ndarray, y: np.ndarray, params: dict, *, seed: int = 0) -> SklearnHead:
        params = self.check(params)
        if "random_state" not in params:
            params = {**params, "random_state": seed}
        return SklearnHead(fit_pipeline(X, y, params), int(np.max(y)) + 1)
