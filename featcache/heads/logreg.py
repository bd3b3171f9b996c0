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
   apply scikit-learn's test to the D-space gradient ourselves (the bounds ||g||_2/sqrt(D) <= ||g||_inf <=
   ||g||_2 skip the exact check most of the time). Result: the same iterates AND the same stopping iteration
   in exact arithmetic; on the float64 test problems decision values agree to ~1e-12. In floating point
   the two trajectories are not bit-identical, and over ~100 unconverged iterations of an ill-conditioned
   problem a rounding difference can tip a line-search test and send L-BFGS down another path: on real
   VGG16 features (5,206 x 25,088, 31 of 71 fits stopping at max_iter) 11 of 14 mean CV scores equalled
   float64 scikit-learn's and the other 3 moved by up to 0.001 -- less than scikit-learn's own
   float32-vs-float64 difference on the same data. When D <= n the "factor" is Z itself
   (no Gram needed) and only step 3 applies. On float32 inputs scikit-learn evaluates its loss in float32
   while we solve in float64 (on a float32 Gram), so small differences remain there.
3. *All candidates at once.* The 7 C x 2 class-weight problems of a fold share F; each runs its own
   L-BFGS in a thread and the threads meet at a barrier (``_Evaluator``): the last arrival evaluates all
   objectives together, with one product ``F @ [g_1 ... g_k]`` (a triangular multiply: F is kept as its
   Cholesky factor, half the memory traffic of a dense GEMM), one vectorised loss/gradient pass and one
   ``F.T @ R``.
4. *float32 BLAS for the big product.* The Gram ``Z Z^T`` (and the test-row cross products) are the only
   O(n^2 D) work: one float32 SYRK/GEMM per fold, the fold's own mean/std applied as the Pipeline would.
   Gathering a fold's rows and standardising them is one chunked pass into a buffer reused by every fold
   and the refit (``_Workspace``); the refit's statistics come from the same moments.

Measured on the 2-core dev box: see benchmarks/bench_logreg.py. Unsupported settings (a non-lbfgs solver,
l1/elastic-net, a scorer we do not compute) fall back to real ``GridSearchCV`` -- still correct, slower.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from featcache.errors import ConfigError
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
_SMALL = 400_000  # F entries below which problems are solved one after another
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

