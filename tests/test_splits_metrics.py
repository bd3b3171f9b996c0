"""Grouped splits never share a patient; metrics, thresholds and bootstrap CIs are right."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import f1_score, roc_auc_score

from featcache.errors import ConfigError, DataError
from featcache.metrics import bootstrap_ci, choose_threshold, classification_metrics
from featcache.splits import grouped_holdout, grouped_kfold, index_digest


def _layout(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A random patient layout: 6-40 patients, 1-6 images each, 2-3 classes, patient-level label."""
    n_pat = int(rng.integers(6, 41))
    n_cls = int(rng.integers(2, 4))
    sizes = rng.integers(1, 7, n_pat)
    pat_label = rng.integers(0, n_cls, n_pat)
    pat_label[:n_cls] = np.arange(n_cls)  # every class present
    groups = np.repeat(np.arange(n_pat), sizes)
    y = pat_label[groups]
    perm = rng.permutation(len(y))
    return y[perm], np.array([f"p{g}" for g in groups[perm]])


def test_kfold_never_shares_a_patient_on_thousands_of_layouts() -> None:
    rng = np.random.default_rng(0)
    for trial in range(1500):
        y, groups = _layout(rng)
        k = int(rng.integers(2, 6))
        if trial % 2:
            folds = grouped_kfold(y, groups, n_splits=k, seed=trial)
            seen_val = np.concatenate([va for _, va in folds])
            assert sorted(seen_val.tolist()) == list(range(len(y)))  # each image validated once
        else:
            folds = [grouped_holdout(y, groups, fraction=float(rng.uniform(0.1, 0.6)), seed=trial)]
        for tr, va in folds:
            assert len(tr) and len(va)
            assert not set(groups[tr]) & set(groups[va])
            assert len(np.intersect1d(tr, va)) == 0
            assert len(tr) + len(va) == len(y)


def test_holdout_fraction_is_the_nearest_fold_share() -> None:
    """K was round(1 / fraction), and Python rounds 2.5 to 2: --val-fraction 0.4 and 0.6 both gave a 50%
    hold-out. The nearest 1/K is taken now (0.4 -> 33%, 0.6 -> 67%); 0.2 stays 20%."""
    groups = np.repeat(np.arange(300), 2)
    y = (np.arange(300) % 3 == 0).astype(int)[groups]
    for asked, share in ((0.2, 1 / 5), (0.3, 1 / 3), (0.4, 1 / 3), (0.45, 1 / 2), (0.6, 2 / 3), (0.8, 4 / 5)):
        _, va = grouped_holdout(y, groups, asked, seed=0)
        assert len(va) / len(y) == pytest.approx(share, abs=0.01), asked
    # runs made under the old rule must not count as done where the split changed (fit hashes this)
    from featcache.splits import holdout_rule_change

    changed = {round(f / 100, 2) for f in range(1, 100) if holdout_rule_change(f / 100) is not None}
    assert {0.4, 0.6} <= changed and not {0.2, 0.25, 0.3, 0.5} & changed
    assert holdout_rule_change(0.4) == 3 and holdout_rule_change(0.2) is None


def test_holdout_fraction_stratified_and_seeded() -> None:
    rng = np.random.default_rng(1)
    groups = np.repeat(np.arange(200), 3)
    y = (rng.random(200) < 0.3).astype(int)[groups]
    tr, va = grouped_holdout(y, groups, 0.2, seed=3)
    assert abs(len(va) / len(y) - 0.2) < 0.03
    assert abs(y[va].mean() - y.mean()) < 0.05
    tr2, va2 = grouped_holdout(y, groups, 0.2, seed=3)
    assert index_digest(va) == index_digest(va2)
    _, va3 = grouped_holdout(y, groups, 0.2, seed=4)
    assert index_digest(va) != index_digest(va3)


def test_split_errors() -> None:
    with pytest.raises(DataError, match="patients"):
        grouped_kfold([0, 1, 0], ["a", "b", "a"], n_splits=5)
    with pytest.raises(ConfigError):
        grouped_holdout([0, 1], ["a", "b"], fraction=1.5)


