"""Logistic-regression head: standardisation + LogisticRegression, tuned like GridSearchCV -- only faster.

How the speed is obtained (and why the answers stay scikit-learn's)
-------------------------------------------------------------------
The reference is ``GridSearchCV(make_pipeline(StandardScaler(), LogisticRegression()), grid, cv=folds)``.
Each of its fits runs scipy's L-BFGS-B on ``mean_sw(loss) + ||w||^2 / (2 C sw_sum)`` in D dimensions, and
every iteration streams the whole [n_train, D] matrix twice (two matrix-vector products): with VGG16
flatten features (D = 25,088 > n) that is memory-bound work repeated for every C, class weighting and fold.

1. *Same standardisation.* Per fold we standardise with the fold's training mean and (population) std, as
   the Pipeline's StandardScaler does (``fit_scaler``: same statistics, chunked float64 accumulation), so
   the model sees the same standardised rows Z.
2. *A smaller, isometric problem.* L-BFGS started at w = 0 only ever moves inside the span of Z's rows
   (the gradient is Z^T r + w / C'). Pick any F with F F^T = Z Z^T = K (we use a pivoted Cholesky
   factor of the Gram matrix, r = rank <= n columns): the map gamma -> w = Q gamma with Q = Z^T L^-T is
   an isometry onto that span, so the objective, its gradient norms, all inner products and therefore
   **the L-BFGS iterates themselves are the same** in exact arithmetic. We run the very same scipy
   L-BFGS-B with scikit-learn's options (maxiter, gtol = tol, ftol, maxls=50) on [n, r] instead of
   [n, D]. scipy's stop test max|grad_i| <= tol is not rotation invariant, so in kernel space we switch
   it off and apply scikit-learn's test to the D-space gradient ourselves (the bounds
   ||g||_2/sqrt(D) <= ||g||_inf <= ||g||_2 skip the exact check most of the time). Result: the same
   iterates AND the same stopping iteration -- decision values agree to ~1e-12 on float64 data, so
   unconverged fits (max_iter=100 on this data) are reproduced too. When D <= n the "factor" is Z
   itself (no Gram needed) and only step 3 applies. On float32 inputs scikit-learn evaluates its loss in
   float32 while we solve in float64, so tiny differences remain there.
3. *All candidates at once.* The 7 C x 2 class-weight problems of a fold share F; each runs its own
   L-BFGS in a thread and the threads meet at a barrier so that one GEMM ``F @ [g_1 ... g_k]`` serves
   them all (compute-bound float64 BLAS instead of k memory-bound GEMVs).
4. *float32 BLAS for the big product.* The Gram ``Z Z^T`` (and the test-row cross products) are the only
   O(n^2 D) work: one float32 SYRK/GEMM per fold, the fold's own mean/std applied as the Pipeline would.

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
_ONE_THREAD = 4_000_000  # F entries below which BLAS runs single-threaded during the solves
_FAST_SCORERS = ("accuracy", "balanced_accuracy", "roc_auc", "f1_macro", "neg_log_loss")
_LR_DEFAULTS = {"C": 1.0, "class_weight": None, "dual": False, "fit_intercept": True, "intercept_scaling": 1,
                "l1_ratio": 0.0, "max_iter": 100, "n_jobs": None, "penalty": "deprecated",
                "random_state": None, "solver": "lbfgs", "tol": 1e-4, "verbose": 0, "warm_start": False}


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

class _Batcher:
    """A barrier that lets k concurrent scipy L-BFGS runs share one GEMM per evaluation.

    Each run (a thread) asks for ``F @ G`` or ``F.T @ R``; when every still-active run is waiting, the last
    arrival multiplies all requests stacked side by side and wakes the others.
    """

    def __init__(self, F: np.ndarray, active: int, to_w: Any = None, hot: Any = None):
        self.F = F
        self.to_w = to_w
        self.hot = hot
        self.active = active
        self.cond = threading.Condition()
        self.pending: dict[int, tuple[str, np.ndarray]] = {}
        self.results: dict[int, np.ndarray] = {}

    def _run(self) -> None:
        for op in ("F", "FT", "W"):
            keys = [k for k, v in self.pending.items() if v[0] == op]
            if not keys:
                continue
            mats = [self.pending.pop(k)[1] for k in keys]
            stacked = np.hstack(mats) if len(mats) > 1 else mats[0]
            ops = {"F": lambda m: self.F @ m, "FT": lambda m: self.F.T @ m, "W": self.to_w}
            out = ops[op](stacked)
            cuts = np.cumsum([m.shape[1] for m in mats])[:-1]
            for k, part in zip(keys, np.split(out, cuts, axis=1), strict=True):
                self.results[k] = part
        self.cond.notify_all()

    def apply(self, key: int, op: str, M: np.ndarray) -> np.ndarray:
        with self.cond:
            self.pending[key] = (op, M)
            if len(self.pending) >= self.active:
                self._run()
            while key not in self.results:
                self.cond.wait()
            return self.results.pop(key)

    def leave(self) -> None:
        with self.cond:
            self.active -= 1
            if self.pending and len(self.pending) >= self.active:
                self._run()


def _objective(batcher: _Batcher, key: int, y: np.ndarray, sw: np.ndarray, n_cls: int, r: int,
               C: float, fit_intercept: bool, tol: float, n_features: int, state: dict):
    """scikit-learn's lbfgs objective (HalfBinomial / HalfMultinomial, penalty 1/(C sw_sum)) in F-space."""
    from scipy.special import expit, logsumexp

    sw_sum = float(sw.sum())
    l2 = 1.0 / (C * sw_sum)
    k = 1 if n_cls == 2 else n_cls
    onehot = None if k == 1 else np.eye(k)[y]
    swn = (sw / sw_sum)[:, None]

    def fun(x: np.ndarray) -> tuple[float, np.ndarray]:
        G = x[: r * k].reshape(r, k)
        raw = batcher.apply(key, "F", G)
        if fit_intercept:
            raw = raw + x[r * k:]
        if k == 1:
            z = raw[:, 0]
            loss_i = np.logaddexp(0.0, z) - y * z
            d = (expit(z) - y)[:, None]
        else:
            lse = logsumexp(raw, axis=1)
            loss_i = lse - raw[np.arange(len(y)), y]
            d = np.exp(raw - lse[:, None]) - onehot
        d = d * swn
        loss = float(swn[:, 0] @ loss_i) + 0.5 * l2 * float(np.sum(G * G))
        gG = batcher.apply(key, "FT", d) + l2 * G
        gb = d.sum(axis=0)
        grad = np.concatenate([gG.ravel(), gb]) if fit_intercept else gG.ravel()
        if batcher.to_w is not None:  # scikit-learn's stop test: max|grad| of the D-space gradient
            norm2 = float(np.sqrt(np.sum(gG * gG)))
            gmax = float(np.max(np.abs(gb))) if fit_intercept else 0.0
            # ||g||_inf lies in [||g||_2 / sqrt(D), ||g||_2]: the exact D-space max is needed only in between
            if norm2 <= tol or norm2 / np.sqrt(n_features) > tol:
                gmax = max(gmax, norm2 if norm2 <= tol else np.inf)
            elif gmax <= tol:  # only then does the D-space max decide the stop test
                lower = batcher.hot.bound(gG) if batcher.hot is not None else None
                if lower is not None and lower > tol * (1 + 1e-6):
                    gmax = lower  # provably not converged: max|Q g| >= max over the hot rows > tol
                else:
                    gw = batcher.apply(key, "W", gG)
                    gmax = max(gmax, float(np.max(np.abs(gw))))
                    if batcher.hot is not None and gmax > tol:
                        batcher.hot.learn(gw)  # the bound missed: learn where the gradient is now
            state["x"], state["gmax"] = x, gmax
        return loss, grad

    return fun, k


