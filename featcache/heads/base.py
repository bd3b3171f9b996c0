"""The head interface shared by every classifier family, plus the scikit-learn plumbing they reuse.

Why one small interface: fit.py (model selection, runs, metrics) must not know which family it drives,
so adding a head is one module. Two selection styles exist: ``CVHead`` (grouped K-fold CV over a grid,
cheap models) and ``MLPHead`` (grouped hold-out, Keras) -- see docs/ARCHITECTURE.md.
"""
from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np

from featcache.errors import ConfigError
from featcache.progress import ProgressFn, emit

Folds = Sequence[tuple[np.ndarray, np.ndarray]]
SKLEARN_FILE = "sklearn.joblib"
_CW_MSG = "class_weight '{}' is not valid; use none, balanced or per-class weights like 1:3."


@dataclass
class SearchResult:
    """Outcome of a CV grid search; ``cv_results`` is JSON-serialisable and keyed like scikit-learn's."""

    best_params: dict
    best_index: int
    best_score: float
    cv_results: dict = field(default_factory=dict)
    #: fits of the search that stopped unconverged (scikit-learn warned for each); None: not counted
    n_unconverged: int | None = None


class FittedHead(Protocol):
    """A trained head: probabilities for classes 0..K-1, and safe persistence."""

    classes_: np.ndarray

    def predict_proba(self, X: np.ndarray) -> np.ndarray: ...

    def save(self, directory: Path) -> list[Path]: ...

    @classmethod
    def load(cls, directory: Path) -> FittedHead: ...


# ---------------------------------------------------------------- parameters

def jsonable(value: Any) -> Any:
    """Make numpy scalars, tuples and int-keyed dicts JSON friendly (cv_results go into metrics.json)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def normalize_class_weight(value: Any) -> None | str | dict[int, float]:
    """Accept None, "balanced", "1:3" or {class: weight} (keys may be strings after JSON round trips)."""
    if value is None or isinstance(value, str) and value.strip().lower() in ("", "none"):
        return None
    if isinstance(value, str):
        s = value.strip().lower()
        if s == "balanced":
            return "balanced"
        try:
            return {i: float(v) for i, v in enumerate(s.split(":"))}
        except ValueError:
            raise ConfigError(_CW_MSG.format(value)) from None
    if isinstance(value, dict):
        try:
            return {int(k): float(v) for k, v in value.items()}
        except (TypeError, ValueError):
            raise ConfigError(_CW_MSG.format(value)) from None
    raise ConfigError(_CW_MSG.format(value))


def check_params(head: str, params: dict, schema: dict[str, str]) -> dict:
    """Reject parameters the head does not know (one sentence listing the valid ones); normalise weights."""
    unknown = sorted(set(params) - set(schema))
    if unknown:
        raise ConfigError(f"unknown parameter '{unknown[0]}' for head '{head}'; valid ones are: "
                          f"{', '.join(sorted(schema))}.")
    out = dict(params)
    if "class_weight" in out:
        out["class_weight"] = normalize_class_weight(out["class_weight"])
    return out


def sample_weights(y: np.ndarray, class_weight: Any, n_classes: int) -> np.ndarray | None:
    """Per-sample weights from a class_weight value, using scikit-learn's "balanced" formula."""
    cw = normalize_class_weight(class_weight)
    if cw is None:
        return None
    if cw == "balanced":
        counts = np.bincount(y, minlength=n_classes).astype(np.float64)
        present = counts > 0
        w = np.ones(n_classes)
        w[present] = len(y) / (present.sum() * counts[present])
    else:
        w = np.array([cw.get(k, 1.0) for k in range(n_classes)], dtype=np.float64)
    return w[y]


# ---------------------------------------------------------------- cv_results

