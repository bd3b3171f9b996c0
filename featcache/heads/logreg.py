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
   fold with Chan's pairwise update (``FoldScalers``): one pass over X instead of one per fold.
2. *A smaller, isometric problem.* L-BFGS started at w = 0 only ever moves inside the span of Z's rows (the
   gradient is Z^T r + w / C'). Pick any F with F F^T = Z Z^T = K (we use the Cholesky factor of the Gram
   matrix, pivoted and cut at rank r <= n when K is singular): the map gamma -> w = Q gamma with Q = Z^T
   L^-T is an isometry onto that span, so the objective, its gradient norms, all inner products and
   therefore **the L-BFGS iterates themselves are the same** in exact arithmetic. We run the very same scipy
   L-BFGS-B with scikit-learn's options (maxiter, gtol = tol, ftol, maxls=50) on [n, r] instead of [n, D].
   scipy's stop test max|grad_i| <= tol is not rotation invariant, so in kernel space we switch it off and
   apply scikit-learn's test to the D-space gradient ourselves (at the start point w = 0 too, which scipy
   tests before any step): the bounds ||g||_2/sqrt(D) <= ||g||_inf <=
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
   (``Prefetcher``), in pieces that the solving thread takes too when it would wait (``Tasks``); the
   BLAS calls that run beside Python code release the GIL (numpy's matmul; ``_blas`` for the
   triangular routines).
   Two sets of buffers alternate (``Workspace``); the refit's statistics come from the same moments.

Where each part lives: this module holds the search (``FastLogisticGridSearchCV``), the refit and the head;
``logreg_stats`` the standardisation statistics (1); ``logreg_space`` the Gram, its factor and the fold
preparation (2, 4); ``logreg_lbfgs`` the batched L-BFGS-B runs and the stop test (2, 3).