class _Evaluator:
    """A barrier at which k concurrent scipy L-BFGS runs (one thread each) get their objectives together.

    Why: every run needs ``F @ G`` and ``F.T @ R`` per evaluation. When all still-active runs are waiting,
    the last arrival evaluates them all at once: one product with F for all of them, the loss and
    gradient arithmetic as one vectorised pass, and (kernel space) scikit-learn's D-space stop test with
    one shared product for the runs that need it. Each run's numbers are those it would get alone.
    """

    def __init__(self, space: _Space, y: np.ndarray, n_cls: int, problems: list[dict], n_features: int,
                 hot: _HotRows | None):
        self.space, self.y, self.hot = space, y, hot
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
        self.active = len(problems)
        self.cond = threading.Condition()
        self.pending: dict[int, np.ndarray] = {}
        self.results: dict[int, tuple[float, np.ndarray]] = {}
        self.state: dict[int, tuple[np.ndarray, float]] = {}
        self.error: BaseException | None = None

    def n_params(self, i: int) -> int:
        return self.r * self.k + (self.k if self.specs[i]["intercept"] else 0)

    def evaluate(self, i: int, x: np.ndarray) -> tuple[float, np.ndarray]:
        with self.cond:
            self.pending[i] = x
            if len(self.pending) >= self.active:
                self._run()
            while i not in self.results and self.error is None:
                self.cond.wait()
            if self.error is not None:
                raise RuntimeError("a batched logistic-regression evaluation failed") from self.error
            return self.results.pop(i)

    def leave(self) -> None:
        with self.cond:
            self.active -= 1
            if self.pending and len(self.pending) >= self.active:
                self._run()

    def converged(self, i: int, x: np.ndarray) -> bool:
        """scikit-learn's stop test (max |D-space gradient| <= tol) for the point ``x`` just accepted."""
        last = self.state.get(i)
        return last is not None and np.array_equal(last[0], x) and last[1] <= self.specs[i]["tol"]

    def _run(self) -> None:
        try:
            self._evaluate_pending()
        except BaseException as exc:  # wake every waiter: a failed batch must not hang the others
            self.error = exc
        self.cond.notify_all()

    def _evaluate_pending(self) -> None:
        from scipy.special import expit, logsumexp

        keys = sorted(self.pending)
        xs = [self.pending.pop(i) for i in keys]
        r, k = self.r, self.k
        Gs = [x[: r * k].reshape(r, k) for x in xs]
        raw = self.space.mul(np.hstack(Gs) if len(Gs) > 1 else Gs[0])
        for j, (i, x) in enumerate(zip(keys, xs, strict=True)):
            if self.specs[i]["intercept"]:
                raw[:, j * k:(j + 1) * k] += x[r * k:]
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
        need_w: list[tuple[int, int, np.ndarray, float]] = []
        for j, i in enumerate(keys):
            spec, G = self.specs[i], Gs[j]
            cols = slice(j * k, (j + 1) * k)
            gG = gG_all[:, cols] + spec["l2"] * G
            loss = float(losses[j]) + 0.5 * spec["l2"] * float(np.sum(G * G))
            gb = D[:, cols].sum(axis=0)
            grad = np.concatenate([gG.ravel(), gb]) if spec["intercept"] else gG.ravel()
            self.results[i] = (loss, grad)
            if self.space.to_w is None:
                continue
            gmax = self._gradient_max(spec, gG, gb)
            if gmax is None:
                need_w.append((i, j, gG, float(np.max(np.abs(gb))) if spec["intercept"] else 0.0))
            else:
                self.state[i] = (xs[j], gmax)
        if need_w:  # the exact D-space gradients, one shared product
            gw_all = self.space.to_w(np.hstack([g for _, _, g, _ in need_w]))
            for c, (i, j, _g, gb_max) in enumerate(need_w):
                gw = gw_all[:, c * k:(c + 1) * k]
                gmax = max(gb_max, float(np.max(np.abs(gw))))
                if self.hot is not None and gmax > self.specs[i]["tol"]:
                    self.hot.learn(gw)  # the bound missed: learn where the gradient is now
                self.state[i] = (xs[j], gmax)

    def _gradient_max(self, spec: dict, gG: np.ndarray, gb: np.ndarray) -> float | None:
        """max|grad| of the D-space gradient where cheap bounds decide the stop test; None: compute it.

        ||g||_inf lies in [||g||_2 / sqrt(D), ||g||_2], and the hot rows give a lower bound, so the exact
        D-space product is needed only when those bounds cannot decide ``max|g| <= tol``.
        """
        tol = spec["tol"]
        norm2 = float(np.sqrt(np.sum(gG * gG)))
        gmax = float(np.max(np.abs(gb))) if spec["intercept"] else 0.0
        if norm2 <= tol or norm2 / np.sqrt(self.n_features) > tol:
            return max(gmax, norm2 if norm2 <= tol else np.inf)
        if gmax > tol:
            return gmax
        lower = self.hot.bound(gG) if self.hot is not None else None
        if lower is not None and lower > tol * (1 + 1e-6):
            return lower  # provably not converged: max|Q g| >= max over the hot rows > tol
        return None