def build_cv_results(grid: list[dict], split_scores: np.ndarray, fit_times: np.ndarray,
                     score_times: np.ndarray) -> dict:
    """scikit-learn-shaped cv_results (params, param_<k>, split<i>_test_score, mean/std/rank...).

    Ranking uses ``rankdata(-mean, "min")`` and the best index is the first of the top rank, exactly like
    GridSearchCV, so both pick the same candidate on ties.
    """
    from scipy.stats import rankdata

    scores = np.asarray(split_scores, dtype=np.float64)
    mean = scores.mean(axis=1)
    ranks = rankdata(-np.where(np.isnan(mean), -np.inf, mean), method="min").astype(int)
    res: dict[str, Any] = {"params": [jsonable(p) for p in grid]}
    for key in sorted({k for p in grid for k in p}):
        res[f"param_{key}"] = [jsonable(p.get(key)) for p in grid]
    for i in range(scores.shape[1]):
        res[f"split{i}_test_score"] = scores[:, i].tolist()
    res["mean_test_score"] = mean.tolist()
    res["std_test_score"] = scores.std(axis=1).tolist()
    res["rank_test_score"] = ranks.tolist()
    res["mean_fit_time"] = np.mean(fit_times, axis=1).tolist()
    res["std_fit_time"] = np.std(fit_times, axis=1).tolist()
    res["mean_score_time"] = np.mean(score_times, axis=1).tolist()
    res["std_score_time"] = np.std(score_times, axis=1).tolist()
    return res


def result_from_cv(grid: list[dict], cv_results: dict) -> SearchResult:
    """Pick the best candidate like GridSearchCV (first of rank 1)."""
    best = int(np.argmin(cv_results["rank_test_score"]))
    return SearchResult(best_params=dict(grid[best]), best_index=best,
                        best_score=float(cv_results["mean_test_score"][best]), cv_results=cv_results)


# ---------------------------------------------------------------- fitted sklearn heads

class SklearnHead:
    """A fitted scikit-learn estimator (a Pipeline with standardisation) as a FittedHead.

    Saved with joblib: that is a pickle, so runs.py records the file's sha256 when featcache writes it and
    checks it before loading -- a model file is only ever loaded when featcache itself wrote it.
    """

    def __init__(self, estimator: Any, n_classes: int):
        self.estimator = estimator
        self.n_classes = int(n_classes)
        self.classes_ = np.arange(self.n_classes)

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """[n, K] probabilities; columns of classes absent at training time are zero."""
        proba = self.estimator.predict_proba(np.asarray(X))
        out = np.zeros((proba.shape[0], self.n_classes), dtype=np.float64)
        out[:, np.asarray(self.estimator.classes_, dtype=int)] = proba
        return out

    def save(self, directory: Path) -> list[Path]:
        import joblib

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / SKLEARN_FILE
        tmp = path.with_suffix(".joblib.tmp")
        joblib.dump({"format": 1, "estimator": self.estimator, "n_classes": self.n_classes}, tmp)
        tmp.replace(path)
        return [path]

    @classmethod
    def load(cls, directory: Path) -> SklearnHead:
        """Load a model featcache wrote (the caller has verified its sha256 first)."""
        import joblib

        data = joblib.load(Path(directory) / SKLEARN_FILE)
        return cls(data["estimator"], data["n_classes"])


# ---------------------------------------------------------------- CV heads

def plain_value(value: Any) -> bool:
    """JSON-ready scalars, and lists/dicts of them (estimator objects and callables are left out)."""
    if value is None or isinstance(value, bool | int | float | str):
        return True
    if isinstance(value, list | tuple):
        return all(plain_value(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str | int) and plain_value(v) for k, v in value.items())
    return False


