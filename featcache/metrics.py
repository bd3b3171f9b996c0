"""Metrics, decision thresholds and bootstrap confidence intervals.

Why these choices:
- The decision threshold is chosen on VALIDATION predictions (Youden's J or a target sensitivity) and
  reported beside the plain 0.5 rule: a threshold tuned on the test split would be a leak (paper 002
  tuned its ROC threshold from 0.5 to 0.98 without saying on which data).
- The test split has only a few hundred images, so a point estimate alone overstates what is known;
  percentile bootstrap CIs are computed with one multinomial draw of resample counts and matrix
  algebra (no Python loop over resamples), so 1000 resamples take milliseconds.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

ROC_POINTS = 101  # downsampled ROC curve size stored per run (enough for a smooth plot)
_EPS = 1e-15
LOG_LOSS_CLIP = _EPS  # the report's recomputed log loss uses the same clip (it had 1e-7: another number)


def _as_proba(proba: np.ndarray, n_classes: int) -> np.ndarray:
    """[n, K] float64 probabilities; a 1-D array is taken as P(class 1) of a binary task."""
    p = np.asarray(proba, dtype=np.float64)
    if p.ndim == 1:
        p = np.stack([1.0 - p, p], axis=1)
    if p.shape[1] != n_classes:
        raise ValueError(f"proba has {p.shape[1]} columns for {n_classes} classes")
    return p


def predict_labels(proba: np.ndarray, threshold: float | None = None) -> np.ndarray:
    """Binary: P(class 1) >= threshold (0.5 by default); multi-class: argmax."""
    p = np.asarray(proba, dtype=np.float64)
    if p.shape[1] == 2:
        return (p[:, 1] >= (0.5 if threshold is None else threshold)).astype(np.int64)
    return np.argmax(p, axis=1).astype(np.int64)


_REST_RTOL = 1e-6
"""Relative difference below which two totals of the other classes are one. Above the rounding of a sum
of float32 probabilities (each carries up to 6e-8: 0.3 + 0.2 in float32 is 0.5000000149, against 0.25 +
0.25 = 0.5, which at 1e-9 broke a real tie and moved a 3-class AUC from scikit-learn's 0.861 to 0.806),
and far below what tells saturated outputs apart (totals of 1e-20 against 1e-15)."""


def rank_score(p: np.ndarray, i: int) -> np.ndarray:
    """Class ``i``'s score for rank metrics (AUC, ROC, precision-recall): P(class i), its ties broken by the
    other classes' total probability (a smaller total ranks higher).

    Why: float32 probabilities saturate. An MLP's P(pneumonia) was 0.99999994 for every test image while
    P(normal) still ranged from 1e-20 to 1e-15, and prediction CSVs round P near 1 to "1"; ranked on P(class
    i) alone that model scored AUC 0.500 with a zero-width interval, its true one 0.789. Without ties in
    P(class i) this returns P(class i) itself, so every number stays as it was; with ties that the rest
    breaks it returns dense ranks (0, 1, ...), comparable only with each other.

    Totals that differ by the rounding of the sum alone are equal (``_REST_RTOL``): a kNN's P(class i) = 0
    for two images is a real tie, which AUC counts as a half, but their totals were 1.0 and
    0.9999999999999999, and ranking by that put them in an arbitrary order (a 3-class AUC 0.8895 where
    scikit-learn's is 0.8854). A float32 model's saturated totals differ by far more (1e-20 against 1e-15).
    """
    p = np.asarray(p, dtype=np.float64)
    pi = p[:, i]
    distinct = len(np.unique(pi))
    if distinct == len(pi):
        return pi
    rest = np.delete(p, i, axis=1).sum(axis=1)
    order = np.lexsort((-rest, pi))
    a, b = pi[order], rest[order]
    apart = np.abs(b[1:] - b[:-1]) > _REST_RTOL * np.maximum(np.abs(b[1:]), np.abs(b[:-1]))
    new = np.r_[True, (a[1:] != a[:-1]) | apart]
    if new.sum() == distinct:  # the rest breaks no tie: P(class i) ranks the same
        return pi
    ranks = np.empty(len(pi))
    ranks[order] = np.cumsum(new) - 1
    return ranks


def _downsample_roc(fpr: np.ndarray, tpr: np.ndarray, thr: np.ndarray) -> dict:
    """At most ROC_POINTS points, always keeping both ends, so run files stay small."""
    if len(fpr) > ROC_POINTS:
        idx = np.unique(np.linspace(0, len(fpr) - 1, ROC_POINTS).round().astype(int))
        fpr, tpr, thr = fpr[idx], tpr[idx], thr[idx]
    thr = np.where(np.isfinite(thr), thr, 1.0)
    return {
        "fpr": [float(v) for v in fpr],
        "tpr": [float(v) for v in tpr],
        "thresholds": [float(v) for v in thr],
    }


def _safe_auc(y_true: np.ndarray, p: np.ndarray, n_classes: int) -> float | None:
    """ROC AUC (binary) or one-vs-rest macro AUC; None when a class is absent (undefined)."""
    from sklearn.metrics import roc_auc_score

    present = np.unique(y_true)
    if n_classes == 2:
        return float(roc_auc_score(y_true, rank_score(p, 1))) if len(present) == 2 else None
    if len(present) < n_classes:
        return None
    # scikit-learn's one-vs-rest macro AUC (the mean of each class's AUC against the rest), on rank scores
    return float(np.mean([roc_auc_score(y_true == c, rank_score(p, c)) for c in range(n_classes)]))


def classification_metrics(
    y_true: Sequence[int], proba: np.ndarray, classes: Sequence[str], threshold: float | None = None
) -> dict:
    """Everything a report needs about one set of predictions, JSON-serialisable.

    Binary tasks treat class 1 as positive (sensitivity = its recall, specificity = class 0 recall).
    """
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    classes = [str(c) for c in classes]
    k = len(classes)
    y = np.asarray(y_true, dtype=np.int64)
    p = _as_proba(proba, k)
    y_pred = predict_labels(p, threshold)
    labels = list(range(k))
    prec, rec, f1, support = precision_recall_fscore_support(y, y_pred, labels=labels, zero_division=0)
    cm = confusion_matrix(y, y_pred, labels=labels)
    p_true = np.clip(p[np.arange(len(y)), y], _EPS, 1.0) if len(y) else np.array([])
    out: dict = {
        "n": int(len(y)),
        "classes": classes,
        "threshold": (0.5 if threshold is None else float(threshold)) if k == 2 else None,
        "accuracy": float(np.mean(y_pred == y)) if len(y) else None,
        "per_class": {
            c: {
                "precision": float(prec[i]),
                "recall": float(rec[i]) if support[i] else None,  # no image of the class: undefined
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, c in enumerate(classes)
        },
        "macro_f1": float(np.mean(f1)),
        "auc": _safe_auc(y, p, k) if len(y) else None,
        "log_loss": float(-np.mean(np.log(p_true))) if len(y) else None,
        "confusion": cm.astype(int).tolist(),
    }
    if k == 2:
        out["sensitivity"] = float(rec[1]) if support[1] else None  # undefined, not 0, without positives
        out["specificity"] = float(rec[0]) if support[0] else None
        if len(np.unique(y)) == 2:
            out["roc"] = _downsample_roc(*_roc_on_rank_score(y, p, 1))
        else:
            out["roc"] = None
    else:
        curves = {}
        for i, c in enumerate(classes):
            yi = (y == i).astype(int)
            if 0 < yi.sum() < len(yi):  # on the scores the AUC ranks, thresholds shown as P(class i)
                curves[c] = _downsample_roc(*_roc_on_rank_score(yi, p, i))
        out["roc"] = curves or None
    return out


def _roc_on_rank_score(y: np.ndarray, p: np.ndarray, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC (fpr, tpr, thresholds) of class ``i`` against the rest, ranked by ``rank_score`` as its AUC is,
    each threshold given back as the P(class i) it stands for (dense ranks mean nothing to a reader)."""
    from sklearn.metrics import roc_curve

    score = rank_score(p, i)
    fpr, tpr, thr = roc_curve(y, score)
    at = dict(zip(score.tolist(), p[:, i].tolist(), strict=False))
    return fpr, tpr, np.array([at.get(float(t), np.inf) for t in thr])


def choose_threshold(
    y_true: Sequence[int],
    p_pos: Sequence[float],
    method: str = "youden",
    target_sensitivity: float | None = None,
) -> float:
    """A decision threshold on P(positive), chosen on validation predictions.

    ``youden`` maximises sensitivity + specificity - 1; ``sensitivity`` picks the highest threshold
    whose sensitivity reaches ``target_sensitivity`` (highest = best specificity at that sensitivity).
    Falls back to 0.5 when validation holds a single class (no ROC curve exists), and for ``youden`` when
    no threshold does better than chance (every image given the same probability). Of thresholds with
    equal J, ``youden`` keeps the highest (the first in roc_curve's decreasing order): fewer false
    positives at the same J, and one documented rule rather than whatever order ties fell in.

    The threshold returned lies midway between the validation score the ROC point is taken at and the
    next lower one: the same split of the validation images, but not equal to any of their scores. Why:
    a threshold equal to a score puts that image on the boundary, and the same model's probability for it
    recomputed in another batch (``predict``) differs in the last float digits and flipped its label.
    Two cases keep a score: two adjacent floats have no value between them (the higher is returned, so
    the split holds), and a point calling every image positive whose lowest score is 0.0 returns 0.0.
    """
    from sklearn.metrics import roc_curve

    y = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(p_pos, dtype=np.float64)
    if len(np.unique(y)) < 2:
        return 0.5
    # every threshold, not only the ROC's corners: with the default drop_intermediate=True the first
    # point reaching the target sensitivity could be the top of a vertical segment, a lower threshold
    # than the highest one reaching it (sensitivity 0.95 chosen where 0.90 was asked and reachable)
    fpr, tpr, thr = roc_curve(y, p, drop_intermediate=False)
    thr = np.where(np.isfinite(thr), thr, 1.0)
    if method == "youden":
        j = tpr - fpr
        if j.max() <= 0:  # no threshold beats chance (one probability for every image): keep the default,
            return 0.5  # not "above every score", which called every image negative
        i = int(np.argmax(j))
    elif method == "sensitivity":
        if target_sensitivity is None or not 0.0 < target_sensitivity <= 1.0:
            raise ValueError("target_sensitivity must be in (0, 1]")
        ok = np.flatnonzero(tpr >= target_sensitivity - 1e-12)
        i = int(ok[0])  # roc_curve thresholds decrease: the first hit is the highest threshold
    else:
        raise ValueError(f"unknown threshold method {method!r}")
    if i == 0:  # above every score: nothing is called positive
        return 1.0
    lower = p[p < thr[i]]
    below = float(lower.max()) if len(lower) else 0.0
    mid = (float(thr[i]) + below) / 2
    if len(lower) and not below < mid:  # adjacent floats: the midpoint rounded onto the lower score, which
        mid = float(thr[i])  # then counted as positive (specificity 1 -> 0); the point's own score splits
    return float(min(1.0, max(0.0, mid)))


# --- bootstrap -------------------------------------------------------------------------------------


def _weighted_auc(w_pos: np.ndarray, w_neg: np.ndarray, order: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """Mann-Whitney AUC for every resample at once.

    ``w_pos``/``w_neg`` [B, n]: how often each sample is drawn as positive/negative; ``order`` sorts
    the scores ascending and ``bounds`` are the starts of runs of tied scores, so ties count 1/2.
    """
    pos_u = np.add.reduceat(w_pos[:, order], bounds, axis=1)
    neg_u = np.add.reduceat(w_neg[:, order], bounds, axis=1)
    neg_below = np.cumsum(neg_u, axis=1) - neg_u
    num = np.sum(pos_u * (neg_below + 0.5 * neg_u), axis=1)
    den = pos_u.sum(axis=1) * neg_u.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.maximum(den, 1), np.nan)


def _ties(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ascending order of ``scores`` and the start index of each run of equal values."""
    order = np.argsort(scores, kind="mergesort")
    s = scores[order]
    bounds = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    return order, bounds


def bootstrap_weights(n: int, n_boot: int, seed: int, groups: Sequence | None = None) -> np.ndarray:
    """[n_boot, n] bootstrap draw counts: images resampled, or whole groups when ``groups`` is given."""
    rng = np.random.default_rng(seed)
    if groups is None:
        return rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float64)
    _, inverse = np.unique(np.asarray([str(g) for g in groups]), return_inverse=True)
    n_groups = int(inverse.max()) + 1
    counts = rng.multinomial(n_groups, np.full(n_groups, 1.0 / n_groups), size=n_boot).astype(np.float64)
    return counts[:, inverse]


def bootstrap_ci(
    y_true: Sequence[int],
    proba: np.ndarray,
    classes: Sequence[str],
    threshold: float | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    groups: Sequence | None = None,
) -> dict:
    """Percentile bootstrap CIs: metric -> [lo, hi] for accuracy, macro_f1, auc, log_loss
    (+ sensitivity, specificity for binary tasks; ``per_class_recall``, {class: [lo, hi]}, for more
    classes), seeded.

    With ``groups`` (patient ids) whole patients are resampled, so the several images of one patient are
    not counted as independent evidence (most Kermany patients have several images); without, images.
    A proportion (accuracy, sensitivity, specificity) observed at 0 or 1 gets the exact Clopper-Pearson
    interval instead, named under ``exact_at_bound`` (see :func:`_exact_at_bounds`). An AUC of exactly 1
    (or 0) gets a score-type bound instead of the point [1, 1], flagged ``auc_score_bound``
    (see :func:`_auc_at_bounds`). A macro F1 of exactly 1 (or 0) keeps its point interval, named under
    ``point_at_bound`` so that a report can say it is no measure of uncertainty. Other intervals of no
    width are named under ``no_width``; resamples in which a metric is undefined (no image of a class it
    needs was drawn) are left out of its interval and counted under ``undefined_resamples``.
    """
    k = len(classes)
    y = np.asarray(y_true, dtype=np.int64)
    n = len(y)
    if n == 0:
        return {}
    p = _as_proba(proba, k)
    y_pred = predict_labels(p, threshold)
    w = bootstrap_weights(n, n_boot, seed, groups)  # [B, n] draw counts
    total = np.maximum(w.sum(axis=1), 1.0)

    cell = y * k + y_pred  # confusion cell of each sample
    onehot = np.zeros((n, k * k))
    onehot[np.arange(n), cell] = 1.0
    cm = (w @ onehot).reshape(n_boot, k, k)  # [B, true, pred]
    diag = np.diagonal(cm, axis1=1, axis2=2)
    row = cm.sum(axis=2)
    col = cm.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(row > 0, diag / np.maximum(row, 1), 0.0)
        precision = np.where(col > 0, diag / np.maximum(col, 1), 0.0)
        f1 = np.where(
            precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, _EPS), 0.0
        )
    stats: dict[str, np.ndarray] = {
        "accuracy": diag.sum(axis=1) / total,
        "macro_f1": f1.mean(axis=1),
        "log_loss": w @ -np.log(np.clip(p[np.arange(n), y], _EPS, 1.0)) / total,
    }
    if k == 2:
        stats["sensitivity"] = np.where(row[:, 1] > 0, recall[:, 1], np.nan)
        stats["specificity"] = np.where(row[:, 0] > 0, recall[:, 0], np.nan)
        order, bounds = _ties(rank_score(p, 1))
        stats["auc"] = _weighted_auc(w * (y == 1), w * (y == 0), order, bounds)
    else:
        aucs = []
        for i in range(k):
            order, bounds = _ties(rank_score(p, i))
            aucs.append(_weighted_auc(w * (y == i), w * (y != i), order, bounds))
        stats["auc"] = np.mean(np.stack(aucs, axis=1), axis=1)  # NaN when a class is missing

    alpha = (1.0 - level) / 2.0
    out: dict = {}
    undefined: dict[str, int] = {}
    for name, vals in stats.items():
        finite = vals[np.isfinite(vals)]
        if len(finite) < len(vals):
            undefined[name] = int(len(vals) - len(finite))
        out[name] = ([float(np.quantile(finite, alpha)), float(np.quantile(finite, 1 - alpha))]
                     if len(finite) else None)
    exact = _exact_at_bounds(out, y, y_pred, k, groups, level)
    if exact:
        out["exact_at_bound"] = exact
    if k > 2:
        out["per_class_recall"] = _per_class_recall_ci(recall, row, y, y_pred, classes, groups, level)
    if _auc_at_bounds(out, y, k, groups, level):
        out["auc_score_bound"] = True
    f1 = out.get("macro_f1")
    if f1 is not None and f1[0] == f1[1] and f1[0] in (0.0, 1.0):
        out["point_at_bound"] = ["macro_f1"]  # no exact interval for an F1: the report says so
    if undefined:  # resamples drawing no image of a class the metric needs: the interval is conditional
        out["undefined_resamples"] = undefined
    # an interval of no width left after the bounds above: every resample gave the same value (one patient
    # holding every image of a class), which is no measure of certainty, and the report says so
    flat = [name for name in stats if isinstance(out.get(name), list) and out[name][0] == out[name][1]
            and name not in (out.get("point_at_bound") or ())]
    if flat:
        out["no_width"] = flat
    out["n_boot"] = int(n_boot)
    out["level"] = float(level)
    return out


def _exact_at_bounds(out: dict, y: np.ndarray, y_pred: np.ndarray, k: int, groups: Sequence | None,
                     level: float) -> list[str]:
    """Replace the degenerate percentile interval of a proportion observed at 0 or 1 by the exact
    Clopper-Pearson interval; return the names replaced.

    Why: when all 12 positives are found, every resample finds all of them, and the percentile interval
    is [1.00, 1.00], a certainty that 12 images cannot give. Clopper-Pearson at x = n is
    [(alpha/2)^(1/n), 1] (at x = 0 its mirror). n counts patients, the bootstrap's resampling unit (images
    without patient ids), so several images of one patient are not counted as independent evidence.
    """
    ids = np.asarray(groups if groups is not None else np.arange(len(y)), dtype=object)
    counted = {"accuracy": np.ones(len(y), dtype=bool)}
    if k == 2:
        counted.update(sensitivity=y == 1, specificity=y == 0)
    replaced = []
    for name, mask in counted.items():
        if not mask.any() or out.get(name) is None:
            continue
        hits = y_pred[mask] == y[mask]
        if 0 < hits.sum() < len(hits):
            continue
        out[name] = list(exact_interval_at_bound(len(set(ids[mask].tolist())), bool(hits.all()), level))
        replaced.append(name)
    return replaced


def _per_class_recall_ci(recall: np.ndarray, row: np.ndarray, y: np.ndarray, y_pred: np.ndarray,
                         classes: Sequence[str], groups: Sequence | None, level: float) -> dict:
    """{class: [lo, hi] of its recall, or None where the split has no image of it}, for more than two
    classes: percentile intervals over the resamples that drew the class, the exact Clopper-Pearson
    interval over its patients where every or no image of it was found.

    Why: a 3-class run's virus recall of 0.44 on 18 images came without an interval (the patient bootstrap
    gives [0.19, 0.71]); binary runs have theirs as sensitivity and specificity."""
    ids = np.asarray(groups if groups is not None else np.arange(len(y)), dtype=object)
    alpha = (1.0 - level) / 2.0
    out: dict = {}
    for i, cls in enumerate(str(c) for c in classes):
        mask = y == i
        vals = recall[:, i][row[:, i] > 0]
        if not mask.any() or not len(vals):
            out[cls] = None
            continue
        hits = y_pred[mask] == i
        if hits.all() or not hits.any():
            out[cls] = list(exact_interval_at_bound(len(set(ids[mask].tolist())), bool(hits.all()), level))
        else:
            out[cls] = [float(np.quantile(vals, alpha)), float(np.quantile(vals, 1 - alpha))]
    return out


def exact_interval_at_bound(m: int, all_hit: bool, level: float = 0.95) -> tuple[float, float]:
    """The exact Clopper-Pearson interval of a proportion observed at 1 (``all_hit``) or at 0 over ``m``
    counted units: [(alpha/2)^(1/m), 1], or its mirror.

    Why a function of its own: every proportion the report shows with an interval (the leaderboard's, the
    per-subtype sensitivities) must replace the percentile bootstrap's point [1, 1] the same way; m counts
    the bootstrap's resampling unit (patients, else images)."""
    edge = float(((1.0 - level) / 2.0) ** (1.0 / m))
    return (edge, 1.0) if all_hit else (0.0, 1.0 - edge)


def _auc_at_bounds(out: dict, y: np.ndarray, k: int, groups: Sequence | None, level: float) -> bool:
    """Replace the point interval [1, 1] of a perfectly separating AUC (or [0, 0]) by a score-type
    bound; return whether it did.

    Why: perfect separation holds in every resample, so the percentile interval claimed a certainty no
    finite test split gives (small demo and per-subtype test sets do reach AUC 1). There is no exact
    interval for an AUC; the bound used is the AUC theta at which Hanley and McNeil's standard error puts
    the observed 1 exactly z standard errors away, ``1 - theta = z * SE(theta)``, with the variance in
    Newcombe's symmetric form (m - 1 and n - 1 both replaced by N* - 1, N* = (m + n) / 2; the
    denominator keeps m n). m and n count positive and negative patients (images without patient ids),
    the bootstrap's resampling unit. For a
    multi-class macro AUC each class's one-vs-rest bound is taken and the bounds are averaged.
    """
    ci = out.get("auc")
    if ci is None or ci[0] != ci[1] or ci[0] not in (0.0, 1.0):
        return False
    z = _normal_quantile(1.0 - (1.0 - level) / 2.0)
    ids = np.asarray(groups if groups is not None else np.arange(len(y)), dtype=object)
    bounds = []
    for i in [1] if k == 2 else range(k):
        m, n = len(set(ids[y == i].tolist())), len(set(ids[y != i].tolist()))
        if m == 0 or n == 0:
            return False
        bounds.append(auc_score_bound(m, n, z))
    edge = float(np.mean(bounds))
    out["auc"] = [edge, 1.0] if ci[0] == 1.0 else [0.0, 1.0 - edge]
    return True


def auc_score_bound(m: int, n: int, z: float) -> float:
    """The lower bound theta of an observed AUC of 1 with m positives and n negatives: the root of
    ``1 - theta = z * SE(theta)`` below 1 (see :func:`_auc_at_bounds`), by bisection.

    Hanley-McNeil's variance, theta (1 - theta) [1 + (m-1) Q1' + (n-1) Q2'] / (m n) with
    Q1' = (1 - theta) / (2 - theta) and Q2' = theta / (1 + theta), uses N* - 1 for both m - 1 and n - 1
    (Newcombe), so the bound does not depend on which class is called positive. The left side minus
    the right is positive at theta = 0 and negative just below 1, so the root is bracketed.
    """
    half = (m + n) / 2.0 - 1.0

    def gap(t: float) -> float:
        var = t * (1.0 - t) * (1.0 + half * ((1.0 - t) / (2.0 - t) + t / (1.0 + t))) / (m * n)
        return (1.0 - t) - z * float(np.sqrt(max(var, 0.0)))

    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2.0
        if gap(mid) >= 0.0:
            lo = mid
        else:
            hi = mid
    return lo


def _normal_quantile(q: float) -> float:
    """The standard normal quantile."""
    from statistics import NormalDist

    return NormalDist().inv_cdf(q)