def _solve_many(space: _Space, y: np.ndarray, n_cls: int, problems: list[dict],
                progress_cb=None, n_features: int = 0) -> list[tuple]:
    """Run one scipy L-BFGS-B per problem (identical options to scikit-learn) sharing the products.

    Returns (G [r, k], intercept [k], n_iter) per problem.
    """
    from scipy.optimize import minimize
    from threadpoolctl import threadpool_limits

    r = space.r
    out: list[Any] = [None] * len(problems)
    errors: list[BaseException] = []
    exact = space.to_w is not None  # kernel space: apply the tol test in D-space ourselves
    hot = space.hot()

    def work(i: int, key: int, p: dict, ev: _Evaluator) -> None:
        """Problem i, known to the evaluator ``ev`` as ``key``."""
        try:
            k = ev.k
            x0 = np.zeros(ev.n_params(key))

            def stop(intermediate_result: Any) -> None:
                if ev.converged(key, intermediate_result.x):
                    raise StopIteration

            res = minimize(lambda x: ev.evaluate(key, x), x0, method="L-BFGS-B", jac=True,
                           callback=stop if exact else None,
                           options={"maxiter": int(p["max_iter"]), "maxls": 50,
                                    "gtol": 0.0 if exact else float(p["tol"]),
                                    "ftol": 64 * np.finfo(float).eps})
            G = res.x[: r * k].reshape(r, k)
            b = res.x[r * k:] if p["fit_intercept"] else np.zeros(k)
            out[i] = (G, b, int(res.nit))
        except BaseException as exc:  # surfaced after join; the barrier must not hang
            errors.append(exc)
        finally:
            ev.leave()
            if progress_cb is not None:
                progress_cb()

    # One BLAS thread: the shared products are triangular multiplies that measured fastest on one
    # thread here (6.8 ms against 10.7 ms on two for 4,186 rows x 14 columns), and multi-threaded
    # OpenBLAS spin-waits between the many small calls of L-BFGS-B (25x slower on a busy 2-core box).
    with threadpool_limits(1, user_api="blas"):
        if len(problems) == 1 or space.n * r < _SMALL:  # thread hand-offs would cost more than they save
            for i, p in enumerate(problems):
                work(i, 0, p, _Evaluator(space, y, n_cls, [p], n_features, hot))
        else:
            ev = _Evaluator(space, y, n_cls, problems, n_features, hot)
            threads = [threading.Thread(target=work, args=(i, i, p, ev), daemon=True)
                       for i, p in enumerate(problems)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
    if errors:
        raise errors[0]
    return out


# ---------------------------------------------------------------- standardisation statistics

_CHUNK_ROWS = 512
_GATHER_ROWS = 64  # rows per gather-and-standardise step: a few MB, so the second pass hits the cache


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

    def __init__(self, X: np.ndarray, folds: Sequence[tuple[np.ndarray, np.ndarray]]):
        self.X, self.folds = X, folds
        member = np.zeros((X.shape[0], len(folds)), dtype=bool)
        for j, (tr, _) in enumerate(folds):
            member[tr, j] = True
        patterns, codes = np.unique(member, axis=0, return_inverse=True)
        self.parts: list | None = None
        if len(patterns) <= self.MAX_GROUPS:
            codes = codes.ravel()
            self.patterns = patterns
            self.parts = [_moments(X, np.flatnonzero(codes == g)) for g in range(len(patterns))]

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
    n = X.shape[0] if rows is None else len(rows)
    dtype = X.dtype if X.dtype in (np.float32, np.float64) else np.float64
    out = np.empty((n, X.shape[1]), dtype=dtype) if out is None else out[:n]
    mean, scale = scaler.mean_.astype(out.dtype), scaler.scale_.astype(out.dtype)
    for s in range(0, n, _GATHER_ROWS):
        blk = out[s:s + _GATHER_ROWS]
        np.subtract(_rows(X, rows, s, s + _GATHER_ROWS), mean, out=blk, casting="unsafe")
        blk /= scale
    return out


# ---------------------------------------------------------------- the isometric space

def _gram_tol(dtype: np.dtype, diag_max: float) -> float:
    """Pivots below this are rounding noise of the float32 Gram (relative error ~ sqrt(D) * eps32)."""
    return diag_max * (1e-5 if dtype == np.float32 else 1e-11)


def _gram(Z: np.ndarray) -> np.ndarray:
    """Z Z^T (lower triangle, Fortran order) by one SYRK in Z's precision: half the FLOPs of a GEMM."""
    from scipy.linalg import blas

    syrk = blas.ssyrk if Z.dtype == np.float32 else blas.dsyrk
    # Z is C-ordered [n, D]: Z.T is the same memory in Fortran order, and syrk(trans=1) gives (Z.T)^T Z.T
    return syrk(1.0, Z.T, trans=1, lower=1)


class _Workspace:
    """Buffers reused across a search's folds and its refit.

    Why: a fresh half-gigabyte array per fold costs page faults (measured 0.3 s just to convert one
    4,186-row Gram to float64 into new memory), and the folds run one after another anyway.
    """

    def __init__(self, rows: int, d: int, dtype: np.dtype, gram_rows: int):
        self.rows = np.empty((rows, d), dtype=dtype)          # standardised rows of a fold
        self.gram = np.empty(gram_rows * gram_rows) if gram_rows < d else None  # float64 Cholesky

    def square(self, n: int) -> np.ndarray:
        """An [n, n] float64 Fortran-ordered view of the Gram buffer (or a new array)."""
        if self.gram is None or self.gram.size < n * n:
            return np.empty((n, n), order="F")
        return self.gram[: n * n].reshape((n, n), order="F")


def _cholesky(K: np.ndarray, tol: float, work: _Workspace | None = None
              ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, int]:
    """(L11 [r, r] lower, L21 [n-r, r] or None, pivot order, rank) with F F^T = K for F[piv] = [L11; L21].

    K's lower triangle is read (in any float precision) and not modified; the factor is float64. Plain
    Cholesky when K is clearly positive definite (no pivoting: about half the time of the pivoted one);
    pivoted Cholesky, stopping at rank r, when it is not (duplicate or collinear rows).
    """
    from scipy.linalg.lapack import dpotrf, dpstrf

    n = K.shape[0]

    def float64_copy() -> np.ndarray:
        A = work.square(n) if work is not None else np.empty((n, n), order="F")
        np.copyto(A, K)
        return A

    c, info = dpotrf(float64_copy(), lower=1, clean=0, overwrite_a=1)
    if info == 0 and float(np.min(np.diag(c))) ** 2 > tol:
        return c, None, np.arange(n), n
    c, piv, rank, info = dpstrf(float64_copy(), lower=1, tol=tol, overwrite_a=1)
    if info < 0:
        raise RuntimeError(f"pivoted Cholesky failed (info={info})")
    L21 = np.ascontiguousarray(c[rank:, :rank]) if rank < n else None
    return np.asfortranarray(c[:rank, :rank]), L21, piv - 1, rank


class _Space:
    """F (training rows) and F_te (other rows) with F F^T = Z Z^T, plus the map back to coefficients.

    F is kept as its triangular Cholesky factor: products with it are triangular multiplies (TRMM),
    which read half the matrix (measured 6.8 ms against 27 ms for a dense GEMM at 4,186 rows).
    """

    def __init__(self, Z: np.ndarray, Zte: np.ndarray | None = None, work: _Workspace | None = None):
        n, D = Z.shape
        self.n = n
        self.primal = n >= D
        self.to_w: Any = None
        self.Fte: np.ndarray | None = None
        if self.primal:  # the rows themselves are the cheapest factor
            self.F = Z.astype(np.float64)
            self.r = D
            if Zte is not None:
                self.Fte = Zte.astype(np.float64)
            return
        from scipy.linalg import solve_triangular

        K = _gram(Z)
        self.L11, self.L21, piv, self.r = _cholesky(K, _gram_tol(Z.dtype, float(np.max(np.diag(K)))), work)
        del K
        self.piv, self.rest = piv[:self.r], piv[self.r:]
        self.identity = self.L21 is None and bool(np.all(self.piv == np.arange(n)))
        self._solve = solve_triangular
        self.Z = Z
        if Zte is not None:  # cross products with Z itself, then the pivot columns: no copy of Z is made
            cross = Zte @ Z.T
            cross = (cross if self.identity else cross[:, self.piv]).astype(np.float64)
            self.Fte = solve_triangular(self.L11, cross.T, lower=True).T
        self.to_w = self._to_w

    def _to_w(self, G: np.ndarray) -> np.ndarray:
        """Q @ G: the D-space vectors of F-space ones (one pass over all of Z)."""
        alpha = self._scatter(self._solve(self.L11.T, G, lower=False)).astype(self.Z.dtype)
        return self.Z.T @ alpha

    def mul(self, G: np.ndarray) -> np.ndarray:
        """F @ G."""
        if self.primal:
            return self.F @ G
        from scipy.linalg.blas import dtrmm

        top = dtrmm(1.0, self.L11, G, lower=1)
        if self.identity:
            return top
        out = np.empty((self.n, G.shape[1]))
        out[self.piv] = top
        if self.L21 is not None:
            out[self.rest] = self.L21 @ G
        return out

    def tmul(self, R: np.ndarray) -> np.ndarray:
        """F.T @ R."""
        if self.primal:
            return self.F.T @ R
        from scipy.linalg.blas import dtrmm

        if self.identity:
            return dtrmm(1.0, self.L11, R, lower=1, trans_a=1)
        out = dtrmm(1.0, self.L11, R[self.piv], lower=1, trans_a=1)
        if self.L21 is not None:
            out += self.L21.T @ R[self.rest]
        return out

    def hot(self) -> _HotRows | None:
        """A cheap lower bound on the D-space gradient max (None in the primal case: no D-space check)."""
        return None if self.primal else _HotRows(self)

    def _scatter(self, alpha: np.ndarray) -> np.ndarray:
        """[n, k] with ``alpha`` on the pivot rows: Z_p^T alpha == Z^T scatter(alpha)."""
        if self.identity:
            return alpha
        out = np.zeros((self.n, alpha.shape[1]))
        out[self.piv] = alpha
        return out

    def coefficients(self, Z: np.ndarray, G: np.ndarray) -> np.ndarray:
        """w (D x k) for the solution G: w = Z_p^T L11^-T G (or G itself in the primal case)."""
        if self.primal:
            return G
        a = self._scatter(self._solve(self.L11.T, G, lower=False))
        w = np.zeros((Z.shape[1], a.shape[1]))
        for s in range(0, Z.shape[0], _CHUNK_ROWS):  # float64 products without a float64 copy of Z
            w += Z[s:s + _CHUNK_ROWS].T.astype(np.float64) @ a[s:s + _CHUNK_ROWS]
        return w


class _HotRows:
    """Rows of Q = Z_p^T L11^-T (the map to D-space) for the features where the gradient was largest.

    Why: scikit-learn stops when max|grad_w| <= tol, and grad_w = Q g costs a pass over the whole
    [n, D] matrix. Near the end of a solve max|Q_S g| over a few hundred "hot" features S is a lower bound
    that already exceeds tol on most iterations, which proves "not converged" without the full product;
    the exact product is computed only when the bound cannot decide, so the stopping iteration is the
    same. S is learnt from the full gradients that were computed (the bound refreshed when it missed).
    """

    SIZE = 256
    MAX_LEARN = 4

    def __init__(self, space: _Space):
        self.space = space
        self.Q: np.ndarray | None = None
        self.learnt = 0

    def bound(self, gG: np.ndarray) -> float | None:
        return None if self.Q is None else float(np.max(np.abs(self.Q @ gG)))

    def learn(self, gw: np.ndarray) -> None:
        """Called only by the evaluating thread (under the evaluator's lock), so no lock of its own."""
        from scipy.linalg import solve_triangular

        if self.learnt >= self.MAX_LEARN:
            return
        self.learnt += 1
        size = min(self.SIZE, gw.shape[0])
        S = np.argpartition(-np.abs(gw).max(axis=1), size - 1)[:size]
        if self.Q is not None:  # keep what was hot before as well
            S = np.union1d(S, self.S)
        sp = self.space
        Zs = sp.Z[np.ix_(sp.piv, S)].astype(np.float64)          # Z_p[:, S], [r, |S|]
        self.S = S
        self.Q = solve_triangular(sp.L11, Zs, lower=True).T      # (L11^-1 Z_p[:, S])^T = Q[S]


def _decision(Fte: np.ndarray, G: np.ndarray, b: np.ndarray) -> np.ndarray:
    return Fte @ G + b


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
        need = max([len(tr) + len(te) for tr, te in folds] + [X.shape[0] if self.refit else 0])
        train = max([len(tr) for tr, _ in folds] + [X.shape[0] if self.refit else 0])
        work = _Workspace(need, X.shape[1], X.dtype, train)
        buf = work.rows
        for j, (tr, te) in enumerate(folds):
            t0 = time.perf_counter()
            scaler = scalers.fold(j)
            Z = standardize(scaler, X, tr, out=buf)
            Zte = standardize(scaler, X, te, out=buf[len(tr):])
            space = _Space(Z, Zte, work)
            classes, yi = np.unique(y[tr], return_inverse=True)

            def tick(j=j) -> None:
                done[0] += 1
                emit(self.progress, "fit", done[0], total, f"fold {j + 1}/{len(folds)}")

            sols = _solve_many(space, yi, len(classes), full, tick, X.shape[1])
            t1 = time.perf_counter()
            for i, (G, b, _nit) in enumerate(sols):
                scores[i, j] = _score(self.scoring, y[te], _decision(space.Fte, G, b), classes)
            # fold-level cost shared equally by its candidates (they were solved together)
            fit_t[:, j] = (t1 - t0) / len(full)
            score_t[:, j] = (time.perf_counter() - t1) / len(full)
            del space, Z, Zte
        self.cv_results_ = build_cv_results(candidates, scores, fit_t, score_t)
        res = result_from_cv(candidates, self.cv_results_)
        self.best_index_, self.best_params_ = res.best_index, res.best_params
        self.best_score_ = res.best_score
        if self.refit:
            self.best_estimator_ = fit_pipeline(X, y, self.best_params_, scaler=scalers.all_rows(),
                                                workspace=work)
        return self

    def search_result(self) -> SearchResult:
        from featcache.heads.base import jsonable

        cvr = {k: jsonable(v) for k, v in self.cv_results_.items()}
        return SearchResult(best_params=dict(self.best_params_), best_index=int(self.best_index_),
                            best_score=float(self.best_score_), cv_results=cvr)


def fit_pipeline(X: np.ndarray, y: np.ndarray, params: dict, *, scaler: Any = None,
                 workspace: _Workspace | None = None) -> Any:
    """A fitted Pipeline(StandardScaler, LogisticRegression) for ``params``.

    Plain lbfgs/L2 candidates are solved in the isometric space (same iterates as scikit-learn's own fit)
    and the coefficients mapped back; anything else is fitted by scikit-learn itself. ``scaler`` (fitted
    on all of X) and ``workspace`` (buffers with room for all of X) let a grid search reuse its work.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline, make_pipeline
    from sklearn.preprocessing import StandardScaler

    p = _lr_params(params)
    X, y = np.asarray(X), np.asarray(y)
    if not _fast_supported(p) or len(np.unique(y)) < 2:
        return make_pipeline(StandardScaler(), LogisticRegression(**p)).fit(X, y)
    scaler = fit_scaler(X) if scaler is None else scaler
    Z = standardize(scaler, X, out=None if workspace is None else workspace.rows)
    space = _Space(Z, work=workspace)
    classes, yi = np.unique(y, return_inverse=True)
    (G, b, nit), = _solve_many(space, yi, len(classes), [p], None, X.shape[1])
    W = space.coefficients(Z, G)
    lr = LogisticRegression(**p)
    lr.classes_ = classes
    lr.coef_ = np.ascontiguousarray(W.T)
    lr.intercept_ = np.asarray(b, dtype=np.float64)
    lr.n_features_in_ = X.shape[1]
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
