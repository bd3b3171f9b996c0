"""SVM head (linear and RBF) as a cheap baseline, standardised inside.

Why two estimators: ``LinearSVC`` scales to thousands of rows x thousands of features far better than a
kernel SVC with a linear kernel; ``SVC`` is used for RBF. Probabilities come from Platt scaling
(``CalibratedClassifierCV(method="sigmoid")`` around either model) on 3 patient-grouped folds
(``StratifiedGroupKFold``): with scikit-learn's plain 3 folds a patient's other images sat in the part a
calibration model was trained on, so the sigmoid was fitted to scores that were too good.
The CV search scores the uncalibrated model (decision-based scorers do not need probabilities, and
calibration would multiply the cost); only the final fit is calibrated.
"""
from __future__ import annotations

from typing import Any, ClassVar

from featcache.errors import ConfigError, DataError
from featcache.heads.base import CVHead


def _gamma(value: Any) -> Any:
    if value is None:
        return "scale"
    if isinstance(value, str) and value not in ("scale", "auto"):
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"svm gamma '{value}' is not valid; use scale, auto or a positive number.") \
                from None
    return value


class SVMHead(CVHead):
    """``svm``: kernel in {linear, rbf}, C, gamma (rbf), class_weight, max_iter.

    ``max_iter=none`` is each kernel's default: no limit for rbf (SVC's -1, which the grid's range check
    refuses as a number since -1 means nothing to the other heads) and 5,000 for linear.
    """

    name: ClassVar[str] = "svm"
    schema: ClassVar[dict[str, str]] = {"kernel": "str", "C": "float", "gamma": "float|str",
                                        "class_weight": "class_weight", "max_iter": "int?"}
    default_grid: ClassVar[dict[str, list]] = {"kernel": ["linear", "rbf"], "C": [0.1, 1.0, 10.0],
                                               "class_weight": [None, "balanced"]}

    def fit(self, X: Any, y: Any, params: dict, *, seed: int = 0, groups: Any = None) -> Any:
        """The calibrated final model; Platt scaling's 3 folds (patient-grouped when ``groups`` is given)
        shrink to what the smallest class allows."""
        import numpy as np
        from sklearn.model_selection import StratifiedGroupKFold

        from featcache.heads.base import SklearnHead, rejected_params

        y = np.asarray(y)
        g = np.arange(len(y)) if groups is None else np.asarray(groups)
        smallest = min(len(np.unique(g[y == k])) for k in np.unique(y))  # patients of the smallest class
        if smallest < 2:
            raise DataError(f"svm's probability calibration needs at least 2 patients of every class in the "
                            f"rows it is fitted on (each CV fold's training part, then all training images); "
                            f"one class has {smallest} there: add images, or use the logreg or knn head.")
        folds = list(StratifiedGroupKFold(n_splits=min(3, smallest)).split(np.zeros(len(y)), y, g))
        est = self.make_estimator(self.check(params), seed=seed, calibration_folds=folds)
        with rejected_params(self.name):
            est.fit(np.asarray(X), np.asarray(y))
        return SklearnHead(est, int(np.max(y)) + 1)

    def make_estimator(self, params: dict, *, seed: int = 0, for_search: bool = False,
                       calibration_folds: Any = 3) -> Any:
        from sklearn.calibration import CalibratedClassifierCV
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler
        from sklearn.svm import SVC, LinearSVC

        kernel = params.get("kernel", "rbf")
        C = float(params.get("C", 1.0))
        cw = params.get("class_weight")
        if kernel == "linear":
            est: Any = LinearSVC(C=C, class_weight=cw, dual="auto", random_state=seed,
                                 max_iter=int(params.get("max_iter") or 5000))
            if not for_search:
                est = CalibratedClassifierCV(est, method="sigmoid", cv=calibration_folds)
        elif kernel == "rbf":
            est = SVC(kernel="rbf", C=C, gamma=_gamma(params.get("gamma")), class_weight=cw,
                      random_state=seed, max_iter=int(params.get("max_iter") or -1))
            if not for_search:
                est = CalibratedClassifierCV(est, method="sigmoid", cv=calibration_folds)
        else:
            raise ConfigError(f"unknown svm kernel '{kernel}'; use linear or rbf.")
        return make_pipeline(StandardScaler(), est)