Measured on the 2-core dev box: see benchmarks/bench_logreg.py. Unsupported settings (a non-lbfgs solver,
l1/elastic-net, a scorer we do not compute, a dict class_weight that scikit-learn refuses for a training
set) fall back to real ``GridSearchCV`` -- the same numbers, slower, except that its ``error_score``
defaults to ``"raise"``: a fit scikit-learn would score NaN (a one-class training fold, an invalid
solver/penalty pair) stops the search with scikit-learn's own message (``error_score=np.nan`` gives
GridSearchCV's default). On float32 input the search matches float64 scikit-learn; float32 scikit-learn
evaluates decision values near 0 in float32 (tiny C), where its predictions can flip and its scores differ
from ours by more than 0.005.
"""
from __future__ import annotations

import time
import warnings
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
    plain_value,
    result_from_cv,
)
from featcache.heads.logreg_lbfgs import Solution, solve_many
from featcache.heads.logreg_space import GramJob, Prefetcher, Space, Tasks, Workspace
from featcache.heads.logreg_stats import FoldScalers, fit_scaler, standardize, standardize_tasks
from featcache.progress import ProgressFn, emit
from featcache.resources import available_memory as _available_memory  # tests patch it here
from featcache.resources import cpus

DEFAULT_CS = [1e-4, 1e-3, 1e-2, 1e-1, 1.0, 1e1, 1e2]
_FAST_SCORERS = ("accuracy", "balanced_accuracy", "roc_auc", "f1_macro", "neg_log_loss")


def _lr_params(params: dict, classes: np.ndarray | None = None) -> dict:
    """Complete LogisticRegression parameters (library defaults + the candidate's own).

    ``classes``: the labels of the data being fitted (sorted, as ``np.unique`` gives them). With them, a
    dict class_weight is keyed by those labels (``_label_weights``) instead of being read as featcache's
    0-based class codes, so string labels work as in scikit-learn.
    """
    from sklearn.linear_model import LogisticRegression

    defaults = LogisticRegression().get_params()
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise ConfigError(f"unknown parameter '{unknown[0]}' for head 'logreg'; valid ones are: "
                          f"{', '.join(sorted(defaults))}.")
    out = {**defaults, **params}
    if "class_weight" in params:
        cw = params["class_weight"]
        if classes is not None and isinstance(cw, dict):
            out["class_weight"] = _label_weights(cw, classes)
        else:
            out["class_weight"] = normalize_class_weight(cw)
            if classes is not None and isinstance(cw, str) and isinstance(out["class_weight"], dict) \
                    and len(out["class_weight"]) == len(classes):  # "3:1": one weight per class, in order
                out["class_weight"] = {c: w for c, w in zip(classes.tolist(), out["class_weight"].values(),
                                                            strict=True)}
    return out


def _label_weights(cw: dict, classes: np.ndarray) -> dict:
    """A dict class_weight keyed by the labels in ``classes``, as LogisticRegression reads it.

    Why: featcache's own dicts come from JSON with string keys ("0": 3.0) for integer labels, so a key is
    matched to a label by its text when it is not a label itself; string labels ({"NORMAL": 2.0}) are
    kept as they are (they were refused: the keys were forced to int). A key naming no label is kept
    too: scikit-learn decides what it means (``_weights_as_sklearn`` sends such a search to GridSearchCV).
    """
    labels = set(classes.tolist())
    by_text = {str(c): c for c in classes.tolist()}
    try:
        return {(k if k in labels else by_text.get(str(k), k)): float(v) for k, v in cw.items()}
    except (TypeError, ValueError):
        raise ConfigError(f"class_weight '{cw}' is not valid: its weights must be numbers.") from None


def _weight_key(label: Any) -> Any:
    """The key scikit-learn 1.9's ``compute_class_weight`` looks a label up by: int(label), else str(label)
    (older versions look the label itself up)."""
    try:
        return int(label)
    except (TypeError, ValueError):
        return str(label)


def _weights_as_sklearn(p: dict, label_sets: list[np.ndarray]) -> bool:
    """True unless ``p``'s dict class_weight makes scikit-learn differ from ``_by_label``'s reading for one
    of ``label_sets`` (the labels of each training set): a fit that raises "The classes ... are not in
    class_weight" (some labels weighted, and not every key a label: a key naming no label, or a training
    fold that lacks a weighted class), or a label that the int/str lookup and the plain one read
    differently (numeric string labels). Those searches go to GridSearchCV, which does what it does;
    the fast solver weighed such classes 1 and scored them.
    """
    cw = p["class_weight"]
    if not isinstance(cw, dict):
        return True
    for classes in label_sets:
        found = []
        for c in classes.tolist():
            plain, key = c in cw, _weight_key(c) in cw
            if plain != key or (plain and cw[c] != cw[_weight_key(c)]):
                return False
            found.append(plain)
        if not all(found) and sum(found) != len(cw):
            return False
    return True


def _fast_supported(p: dict) -> bool:
    """True when the candidate is plain L2 lbfgs, which the kernel-space solver reproduces."""
    return (p["solver"] == "lbfgs" and p["penalty"] in ("l2", "deprecated")
            and p["l1_ratio"] in (None, 0, 0.0) and not p["dual"] and np.isfinite(p["C"]) and p["C"] > 0)


def _by_label(p: dict, classes: np.ndarray) -> dict:
    """``p`` with a dict class_weight keyed by the positions of ``classes`` (a fold's labels, in the order
    its 0-based codes follow), as LogisticRegression reads such a dict: by class label.

    Why: the solver weighs rows by their fold-local code, and a dict {label: weight} used as codes put the
    weights on other classes when the labels are not 0..K-1 or a training fold lacks a class.
    """
    cw = p["class_weight"]
    if not isinstance(cw, dict):
        return p
    return {**p, "class_weight": {i: float(cw.get(c, 1.0)) for i, c in enumerate(classes)}}


def _checked_xy(X: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
    """X as a finite float array and y as 1-d, with scikit-learn's own messages (NaN/inf in X was taken
    silently: every decision value NaN, chance-level scores, a refit scaler with a NaN mean)."""
    from sklearn.utils import check_X_y

    return check_X_y(X, y, dtype=[np.float64, np.float32])  # finite by default in every supported version


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
    if scoring == "neg_log_loss":  # as scikit-learn's scorer calls it: NaN where it cannot score a fold
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return float(-metrics.log_loss(y, proba[:, 1] if proba.shape[1] == 2 else proba))
        except ValueError:
            return float("nan")
    raise ValueError(scoring)


def _as_arrays(cv_results: dict, candidates: list[dict]) -> dict:
    """``cv_results_`` as GridSearchCV gives it: numpy arrays for scores, times and ranks
    (``cv_results_["mean_test_score"].argmax()`` failed on lists), masked object arrays of the candidates'
    own values for ``param_<name>`` and the candidates themselves for ``params`` (a dict class_weight
    came back with string keys, unlike ``best_params_``)."""
    out: dict = {}
    for k, v in cv_results.items():
        if k == "params":
            out[k] = [dict(c) for c in candidates]
        elif k.startswith("param_"):
            name = k[len("param_"):]
            column = np.empty(len(candidates), dtype=object)
            column[:] = [c.get(name) for c in candidates]
            out[k] = np.ma.MaskedArray(column, mask=[name not in c for c in candidates])
        else:
            out[k] = np.asarray(v)
    return out


def _unweighted_scorer(scoring: Any) -> Any:
    """``scoring`` as a scorer that asks for no sample weights under metadata routing (GridSearchCV's
    unweighted scores). None is the Pipeline's own score, accuracy; a scorer object is copied first (the
    request would change the caller's own object); a plain function asks for nothing already."""
    import copy

    from sklearn.metrics import get_scorer

    if scoring is None or isinstance(scoring, str):
        return get_scorer(scoring or "accuracy").set_score_request(sample_weight=False)
    if hasattr(scoring, "set_score_request"):
        return copy.deepcopy(scoring).set_score_request(sample_weight=False)
    return scoring