def test_binary_metrics_match_sklearn() -> None:
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 300)
    p1 = np.clip(0.3 * y + rng.random(300) * 0.7, 0, 1)
    proba = np.stack([1 - p1, p1], 1)
    m = classification_metrics(y, proba, ["NORMAL", "PNEUMONIA"], threshold=0.6)
    pred = (p1 >= 0.6).astype(int)
    assert m["accuracy"] == pytest.approx(np.mean(pred == y))
    assert m["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert m["auc"] == pytest.approx(roc_auc_score(y, p1))
    tp = int(((pred == 1) & (y == 1)).sum())
    assert m["sensitivity"] == pytest.approx(tp / (y == 1).sum())
    assert m["confusion"][1][1] == tp
    assert len(m["roc"]["fpr"]) <= 101 and m["roc"]["fpr"][0] == 0.0 and m["roc"]["tpr"][-1] == 1.0


def test_multiclass_metrics_ovr_auc() -> None:
    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, 200)
    logits = rng.normal(size=(200, 3)) + 1.5 * np.eye(3)[y]
    proba = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    m = classification_metrics(y, proba, ["normal", "bacteria", "virus"])
    assert m["auc"] == pytest.approx(roc_auc_score(y, proba, multi_class="ovr", average="macro"))
    assert "sensitivity" not in m and set(m["per_class"]) == {"normal", "bacteria", "virus"}
    assert np.array(m["confusion"]).sum() == 200


def test_saturated_float32_probabilities_are_ranked_by_the_other_class() -> None:
    """An overfit MLP gave P(pneumonia) = 0.99999994 (float32's largest below 1) to every test image while
    P(normal) still ranged 1e-20..1e-15: ranked on P(pneumonia) alone the AUC was 0.500 with a zero-width
    interval; its ranking lies in P(normal), as in the log-odds."""
    from featcache.metrics import rank_score
    from featcache.report.collect import Predictions
    from featcache.report.scores import auc, scores

    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(20, int), np.ones(40, int)]
    exponent = np.where(y == 1, rng.uniform(18, 20, 60), rng.uniform(15, 17.5, 60))  # a near-perfect ranking
    p0 = (10.0 ** -exponent).astype(np.float32)
    p0[0] = 1e-19  # one normal image among the pneumonia ones
    proba = np.column_stack([p0, np.full(60, np.float32(1) - np.float32(2.0**-24))]).astype(np.float32)
    m = classification_metrics(y, proba, ["NORMAL", "PNEUMONIA"])
    truth = roc_auc_score(y, np.log(proba[:, 1].astype(float)) - np.log(proba[:, 0].astype(float)))
    assert m["auc"] == pytest.approx(truth) and truth > 0.9
    ci = bootstrap_ci(y, proba, ["NORMAL", "PNEUMONIA"], n_boot=200, seed=0)["auc"]
    assert min(ci) > 0.9  # not a zero-width interval at 0.5
    pred = Predictions([f"{i}.png" for i in range(60)], y, proba.astype(np.float64), ["NORMAL", "PNEUMONIA"])
    assert auc(pred) == pytest.approx(truth)
    assert scores(pred)["average_precision"] > 0.9
    # without ties in P(class 1) the score is P(class 1) itself: every earlier number stays as it was
    q = rng.uniform(size=60)
    plain = np.column_stack([1 - q, q])
    assert rank_score(plain, 1) is not None and np.array_equal(rank_score(plain, 1), q)
    assert classification_metrics(y, plain, ["a", "b"])["auc"] == pytest.approx(roc_auc_score(y, q))