def _solve_many(F: np.ndarray, y: np.ndarray, n_cls: int, problems: list[dict],
                progress_cb=None, to_w: Any = None, n_features: int = 0, hot: Any = None) -> list[tuple]:
    """Run one scipy L-BFGS-B per problem (identical options to scikit-learn) sharing GEMMs.

    Returns (G [r, k], intercept [k], n_iter) per problem.
    """
    from scipy.optimize import minimize

    r = F.shape[1]
    out: list[Any] = [None] * len(problems)
    errors: list[BaseException] = []

    def work(i: int, p: dict, batcher: _Batcher) -> None:
        try:
            sw = sample_weights(y, p["class_weight"], n_cls)
            sw = np.ones(len(y)) if sw is None else sw
            state: dict = {}
            fun, k = _objective(batcher, i, y, sw, n_cls, r, float(p["C"]), bool(p["fit_intercept"]),
                                float(p["tol"]), n_features, state)
            x0 = np.zeros(r * k + (k if p["fit_intercept"] else 0))

            def stop(intermediate_result: Any) -> None:
                if np.array_equal(state.get("x"), intermediate_result.x) and state["gmax"] <= float(p["tol"]):
                    raise StopIteration

            exact = to_w is not None  # kernel space: apply the tol test in D-space ourselves
            res = minimize(fun, x0, method="L-BFGS-B", jac=True, callback=stop if exact else None,
                           options={"maxiter": int(p["max_iter"]), "maxls": 50,
                                    "gtol": 0.0 if exact else float(p["tol"]),
                                    "ftol": 64 * np.finfo(float).eps})
            G = res.x[: r * k].reshape(r, k)
            b = res.x[r * k:] if p["fit_intercept"] else np.zeros(k)
            out[i] = (G, b, int(res.nit))
        except BaseException as exc:  # surfaced after join; the barrier must not hang
            errors.append(exc)
        finally:
            batcher.leave()
            if progress_cb is not None:
                progress_cb()

    from threadpoolctl import threadpool_limits

    # Small products: one BLAS thread. Multi-threaded OpenBLAS on tiny operands (and inside scipy's
    # L-BFGS-B) spin-waits; on a busy 2-core box that made the solve 25x slower in our measurements.
    # Many problems (one Python thread each): one BLAS thread as well -- measured 24 s against 31 s for a
    # 4,186-row fold of 14 candidates here, the shared GEMMs lose less than the oversubscription costs.
    one = F.size < _ONE_THREAD or len(problems) > 1
    with threadpool_limits(1 if one else None, user_api="blas"):
        _run_all(F, problems, work, to_w, hot)
    if errors:
        raise errors[0]
    return out