def _checked_weights(sample_weight: Any, n: int) -> np.ndarray:
    """``sample_weight`` as n float64 weights (a scalar is every row's), or scikit-learn's kind of error."""
    sw = np.asarray(sample_weight, dtype=np.float64)
    if sw.ndim == 0:
        return np.full(n, float(sw))
    if sw.shape != (n,):
        raise ValueError(f"sample_weight.shape == {sw.shape}, expected ({n},)!")
    return sw


def _indices(a: Any) -> np.ndarray:
    """A fold side as row indices: boolean masks (which scikit-learn accepts) become their positions."""
    a = np.asarray(a)
    return np.flatnonzero(a) if a.dtype == bool else a.astype(np.intp, copy=False)


# ---------------------------------------------------------------- public search class

class FastLogisticGridSearchCV:
    """GridSearchCV over StandardScaler + LogisticRegression, with the interface users know.

    ``param_grid`` holds LogisticRegression parameter names (``C``, ``class_weight``, ``max_iter``...) as
    a dict of lists or a list of such dicts; candidates come in ``ParameterGrid`` order, so
    ``cv_results_`` lines up with GridSearchCV's, keyed ``param_<name>`` on both paths.
    ``best_estimator_`` is a real fitted ``Pipeline(StandardScaler, LogisticRegression)``.

    ``error_score`` is GridSearchCV's, used by the fallback (the fast path's fits do not fail: what could
    fail is sent to the fallback). Its default is ``"raise"``, not GridSearchCV's ``np.nan``: featcache
    turns the first failing fit (an invalid solver/penalty pair, a one-class training fold) into one
    sentence (``LogRegHead.search``), where NaN would give a search whose scores are partly NaN and
    scikit-learn's report of every failed fit. Pass ``np.nan`` (or a number) for GridSearchCV's behaviour.

    A fit that stops at ``max_iter`` (or abnormally) raises scikit-learn's ConvergenceWarning, once per
    fit as in GridSearchCV; ``n_unconverged_`` counts those fits of the search (the fallback's too).
    """

    def __init__(self, param_grid: dict | list[dict], *, cv: Any = 5, scoring: str = "accuracy",
                 refit: bool = True, error_score: Any = "raise", progress: ProgressFn | None = None):
        self.param_grid = param_grid
        self.cv = cv
        self.scoring = scoring
        self.refit = refit
        self.error_score = error_score
        self.progress = progress

    # --- helpers
    def _folds(self, X: np.ndarray, y: np.ndarray, groups: np.ndarray | None) -> list:
        from sklearn.model_selection import check_cv

        if isinstance(self.cv, (list, tuple)):
            pairs = list(self.cv)
        else:
            pairs = list(check_cv(self.cv, y, classifier=True).split(X, y, groups))
        folds = [(_indices(a), _indices(b)) for a, b in pairs]
        if not folds:
            raise ValueError("No fits were performed: the cv iterator is empty.")
        return folds

    def _fallback(self, X, y, groups, folds, candidates: list[dict], full: list[dict],
                  sample_weight: np.ndarray | None = None) -> None:
        """Plain GridSearchCV over the Pipeline, its results shaped as the fast path's.

        ``sample_weight`` goes to both steps of every fit (the scaler's weighted mean and variance, the
        classifier's weighted loss) and of the refit, through scikit-learn's metadata routing, enabled for
        this search only: without it GridSearchCV hands fit parameters to ``Pipeline.fit``, which refuses
        a bare ``sample_weight``, and ``logisticregression__sample_weight`` would leave the scaler
        unweighted. Scoring stays unweighted, as GridSearchCV's without routing.

        The candidates' class weights go in as resolved (``_lr_params``: "3:1" and JSON-keyed dicts mean
        what they mean on the fast path); ``cv_results_`` is keyed ``param_<name>`` with the candidates' own
        values, as on the fast path (GridSearchCV's ``param_logisticregression__<name>`` keys changed
        with the settings that chose the path).
        """
        from contextlib import nullcontext

        from sklearn import config_context
        from sklearn.linear_model import LogisticRegression
        from sklearn.model_selection import GridSearchCV
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        grid = [{f"logisticregression__{k}": [p[k] if k == "class_weight" else v] for k, v in c.items()}
                for c, p in zip(candidates, full, strict=True)]
        weighted = sample_weight is not None
        with config_context(enable_metadata_routing=True) if weighted else nullcontext():
            pipe = make_pipeline(StandardScaler(), LogisticRegression())
            scoring: Any = self.scoring
            params: dict = {"groups": groups}
            if weighted:  # the folds are fixed: no groups to route
                for _name, step in pipe.steps:
                    step.set_fit_request(sample_weight=True)
                scoring = _unweighted_scorer(self.scoring)
                params = {"sample_weight": sample_weight}
            # the refit is done below, not by GridSearchCV: its warning must not count as the search's
            gs = GridSearchCV(pipe, grid, cv=folds, scoring=scoring, refit=False,
                              error_score=self.error_score)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")  # every fit's warning, to count them; shown again below
                warnings.simplefilter("ignore", FutureWarning)  # deprecation notices about 'penalty', per fit
                gs.fit(X, y, **params)
            if self.refit:  # what GridSearchCV's refit does: the base pipeline, best parameters, all rows
                pipe.set_params(**gs.best_params_)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", FutureWarning)
                    pipe.fit(X, y, **({"sample_weight": sample_weight} if weighted else {}))
        self.used_fallback_ = True
        self.n_unconverged_ = _reissued(caught)
        prefix = "param_logisticregression__"
        cvr = {("param_" + k[len(prefix):] if k.startswith(prefix) else k): v
               for k, v in gs.cv_results_.items()}
        self.cv_results_ = _as_arrays(cvr, candidates)
        self.best_index_ = int(gs.best_index_)
        self.best_params_ = dict(candidates[self.best_index_])
        self.best_score_ = float(gs.best_score_)
        if self.refit:
            self.best_estimator_ = pipe

    def fit(self, X: np.ndarray, y: np.ndarray, groups: np.ndarray | None = None,
            sample_weight: Any = None) -> FastLogisticGridSearchCV:
        """Search the grid. ``sample_weight`` (one weight per row) sends the search to GridSearchCV with the
        weights given to the scaler and the classifier of every fit (``_fallback``); the fast path solves
        unweighted problems only."""
        from sklearn.model_selection import ParameterGrid
        from threadpoolctl import threadpool_limits

        X, y = _checked_xy(X, y)
        sw = None if sample_weight is None else _checked_weights(sample_weight, len(y))
        candidates = [dict(c) for c in ParameterGrid(self.param_grid)]
        labels = np.unique(y)
        full = [_lr_params(c, labels) for c in candidates]
        folds = self._folds(X, y, groups)
        self.n_splits_ = len(folds)
        label_sets = [labels] + [np.unique(y[tr]) for tr, _ in folds]
        fast = sw is None and self.scoring in _FAST_SCORERS and all(len(c) >= 2 for c in label_sets)
        fast = fast and all(_fast_supported(p) and _weights_as_sklearn(p, label_sets) for p in full)
        if fast and self.scoring == "roc_auc" and len(np.unique(y)) != 2:
            fast = False
        if not fast:
            self._fallback(X, y, groups, folds, candidates, full, sw)
            return self
        self.used_fallback_ = False
        unconverged = 0
        scores = np.zeros((len(full), len(folds)))
        fit_t = np.zeros_like(scores)
        score_t = np.zeros_like(scores)
        total, done = len(full) * len(folds), [0]
        scalers = FoldScalers(X, folds)
        n, d = X.shape
        jobs: list[tuple] = [(j, tr, te) for j, (tr, te) in enumerate(folds)]
        if self.refit:  # the refit's rows and Gram do not depend on the winner: prepare them in turn
            jobs.append((None, None, np.empty(0, dtype=np.intp)))
        need = max([len(tr) + len(te) for tr, te in folds] + [n if self.refit else 0])
        train = max([len(tr) for tr, _ in folds] + [n if self.refit else 0])
        chol = np.empty(train * train) if train < d else None  # one factor is in use at a time
        # two workspaces let the next fold be prepared during this one's solve; one when memory is tight
        sets = 2 if len(jobs) > 1 and 2 * need * d * X.dtype.itemsize < 0.5 * _available_memory() else 1
        works = [Workspace(need, d, X.dtype, train, chol) for _ in range(sets)]

        def prepare(job: tuple, work: Workspace) -> tuple:
            j, tr, te = job
            scaler = scalers.all_rows() if j is None else scalers.fold(j)
            Z, std_tr = standardize_tasks(scaler, X, tr, work.rows)
            Zte, std_te = standardize_tasks(scaler, X, te, work.rows[len(Z):])
            gram = GramJob(Z, work.gram_in) if len(Z) < d else None
            phases = [Tasks(std_tr + std_te)] + ([gram] if gram is not None else [])
            return (scaler, Z, Zte, gram, work), phases

        # One BLAS thread throughout: this thread and the prefetcher's each keep a core busy.
        with threadpool_limits(1, user_api="blas"), Prefetcher(prepare, jobs, works) as ready:
            for j, (tr, te) in enumerate(folds):
                t0 = time.perf_counter()
                _scaler, Z, Zte, gram, work = ready.get()
                space = Space(Z, work, None if gram is None else gram.K(), centered=True)
                classes, yi = np.unique(y[tr], return_inverse=True)

                def tick(j=j) -> None:
                    done[0] += 1
                    emit(self.progress, "fit", done[0], total, f"fold {j + 1}/{len(folds)}")

                sols = solve_many(space, yi, len(classes), [_by_label(p, classes) for p in full], tick, d)
                t1 = time.perf_counter()
                k = sols[0].G.shape[1]
                raw = space.decisions(Zte, np.hstack([s.G for s in sols]))
                for i, (s, p) in enumerate(zip(sols, full, strict=True)):
                    scores[i, j] = _score(self.scoring, y[te], raw[:, i * k:(i + 1) * k] + s.b, classes)
                    unconverged += _warn_if_unconverged(s, p)
                # fold-level cost shared equally by its candidates (they were solved together)
                fit_t[:, j] = (t1 - t0) / len(full)
                score_t[:, j] = (time.perf_counter() - t1) / len(full)
                del space, Z, Zte, gram, work
                ready.release()
            self.cv_results_ = _as_arrays(build_cv_results(candidates, scores, fit_t, score_t), candidates)
            self.n_unconverged_ = unconverged
            res = result_from_cv(candidates, self.cv_results_)
            self.best_index_, self.best_params_ = res.best_index, res.best_params
            self.best_score_ = res.best_score
            if self.refit:
                scaler, Z, _Zte, gram, work = ready.get()
        if self.refit:  # outside the one-thread limit: nothing runs beside the refit
            space = Space(Z, work, None if gram is None else gram.K(), centered=True)
            self.best_estimator_ = _fit_in_space(space, Z, y, full[self.best_index_], scaler)
        return self

    # GridSearchCV's shortcuts to the refit model (``refit=True``)
    @property
    def classes_(self) -> np.ndarray:
        return self.best_estimator_.classes_

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.best_estimator_.predict(X)

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        return self.best_estimator_.predict_proba(X)

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        return self.best_estimator_.decision_function(X)

    def score(self, X: np.ndarray, y: np.ndarray) -> float:
        """The refit model's score with the search's scorer, as GridSearchCV's ``score``."""
        from sklearn.metrics import get_scorer

        return float(get_scorer(self.scoring)(self.best_estimator_, X, y))

    def search_result(self) -> SearchResult:
        from featcache.heads.base import jsonable

        cvr = {k: jsonable(v) for k, v in self.cv_results_.items()}
        return SearchResult(best_params=dict(self.best_params_), best_index=int(self.best_index_),
                            best_score=float(self.best_score_), cv_results=cvr,
                            n_unconverged=getattr(self, "n_unconverged_", None))