def test_real_ties_stay_ties_when_the_other_classes_total_differs_by_rounding_alone() -> None:
    """Two images with the same P(class) whose other probabilities add to 1.0 and 0.9999999999999999
    were ranked by that rounding: a kNN's 3-class AUC was 0.8895 where scikit-learn's is 0.8854. Such a
    tie now counts a half, as scikit-learn counts it."""
    from featcache.metrics import rank_score

    proba = np.array([[.1, .1 + .2, .6], [.1, .3, .6], [.8, .1, .1], [.05, .05, .9]])
    y = np.array([0, 1, 0, 2])
    assert classification_metrics(y, proba, ["a", "b", "c"])["auc"] == pytest.approx(
        roc_auc_score(y, proba, multi_class="ovr"))
    knn = np.array([[0.0, 0.6, 0.4], [0.0, 0.7, 0.30000000000000004], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    assert rank_score(knn, 0)[0] == rank_score(knn, 0)[1]  # P = 0 for both: a tie
    assert classification_metrics([1, 0, 0, 1], knn, ["a", "b", "c"])["auc"] is None  # no class c
    yk = np.array([1, 0, 0, 2])
    knn[3] = [0.0, 0.0, 1.0]
    assert classification_metrics(yk, knn, ["a", "b", "c"])["auc"] == pytest.approx(
        roc_auc_score(yk, knn, multi_class="ovr"))
    # float32 probabilities (what heads store): 0.3 + 0.2 is 0.5000000149 and 0.25 + 0.25 is 0.5, which
    # broke the tie in P(class 0) = 0.5 (macro AUC 0.806 against 0.861: a statistics audit)
    f32 = np.array([[0.5, 0.3, 0.2], [0.5, 0.25, 0.25], [0.2, 0.7, 0.1], [0.1, 0.2, 0.7], [0.6, 0.2, 0.2]],
                   np.float32)
    y32 = np.array([0, 1, 1, 2, 0])
    assert rank_score(f32, 0)[0] == rank_score(f32, 0)[1]
    assert classification_metrics(y32, f32, ["a", "b", "c"])["auc"] == pytest.approx(
        roc_auc_score(y32, f32.astype(np.float64), multi_class="ovr"))


def test_paired_difference_and_roc_curves_rank_saturated_probabilities_as_the_auc_does() -> None:
    """The report's paired test (best run vs next) and the stored 3-class ROC curves ranked on P(class i)
    alone: two runs with the same ranking and the same AUC differed by -0.4 "significantly", and a
    saturated class's curve was the diagonal next to its AUC of 0.9."""
    from featcache.report.collect import Predictions
    from featcache.report.scores import paired_difference

    rng = np.random.default_rng(1)
    y = np.r_[np.zeros(20, int), np.ones(40, int)]
    exponent = np.where(y == 1, rng.uniform(18, 20, 60), rng.uniform(15, 17.5, 60))
    p0 = 10.0 ** -exponent
    p0[:2] = 1e-19  # two normal images among the pneumonia ones: an AUC below 1
    saturated = np.column_stack([p0, np.full(60, 1 - 2.0**-24)])
    odds = -np.log(p0)  # the same ranking, unsaturated
    plain = np.column_stack([1 - odds / odds.max(), odds / odds.max()])
    names = [f"{i}.png" for i in range(60)]
    diff = paired_difference(Predictions(names, y, saturated, ["NORMAL", "PNEUMONIA"]),
                             Predictions(names, y, plain, ["NORMAL", "PNEUMONIA"]), n_boot=200)
    assert diff["auc"] == pytest.approx((0.0, 0.0, 0.0), abs=1e-12)
    # 3 classes: class 2 saturated for every image, its ranking in the other two
    y3 = np.where(y == 1, 2, rng.integers(0, 2, 60))
    three = np.column_stack([p0 / 2, p0 / 2, np.full(60, 1 - 2.0**-24)])
    m = classification_metrics(y3, three, ["normal", "bacteria", "virus"])
    curve = m["roc"]["virus"]
    area = float(np.sum(np.diff(curve["fpr"]) * (np.array(curve["tpr"][1:]) + curve["tpr"][:-1]) / 2))
    assert area == pytest.approx(roc_auc_score(y3 == 2, odds)) and area > 0.9
    assert max(curve["thresholds"]) <= 1.0  # shown as P(virus), not as dense ranks


def test_choose_threshold() -> None:
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.3, 0.75, 0.7, 0.8, 0.9, 0.95])
    # Youden: threshold 0.8 gives sens .75 spec 1.0 (J=.75); 0.7 gives sens 1 spec .75 (J=.75): first max
    # the threshold lies midway to the next lower score: the same split, no image on the boundary
    t = choose_threshold(y, p, "youden")
    assert t in (pytest.approx(0.725), pytest.approx(0.775))
    assert choose_threshold(y, p, "sensitivity", target_sensitivity=1.0) == pytest.approx(0.5)
    assert choose_threshold(y, p, "sensitivity", target_sensitivity=0.75) == pytest.approx(0.775)
    assert choose_threshold([0, 1, 1], [0.6, 0.1, 0.2], "sensitivity", target_sensitivity=1.0) == 0.05
    assert choose_threshold([0, 1], [0.1, 0.9], "youden") == pytest.approx(0.5)
    assert choose_threshold([1, 1], [0.2, 0.9]) == 0.5
    # adjacent floats: the midpoint rounded onto the negative's score, which then counted as positive
    neg = 0.8346938775510204
    pos = float(np.nextafter(neg, 1.0))
    t = choose_threshold([0, 1], [neg, pos], "youden")
    assert neg < t <= pos