class CVHead:
    """Base for heads selected by grouped K-fold CV; subclasses say how to build the estimator."""

    name: ClassVar[str] = ""
    selection: ClassVar[str] = "cv"
    # patients of every class each fit needs in its training rows (svm: 2, for its grouped calibration)
    min_training_patients: ClassVar[int] = 1
    schema: ClassVar[dict[str, str]] = {}
    default_grid: ClassVar[dict[str, list]] = {}

    def make_estimator(self, params: dict, *, seed: int = 0, for_search: bool = False) -> Any:
        """A fresh unfitted scikit-learn estimator for ``params`` (validated)."""
        raise NotImplementedError

    def check(self, params: dict) -> dict:
        return check_params(self.name, params, self.schema)

    def resolved(self, params: dict, *, seed: int = 0) -> dict:
        """Every plain parameter of the estimator this config builds with this ``seed``, defaults included:
        run.json records it, so a reader sees the whole model, not only the keys the grid varied."""
        est = self.make_estimator(params, seed=seed)
        final = est.steps[-1][1] if hasattr(est, "steps") else est
        return {k: v for k, v in final.get_params(deep=True).items() if plain_value(v)}

    def search(self, X: np.ndarray, y: np.ndarray, folds: Folds, grid: list[dict], *,
               scoring: str = "accuracy", seed: int = 0, progress: ProgressFn | None = None) -> SearchResult:
        """Score every config on every fold (GridSearchCV semantics, with progress events)."""
        from sklearn.metrics import get_scorer

        grid = [self.check(p) for p in grid]
        scorer = self.scorer(scoring) or _scorer(scoring, get_scorer)
        with rejected_params(self.name):
            return cv_loop(lambda p, n_train: self.make_estimator(self.fold_params(p, n_train), seed=seed,
                                                                  for_search=True),
                           X, y, folds, grid, scorer, progress, n_jobs=self.search_jobs(X),
                           serial=self.draws_global_rng, unconverged=self.unconverged)

    def unconverged(self, estimator: Any) -> bool | None:
        """Whether a fitted search ``estimator`` stopped before its solver converged (scikit-learn warned for
        it); None: this head's models have no iterative solver, nothing to count. Why read from the model,
        not counted from the warnings: the search fits in threads, and the model says it for its own fit."""
        return None

    def search_jobs(self, X: np.ndarray) -> int | None:
        """How many threads the search may fit in (None: one per core). 1 where this head's models, on
        ``X``, run scikit-learn's own Parallel: its workers empty and refill the process-wide warning
        filters (``warnings.resetwarnings``, not thread-safe before Python 3.14), so such fits in parallel
        threads warned "`sklearn.utils.parallel.delayed` should be used with
        `sklearn.utils.parallel.Parallel`" at random."""
        return None

    def fold_params(self, params: dict, n_train: int) -> dict:
        """The parameters one fit on ``n_train`` rows really uses (knn caps its k there); the search
        records the requested ones."""
        return params

    def scorer(self, scoring: str) -> Callable | None:
        """A head's own scorer for ``scoring`` where scikit-learn's named one cannot score its search
        estimator (None: the named one)."""
        return None

    def draws_global_rng(self, params: dict) -> bool:
        """Whether fitting ``params`` draws from a process-wide random stream (liblinear's): two such fits
        in parallel threads would take each other's draws, and the scores would change from run to run."""
        return False

    def fit(self, X: np.ndarray, y: np.ndarray, params: dict, *, seed: int = 0,
            groups: np.ndarray | None = None) -> SklearnHead:
        """The final model of ``params``; ``groups`` (each row's patient) for heads that split internally."""
        est = self.make_estimator(self.check(params), seed=seed)
        with rejected_params(self.name):
            est.fit(np.asarray(X), np.asarray(y))
        return SklearnHead(est, int(np.max(y)) + 1)


@contextlib.contextmanager
def rejected_params(head: str) -> Iterator[None]:
    """A parameter value scikit-learn rejects (``--grid metric=foo``) becomes one sentence, not a traceback.

    Only scikit-learn's own parameter validation error is converted: the schema checks types and ranges, but
    not every estimator's list of allowed strings, which scikit-learn knows best.
    """
    try:
        from sklearn.utils._param_validation import InvalidParameterError
    except ImportError:  # pragma: no cover - scikit-learn < 1.2 (not supported) has no such class
        yield
        return
    try:
        yield
    except InvalidParameterError as exc:
        text = " ".join(str(exc).split())
        raise ConfigError(f"head '{head}' rejected a grid value: {text}") from None