def fit_pipeline(X: np.ndarray, y: np.ndarray, params: dict) -> Any:
    """A fitted Pipeline(StandardScaler, LogisticRegression) for ``params``.

    Plain lbfgs/L2 candidates are solved in the isometric space (same iterates as scikit-learn's own fit)
    and the coefficients mapped back; anything else is fitted by scikit-learn itself.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    X, y = _checked_xy(X, y)
    p = _lr_params(params, np.unique(y))
    if not _fast_supported(p) or len(np.unique(y)) < 2:
        return make_pipeline(StandardScaler(), LogisticRegression(**p)).fit(X, y)
    scaler = fit_scaler(X)
    Z = standardize(scaler, X)
    return _fit_in_space(Space(Z, centered=True), Z, y, p, scaler)


def _fit_in_space(space: Space, Z: np.ndarray, y: np.ndarray, p: dict, scaler: Any) -> Any:
    """The Pipeline for complete LogisticRegression parameters ``p``, solved in ``space`` (built on Z)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline

    classes, yi = np.unique(y, return_inverse=True)
    # All cores but at most 4: a lone fit's products are memory-bound ?trmv (two threads: 2x here), and
    # idle OpenBLAS threads spin between L-BFGS-B's small calls.
    sol, = solve_many(space, yi, len(classes), [_by_label(p, classes)], None, Z.shape[1],
                      threads=min(cpus(), 4))
    _warn_if_unconverged(sol, p)
    G, b, nit = sol.G, sol.b, sol.n_iter
    W = space.coefficients(Z, G)
    lr = LogisticRegression(**p)
    lr.classes_ = classes
    lr.coef_ = np.ascontiguousarray(W.T)
    lr.intercept_ = np.asarray(b, dtype=np.float64)
    lr.n_features_in_ = Z.shape[1]
    lr.n_iter_ = np.array([nit], dtype=np.int32)
    return Pipeline([("standardscaler", scaler), ("logisticregression", lr)])