def test_intervals_without_width_and_undefined_resamples_are_named() -> None:
    """A statistics audit: a test split whose positives are one patient (3 of 4 found) got sensitivity
    [0.75, 0.75] with no flag (it is not at 0 or 1, so no exact interval replaced it), and the resamples
    that drew no positive were dropped while n_boot still said 1000."""
    y = np.array([1, 1, 1, 1] + [0] * 10)
    p1 = np.array([0.9, 0.8, 0.7, 0.2] + [0.1] * 9 + [0.6])
    groups = ["p0"] * 4 + [f"n{i}" for i in range(10)]
    ci = bootstrap_ci(y, np.c_[1 - p1, p1], ["NORMAL", "PNEUMONIA"], 0.5, n_boot=500, seed=0, groups=groups)
    assert ci["sensitivity"] == [0.75, 0.75] and "sensitivity" in ci["no_width"]
    dropped = ci["undefined_resamples"]["sensitivity"]
    assert 0 < dropped < 500 and ci["undefined_resamples"]["auc"] == dropped  # no p0 drawn: no positive
    assert "specificity" not in ci["no_width"] and ci["n_boot"] == 500


def test_bootstrap_ci_matches_loop_and_is_seeded() -> None:
    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, 120)
    p1 = np.clip(0.35 * y + rng.random(120) * 0.65, 0, 1)
    proba = np.stack([1 - p1, p1], 1)
    ci = bootstrap_ci(y, proba, ["a", "b"], threshold=0.5, n_boot=400, seed=7)
    assert ci == bootstrap_ci(y, proba, ["a", "b"], threshold=0.5, n_boot=400, seed=7)
    # same resamples via an explicit loop: counts -> indices
    w = np.random.default_rng(7).multinomial(120, np.full(120, 1 / 120), size=400)
    aucs, accs = [], []
    for row in w:
        idx = np.repeat(np.arange(120), row)
        aucs.append(roc_auc_score(y[idx], p1[idx]))
        accs.append(np.mean((p1[idx] >= 0.5) == y[idx]))
    assert ci["auc"] == pytest.approx([np.quantile(aucs, 0.025), np.quantile(aucs, 0.975)])
    assert ci["accuracy"] == pytest.approx([np.quantile(accs, 0.025), np.quantile(accs, 0.975)])
    point = classification_metrics(y, proba, ["a", "b"])
    assert ci["auc"][0] < point["auc"] < ci["auc"][1]


def test_bootstrap_multiclass_runs() -> None:
    rng = np.random.default_rng(5)
    y = rng.integers(0, 3, 90)
    proba = rng.dirichlet(np.ones(3), 90)
    ci = bootstrap_ci(y, proba, ["a", "b", "c"], n_boot=200)
    assert 0.0 <= ci["accuracy"][0] <= ci["accuracy"][1] <= 1.0
    assert ci["auc"][0] < 0.5 < ci["auc"][1] + 0.1


def test_bootstrap_gives_each_class_recall_an_interval_for_more_than_two_classes() -> None:
    """A 3-class run's virus recall came without an interval (binary runs have sensitivity and specificity).
    Each class's recall now gets the percentile interval of the same resamples (checked against a loop),
    the exact interval where every or no image of the class was found, and None for a class absent here."""
    rng = np.random.default_rng(9)
    y = np.array([0] * 20 + [1] * 20 + [2] * 18)
    y_pred = np.where(y == 0, 0, np.where(rng.random(len(y)) < 0.5, y, 3 - y))  # class 0 always found
    proba = np.full((len(y), 3), 0.1)
    proba[np.arange(len(y)), y_pred] = 0.8
    ci = bootstrap_ci(y, proba, ["normal", "bacteria", "virus"], n_boot=300, seed=3)
    per = ci["per_class_recall"]
    assert per["normal"] == pytest.approx([0.025 ** (1 / 20), 1.0])  # all 20 found: Clopper-Pearson
    w = np.random.default_rng(3).multinomial(len(y), np.full(len(y), 1 / len(y)), size=300)
    for i, cls in ((1, "bacteria"), (2, "virus")):
        recalls = [np.sum(r[y == i] * (y_pred[y == i] == i)) / r[y == i].sum() for r in w if r[y == i].sum()]
        assert per[cls] == pytest.approx([np.quantile(recalls, 0.025), np.quantile(recalls, 0.975)])
        assert per[cls][0] < np.mean(y_pred[y == i] == i) < per[cls][1]
    absent = bootstrap_ci(y[y < 2], proba[y < 2], ["normal", "bacteria", "virus"], n_boot=50)
    assert absent["per_class_recall"]["virus"] is None
    two = bootstrap_ci(y[y < 2], proba[y < 2][:, :2], ["normal", "bacteria"], n_boot=50)
    assert "per_class_recall" not in two  # binary: sensitivity and specificity say it