def _scorer(scoring: str, get_scorer: Callable) -> Callable:
    try:
        return get_scorer(scoring)
    except ValueError:
        raise ConfigError(f"unknown scoring '{scoring}'; use a scikit-learn scorer name such as accuracy, "
                          "roc_auc or f1_macro.") from None


def cv_loop(factory: Callable[[dict, int], Any], X: np.ndarray, y: np.ndarray, folds: Folds, grid: list[dict],
            scorer: Callable, progress: ProgressFn | None, n_jobs: int | None = None,
            serial: Callable[[dict], bool] | None = None,
            unconverged: Callable[[Any], bool | None] | None = None) -> SearchResult:
    """Fit/score every (config, fold) pair; the shared engine of the plain CV heads.

    Why threads: libsvm and the kNN searches release the GIL, so on a 2-core machine two fits run at once
    (the svm grid took about half the time); no process start-up or data copying is paid. Results do not
    depend on the order in which pairs finish. ``factory(config, n_train)`` builds the estimator of one
    (config, fold) pair, the fold's training size given. ``serial(config)``: configs whose fits must not
    overlap each other (a linear SVM: liblinear seeds and draws one process-wide random stream, and two
    threads drawing it at once gave other CV scores in every run); they fit one at a time, beside the
    others.

    ``unconverged(fitted)``: whether a fit stopped before converging; their number is the result's
    ``n_unconverged`` (fit's note, run.json's ``cv_unconverged_fits``), as logreg's search counts them.
    scikit-learn's own warnings of the search (one per fit, e.g. liblinear's "failed to converge") are
    recorded, not printed under the progress bar, and shown again once each (as Python shows a repeated
    warning) for Python callers; the CLI silences them, since fit's note says it with the count.
    """
    import threading
    import warnings

    from joblib import Parallel, delayed

    X, y = np.asarray(X), np.asarray(y)
    n_f = len(folds)
    scores = np.full((len(grid), n_f), np.nan)
    fit_t = np.zeros((len(grid), n_f))
    score_t = np.zeros((len(grid), n_f))
    pairs = [(i, j) for i in range(len(grid)) for j in range(n_f)]

    one_at_a_time = threading.Lock()

    def one(i: int, j: int) -> tuple[int, int, float, float, float, bool | None]:
        tr, te = folds[j]
        est = factory(grid[i], len(tr))
        guard = one_at_a_time if serial is not None and serial(grid[i]) else contextlib.nullcontext()
        with guard:
            t0 = time.perf_counter()
            est.fit(X[tr], y[tr])
            t1 = time.perf_counter()
        stopped = unconverged(est) if unconverged is not None else None
        return i, j, float(scorer(est, X[te], y[te])), t1 - t0, time.perf_counter() - t1, stopped

    workers = n_jobs or min(len(pairs), os.cpu_count() or 1)
    n_stopped = 0
    counted = False  # whether any fit could say: knn's cannot, and its runs recorded "0 unconverged"
    # entered here, around every thread's fits: the filters and the record are process-wide (Python < 3.14)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # every fit's warning, to show each distinct one again below
        if workers <= 1:
            results: Any = (one(i, j) for i, j in pairs)
        else:
            results = Parallel(n_jobs=workers, prefer="threads", return_as="generator_unordered")(
                delayed(one)(i, j) for i, j in pairs)
        for done, (i, j, score, ft, st, stopped) in enumerate(results, start=1):
            scores[i, j], fit_t[i, j], score_t[i, j] = score, ft, st
            n_stopped += bool(stopped)
            counted = counted or stopped is not None
            emit(progress, "fit", done, len(pairs), f"config {i + 1}/{len(grid)} fold {j + 1}/{n_f}")
    registry: dict = {}
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, registry=registry)
    result = result_from_cv(grid, build_cv_results(grid, scores, fit_t, score_t))
    result.n_unconverged = n_stopped if counted else None
    return result