def _reissued(caught: list[warnings.WarningMessage]) -> int:
    """Show the warnings recorded during a GridSearchCV search again under the caller's filters (each
    distinct one once, as Python shows a repeated warning), and return how many were ConvergenceWarnings:
    the search's unconverged fits, counted as the fast path counts them."""
    from sklearn.exceptions import ConvergenceWarning

    registry: dict = {}
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, registry=registry)
    return sum(issubclass(w.category, ConvergenceWarning) for w in caught)


def _warn_if_unconverged(sol: Solution, p: dict) -> int:
    """scikit-learn's ConvergenceWarning, in its words, for a fit it would warn about (scipy's status != 0:
    max_iter reached, or an abnormal stop); 1 if it warned, else 0. Called once per fit, as each of
    GridSearchCV's fits warns once."""
    if sol.status == 0:
        return 0
    from scipy.optimize import OptimizeResult
    from sklearn.linear_model._logistic import _LOGISTIC_SOLVER_CONVERGENCE_MSG
    from sklearn.utils.optimize import _check_optimize_result

    _check_optimize_result("lbfgs", OptimizeResult(nit=sol.n_iter, status=sol.status, message=sol.message),
                           int(p["max_iter"]), extra_warning_msg=_LOGISTIC_SOLVER_CONVERGENCE_MSG)
    return 1


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
    #: added to the default grid for a task of more than two classes (--task 3class, or --task folders with
    #: 3+ class folders). Why: at scikit-learn's max_iter=100, 40 of the default grid's 70 3-class CV fits on
    #: Kermany mobilenet-0.75 features (4,186 training images) stopped unconverged; at 1,000 none did, with
    #: the same chosen C and the same validation and test accuracy (binary fits converge well before 100
    #: there, and their config ids stay as they were). Keyed by class count, not task name: the same
    #: classes as class folders (--task folders) kept max_iter 100 and stopped unconverged
    multiclass_defaults: ClassVar[dict[str, list]] = {"max_iter": [1000]}

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

    def resolved(self, params: dict, *, seed: int = 0) -> dict:
        """Every LogisticRegression parameter of this config, library defaults included, with the
        ``random_state`` the trained model gets (``fit`` fills in the seed)."""
        params = self.check(params)
        params = {**params, "random_state": params.get("random_state", seed)}
        return {k: v for k, v in _lr_params(params).items() if plain_value(v)}

    def fit(self, X: np.ndarray, y: np.ndarray, params: dict, *, seed: int = 0,
            groups: np.ndarray | None = None) -> SklearnHead:
        params = self.check(params)
        if "random_state" not in params:
            params = {**params, "random_state": seed}
        return SklearnHead(fit_pipeline(X, y, params), int(np.max(y)) + 1)
