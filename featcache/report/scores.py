"""Metrics recomputed from prediction CSVs: both thresholds, ROC points and bootstrap CIs.

Recomputing (instead of trusting whatever a run recorded) gives every run of a report the same
definitions. Binary tasks use the positive class = class index 1 (PNEUMONIA); the "chosen"
threshold is the one fit picked on validation data (run.json ``threshold``), else Youden's J on the
validation predictions, so it never looks at the test split.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from featcache.metrics import LOG_LOSS_CLIP as EPS
from featcache.metrics import predict_labels, rank_score
from featcache.report.collect import Predictions, RunRecord

METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "auc", "average_precision", "sensitivity",
           "specificity", "loss", "brier")
LOWER_IS_BETTER = {"loss", "brier"}
THRESHOLD_FREE = {"auc", "average_precision", "loss", "brier"}  # scored on probabilities, not labels


def predict(pred: Predictions, threshold: float | None) -> np.ndarray:
    """Class indices by fit's rule (:func:`featcache.metrics.predict_labels`): two classes
    ``p_pos >= threshold`` (0.5 when None; argmax sent a 0.5 tie the other way), else argmax."""
    return predict_labels(pred.proba, threshold)


def confusion(y_true: np.ndarray, y_pred: np.ndarray, k: int) -> np.ndarray:
    """[k, k] counts, rows = true class, columns = predicted class."""
    cm = np.zeros((k, k), dtype=int)
    np.add.at(cm, (y_true, y_pred), 1)
    return cm


def per_class(pred: Predictions, threshold: float | None = 0.5) -> list[dict]:
    """Precision, recall (sensitivity of that class), F1 and image count of each class.

    Why: a 3-class accuracy hides a class the head never finds (viral pneumonia, often); the rows
    show it. Binary: at ``threshold`` on P(class 1); otherwise the most probable class.
    """
    k = pred.proba.shape[1]
    cm = confusion(pred.y_true, predict(pred, threshold), k)
    out = []
    for i, name in enumerate(pred.classes):
        tp, predicted, actual = cm[i, i], cm[:, i].sum(), cm[i, :].sum()
        precision = tp / predicted if predicted else float("nan")
        recall = tp / actual if actual else float("nan")
        f1 = 2 * precision * recall / (precision + recall) if predicted and actual and tp else 0.0
        out.append({"class": name, "precision": float(precision), "recall": float(recall),
                    "f1": float(f1) if actual else float("nan"), "n": int(actual)})
    return out


def subtype_sensitivity(pred: Predictions, thresholds: Sequence[float | None], n_boot: int = 1000,
                        seed: int = 0) -> list[dict]:
    """Sensitivity of a binary run on each pneumonia subtype named by the Kermany file names
    (``person12_bacteria_47.jpeg``, ``..._virus_...``), at each of ``thresholds``, with 95% bootstrap
    intervals (patients resampled when the CSV has groups, as every other interval of the report). A
    subtype found in all or none of its images gets the exact Clopper-Pearson interval over its patients
    (``exact``), as the leaderboard's proportions do: the percentile interval of 8/8 is the point [1, 1],
    a certainty that 8 patients cannot give.

    Why: a binary run's one sensitivity hides whether it misses viral pneumonia, the subtype papers find
    hardest (fewer images, subtler opacities), more than bacterial. Only the positive class's images whose
    name carries a subtype count; an empty list when there are none (another dataset, or a 3-class task,
    whose per-class table already shows each subtype).
    """
    from featcache.datasets import parse_kermany_name
    from featcache.metrics import bootstrap_weights, exact_interval_at_bound

    if pred.proba.shape[1] != 2:
        return []
    names = [parse_kermany_name(rp.replace("\\", "/").rsplit("/", 1)[-1])[0] for rp in pred.relpaths]
    out = []
    for subtype in ("bacteria", "virus"):
        rows = np.array([i for i, s in enumerate(names) if s == subtype and pred.y_true[i] == 1], dtype=int)
        if not len(rows):
            continue
        groups = [pred.groups[i] for i in rows] if pred.groups is not None else None
        w = bootstrap_weights(len(rows), n_boot, seed, groups)
        entry: dict = {"subtype": subtype, "n": int(len(rows)),
                       "patients": len(set(groups)) if groups is not None else None, "at": []}
        for thr in thresholds:
            found = (predict(pred, thr)[rows] == 1).astype(float)
            exact = found.sum() in (0, len(found))
            if exact:  # every resample agrees: the percentile interval would be the point [1, 1] or [0, 0]
                lo, hi = exact_interval_at_bound(len(set(groups)) if groups is not None else len(rows),
                                                 bool(found.all()))
            else:
                boot = w @ found / np.maximum(w.sum(axis=1), 1.0)
                lo, hi = np.quantile(boot, [0.025, 0.975])
            entry["at"].append({"threshold": thr, "sensitivity": float(found.mean()),
                                "found": int(found.sum()), "ci": (float(lo), float(hi)), "exact": exact})
        out.append(entry)
    return out


def macro_average(rows: Sequence[dict]) -> dict:
    """The unweighted mean of :func:`per_class`'s rows, an undefined value counting 0: scikit-learn's
    ``average="macro", zero_division=0`` over every class, and the same macro F1 as fit's metrics.json.
    Why: papers report macro precision, recall and F1 (paper 003: 0.97 / 0.96 / 0.96); a reader should not
    have to average the rows by hand, nor guess how an absent class counts."""
    def mean(key: str) -> float:
        return float(np.mean([0.0 if np.isnan(r[key]) else r[key] for r in rows])) if rows else float("nan")

    return {"class": "macro average", "precision": mean("precision"), "recall": mean("recall"),
            "f1": mean("f1"), "n": int(sum(r["n"] for r in rows))}


def _macro_f1(cm: np.ndarray) -> float:
    tp = np.diag(cm).astype(float)
    prec = np.divide(tp, cm.sum(0), out=np.zeros_like(tp), where=cm.sum(0) > 0)
    rec = np.divide(tp, cm.sum(1), out=np.zeros_like(tp), where=cm.sum(1) > 0)
    f1 = np.divide(2 * prec * rec, prec + rec, out=np.zeros_like(tp), where=(prec + rec) > 0)
    # over every class, an absent one scoring 0 (fit's metrics.json and its bootstrap, scikit-learn's
    # labels=..., zero_division=0): averaged over the classes present, a 3-class hold-out without a virus
    # image gave 0.97 here against 0.65 in metrics.json
    return float(f1.mean()) if cm.sum() else float("nan")


def auc_binary(y: np.ndarray, score: np.ndarray) -> float:
    """Mann-Whitney AUC with ties counted half; NaN when a class is absent."""
    return float(_auc_weighted(y, score, np.ones((1, len(y))))[0])


def _auc_weighted(y: np.ndarray, score: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUC for each row of ``weights`` (bootstrap counts) at once: one sort, then cumulative sums."""
    uniq, inv = np.unique(score, return_inverse=True)
    pos = np.zeros((weights.shape[0], len(uniq)))
    neg = np.zeros_like(pos)
    for cls, arr in ((1, pos), (0, neg)):
        m = y == cls
        np.add.at(arr.T, inv[m], weights[:, m].T)
    n_pos, n_neg = pos.sum(1), neg.sum(1)
    below = np.cumsum(neg, axis=1) - neg
    num = (pos * (below + 0.5 * neg)).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((n_pos > 0) & (n_neg > 0), num / (n_pos * n_neg), np.nan)