def _run_all(F: np.ndarray, problems: list[dict], work: Any, to_w: Any, hot: Any = None) -> None:
    if len(problems) == 1 or F.size < _SMALL:  # thread hand-offs would cost more than the GEMMs save
        for i, p in enumerate(problems):
            work(i, p, _Batcher(F, 1, to_w, hot))
    else:
        shared = _Batcher(F, len(problems), to_w, hot)
        threads = [threading.Thread(target=work, args=(i, p, shared), daemon=True)
                   for i, p in enumerate(problems)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()


# ---------------------------------------------------------------- the isometric space

def _gram_tol(dtype: np.dtype, diag_max: float) -> float:
    """Pivots below this are rounding noise of the float32 Gram (relative error ~ sqrt(D) * eps32)."""
    return diag_max * (1e-5 if dtype == np.float32 else 1e-11)


class _Space:
    """F (training rows) and F_te (other rows) with F F^T = Z Z^T, plus the map back to coefficients."""

    def __init__(self, Z: np.ndarray, others: Sequence[np.ndarray] = ()):
        n, D = Z.shape
        self.primal = n >= D
        self.to_w: Any = None
        if self.primal:  # the rows themselves are the cheapest factor
            self.F = Z.astype(np.float64)
            self.others = [o.astype(np.float64) for o in others]
            return
        from scipy.linalg import solve_triangular
        from scipy.linalg.lapack import dpstrf

        K = _gram(Z)
        c, piv, rank, info = dpstrf(K, lower=1, tol=_gram_tol(Z.dtype, float(np.max(np.diag(K)))),
                                    overwrite_a=1)
        del K
        if info < 0:
            raise RuntimeError(f"pivoted Cholesky failed (info={info})")
        piv = piv - 1
        L = c[:, :rank]
        L[np.triu_indices(rank, 1)] = 0.0  # dpstrf leaves the upper triangle untouched
        F = np.empty((n, rank))
        F[piv] = L
        self.F = F
        self.n = n
        self.piv = piv[:rank]
        self.L11 = np.ascontiguousarray(L[:rank])
        self._solve = solve_triangular
        # cross products with Z itself, then the pivot columns: no [rank, D] copy of Z is made
        self.others = [solve_triangular(self.L11, (o @ Z.T)[:, self.piv].astype(np.float64).T, lower=True).T
                       for o in others]
        self.Z = Z
        self.to_w = lambda G: Z.T @ self._scatter(
            solve_triangular(self.L11.T, G, lower=False)).astype(Z.dtype)

    def hot(self) -> _HotRows | None:
        """A cheap lower bound on the D-space gradient max (None in the primal case: no D-space check)."""
        return None if self.primal else _HotRows(self)

    def _scatter(self, alpha: np.ndarray) -> np.ndarray:
        """[n, k] with ``alpha`` on the pivot rows: Z_p^T alpha == Z^T scatter(alpha)."""
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


def _gram(Z: np.ndarray) -> np.ndarray:
    """Z Z^T (lower triangle filled) in float64, by one SYRK in Z's precision: half the FLOPs of a GEMM."""
    from scipy.linalg import blas

    syrk = blas.ssyrk if Z.dtype == np.float32 else blas.dsyrk
    # Z is C-ordered [n, D]: Z.T is the same memory in Fortran order, and syrk(trans=1) gives (Z.T)^T Z.T
    K = syrk(1.0, Z.T, trans=1, lower=1)
    return np.asarray(K, dtype=np.float64, order="F")


_CHUNK_ROWS = 512


def fit_scaler(X: np.ndarray) -> Any:
    """A fitted ``StandardScaler`` equal to ``StandardScaler().fit(X)`` up to float rounding, made faster.

    Why: scikit-learn's incremental mean/variance makes float64 temporaries of the whole matrix (about 16 s
    for five 4,186 x 25,088 folds here); two chunked passes with float64 accumulators give the same
    statistics (population variance, zero variances scaled by 1) in a fraction of that.
    """
    from sklearn.preprocessing import StandardScaler

    n, d = X.shape
    total = np.zeros(d)
    for s in range(0, n, _CHUNK_ROWS):
        total += X[s:s + _CHUNK_ROWS].sum(axis=0, dtype=np.float64)
    mean = total / n
    sq = np.zeros(d)
    for s in range(0, n, _CHUNK_ROWS):
        dev = X[s:s + _CHUNK_ROWS].astype(np.float64) - mean
        sq += np.einsum("ij,ij->j", dev, dev)
    var = sq / n
    scale = np.sqrt(var)
    scale[scale < 10 * np.finfo(np.float64).eps] = 1.0
    sc = StandardScaler()
    sc.mean_, sc.var_, sc.scale_ = mean, var, scale
    sc.n_samples_seen_ = np.int64(n)
    sc.n_features_in_ = d
    return sc


def standardize(scaler: Any, X: np.ndarray) -> np.ndarray:
    """``scaler.transform(X)`` in X's dtype, chunked (no float64 copy of the whole matrix)."""
    out = np.empty(X.shape, dtype=X.dtype if X.dtype in (np.float32, np.float64) else np.float64)
    mean, scale = scaler.mean_.astype(out.dtype), scaler.scale_.astype(out.dtype)
    for s in range(0, X.shape[0], _CHUNK_ROWS):
        np.subtract(X[s:s + _CHUNK_ROWS], mean, out=out[s:s + _CHUNK_ROWS], casting="unsafe")
        out[s:s + _CHUNK_ROWS] /= scale
    return out


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
        self.lock = threading.Lock()
        self.learnt = 0

    def bound(self, gG: np.ndarray) -> float | None:
        Q = self.Q
        return None if Q is None else float(np.max(np.abs(Q @ gG)))

    def learn(self, gw: np.ndarray) -> None:
        from scipy.linalg import solve_triangular

        with self.lock:
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
        for j, (tr, te) in enumerate(folds):
            t0 = time.perf_counter()
            space, Fte = _fold_space(X[tr], X[te])
            classes, yi = np.unique(y[tr], return_inverse=True)

            def tick(j=j) -> None:
                done[0] += 1
                emit(self.progress, "fit", done[0], total, f"fold {j + 1}/{len(folds)}")

            sols = _solve_many(space.F, yi, len(classes), full, tick, space.to_w, X.shape[1], space.hot())
            t1 = time.perf_counter()
            for i, (G, b, _nit) in enumerate(sols):
                scores[i, j] = _score(self.scoring, y[te], _decision(Fte, G, b), classes)
            # fold-level cost shared equally by its candidates (they were solved together)
            fit_t[:, j] = (t1 - t0) / len(full)
            score_t[:, j] = (time.perf_counter() - t1) / len(full)
        self.cv_results_ = build_cv_results(candidates, scores, fit_t, score_t)
        res = result_from_cv(candidates, self.cv_results_)
        self.best_index_, self.best_params_ = res.best_index, res.best_params
        self.best_score_ = res.best_score
        if self.refit:
            self.best_estimator_ = fit_pipeline(X, y, self.best_params_)
        return self

    def search_result(self) -> SearchResult:
        from featcache.heads.base import jsonable

        cvr = {k: jsonable(v) for k, v in self.cv_results_.items()}
        return SearchResult(best_params=dict(self.best_params_), best_index=int(self.best_index_),
                            best_score=float(self.best_score_), cv_results=cvr)


def _fold_space(Xtr: np.ndarray, Xte: np.ndarray) -> tuple[_Space, np.ndarray]:
    scaler = fit_scaler(Xtr)
    Z = standardize(scaler, Xtr)
    space = _Space(Z, [standardize(scaler, Xte)])
    return space, space.others[0]


def fit_pipeline(X: np.ndarray, y: np.ndarray, params: dict) -> Any:
    """A fitted Pipeline(StandardScaler, LogisticRegression) for ``params``.

    Plain lbfgs/L2 candidates are solved in the isometric space (same iterates as scikit-learn's own fit)
    and the coefficients mapped back; anything else is fitted by scikit-learn itself.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline, make_pipeline
    from sklearn.preprocessing import StandardScaler

    p = _lr_params(params)
    X, y = np.asarray(X), np.asarray(y)
    if not _fast_supported(p) or len(np.unique(y)) < 2:
        return make_pipeline(StandardScaler(), LogisticRegression(**p)).fit(X, y)
    scaler = fit_scaler(X)
    Z = standardize(scaler, X)
    space = _Space(Z)
    classes, yi = np.unique(y, return_inverse=True)
    (G, b, nit), = _solve_many(space.F, yi, len(classes), [p], None, space.to_w, X.shape[1], space.hot())
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