def test_a_proportion_at_0_or_1_gets_the_exact_interval_not_a_point() -> None:
    """All 12 positives found: every resample finds all of them, so the percentile interval was
    [1.00, 1.00]. It is the Clopper-Pearson interval over the patients counted instead, and named."""
    from scipy.stats import beta

    y = np.array([0] * 30 + [1] * 12)
    p1 = np.where(y == 1, 0.8, 0.1)
    p1[0] = 0.7  # one false positive: specificity 29/30 keeps its percentile interval
    proba = np.column_stack([1 - p1, p1])
    ci = bootstrap_ci(y, proba, ["n", "p"], threshold=0.5, n_boot=300, seed=0)
    assert ci["exact_at_bound"] == ["sensitivity"]
    assert ci["sensitivity"] == pytest.approx([beta.ppf(0.025, 12, 1), 1.0])  # 0.735: 12 images say no more
    assert ci["specificity"][1] == 1.0 and 0.85 < ci["specificity"][0] < 29 / 30
    # by patients (3 images each): 4 positive patients, a far wider interval; all wrong: the mirror image
    pats = [i // 3 for i in range(42)]
    by_pat = bootstrap_ci(y, proba, ["n", "p"], threshold=0.5, n_boot=300, seed=0, groups=pats)
    assert by_pat["sensitivity"] == pytest.approx([beta.ppf(0.025, 4, 1), 1.0])
    wrong = bootstrap_ci(y, proba[:, ::-1], ["n", "p"], threshold=0.5, n_boot=300, seed=0)
    assert set(wrong["exact_at_bound"]) == {"sensitivity"} and wrong["sensitivity"] == pytest.approx(
        [0.0, 1 - (0.025) ** (1 / 12)])
    assert ci["accuracy"][0] < ci["accuracy"][1] and "accuracy" not in ci["exact_at_bound"]


def test_a_target_sensitivity_gets_the_highest_threshold_reaching_it() -> None:
    """roc_curve dropped the points inside a vertical segment, so the first point reaching 0.9 was the
    segment's top: threshold 0.525 with sensitivity 0.95, although 0.571 reaches 0.90 (a better
    specificity on new images)."""
    y = np.array([1] * 20 + [0] * 20)
    s = np.r_[np.linspace(0.95, 0.55, 20), np.linspace(0.5, 0.05, 20)]
    s[0] = 0.3  # one positive ranked low
    t = choose_threshold(y, s, "sensitivity", 0.9)
    highest = max(th for th in np.unique(s) if np.mean(s[y == 1] >= th) >= 0.9)
    assert np.mean(s[y == 1] >= t) == 0.9 and highest > t > max(s[s < highest])  # midway below it


def test_the_report_scores_as_fit_records() -> None:
    """The report recomputes its numbers from the CSVs with fit's definitions: macro F1 over every class
    (0.97 against metrics.json's 0.65 for a 3-class hold-out without a virus image), no 3-class AUC then,
    fit's log-loss clip (it clipped a probability of 1e-12 at 1e-7) and the 0.5 rule at a tie."""
    from featcache.report.collect import Predictions
    from featcache.report.scores import scores

    def both(y, p, classes, thr):
        return classification_metrics(y, p, classes), scores(Predictions([f"i{i}" for i in range(len(y))],
                                                                      y, p, classes, None), thr)

    y = np.array([0] * 10 + [1] * 10)
    p = np.full((20, 3), 0.1)
    p[:10, 0], p[10:, 1], p[3] = 0.8, 0.8, [0.1, 0.1, 0.8]  # one normal called virus
    fit_m, rep = both(y, p, ["normal", "bacteria", "virus"], None)
    assert rep["macro_f1"] == pytest.approx(fit_m["macro_f1"]) == pytest.approx(
        f1_score(y, p.argmax(1), average="macro", labels=[0, 1, 2], zero_division=0))
    assert fit_m["auc"] is None and np.isnan(rep["auc"])
    y2 = np.array([1, 1, 1, 0])  # the first image: P(true class) = 1e-12
    p2 = np.array([[1 - 1e-12, 1e-12], [0.2, 0.8], [0.3, 0.7], [0.6, 0.4]])
    fit_m, rep = both(y2, p2, ["a", "b"], 0.5)
    assert rep["loss"] == pytest.approx(fit_m["log_loss"]) and rep["loss"] > 6.5  # 1e-7 clip: 4.3
    fit_m, rep = both(np.array([1, 0]), np.array([[0.5, 0.5], [0.9, 0.1]]), ["a", "b"], None)
    assert rep["accuracy"] == fit_m["accuracy"] == 1.0


def test_a_perfect_auc_gets_a_score_bound_not_a_point() -> None:
    """Perfect separation holds in every resample, so the percentile interval of an AUC of 1 was
    [1.00, 1.00]. It is the score-type bound now: the theta at which Hanley-McNeil's standard error (in
    Newcombe's symmetric form) puts 1 at 1.96 SE, over the positive and negative patients counted."""
    from featcache.metrics import auc_score_bound

    z = 1.959963984540054

    def se(t: float, m: int, n: int) -> float:  # written out independently of the module's form
        q1, q2, ns = t / (2 - t), 2 * t * t / (1 + t), (m + n) / 2
        return float(np.sqrt((t * (1 - t) + (ns - 1) * (q1 - t * t) + (ns - 1) * (q2 - t * t)) / (m * n)))

    for m, n in [(10, 10), (12, 100), (3, 40), (300, 200)]:
        t = auc_score_bound(m, n, z)
        assert 0.0 < t < 1.0 and 1 - t == pytest.approx(z * se(t, m, n), rel=1e-9)
        assert auc_score_bound(n, m, z) == t  # which class is positive does not matter
    assert auc_score_bound(10, 10, z) == pytest.approx(0.8002, abs=1e-4)  # 10 + 10 cannot say 0.95
    assert auc_score_bound(300, 200, z) > auc_score_bound(30, 20, z)  # more patients, a tighter bound

    y = np.array([0] * 10 + [1] * 10)
    p1 = np.where(y == 1, 0.9, 0.2)
    p1[0] = 0.6  # a false positive at 0.5 that still ranks below every positive: AUC 1
    proba = np.column_stack([1 - p1, p1])
    ci = bootstrap_ci(y, proba, ["n", "p"], n_boot=300, seed=0)
    assert ci["auc"] == pytest.approx([auc_score_bound(10, 10, z), 1.0]) and ci["auc_score_bound"] is True
    assert "point_at_bound" not in ci  # one error: macro F1 varies over resamples
    by_pat = bootstrap_ci(y, proba, ["n", "p"], n_boot=300, seed=0, groups=[i // 2 for i in range(20)])
    assert by_pat["auc"] == pytest.approx([auc_score_bound(5, 5, z), 1.0])  # 5 + 5 patients: wider
    reversed_ = bootstrap_ci(y, proba[:, ::-1], ["n", "p"], n_boot=300, seed=0)
    assert reversed_["auc"] == pytest.approx([0.0, 1 - auc_score_bound(10, 10, z)])
    p1[0] = 0.95  # now a negative outranks every positive: AUC < 1, the percentile interval stays
    ci = bootstrap_ci(y, np.column_stack([1 - p1, p1]), ["n", "p"], n_boot=300, seed=0)
    assert "auc_score_bound" not in ci and ci["auc"][0] < ci["auc"][1] == 1.0
    y3 = np.repeat([0, 1, 2], 8)  # three classes, all right: the mean of the one-vs-rest bounds
    ci3 = bootstrap_ci(y3, np.eye(3)[y3] * 0.8 + 0.2 / 3, ["a", "b", "c"], n_boot=300, seed=0)
    assert ci3["auc"] == pytest.approx([auc_score_bound(8, 16, z), 1.0])
    assert ci3["point_at_bound"] == ["macro_f1"] and ci3["macro_f1"] == [1.0, 1.0]


def test_bootstrap_resamples_whole_patients_when_groups_are_given() -> None:
    from featcache.metrics import bootstrap_weights

    groups = ["p1", "p1", "p2", "p3", "p3", "p3"]
    w = bootstrap_weights(6, 300, seed=1, groups=groups)
    assert np.all(w[:, 0] == w[:, 1]) and np.all(w[:, 3] == w[:, 4]) and np.all(w[:, 4] == w[:, 5])
    assert np.all(w[:, [0, 2, 3]].sum(axis=1) == 3)  # 3 patients drawn per replicate
    # 40 patients with 5 identical-outcome images each: patient-level CIs are wider than image-level ones
    rng = np.random.default_rng(0)
    right = rng.random(40) < 0.8
    y = np.repeat(rng.integers(0, 2, 40), 5)
    pred = np.where(np.repeat(right, 5), y, 1 - y)
    proba = np.column_stack([1.0 - pred, pred]).astype(float) * 0.8 + 0.1
    pats = np.repeat([f"p{i}" for i in range(40)], 5)
    by_img = bootstrap_ci(y, proba, ["a", "b"], n_boot=500, seed=3)
    by_pat = bootstrap_ci(y, proba, ["a", "b"], n_boot=500, seed=3, groups=pats)
    width = lambda ci: ci["accuracy"][1] - ci["accuracy"][0]  # noqa: E731
    assert width(by_pat) > 1.6 * width(by_img)
    assert by_pat["accuracy"][0] <= np.mean(pred == y) <= by_pat["accuracy"][1]


def test_youden_without_skill_keeps_the_default_threshold() -> None:
    """One probability for every validation image (knn with k larger than the data): no threshold beats
    chance, and Youden's first maximum was "above every score", a threshold of 1.0 that called every test
    image negative (test accuracy 0.333 on a 2:1 split)."""
    from featcache.metrics import choose_threshold

    assert choose_threshold([0, 1, 1, 0, 1], [0.6] * 5, "youden") == 0.5
    assert choose_threshold([1, 0], [0.2, 0.8], "youden") == 0.5  # worse than chance: no skill either
    assert choose_threshold([0, 1], [0.2, 0.8], "youden") == pytest.approx(0.5)  # a real split: midway


def test_a_holdout_of_one_patient_says_so_and_names_no_flag_of_the_kfold() -> None:
    """One patient: the hold-out asked grouped_kfold for 1 fold, which refused it as "--cv-folds must be at
    least 2, got 1", an option the hold-out does not use; with more images it said "raise --val-fraction",
    which cannot add a patient."""
    from featcache.errors import DataError
    from featcache.splits import grouped_holdout, grouped_kfold

    for fraction in (0.2, 0.8):
        with pytest.raises(DataError, match=r"only 1 patient is available") as err:
            grouped_holdout([0, 1, 0, 1], ["p9"] * 4, fraction=fraction)
        assert "add images of more patients" in str(err.value) and "--" not in str(err.value)
    with pytest.raises(DataError, match="lower --cv-folds"):  # the k-fold keeps its own advice
        grouped_kfold([0, 1, 0, 1], ["p9"] * 4, n_splits=2)


def test_documented_tie_rules_youden_keeps_the_highest_threshold_argmax_the_first_class() -> None:
    """README: of thresholds with equal Youden J the highest is kept; a 3-class exact tie goes to the class
    listed first. J is 0.5 at 0.4 (midway to 0.3: 0.35) and at 0.2 (midway to 0.1: 0.15)."""
    from featcache.metrics import predict_labels

    assert choose_threshold([0, 1, 0, 1], [0.1, 0.2, 0.3, 0.4]) == pytest.approx(0.35)
    assert choose_threshold([1, 0, 1, 0], [0.4, 0.3, 0.2, 0.1]) == pytest.approx(0.35)  # not the row order
    labels = predict_labels(np.array([[0.4, 0.4, 0.2], [0.2, 0.4, 0.4], [0.3, 0.3, 0.4]]))
    assert labels.tolist() == [0, 1, 2]