def auc(pred: Predictions) -> float:
    """Binary AUC, or one-vs-rest macro AUC; NaN when a class is absent (undefined, as in metrics.json:
    a mean over the classes present would rank a run on a number its own record does not have)."""
    k = pred.proba.shape[1]
    if k == 2:
        return auc_binary(pred.y_true, rank_score(pred.proba, 1))
    vals = [auc_binary((pred.y_true == c).astype(int), rank_score(pred.proba, c)) for c in range(k)]
    return float(np.mean(vals))  # NaN when any class is absent


def scores(pred: Predictions, threshold: float | None = 0.5) -> dict[str, float]:
    """Accuracy, balanced accuracy, macro F1, AUC, log loss, Brier; binary: sensitivity, specificity and
    average precision (the area under the precision-recall curve of the positive class)."""
    k = pred.proba.shape[1]
    y_pred = predict(pred, threshold)
    cm = confusion(pred.y_true, y_pred, k)
    n = max(int(cm.sum()), 1)
    recalls = [cm[c, c] / cm[c].sum() for c in range(k) if cm[c].sum() > 0]
    p_true = np.clip(pred.proba[np.arange(len(pred.y_true)), pred.y_true], EPS, 1.0)
    out = {
        "accuracy": float(np.trace(cm) / n),
        "balanced_accuracy": float(np.mean(recalls)) if recalls else float("nan"),
        "macro_f1": _macro_f1(cm),
        "auc": auc(pred),
        "loss": float(-np.mean(np.log(p_true))) if len(p_true) else float("nan"),
        "brier": _brier(pred),
        "n": int(cm.sum()),
    }
    if k == 2:
        out["sensitivity"] = float(cm[1, 1] / cm[1].sum()) if cm[1].sum() else float("nan")
        out["specificity"] = float(cm[0, 0] / cm[0].sum()) if cm[0].sum() else float("nan")
        out["average_precision"] = average_precision(pred.y_true, rank_score(pred.proba, 1))
    return out


