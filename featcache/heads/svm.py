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


def ovr_macro_auc(y_true: Any, scores: Any) -> float:
    """Mean over classes of the AUC of class k's score against the rest (scikit-learn's one-vs-rest macro
    AUC, on scores instead of probabilities: AUC needs only their order)."""
    import numpy as np
    from sklearn.metrics import roc_auc_score

    y_true, scores = np.asarray(y_true), np.asarray(scores)
    return float(np.mean([roc_auc_score(y_true == k, scores[:, k]) for k in range(scores.shape[1])]))


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
    min_training_patients: ClassVar[int] = 2  # Platt scaling's patient-grouped folds need two per class
    schema: ClassVar[dict[str, str]] = {"kernel": "str", "C": "float", "gamma": "float|str",
                                        "class_weight": "class_weight", "max_iter": "int?"}
    default_grid: ClassVar[dict[str, list]] = {"kernel": ["linear", "rbf"], "C": [0.1, 1.0, 10.0],
                                               "class_weight": [None, "balanced"]}

    def resolved(self, params: dict, *, seed: int = 0) -> dict:
        """As the base class, but the calibration's folds as :meth:`fit` makes them: the estimator built
        here says ``cv=3``, scikit-learn's plain (not patient-grouped) 3 folds, which fit does not use."""
        out = super().resolved(params, seed=seed)
        if "cv" in out:
            out["cv"] = "patient-grouped StratifiedGroupKFold, 3 folds (fewer if a class has fewer patients)"
        return out

    def scorer(self, scoring: str) -> Any:
        """Multi-class AUC from the decision function: scikit-learn's ``roc_auc_ovr`` needs predict_proba,
        which the search's uncalibrated SVM lacks (`--task 3class --metric auc` crashed). The same
        one-vs-rest macro average as the recorded AUC, on each class's decision value."""
        if scoring != "roc_auc_ovr":
            return None
        from sklearn.metrics import make_scorer

        return make_scorer(ovr_macro_auc, response_method="decision_function")

    @staticmethod
    def canonical(params: dict) -> dict:
        """The config without settings its kernel ignores: a linear SVM has no gamma, so ``--grid
        gamma=0.1,1`` beside ``kernel=linear`` made identical models trained twice and shown as two rows."""
        if params.get("kernel") == "linear" and "gamma" in params:
            return {k: v for k, v in params.items() if k != "gamma"}
        return params

    def unconverged(self, estimator: Any) -> bool | None:
        """Whether a search fit stopped at max_iter, as scikit-learn decides when it warns: liblinear's
        iterations reached max_iter (LinearSVC), libsvm's fit status 1 (SVC: "Solver terminated early")."""
        from sklearn.svm import SVC, LinearSVC

        model = estimator.steps[-1][1] if hasattr(estimator, "steps") else estimator
        if isinstance(model, LinearSVC):
            return int(model.n_iter_) >= int(model.max_iter)
        if isinstance(model, SVC):
            return int(model.fit_status_) == 1
        return None

    def draws_global_rng(self, params: dict) -> bool:
        """LinearSVC's solver draws liblinear's process-wide random stream (libsvm's SVC does not, without
        ``probability=True``): linear configs fit one at a time in a search."""
        return params.get("kernel", "rbf") == "linear"

    def fit(self, X: Any, y: Any, params: dict, *, seed: int = 0, groups: Any = None) -> Any:
        """The calibrated final model; Platt scaling's 3 folds (patient-grouped when ``groups`` is given)
        shrink to what the smallest class allows."""
        import numpy as np
        from sklearn.model_selection import StratifiedGroupKFold

        from featcache.heads.base import SklearnHead, rejected_params, sample_weights

        y = np.asarray(y)
        g = np.arange(len(y)) if groups is None else np.asarray(groups)
        smallest = min(len(np.unique(g[y == k])) for k in np.unique(y))  # patients of the smallest class
        if smallest < 2:
            raise DataError(f"svm's probability calibration needs at least 2 patients of every class in the "
                            f"rows it is fitted on (each CV fold's training part, then all training images); "
                            f"one class has {smallest} there: add images, or use the logreg or knn head.")
        folds = list(StratifiedGroupKFold(n_splits=min(3, smallest)).split(np.zeros(len(y)), y, g))
        params = self.check(params)
        # class weights as sample weights of the calibrated model, so they reach Platt's sigmoid too: given
        # to the SVM alone, the unweighted sigmoid re-centred its scores on the class prior, and at 0.5 the
        # model predicted as if unweighted (the search had chosen the weight for an effect that vanished)
        weights = sample_weights(y, params.get("class_weight"), int(np.max(y)) + 1)
        est = self.make_estimator({**params, "class_weight": None} if weights is not None else params,
                                  seed=seed, calibration_folds=folds)
        with rejected_params(self.name):
            est.fit(np.asarray(X), y, **({} if weights is None else
                                         {"calibratedclassifiercv__sample_weight": weights}))
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
