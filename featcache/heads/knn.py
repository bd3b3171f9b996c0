"""k-nearest-neighbours head: the cheapest baseline, standardised inside (distances need equal scales)."""
from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from featcache.heads.base import CVHead, SklearnHead

NEEDS_MORE_THAN_A_NAME = ("seuclidean", "mahalanobis", "haversine", "precomputed", "wminkowski")
TREE_MAX_FEATURES = 15  # scikit-learn's algorithm="auto" uses brute force above this many features


class KNNHead(CVHead):
    """``knn``: n_neighbors, weights (uniform|distance), metric (euclidean, cosine, manhattan, ...)."""

    name: ClassVar[str] = "knn"
    schema: ClassVar[dict[str, str]] = {"n_neighbors": "int", "weights": "str", "metric": "str"}
    default_grid: ClassVar[dict[str, list]] = {"n_neighbors": [5, 15, 31], "weights": ["uniform", "distance"]}

    def check(self, params: dict) -> dict:
        """The base check, and no distance metric that needs more than its name: seuclidean and mahalanobis
        need per-feature variances or a covariance, haversine takes 2-d inputs, precomputed takes distances;
        scikit-learn accepted them here and failed later with a traceback."""
        from featcache.errors import ConfigError

        out = super().check(params)
        metric = out.get("metric")
        if isinstance(metric, str) and metric.lower() in NEEDS_MORE_THAN_A_NAME:
            raise ConfigError(f"knn metric '{metric}' needs more than its name (extra parameters or other "
                              "inputs); use euclidean, manhattan, chebyshev, minkowski or cosine.")
        return out

    def make_estimator(self, params: dict, *, seed: int = 0, for_search: bool = False) -> Any:
        from sklearn.neighbors import KNeighborsClassifier
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        return make_pipeline(StandardScaler(), KNeighborsClassifier(
            n_neighbors=int(params.get("n_neighbors", 5)), weights=params.get("weights", "uniform"),
            metric=params.get("metric", "euclidean")))

    # Why the cap: a fold (or a small demo set) can hold fewer training rows than n_neighbors, and
    # scikit-learn then fails at predict time. Each fit caps at its own training rows (a search fold, an
    # out-of-fold model, the refit alike); the search records the requested k, the fitted model what ran.
    @staticmethod
    def _capped(params: dict, n_train: int) -> dict:
        k = int(params.get("n_neighbors", 5))
        return {**params, "n_neighbors": max(1, min(k, n_train))}

    def fold_params(self, params: dict, n_train: int) -> dict:
        return self._capped(params, n_train)

    def search_jobs(self, X: np.ndarray) -> int | None:
        """One thread on 15 or fewer features: there scikit-learn's "auto" answers from a KD or ball
        tree, queried through its own Parallel, whose workers rewrite the process-wide warning filters, so
        two threads warned "`sklearn.utils.parallel.delayed` should be used with ..." at random (a lock
        around the query alone is not enough: every fit's check_array saves and restores the filters too).
        Such searches take milliseconds; on more features (2,048-d embeddings) it answers by brute force,
        runs no Parallel, and the search keeps its threads. The scores are the same either way."""
        return 1 if np.ndim(X) == 2 and np.shape(X)[1] <= TREE_MAX_FEATURES else None

    def scorer(self, scoring: str) -> Any:
        """Accuracy and macro F1 from the labels the report uses (``predict_labels``: P(class 1) >= 0.5,
        else argmax): scikit-learn's scorers call ``predict``, which breaks an even k's tied vote towards
        class 0, the report towards class 1, so k was chosen by another rule than the one it was judged by
        (CV 0.487 against 0.603 on the same folds in a tied example)."""
        if scoring not in ("accuracy", "f1_macro"):
            return None
        from sklearn.metrics import accuracy_score, f1_score

        from featcache.metrics import predict_labels

        def score(est: Any, X: np.ndarray, y: np.ndarray) -> float:
            labels = np.asarray(est.classes_)[predict_labels(est.predict_proba(X))]
            if scoring == "accuracy":
                return float(accuracy_score(y, labels))
            return float(f1_score(y, labels, average="macro"))

        return score

    def fit(self, X: np.ndarray, y: np.ndarray, params: dict, *, seed: int = 0,
            groups: np.ndarray | None = None) -> SklearnHead:
        return super().fit(X, y, self._capped(self.check(params), len(X)), seed=seed)