def _brier(pred: Predictions) -> float:
    """Brier score (0 is perfect; calibration and sharpness together): binary, the mean of
    (P(class 1) - y)^2 as usually quoted; more classes, Brier's sum over classes of the squared error."""
    if not len(pred.y_true):
        return float("nan")
    k = pred.proba.shape[1]
    if k == 2:
        return float(np.mean((pred.proba[:, 1] - (pred.y_true == 1)) ** 2))
    return float(np.mean(np.sum((pred.proba - np.eye(k)[pred.y_true]) ** 2, axis=1)))


def youden_threshold(pred: Predictions) -> float | None:
    """Threshold maximising sensitivity + specificity − 1 on these (validation) predictions, by fit's own
    rule (:func:`featcache.metrics.choose_threshold`: midway to the next lower score, never on one)."""
    if pred.proba.shape[1] != 2 or len(set(pred.y_true.tolist())) < 2:
        return None
    from featcache.metrics import choose_threshold

    return choose_threshold(pred.y_true, pred.proba[:, 1], "youden")


def chosen_threshold(rec: RunRecord) -> float | None:
    """The validation-chosen threshold recorded by fit, else Youden on the validation predictions."""
    thr = rec.run.get("threshold")
    if isinstance(thr, dict):
        for key in ("chosen", "youden"):
            val = thr.get(key)
            if isinstance(val, dict):
                val = val.get("value", val.get("threshold"))
            if isinstance(val, int | float) and not isinstance(val, bool):
                return float(val)
    elif isinstance(thr, int | float) and not isinstance(thr, bool):
        return float(thr)
    return youden_threshold(rec.val) if rec.val is not None else None


def roc_points(y: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) over every distinct score, from (0,0) to (1,1)."""
    order = np.argsort(-score, kind="mergesort")
    s, yy = score[order], y[order]
    distinct = np.r_[np.where(np.diff(s))[0], len(s) - 1]
    tps = np.cumsum(yy)[distinct]
    fps = (1 + distinct) - tps
    p, n = max(yy.sum(), 1), max(len(yy) - yy.sum(), 1)
    return np.r_[0, fps / n], np.r_[0, tps / p], np.r_[np.inf, s[distinct]]


def pr_points(y: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(recall, precision, thresholds) at every distinct score, highest threshold first.

    Why beside the ROC: with few positives (or few negatives, as in Kermany's 3:1 pneumonia share) a ROC
    curve can look good while most positive calls are wrong; precision shows that.
    """
    order = np.argsort(-score, kind="mergesort")
    s, yy = score[order], y[order]
    distinct = np.r_[np.where(np.diff(s))[0], len(s) - 1]
    tps = np.cumsum(yy)[distinct]
    called = 1 + distinct
    return tps / max(yy.sum(), 1), tps / called, s[distinct]


def average_precision(y: np.ndarray, score: np.ndarray) -> float:
    """Σ (R_n − R_{n−1}) P_n over the thresholds (scikit-learn's definition, no interpolation); NaN
    without positives."""
    if not np.any(y == 1):
        return float("nan")
    recall, precision, _ = pr_points(y, score)
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def bootstrap_ci(
    pred: Predictions, threshold: float | None, n_boot: int = 1000, seed: int = 0
) -> dict[str, tuple[float, float]]:
    """95% CIs (accuracy, macro F1, AUC, and sensitivity/specificity when binary) for a run that
    recorded none, with the fit's own bootstrap (:func:`featcache.metrics.bootstrap_ci`: patients are
    resampled when the CSV has a ``group`` column), so a report never has two definitions of one CI."""
    from featcache.metrics import bootstrap_ci as fit_bootstrap_ci

    if len(pred.y_true) == 0:
        return {}
    ci = fit_bootstrap_ci(pred.y_true, pred.proba, pred.classes, threshold, n_boot=n_boot, seed=seed,
                          groups=pred.groups)
    return {k: (v[0], v[1]) for k, v in ci.items()
            if k in ("accuracy", "macro_f1", "auc", "log_loss", "sensitivity", "specificity")
            and isinstance(v, list) and len(v) == 2}


def paired_difference(
    a: Predictions, b: Predictions, n_boot: int = 1000, seed: int = 0
) -> dict[str, tuple[float, float, float]] | None:
    """Test accuracy and (binary) AUC of ``a`` minus ``b`` on the same images: (difference, 95% CI).

    Both runs are scored on the SAME bootstrap resamples of patients, so the interval is of the paired
    difference: two overlapping single-run CIs do not mean two runs are indistinguishable, and two
    disjoint ones are rare. None when the runs were not tested on the same images and labels.
    """
    from featcache.metrics import bootstrap_weights

    order_a, order_b = np.argsort(a.relpaths, kind="stable"), np.argsort(b.relpaths, kind="stable")
    same = (len(a.relpaths) == len(b.relpaths) and len(a.relpaths) > 0
            and [a.relpaths[i] for i in order_a] == [b.relpaths[i] for i in order_b]
            and np.array_equal(a.y_true[order_a], b.y_true[order_b]) and a.classes == b.classes)
    if not same:
        return None
    y = a.y_true[order_a]
    groups = [a.groups[i] for i in order_a] if a.groups is not None else None
    w = bootstrap_weights(len(y), n_boot, seed, groups)
    total = np.maximum(w.sum(axis=1), 1.0)
    right_a = (predict(a, 0.5)[order_a] == y).astype(float)
    right_b = (predict(b, 0.5)[order_b] == y).astype(float)
    diffs = {"accuracy": (float(right_a.mean() - right_b.mean()), w @ (right_a - right_b) / total)}
    if a.proba.shape[1] == 2 and len(set(y.tolist())) == 2:
        # ranked as every other AUC of the report is (saturated P(class 1) tied, the rest breaking ties):
        # on P(class 1) alone a saturated run's difference was -0.35 where both runs' AUCs were equal
        pa, pb = rank_score(a.proba[order_a], 1), rank_score(b.proba[order_b], 1)
        point = auc_binary(y, pa) - auc_binary(y, pb)
        diffs["auc"] = (point, _auc_weighted(y, pa, w) - _auc_weighted(y, pb, w))
    out = {}
    for name, (point, boot) in diffs.items():
        boot = boot[np.isfinite(boot)]
        lo, hi = np.quantile(boot, [0.025, 0.975]) if len(boot) else (np.nan, np.nan)
        out[name] = (point, float(lo), float(hi))
    return out


def calibration_bins(pred: Predictions, n_bins: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean predicted P(class 1), observed fraction of class 1, images) per non-empty equal-width bin."""
    return _bins(pred.proba[:, 1], pred.y_true == 1, n_bins)


def confidence_bins(pred: Predictions, n_bins: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean confidence, fraction correct, images) per non-empty equal-width bin of the confidence, the
    probability of the class predicted (the most probable; the first of equal ones, as fit decides).

    Why: with three classes there is no one P(positive) to calibrate; the top-label diagram asks whether
    "90% sure" is right 90% of the time, as a reader of the predicted class would use it.
    """
    labels = predict(pred, None)
    return _bins(pred.proba[np.arange(len(labels)), labels], labels == pred.y_true, n_bins)


def _bins(p: np.ndarray, hit: np.ndarray, n_bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean of ``p``, fraction of ``hit``, count) per non-empty bin of ``p`` over [0, 1] in equal widths."""
    # i / n, not linspace: linspace's 0.30000000000000004 put 0.3 (a kNN's 3/10) in the bin below
    edges = np.arange(n_bins + 1) / n_bins
    which = np.clip(np.digitize(p, edges[1:-1]), 0, n_bins - 1)
    mean_p, observed, counts = [], [], []
    for b in range(n_bins):
        m = which == b
        if m.any():
            mean_p.append(float(p[m].mean()))
            observed.append(float(hit[m].mean()))
            counts.append(int(m.sum()))
    return np.array(mean_p), np.array(observed), np.array(counts)
