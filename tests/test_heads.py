"""Heads: learning, class weights, the fast logistic search against scikit-learn, fused MLP grids, saving."""
from __future__ import annotations

import functools
import warnings

import numpy as np
import pytest

from featcache.errors import ConfigError
from featcache.heads import HEAD_NAMES, get_head, load_fitted

warnings.filterwarnings("ignore", category=FutureWarning)


def separable(n: int = 300, d: int = 50, k: int = 2, seed: int = 0, shift: float = 2.0):
    """Gaussian blobs: class c shifts features c*8..c*8+7 by ``shift`` (linearly separable enough)."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % k
    rng.shuffle(y)
    X = rng.normal(size=(n, d))
    for c in range(k):
        X[y == c, c * 8:(c + 1) * 8] += shift
    return X.astype(np.float32), y


def folds_for(y: np.ndarray, n: int = 3):
    from sklearn.model_selection import StratifiedKFold

    return list(StratifiedKFold(n, shuffle=True, random_state=0).split(np.zeros(len(y)), y))


@pytest.mark.parametrize("name,grid", [
    ("logreg", [{"C": 0.01}, {"C": 1.0}]),
    ("svm", [{"kernel": "linear", "C": 1.0}, {"kernel": "rbf", "C": 1.0}]),
    ("knn", [{"n_neighbors": 5}, {"n_neighbors": 15, "weights": "distance"}]),
])
def test_cv_heads_learn_separable_data(name, grid, tmp_path):
    X, y = separable(k=3)
    head = get_head(name)
    res = head.search(X[:240], y[:240], folds_for(y[:240]), grid)
    assert res.best_params == grid[res.best_index]
    assert res.best_score > 0.85
    assert len(res.cv_results["mean_test_score"]) == len(grid)
    fitted = head.fit(X[:240], y[:240], res.best_params)
    proba = fitted.predict_proba(X[240:])
    assert proba.shape == (60, 3)
    assert np.allclose(proba.sum(axis=1), 1.0) and (proba >= 0).all()
    assert np.mean(proba.argmax(axis=1) == y[240:]) > 0.85
    files = fitted.save(tmp_path / "model")
    assert [f.name for f in files] == ["sklearn.joblib"]
    again = load_fitted(name, tmp_path / "model")
    assert np.allclose(again.predict_proba(X[240:]), proba)


def test_class_weight_changes_decisions_on_imbalanced_data():
    rng = np.random.default_rng(1)
    y = (rng.random(400) < 0.1).astype(int)
    X = (rng.normal(size=(400, 20)) + 0.7 * y[:, None] * (np.arange(20) < 3)).astype(np.float32)
    head = get_head("logreg")
    plain = head.fit(X, y, {"C": 1.0}).predict_proba(X).argmax(1)
    balanced = head.fit(X, y, {"C": 1.0, "class_weight": "balanced"}).predict_proba(X).argmax(1)
    explicit = head.fit(X, y, {"C": 1.0, "class_weight": {0: 1.0, 1: 9.0}}).predict_proba(X).argmax(1)
    assert balanced.sum() > 2 * plain.sum()
    assert explicit.sum() > 2 * plain.sum()


def sklearn_search(X: np.ndarray, y: np.ndarray, grid: dict, folds: list):
    """The reference: GridSearchCV over Pipeline(StandardScaler, LogisticRegression), warnings silenced."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return GridSearchCV(make_pipeline(StandardScaler(), LogisticRegression()),
                            {f"logisticregression__{k}": v for k, v in grid.items()}, cv=folds).fit(X, y)


@pytest.mark.parametrize("n,d", [(120, 300), (200, 20)])  # features outnumber samples, and the reverse
def test_fast_logistic_search_matches_sklearn(n, d):
    from featcache.heads.logreg import DEFAULT_CS, FastLogisticGridSearchCV

    X, y = separable(n, d, k=2, shift=0.6)
    X = X.astype(np.float64)
    y[:15] = 0  # mild imbalance so class_weight matters
    folds = folds_for(y, 4)
    # max_iter=1000 for both so that scikit-learn converges (at 100 it stops early for large C, and two
    # unconverged runs may legitimately differ on a test set this small)
    grid = {"C": DEFAULT_CS, "class_weight": [None, "balanced"], "max_iter": [1000]}
    ours = FastLogisticGridSearchCV(grid, cv=folds).fit(X, y)
    ref = sklearn_search(X, y, grid, folds)
    assert not ours.used_fallback_
    assert ours.best_params_ == {k.split("__")[1]: v for k, v in ref.best_params_.items()}
    diff = np.abs(np.asarray(ours.cv_results_["mean_test_score"]) - ref.cv_results_["mean_test_score"])
    assert diff.max() <= 0.005
    ref_keys = {k.replace("logisticregression__", "") for k in ref.cv_results_}
    assert ref_keys <= set(ours.cv_results_)
    p_ours = ours.best_estimator_.predict_proba(X)
    p_ref = ref.best_estimator_.predict_proba(X)
    assert np.abs(p_ours - p_ref).max() < 1e-3
    assert type(ours.best_estimator_).__name__ == "Pipeline"


def test_fast_logistic_search_duplicate_rows_matches_sklearn():
    """Duplicate rows make the fold Grams singular: the pivoted factor (rank < n) must give the same fits."""
    from featcache.heads.logreg import FastLogisticGridSearchCV

    X, y = separable(100, 260, k=2, shift=0.5)
    X, y = np.vstack([X, X[:40]]).astype(np.float64), np.concatenate([y, y[:40]])
    folds = folds_for(y, 3)
    grid = {"C": [0.01, 1.0], "class_weight": [None, "balanced"], "max_iter": [1000]}
    ours = FastLogisticGridSearchCV(grid, cv=folds).fit(X, y)
    ref = sklearn_search(X, y, grid, folds)
    assert not ours.used_fallback_
    np.testing.assert_allclose(ours.cv_results_["mean_test_score"], ref.cv_results_["mean_test_score"],
                               atol=1e-9)
    np.testing.assert_allclose(ours.best_estimator_.predict_proba(X), ref.best_estimator_.predict_proba(X),
                               atol=1e-5)


def test_pivoted_factor_reproduces_the_gram():
    from featcache.heads.logreg_space import Space, _gram

    rng = np.random.default_rng(0)
    Z = rng.normal(size=(30, 80))
    Z = np.vstack([Z, Z[:6], 2 * Z[6:9]])  # rank 30 of 39 rows
    space = Space(Z)
    assert space.r == 30 and space.L21 is not None
    F = space.mul(np.eye(space.r))
    np.testing.assert_allclose(F @ F.T, Z @ Z.T, atol=1e-8)
    for width in (1, 2, 3):  # narrow products go through ?trmv column by column, wider ones ?trmm
        R = rng.normal(size=(39, width))
        np.testing.assert_allclose(space.tmul(R), F.T @ R, atol=1e-10)
        G = rng.normal(size=(space.r, width))
        np.testing.assert_allclose(space.mul(G), F @ G, atol=1e-10)
    np.testing.assert_allclose(np.tril(_gram(Z)), np.tril(Z @ Z.T), atol=1e-10)


def test_to_w_in_row_pieces_equals_one_product():
    """``Space.to_w`` (64-row pieces for 2-24 columns, one product otherwise) is Q @ G for every width."""
    from featcache.heads.logreg_space import Space

    rng = np.random.default_rng(2)
    Z = rng.normal(size=(200, 500)).astype(np.float32)  # 200 rows: four pieces, the last one short
    space = Space(Z)
    Q = Z.T.astype(np.float64) @ np.linalg.inv(np.tril(space.L11)).T  # rows in pivot order: no pivots here
    assert space.identity
    for width in (1, 2, 5, 24, 25):
        G = rng.normal(size=(space.r, width))
        np.testing.assert_allclose(space.to_w(G), Q @ G, rtol=1e-4, atol=1e-4 * float(np.abs(Q @ G).max()))


def test_centred_rows_factor_drops_the_null_direction_exactly():
    """Standardised training rows sum to zero: Z Z^T is rank n-1, and the factor must say so without pivoting.

    Float32 rows as in the cache. A wrong ``centered`` hint (rows not centred) must still give the full-rank
    factor of the general path.
    """
    from featcache.heads.logreg_space import Space, _gram
    from featcache.heads.logreg_stats import fit_scaler, standardize

    rng = np.random.default_rng(1)
    X = np.maximum(rng.normal(size=(60, 400)) + rng.normal(size=(60, 4)) @ rng.normal(size=(4, 400)), 0)
    X = X.astype(np.float32)
    Z = standardize(fit_scaler(X), X)
    space = Space(Z, centered=True)
    assert space.r == 59 and space.prefix and space.L21 is not None
    F = space.mul(np.eye(space.r))
    K = np.tril(_gram(Z).astype(np.float64))
    K = K + np.tril(K, -1).T
    np.testing.assert_allclose(F @ F.T, K, atol=1e-3 * float(np.max(np.diag(K))))
    np.testing.assert_allclose(F[-1], -F[:-1].sum(axis=0), atol=1e-3 * float(np.abs(F).max()))
    R = rng.normal(size=(60, 3))
    np.testing.assert_allclose(space.tmul(R), F.T @ R, atol=1e-9)
    # the same rows shifted off centre: the hint is wrong, the factor must keep all 60 directions
    off = Space(Z + np.float32(0.5), centered=True)
    assert off.r == 60
    F = off.mul(np.eye(off.r))
    Zs = (Z + np.float32(0.5)).astype(np.float64)
    np.testing.assert_allclose(F @ F.T, Zs @ Zs.T, rtol=1e-4, atol=1e-2)


@pytest.mark.parametrize("widen_cols", [7, 256])
def test_float32_gram_factored_in_float32_and_widened_in_place(monkeypatch, widen_cols):
    """``_potrf``: a float32 Gram is factored by spotrf inside the float64 buffer and widened in place.

    The widened factor must be spotrf's bit for bit (an overlap bug in the in-place widening would
    corrupt columns), K must be left as it was, and a float64 K must still get dpotrf.
    """
    from scipy.linalg.lapack import dpotrf, spotrf

    from featcache.heads import logreg_space
    from featcache.heads.logreg_space import Workspace, _potrf

    monkeypatch.setattr(logreg_space, "_WIDEN_COLS", widen_cols)
    rng = np.random.default_rng(5)
    n = 300
    A = rng.normal(size=(n, n + 40)).astype(np.float32)
    K = np.asfortranarray(A @ A.T)
    K_before = K.copy(order="F")
    for m, work in ((n, None), (n - 1, Workspace(n, 2 * n, np.float32, n))):
        c, info = _potrf(K, m, work)
        assert info == 0 and c.dtype == np.float64 and c.shape == (m, m) and c.flags.f_contiguous
        expect, info_s = spotrf(K[:m, :m], lower=1)
        assert info_s == 0
        np.testing.assert_array_equal(np.tril(c), np.tril(expect).astype(np.float64))
        if work is not None:
            assert np.shares_memory(c, work.chol)
        np.testing.assert_array_equal(K, K_before)
    K64 = K.astype(np.float64, order="F")
    c, info = _potrf(K64, n, None)
    np.testing.assert_array_equal(np.tril(c), np.tril(dpotrf(K64, lower=1)[0]))
    assert _potrf(-K64, n, None)[1] == 1 and _potrf(-K, n, None)[1] == 1  # LAPACK's info comes back


def test_fold_scalers_equal_per_fold_standard_scalers():
    """Moments combined per fold equal StandardScaler on each fold's rows, for K-fold and odd splits."""
    from sklearn.preprocessing import StandardScaler

    from featcache.heads.logreg_stats import FoldScalers

    rng = np.random.default_rng(4)
    X = (rng.normal(size=(90, 12)) * rng.uniform(0.1, 30, 12) + 50).astype(np.float32)
    X[:, 3] = 2.5                       # constant everywhere
    X[:30, 7] = 1.0                     # constant on a third of the rows
    kfold = [(np.setdiff1d(np.arange(90), te), te) for te in np.array_split(rng.permutation(90), 3)]
    odd = [(np.arange(0, 60), np.arange(60, 80)), (np.arange(20, 90), np.arange(0, 20)),
           (np.arange(10, 50), np.arange(50, 70))]  # overlapping tests, rows 80-89 in no test set
    # rows listed twice or three times in a training set count as often (StandardScaler on X[train]);
    # few membership patterns, so the shared moments are used, not per-fold statistics
    repeated = [(np.concatenate([tr, tr[:20], tr[:5]]), te) for tr, te in kfold]
    for folds in (kfold, odd, repeated):
        fs = FoldScalers(X, folds)
        assert fs.parts is not None
        for j, (tr, _) in enumerate(folds):
            ref, ours = StandardScaler().fit(X[tr]), fs.fold(j)
            np.testing.assert_allclose(ours.mean_, ref.mean_, rtol=1e-12, atol=1e-10)
            np.testing.assert_allclose(ours.var_, ref.var_, rtol=1e-9, atol=1e-9)
            np.testing.assert_array_equal(ours.scale_ == 1.0, ref.scale_ == 1.0)
        np.testing.assert_allclose(fs.all_rows().var_, StandardScaler().fit(X).var_, rtol=1e-9, atol=1e-9)


def test_fast_logistic_search_multiclass_d_gt_n():
    from featcache.heads.logreg import FastLogisticGridSearchCV

    X, y = separable(90, 150, k=3)
    gs = FastLogisticGridSearchCV({"C": [0.01, 1.0]}, cv=3).fit(X.astype(np.float64), y)
    assert not gs.used_fallback_ and gs.best_score_ > 0.8
    assert gs.best_estimator_.predict_proba(X).shape == (90, 3)


def _sklearn_search(grid: dict, **kw):
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return GridSearchCV(make_pipeline(StandardScaler(), LogisticRegression()),
                        {f"logisticregression__{k}": v for k, v in grid.items()}, **kw)


def test_fast_logistic_dict_class_weights_are_keyed_by_label_as_in_sklearn():
    """The solver weighs rows by their fold-local code; a dict {label: weight} was read as codes, so with
    labels 1, 2 the weights were ignored, and with a class absent from a training fold they moved to
    another class (the two candidates below came out swapped)."""
    from sklearn.datasets import make_classification
    from sklearn.model_selection import KFold

    from featcache.heads.logreg import FastLogisticGridSearchCV

    X, y = make_classification(300, 20, weights=[0.8, 0.2], random_state=0)
    y = y + 1
    grid = {"C": [1.0], "class_weight": [{1: 1, 2: 10}]}
    ours, ref = FastLogisticGridSearchCV(grid, cv=5).fit(X, y), _sklearn_search(grid, cv=5).fit(X, y)
    assert ours.best_score_ == pytest.approx(ref.best_score_, abs=1e-9)
    np.testing.assert_allclose(ours.best_estimator_.predict_proba(X), ref.best_estimator_.predict_proba(X),
                               atol=1e-6)
    X3, y3 = make_classification(240, 20, n_classes=3, n_informative=6, random_state=1)
    order = np.argsort(y3, kind="stable")  # sorted, unshuffled folds: a training fold lacks class 0 / 2
    X3, y3 = X3[order], y3[order]
    folds = list(KFold(4).split(X3))
    grid = {"C": [1.0], "class_weight": [{0: 1, 1: 1, 2: 8}, {0: 1, 1: 8, 2: 1}]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = FastLogisticGridSearchCV(grid, cv=folds).fit(X3, y3)
        ref = _sklearn_search(grid, cv=folds).fit(X3, y3)
    np.testing.assert_allclose(ours.cv_results_["mean_test_score"], ref.cv_results_["mean_test_score"],
                               atol=1e-9)


def test_fast_logistic_dict_class_weight_with_string_labels_as_in_sklearn():
    """A dict class_weight keyed by string labels ({"NORMAL": 2.0}) was refused (its keys were forced to
    int); scikit-learn accepts it. The "2:1" shorthand weighs the sorted labels in order, as it weighs the
    codes 0, 1. A key that names no label goes to scikit-learn, which raises as it does."""
    from sklearn.datasets import make_classification

    from featcache.heads.logreg import FastLogisticGridSearchCV

    X, y = make_classification(200, 30, weights=[0.7, 0.3], random_state=0)
    labels = np.where(y == 1, "PNEUMONIA", "NORMAL")
    grid = {"C": [0.1, 1.0], "class_weight": [{"NORMAL": 2.0, "PNEUMONIA": 1.0}, {"PNEUMONIA": 5.0}]}
    ours = FastLogisticGridSearchCV(grid, cv=4).fit(X, labels)
    ref = _sklearn_search(grid, cv=4).fit(X, labels)
    assert not ours.used_fallback_
    np.testing.assert_allclose(ours.cv_results_["mean_test_score"], ref.cv_results_["mean_test_score"],
                               atol=1e-9)
    assert ours.best_params_ == {k.split("__")[1]: v for k, v in ref.best_params_.items()}
    np.testing.assert_allclose(ours.predict_proba(X), ref.predict_proba(X), atol=1e-6)
    assert list(ours.predict(X[:20])) == list(ref.predict(X[:20]))
    short = FastLogisticGridSearchCV({"C": [0.1, 1.0], "class_weight": ["2:1"]}, cv=4).fit(X, labels)
    np.testing.assert_allclose(short.cv_results_["mean_test_score"],  # C=0.1 and C=1 with {"NORMAL": 2}
                               ref.cv_results_["mean_test_score"][[0, 2]], atol=1e-9)
    with warnings.catch_warnings(), pytest.raises(ValueError, match="not in class_weight"):
        warnings.simplefilter("ignore")
        FastLogisticGridSearchCV({"C": [1.0], "class_weight": [{"NORMAL": 2.0, "OTHER": 1.0}]},
                                 cv=4).fit(X, labels)


def test_fast_logistic_dict_class_weight_missing_from_a_fold_fails_as_in_sklearn():
    """{0: 1, 2: 8} on a training fold without class 0 (or 2) makes LogisticRegression raise "The classes,
    [1], are not in class_weight" (NaN with error_score=np.nan); the fast solver weighed class 1 by 1 and
    scored the fold."""
    from sklearn.datasets import make_classification
    from sklearn.model_selection import KFold

    from featcache.heads.logreg import FastLogisticGridSearchCV

    X, y = make_classification(240, 20, n_classes=3, n_informative=6, random_state=1)
    order = np.argsort(y, kind="stable")  # sorted, unshuffled: each training fold lacks one class
    X, y = X[order], y[order]
    folds = list(KFold(3).split(X))
    grid = {"C": [1.0], "class_weight": [{0: 1, 2: 8}, {0: 1, 1: 1, 2: 8}]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="not in class_weight"):
            FastLogisticGridSearchCV(grid, cv=folds).fit(X, y)
        ours = FastLogisticGridSearchCV(grid, cv=folds, error_score=np.nan).fit(X, y)
        ref = _sklearn_search(grid, cv=folds, error_score=np.nan).fit(X, y)
    for j in range(3):
        np.testing.assert_array_equal(ours.cv_results_[f"split{j}_test_score"],
                                      ref.cv_results_[f"split{j}_test_score"])
    assert np.isnan(ours.cv_results_["split0_test_score"][0])


def test_fallback_cv_results_keys_match_the_fast_path():
    """The fallback's cv_results_ was keyed param_logisticregression__C, the fast path's param_C: a user
    switching solver saw other column names."""
    from sklearn.datasets import make_classification

    from featcache.heads.logreg import FastLogisticGridSearchCV

    X, y = make_classification(150, 12, random_state=2)
    grid = {"C": [0.1, 1.0], "class_weight": [None, {0: 1, 1: 3}]}
    fast = FastLogisticGridSearchCV(grid, cv=3).fit(X, y)
    slow = FastLogisticGridSearchCV({**grid, "solver": ["liblinear"]}, cv=3).fit(X, y)
    ref = _sklearn_search({**grid, "solver": ["liblinear"]}, cv=3).fit(X, y)
    assert not fast.used_fallback_ and slow.used_fallback_
    assert set(slow.cv_results_) == set(fast.cv_results_) | {"param_solver"}
    assert set(slow.cv_results_) == {k.replace("logisticregression__", "") for k in ref.cv_results_}
    for name in ("C", "class_weight"):
        assert list(slow.cv_results_[f"param_{name}"]) == list(fast.cv_results_[f"param_{name}"])
    np.testing.assert_array_equal(slow.cv_results_["mean_test_score"], ref.cv_results_["mean_test_score"])
    assert slow.cv_results_["params"] == [{k.split("__")[1]: v for k, v in c.items()}
                                          for c in ref.cv_results_["params"]]


def test_fast_logistic_repeated_train_rows_standardise_as_the_pipeline():
    """Bootstrap-like folds (train indices with repeats): the Pipeline's StandardScaler counts a repeated
    row as often as it is listed; the shared fold statistics counted it once, so the scores differed."""
    from sklearn.datasets import make_classification

    from featcache.heads.logreg import FastLogisticGridSearchCV

    X, y = make_classification(200, 30, weights=[0.7, 0.3], random_state=0)
    rng = np.random.default_rng(0)
    folds = []
    for _ in range(3):
        tr = rng.integers(0, 200, 200)
        folds.append((tr, np.setdiff1d(np.arange(200), tr)))
    grid = {"C": [0.01, 1.0], "class_weight": [None, "balanced"], "max_iter": [1000]}
    ours, ref = FastLogisticGridSearchCV(grid, cv=folds).fit(X, y), _sklearn_search(grid, cv=folds).fit(X, y)
    assert not ours.used_fallback_
    for j in range(3):
        np.testing.assert_allclose(ours.cv_results_[f"split{j}_test_score"],
                                   ref.cv_results_[f"split{j}_test_score"], atol=1e-9)


def test_error_score_is_honoured_by_the_fallback():
    """error_score was always "raise" on the fallback; GridSearchCV's np.nan (or a number) is honoured,
    "raise" stays the default (featcache reports the first failing fit as one sentence)."""
    from sklearn.datasets import make_classification
    from sklearn.model_selection import KFold

    from featcache.heads.logreg import FastLogisticGridSearchCV

    X, y = make_classification(120, 10, random_state=5)
    grid = {"C": [0.1, 1.0], "l1_ratio": [0.0, 1.0], "solver": ["lbfgs"]}  # l1 with lbfgs fails
    with pytest.raises(ValueError, match="l1"):
        FastLogisticGridSearchCV(grid, cv=3).fit(X, y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = FastLogisticGridSearchCV(grid, cv=3, error_score=np.nan).fit(X, y)
        ref = _sklearn_search(grid, cv=3, error_score=np.nan).fit(X, y)
        order = np.argsort(y, kind="stable")  # the first fold trains on one class only
        folds = [(np.arange(60), np.arange(60, 120)), next(KFold(3, shuffle=True, random_state=0).split(X))]
        low = FastLogisticGridSearchCV({"C": [1.0]}, cv=folds, error_score=-1.0).fit(X[order], y[order])
    assert ours.used_fallback_
    np.testing.assert_array_equal(ours.cv_results_["mean_test_score"], ref.cv_results_["mean_test_score"])
    assert np.isnan(ours.cv_results_["mean_test_score"]).sum() == 2
    assert ours.best_params_ == {k.split("__")[1]: v for k, v in ref.best_params_.items()}
    assert low.used_fallback_ and low.cv_results_["split0_test_score"][0] == -1.0
    assert low.cv_results_["split1_test_score"][0] > 0.5


def test_sample_weight_goes_to_scaler_and_classifier_as_a_routed_pipeline():
    """fit(X, y, sample_weight=...) was refused (no such argument). It falls back to GridSearchCV with the
    weights routed to StandardScaler and LogisticRegression of every fit and of the refit; scores stay
    unweighted."""
    from sklearn import config_context
    from sklearn.datasets import make_classification
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import get_scorer
    from sklearn.model_selection import GridSearchCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from featcache.heads.logreg import FastLogisticGridSearchCV

    X, y = make_classification(150, 12, random_state=2)
    sw = np.random.default_rng(0).uniform(0.2, 3.0, 150)
    folds = folds_for(y, 3)
    grid = {"C": [0.1, 1.0], "class_weight": [None, "balanced"]}
    ours = FastLogisticGridSearchCV(grid, cv=folds).fit(X, y, sample_weight=sw)
    with config_context(enable_metadata_routing=True):
        pipe = make_pipeline(StandardScaler().set_fit_request(sample_weight=True),
                             LogisticRegression().set_fit_request(sample_weight=True))
        ref = GridSearchCV(pipe, {f"logisticregression__{k}": v for k, v in grid.items()}, cv=folds,
                           scoring=get_scorer("accuracy").set_score_request(sample_weight=False))
        ref.fit(X, y, sample_weight=sw)
    assert ours.used_fallback_ and "param_C" in ours.cv_results_
    np.testing.assert_array_equal(ours.cv_results_["mean_test_score"], ref.cv_results_["mean_test_score"])
    np.testing.assert_allclose(ours.best_estimator_[0].mean_, np.average(X, axis=0, weights=sw))
    np.testing.assert_allclose(ours.predict_proba(X), ref.predict_proba(X))
    plain = FastLogisticGridSearchCV(grid, cv=folds).fit(X, y)
    assert not np.allclose(plain.best_estimator_[0].mean_, ours.best_estimator_[0].mean_)
    with pytest.raises(ValueError, match="sample_weight"):
        FastLogisticGridSearchCV(grid, cv=folds).fit(X, y, sample_weight=sw[:10])
    # scoring=None (the Pipeline's accuracy), a plain function and a scorer object, which stays the caller's
    from sklearn.metrics import accuracy_score, make_scorer

    scorer = make_scorer(accuracy_score)
    before = scorer.get_metadata_routing()
    for scoring in (None, lambda est, X_, y_: accuracy_score(y_, est.predict(X_)), scorer):
        got = FastLogisticGridSearchCV(grid, cv=folds, scoring=scoring).fit(X, y, sample_weight=sw)
        np.testing.assert_array_equal(got.cv_results_["mean_test_score"], ref.cv_results_["mean_test_score"])
    assert str(scorer.get_metadata_routing()) == str(before)


def test_fast_logistic_input_checks_as_sklearn():
    """NaN in X was taken silently (chance scores, a NaN scaler mean); boolean-mask folds crashed in
    numpy; an empty cv gave NaN scores and still refit; neg_log_loss scored folds scikit-learn cannot."""
    from sklearn.datasets import make_classification
    from sklearn.model_selection import KFold

    from featcache.heads.logreg import FastLogisticGridSearchCV

    X, y = make_classification(200, 20, random_state=3)
    bad = X.copy()
    bad[5, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        FastLogisticGridSearchCV({"C": [1.0]}, cv=5).fit(bad, y)
    masks = [(np.isin(np.arange(200), a), np.isin(np.arange(200), b))
             for a, b in KFold(4, shuffle=True, random_state=1).split(X)]
    grid = {"C": [0.1]}
    assert (FastLogisticGridSearchCV(grid, cv=masks).fit(X, y).best_score_
            == pytest.approx(_sklearn_search(grid, cv=masks).fit(X, y).best_score_, abs=1e-9))
    with pytest.raises(ValueError, match="cv iterator is empty"):
        FastLogisticGridSearchCV(grid, cv=[]).fit(X, y)
    order = np.argsort(y, kind="stable")  # unshuffled folds on sorted labels: one-class validation folds
    Xs, ys = X[order], y[order]
    folds = list(KFold(4).split(Xs))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = FastLogisticGridSearchCV({"C": [0.1, 1.0]}, cv=folds, scoring="neg_log_loss").fit(Xs, ys)
        ref = _sklearn_search({"C": [0.1, 1.0]}, cv=folds, scoring="neg_log_loss").fit(Xs, ys)
    np.testing.assert_array_equal(np.isnan(ours.cv_results_["mean_test_score"]),
                                  np.isnan(ref.cv_results_["mean_test_score"]))
    assert np.isnan(ours.cv_results_["mean_test_score"]).all()
    # GridSearchCV's interface: arrays in cv_results_, the candidates' own values, shortcuts to the refit
    grid = {"C": [0.1, 1.0], "class_weight": [None, {0: 1, 1: 3}]}
    ours, ref = FastLogisticGridSearchCV(grid, cv=4).fit(X, y), _sklearn_search(grid, cv=4).fit(X, y)
    assert ours.cv_results_["mean_test_score"].argmax() == ref.cv_results_["mean_test_score"].argmax()
    assert ours.cv_results_["params"][1]["class_weight"] == {0: 1, 1: 3}
    column = ref.cv_results_["param_logisticregression__class_weight"]
    assert list(ours.cv_results_["param_class_weight"]) == list(column)
    np.testing.assert_array_equal(ours.predict(X), ref.predict(X))
    np.testing.assert_allclose(ours.predict_proba(X), ref.predict_proba(X), atol=1e-6)
    assert ours.score(X, y) == pytest.approx(ref.score(X, y)) and list(ours.classes_) == list(ref.classes_)


def test_l1_falls_back_to_sklearn():
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from featcache.heads.logreg import FastLogisticGridSearchCV

    X, y = separable(150, 30)
    folds = folds_for(y)
    grid = {"C": [0.05, 1.0], "l1_ratio": [1.0], "solver": ["liblinear"]}
    ours = FastLogisticGridSearchCV(grid, cv=folds).fit(X, y)
    ref = GridSearchCV(make_pipeline(StandardScaler(), LogisticRegression()),
                       {f"logisticregression__{k}": v for k, v in grid.items()}, cv=folds).fit(X, y)
    assert ours.used_fallback_
    assert np.allclose(ours.cv_results_["mean_test_score"], ref.cv_results_["mean_test_score"])
    assert ours.best_params_["C"] == ref.best_params_["logisticregression__C"]


@pytest.mark.parametrize("name,bad", [("logreg", {"nope": 1}), ("svm", {"neighbours": 3}),
                                      ("knn", {"C": 1.0}), ("mlp", {"layerz": (4,)})])
def test_unknown_parameter_is_a_config_error(name, bad):
    X, y = separable(60, 10)
    head = get_head(name)
    with pytest.raises(ConfigError, match="unknown parameter"):
        if name == "mlp":
            head.train(X, y, X, y, bad)
        else:
            head.fit(X, y, bad)


def test_unknown_head_lists_valid_names():
    with pytest.raises(ConfigError) as err:
        get_head("forest")
    assert all(n in str(err.value) for n in HEAD_NAMES)


def test_mlp_trains_and_round_trips(tmp_path):
    X, y = separable(240, 24, k=2)
    head = get_head("mlp")
    params = {"layers": (16,), "epochs": 6, "batch_size": 32, "lr": 0.01, "checkpoint": True,
              "reduce_lr_patience": 2, "patience": 4, "dropout": 0.1}
    fitted, hist = head.train(X[:180], y[:180], X[180:], y[180:], params, seed=0)
    assert set(hist) == {"loss", "val_loss", "accuracy", "val_accuracy", "lr"}
    assert len(hist["lr"]) == len(hist["loss"]) >= 1
    proba = fitted.predict_proba(X[180:])
    assert proba.shape == (60, 2) and np.allclose(proba.sum(1), 1, atol=1e-5)
    assert np.mean(proba.argmax(1) == y[180:]) > 0.85
    files = fitted.save(tmp_path / "m")
    assert [f.name for f in files] == ["head.keras"]
    again = load_fitted("mlp", tmp_path / "m")
    assert np.allclose(again.predict_proba(X[180:]), proba, atol=1e-6)


def test_train_many_agrees_with_train():
    X, y = separable(300, 32, k=2, shift=0.9)
    Xtr, ytr, Xva, yva = X[:220], y[:220], X[220:], y[220:]
    head = get_head("mlp")
    configs = [{"layers": (16, 8), "lr": 0.01, "epochs": 4, "batch_size": 32},
               {"layers": (16, 8), "lr": 0.001, "epochs": 7, "batch_size": 32, "class_weight": "balanced"},
               {"layers": (16, 8), "lr": 0.003, "epochs": 5, "batch_size": 32, "checkpoint": True},
               {"layers": (8,), "lr": 0.01, "epochs": 3, "batch_size": 64, "optimizer": "sgd"}]
    seen = []
    many = head.train_many(Xtr, ytr, Xva, yva, configs, seed=0,
                           on_result=lambda i, h, hist: seen.append(i))
    assert sorted(seen) == [0, 1, 2, 3]
    for i, (cfg, (fitted, hist)) in enumerate(zip(configs, many, strict=True)):
        assert len(hist["val_accuracy"]) == cfg["epochs"]
        _, ref = head.train(Xtr, ytr, Xva, yva, cfg, seed=i)
        assert abs(hist["val_accuracy"][-1] - ref["val_accuracy"][-1]) <= 0.1
        acc = np.mean(fitted.predict_proba(Xva).argmax(1) == yva)
        if not cfg.get("checkpoint"):
            assert abs(acc - hist["val_accuracy"][-1]) < 1e-6


def test_knn_caps_n_neighbors_at_the_training_size():
    X, y = separable(n=24, k=2)
    head = get_head("knn")
    folds = folds_for(y)  # 16 training rows per fold
    res = head.search(X, y, folds, [{"n_neighbors": 31}, {"n_neighbors": 3}])
    # the requested value is recorded (each fold's fit caps at its own training rows: no one effective k)
    assert list(res.cv_results["param_n_neighbors"]) == [31, 3]
    assert all(np.isfinite(res.cv_results["mean_test_score"]))
    fitted = head.fit(X[:10], y[:10], {"n_neighbors": 31})
    assert fitted.estimator[-1].n_neighbors == 10
    assert fitted.predict_proba(X).shape == (24, 2)


def test_fast_scaler_equals_standard_scaler():
    from sklearn.preprocessing import StandardScaler

    from featcache.heads.logreg_stats import fit_scaler, standardize

    rng = np.random.default_rng(3)
    X = rng.normal(size=(1100, 40)) * rng.uniform(0.1, 50, 40) + rng.normal(size=40) * 100
    X = X.astype(np.float32)
    X[:, 5] = 7.0  # a constant feature is scaled by 1, as scikit-learn does
    ref = StandardScaler().fit(X)
    ours = fit_scaler(X)
    np.testing.assert_allclose(ours.mean_, ref.mean_, rtol=1e-10, atol=1e-9)
    np.testing.assert_allclose(ours.var_, ref.var_, rtol=1e-8, atol=1e-9)
    assert ours.scale_[5] == 1.0 and ref.scale_[5] == 1.0
    Z = standardize(ours, X)
    assert Z.dtype == np.float32
    np.testing.assert_allclose(Z, ref.transform(X), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ours.transform(X), ref.transform(X), rtol=1e-5, atol=1e-5)
    # gathered rows (the clipping gather of float32 rows), negative indices as numpy reads them
    rows = np.array([1099, 0, 7, -1, -1100, 512] * 60)  # 360 rows: more than one gather chunk
    np.testing.assert_array_equal(standardize(ours, X, rows), Z[rows])
    for bad in ([0, 1100], [-1101, 3]):
        with pytest.raises(IndexError, match="row indices"):
            standardize(ours, X, np.array(bad))


def test_train_many_fuses_configs_sharing_a_batch_size(monkeypatch):
    import featcache.heads.mlp as mlp

    calls = []
    real = mlp.fused_train
    monkeypatch.setattr(mlp, "fused_train", lambda *a, **k: (calls.append(len(a[4].ps)), real(*a, **k))[1])
    X, y = separable(120, 32, k=2)
    head = get_head("mlp")
    same_batch = [{"layers": (16,), "lr": 0.01, "epochs": 2}, {"layers": (32, 8), "lr": 0.001, "epochs": 3,
                                                              "dropout": 0.2, "l2": 1e-4}]
    alone = [{"layers": (8,), "lr": 0.01, "epochs": 2, "batch_size": 16},
             {"layers": (8,), "lr": 0.01, "epochs": 2, "optimizer": "sgd"}]
    res = head.train_many(X[:90], y[:90], X[90:], y[90:], same_batch + alone, precision="float32")
    assert calls == [2] and len(res) == 4 and all(r is not None for r in res)
    assert [r[0].trainer["path"] for r in res] == ["fused", "fused", "keras.fit", "keras.fit"]
    assert res[0][0].trainer["precision"] == "float32" and res[0][0].trainer["group_size"] == 2
    assert [len(r[1]["loss"]) for r in res] == [2, 3, 2, 2]
    calls.clear()
    head.train_many(X[:90], y[:90], X[90:], y[90:], alone[:1], fuse=True)
    assert calls == [1]


def test_fused_chunks_follow_the_last_level_cache(tmp_path, monkeypatch):
    import featcache.heads.mlp as mlp

    big = {"layers": (1024, 512)}          # 2,048-d input: 2.6M parameters, 40 MiB of state
    small = {"layers": (64,)}               # 2 MiB
    ps = [dict(big, epochs=5), dict(big, epochs=5), dict(big, epochs=10), dict(small, epochs=5),
          dict(small, epochs=5), dict(big, epochs=5)]
    idx = list(range(len(ps)))
    # unknown cache, or one that holds a big member: 96 MiB chunks (pairs of big heads), sorted by epochs
    for llc in (None, 105 * 2**20):
        assert mlp._cache_sized_chunks(idx, ps, 2048, llc) == [[3, 4, 0, 1], [5, 2]]
    # a 32 MiB cache holds no big head: those stream whatever their company and are fused together
    assert mlp._cache_sized_chunks(idx, ps, 2048, 32 * 2**20) == [[3, 4], [0, 1, 5, 2]]
    monkeypatch.setattr(mlp, "STREAMING_STATE_BYTES", 100 * 2**20)  # the memory bound still splits
    assert mlp._cache_sized_chunks(idx, ps, 2048, 32 * 2**20) == [[3, 4], [0, 1], [5, 2]]

    for i, (level, kind, size) in enumerate([(1, "Data", "32K"), (1, "Instruction", "32K"),
                                             (2, "Unified", "1024K"), (3, "Unified", "32768K")]):
        d = tmp_path / f"index{i}"
        d.mkdir()
        (d / "level").write_text(f"{level}\n")
        (d / "type").write_text(f"{kind}\n")
        (d / "size").write_text(f"{size}\n")
    assert mlp.last_level_cache_bytes(str(tmp_path)) == 32 * 2**20
    (tmp_path / "index3" / "size").write_text("garbage\n")
    assert mlp.last_level_cache_bytes(str(tmp_path)) == 2**20
    assert mlp.last_level_cache_bytes(str(tmp_path / "missing")) is None


def test_fused_float32_matches_model_fit_step_for_step():
    """Full-batch training removes the minibatch order: fused Adam must then follow model.fit closely."""
    X, y = separable(200, 24, k=3, shift=0.8)
    Xtr, ytr, Xva, yva = X[:150], y[:150], X[150:], y[150:]
    head = get_head("mlp")
    configs = [{"layers": (16, 8), "lr": 0.01, "epochs": 4, "batch_size": 150, "class_weight": "balanced",
                "l2": 1e-3},
               {"layers": (12,), "lr": 0.003, "epochs": 3, "batch_size": 150, "activation": "tanh"}]
    many = head.train_many(Xtr, ytr, Xva, yva, configs, seed=5, fuse=True, precision="float32")
    for i, (cfg, (fitted, hist)) in enumerate(zip(configs, many, strict=True)):
        ref_fitted, ref = head.train(Xtr, ytr, Xva, yva, cfg, seed=5 + i)
        np.testing.assert_allclose(hist["loss"], ref["loss"], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(hist["val_loss"], ref["val_loss"], rtol=1e-4, atol=1e-5)
        for w, w_ref in zip(fitted.model.get_weights(), ref_fitted.model.get_weights(), strict=True):
            np.testing.assert_allclose(w, w_ref, atol=2e-5)


def test_keras_floatx_float64_does_not_change_what_an_mlp_trains():
    """"floatx": "float64" in keras.json built float64 heads with other initial weights and other numbers,
    recorded as float32 under the same run id (a reproducibility audit). Heads now train at float32 whatever
    floatx says, by model.fit and fused alike, and the user's floatx is put back."""
    import keras

    X, y = separable(120, 16, shift=0.8)
    head = get_head("mlp")
    cfg = {"layers": (8,), "epochs": 2, "batch_size": 40}
    grid = [cfg, {**cfg, "lr": 0.01}]

    def trained() -> list[np.ndarray]:
        one, _ = head.train(X[:90], y[:90], X[90:], y[90:], cfg, seed=1)
        many = head.train_many(X[:90], y[:90], X[90:], y[90:], grid, seed=1, fuse=True, precision="float32")
        return [w for m in (one, *(f for f, _ in many)) for w in m.model.get_weights()]

    want = trained()
    keras.config.set_floatx("float64")
    try:
        got = trained()
        assert keras.config.floatx() == "float64"
    finally:
        keras.config.set_floatx("float32")
    assert all(g.dtype == np.float32 and np.array_equal(g, w) for g, w in zip(got, want, strict=True))


def test_the_tensorflow_trainers_dropout_masks_follow_the_seed():
    """--seed did not reach the fused TensorFlow trainer's dropout masks (their key was the step and the
    member's position): with the initial weights and the minibatch stream held, seed 0 and seed 1 trained
    the same weights. Now the grid's seed salts the masks; the same seed still trains the same weights."""
    from featcache.heads import mlp
    from featcache.heads.mlp_fused import FusedJob, fused_train

    X, y = separable(120, 16, k=2, shift=0.8)
    p = mlp._params({"layers": (16,), "lr": 0.01, "epochs": 2, "batch_size": 40, "dropout": 0.5})

    def weights(dropout_seed: int) -> list[np.ndarray]:
        out: dict[int, list[np.ndarray]] = {}
        def keep(j: int, model, hist, resumed: int = 0) -> None:
            out[j] = model.get_weights()

        job = FusedJob([p, p], [3, 4], keep, stream_seed=7, dropout_seed=dropout_seed)
        fused_train(X[:90], y[:90], X[90:], y[90:], job, 2, build=lambda q, s: mlp.build_model(q, 16, 2, s),
                    precision="float32")
        return out[0] + out[1]

    first, again, other = weights(0), weights(0), weights(1)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert max(float(np.abs(a - b).max()) for a, b in zip(first, other, strict=True)) > 1e-4


@pytest.mark.parametrize("trainer", ["tf", "jax"])
def test_fused_sigmoid_loss_comes_from_the_logit_as_in_model_fit(trainer):
    """A saturating sigmoid output: Keras on TensorFlow takes the loss from the logit (a logit of -50 costs
    50), the fused trainers clipped the probability (a loss capped near 16.1, zero gradient), so a member
    that saturated on every row never recovered and its val_loss history was a flat 16.1. Full batches
    remove the minibatch order, so fused training must follow model.fit here too."""
    if trainer == "jax":
        pytest.importorskip("jax")
    rng = np.random.default_rng(5)
    X = np.maximum(rng.normal(size=(160, 64)), 0).astype(np.float32) * 200  # huge inputs: saturated logits
    y = (X[:, :4].sum(1) > np.median(X[:, :4].sum(1))).astype(int)
    y[rng.random(160) < 0.1] ^= 1  # noisy labels: confidently wrong rows
    Xtr, ytr, Xva, yva = X[:120], y[:120], X[120:], y[120:]
    head = get_head("mlp")
    configs = [{"layers": (16,), "lr": 0.05, "epochs": 4, "batch_size": 120, "output_activation": "sigmoid"},
               {"layers": (8,), "lr": 0.02, "epochs": 4, "batch_size": 120, "output_activation": "sigmoid",
                "class_weight": "balanced"}]
    many = head.train_many(Xtr, ytr, Xva, yva, configs, seed=2, fuse=True, precision="float32",
                           trainer=trainer)
    saturated = False
    for i, (cfg, (_fitted, hist)) in enumerate(zip(configs, many, strict=True)):
        _ref_fitted, ref = head.train(Xtr, ytr, Xva, yva, cfg, seed=2 + i)
        saturated |= max(ref["loss"] + ref["val_loss"]) > 17  # beyond the old cap: the case is exercised
        np.testing.assert_allclose(hist["loss"], ref["loss"], rtol=1e-3, atol=1e-3)
        np.testing.assert_allclose(hist["val_loss"], ref["val_loss"], rtol=1e-3, atol=1e-3)
        np.testing.assert_allclose(hist["val_accuracy"], ref["val_accuracy"], atol=1e-6)
    assert saturated


def test_grid_configs_with_an_activation_the_fused_trainer_lacks_train_alone():
    """leaky_relu passes validation and trains with model.fit; two such Adam configs of one batch size were
    sent to the fused trainer, which raised "not supported by grid training" (after other configs had
    trained). They train alone now, as model.fit does."""
    from featcache.heads.mlp import fused_sigmoid, unpartnered

    X, y = separable(120, 8, k=2, shift=1.0)
    head = get_head("mlp")
    configs = [{"layers": (4,), "lr": lr, "epochs": 2, "batch_size": 30, "activation": "leaky_relu"}
               for lr in (0.01, 0.001)]
    many = head.train_many(X[:90], y[:90], X[90:], y[90:], configs, seed=0, precision="float32")
    assert [r[0].trainer["path"] for r in many] == ["keras.fit", "keras.fit"]
    assert unpartnered(configs) == set()  # not fusable at all: their ids do not depend on partners
    sig = [{**c, "activation": "relu", "output_activation": "sigmoid"} for c in configs]
    assert fused_sigmoid(sig) == {0, 1} and fused_sigmoid(sig[:1]) == set()
    assert fused_sigmoid(configs) == set()


NAN_FIRST_EPOCH = [{"layers": (4,), "lr": 1e36, "epochs": 5, "batch_size": 30, "patience": patience}
                   for patience in (0, 2, 3)]
"""Diverged configs (lr 1e36: val_loss NaN from the first epoch), one per patience."""


@functools.cache
def _nan_first_epoch_keras() -> tuple[list[float], ...]:
    """model.fit's val_loss histories for ``NAN_FIRST_EPOCH`` (config i with seed i, as train_many seeds
    them), computed once for both trainers' tests."""
    X, y = separable(120, 8, k=2, shift=1.0)
    head = get_head("mlp")
    return tuple(head.train(X[:90], y[:90], X[90:], y[90:], cfg, seed=i)[1]["val_loss"]
                 for i, cfg in enumerate(NAN_FIRST_EPOCH))


@pytest.mark.parametrize("trainer", ["tf", "jax"])
def test_fused_early_stopping_after_a_nan_first_epoch_as_keras(trainer):
    """Keras' EarlyStopping never stops after the first epoch (``epoch > 0``), and its best starts unset, so
    a NaN first epoch is an improvement and the epochs without one count from the second on. The fused
    rule stopped after one epoch with patience 0, and, counting from a best of inf, one epoch before
    model.fit with patience 2 and 3."""
    if trainer == "jax":
        pytest.importorskip("jax")
    X, y = separable(120, 8, k=2, shift=1.0)
    head = get_head("mlp")
    many = head.train_many(X[:90], y[:90], X[90:], y[90:], NAN_FIRST_EPOCH, seed=0, fuse=True,
                           precision="float32", trainer=trainer)
    assert {r[0].trainer["path"] for r in many} == {"fused" if trainer == "tf" else "fused-jax"}
    for cfg, (_, hist), ref in zip(NAN_FIRST_EPOCH, many, _nan_first_epoch_keras(), strict=True):
        assert np.isnan(ref[0]) and np.isnan(hist["val_loss"][0])  # the case: a diverged first epoch
        assert len(hist["val_loss"]) == len(ref) == max(2, cfg["patience"] + 1)


def test_bfloat16_grid_training_agrees_with_float32():
    X, y = separable(300, 64, k=2, shift=0.9)
    Xtr, ytr, Xva, yva = X[:220], y[:220], X[220:], y[220:]
    head = get_head("mlp")
    configs = [{"layers": (32, 16), "lr": lr, "epochs": 5, "batch_size": 32} for lr in (0.01, 0.001)]
    lo = head.train_many(Xtr, ytr, Xva, yva, configs, precision="bfloat16")
    hi = head.train_many(Xtr, ytr, Xva, yva, configs, precision="float32")
    assert [r[0].trainer["precision"] for r in lo] == ["bfloat16"] * 2
    for (_, a), (_, b) in zip(lo, hi, strict=True):
        assert abs(a["val_accuracy"][-1] - b["val_accuracy"][-1]) <= 0.05
        assert abs(a["loss"][0] - b["loss"][0]) < 0.05  # same start, same batches: close first epoch


def test_mlp_precision_choice(monkeypatch):
    from featcache.heads import mlp_fused

    monkeypatch.delenv(mlp_fused.PRECISION_ENV, raising=False)
    monkeypatch.setattr(mlp_fused, "cpu_has_bf16_matmul", lambda: False)
    assert mlp_fused.resolve_precision("auto") == "float32"
    monkeypatch.setattr(mlp_fused, "cpu_has_bf16_matmul", lambda: True)
    assert mlp_fused.resolve_precision(None) == "bfloat16"
    assert mlp_fused.resolve_precision("float32") == "float32"
    monkeypatch.setenv(mlp_fused.PRECISION_ENV, "float32")
    assert mlp_fused.resolve_precision("auto") == "float32"
    with pytest.raises(ConfigError, match="precision"):
        mlp_fused.resolve_precision("fp8")



@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_gil_free_triangular_routines_match_numpy(dtype):
    from featcache.heads import _blas

    rng = np.random.default_rng(3)
    n = 37
    A = rng.normal(size=(n, n))
    L = np.asfortranarray(np.tril(A) + n * np.eye(n), dtype=dtype)
    B = rng.normal(size=(n, 5))
    tol = 1e-10 if dtype == np.float64 else 1e-3
    Ld = L.astype(np.float64)
    np.testing.assert_allclose(_blas.trmm(L, B), Ld @ B, rtol=tol)
    np.testing.assert_allclose(_blas.trmm(L, B, trans=True), Ld.T @ B, rtol=tol)
    v = B[:, 2].copy()
    np.testing.assert_allclose(_blas.trmv(L, v), Ld @ v, rtol=tol)
    np.testing.assert_allclose(_blas.trmv(L, v, trans=True), Ld.T @ v, rtol=tol)
    np.testing.assert_array_equal(v, B[:, 2])  # the input is not overwritten
    np.testing.assert_allclose(_blas.trsm(L, B), np.linalg.solve(Ld, B), rtol=tol, atol=tol)
    np.testing.assert_allclose(_blas.trsm(L, B, trans=True), np.linalg.solve(Ld.T, B), rtol=tol, atol=tol)
    K = np.asfortranarray(A @ A.T + n * np.eye(n))
    F = K.copy(order="F")
    assert _blas.potrf(F) == 0
    np.testing.assert_allclose(np.tril(F), np.linalg.cholesky(K), rtol=1e-10)
    assert _blas.potrf(np.asfortranarray(-np.eye(3))) == 1  # not positive definite: LAPACK's info
    F32 = K.astype(np.float32, order="F")
    assert _blas.potrf(F32) == 0  # spotrf
    np.testing.assert_allclose(np.tril(F32), np.linalg.cholesky(K), rtol=1e-4)
    with pytest.raises(ValueError, match="Fortran-ordered"):
        _blas.trmm(np.ascontiguousarray(L.T), B)


@pytest.mark.parametrize("maxiter", [5, 200])
def test_stepped_lbfgsb_is_scipys_minimize(maxiter):
    """``_Lbfgsb`` drives scipy's private ``setulb`` with ``minimize``'s loop: same iterates, iteration and
    evaluation counts, and the same stop when a callback halts the run (guards against scipy changes)."""
    from scipy.optimize import minimize

    from featcache.heads.logreg_lbfgs import _Lbfgsb

    rng = np.random.default_rng(5)
    A = rng.normal(size=(60, 25))
    t = (rng.random(60) < 0.5).astype(float)

    def fg(w: np.ndarray) -> tuple[float, np.ndarray]:
        z = A @ w
        loss = float(np.sum(np.logaddexp(0, z) - t * z) + 0.05 * w @ w)
        return loss, A.T @ (1 / (1 + np.exp(-z)) - t) + 0.1 * w

    opts = {"maxiter": maxiter, "maxls": 50, "gtol": 1e-10, "ftol": 64 * np.finfo(float).eps}
    for halt_at in (None, 4):
        seen: list[np.ndarray] = []

        def callback(xk, halt_at=halt_at, seen=seen):  # minimize passes the iterate itself here
            seen.append(xk.copy())
            if halt_at is not None and len(seen) >= halt_at:
                raise StopIteration

        calls = [0]

        def counted(w, calls=calls):
            calls[0] += 1
            return fg(w)

        ref = minimize(counted, np.zeros(25), method="L-BFGS-B", jac=True, callback=callback, options=opts)
        run = _Lbfgsb(25, maxiter=maxiter, gtol=1e-10, ftol=64 * np.finfo(float).eps)
        ours: list[np.ndarray] = []

        def accept(x, halt_at=halt_at, ours=ours):
            ours.append(x.copy())
            return halt_at is not None and len(ours) >= halt_at

        while run.advance(accept):
            x = run.x.copy()
            run.tell(x, *fg(x))
        assert run.nit == ref.nit and run.nfev == calls[0]
        np.testing.assert_array_equal(run.x, ref.x)
        assert len(ours) == len(seen) and all(np.array_equal(a, b) for a, b in zip(ours, seen, strict=True))


@pytest.mark.parametrize("age", [1, 8, 60])
def test_deferred_stop_test_gives_scikit_learns_iterations(age, monkeypatch):
    """Kernel space, 14 problems solved together, stop tests batched (tested ``age`` rounds late, so a run
    may be stopped retroactively): each run stops at scikit-learn's iteration with its coefficients."""
    from sklearn.linear_model import LogisticRegression

    from featcache.heads.logreg import _lr_params
    from featcache.heads.logreg_lbfgs import _Evaluator, solve_many
    from featcache.heads.logreg_space import Space

    monkeypatch.setattr(_Evaluator, "CHECK_AGE", age)

    X, y = separable(700, 1500, k=2, shift=0.4)
    X = X.astype(np.float64)
    y[:60] = 0
    Z = (X - X.mean(0)) / X.std(0)
    problems = [_lr_params({"C": c, "class_weight": cw, "max_iter": 300})
                for c in (1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0, 1e4) for cw in (None, "balanced")]
    space = Space(Z)
    assert not space.primal  # kernel space: the deferred D-space stop test applies
    stats: dict = {}
    sols = solve_many(space, y, 2, problems, None, Z.shape[1], stats)
    assert stats["exact_checks"] > 0  # undecided iterates were queued and tested in batches
    for p, (G, b, nit, _status, _msg) in zip(problems, sols, strict=True):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = LogisticRegression(**p).fit(Z, y)
        assert nit == int(ref.n_iter_[0]), p
        w = space.coefficients(Z, G)[:, 0]
        np.testing.assert_allclose(Z @ w + b[0], ref.decision_function(Z), atol=1e-6, rtol=1e-6)


def _weak_signal(n: int, d: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """35% positives, five features shifted by 0.3: a gradient at w = 0 that a loose tol already accepts."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.35).astype(int)
    X = rng.normal(size=(n, d))
    X[:, :5] += 0.3 * y[:, None]
    return X, y


def test_kernel_space_tests_the_starting_point_as_scipy_does():
    """D > n: scipy tests the gradient at w = 0 before any step; where it passes tol scikit-learn stops at
    iteration 0 with zero coefficients, and so must the kernel-space solve (it once always took a step)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from featcache.heads.logreg import FastLogisticGridSearchCV, fit_pipeline

    X, y = _weak_signal(100, 400)
    p = {"C": 1.0, "class_weight": "balanced", "tol": 0.2}
    ref = make_pipeline(StandardScaler(), LogisticRegression(**p)).fit(X, y)
    ours = fit_pipeline(X, y, p)
    assert int(ref[-1].n_iter_[0]) == 0 and int(ours[-1].n_iter_[0]) == 0
    np.testing.assert_allclose(ours[-1].coef_, ref[-1].coef_, rtol=0, atol=1e-10)
    np.testing.assert_allclose(ours[-1].intercept_, ref[-1].intercept_, rtol=0, atol=1e-10)
    folds = folds_for(y, 5)
    grid = {"C": [1e-4, 1e-2, 1.0], "class_weight": [None, "balanced"], "tol": [0.2]}
    gs = sklearn_search(X, y, grid, folds)
    fs = FastLogisticGridSearchCV(grid, cv=folds, refit=False).fit(X, y)
    np.testing.assert_allclose(fs.cv_results_["mean_test_score"], gs.cv_results_["mean_test_score"],
                               atol=0.005)
    assert fs.best_index_ == gs.best_index_


@pytest.mark.parametrize("n,d", [(120, 300), (200, 20)])  # kernel space, and the primal one
def test_fits_stopped_at_max_iter_warn_as_scikit_learns(n, d):
    """Every fit that ends at max_iter raises scikit-learn's ConvergenceWarning (as many as GridSearchCV
    gives, counted in ``n_unconverged_``), the refit too; a converged fit raises none."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from featcache.heads.logreg import FastLogisticGridSearchCV, fit_pipeline

    X, y = _weak_signal(n, d, seed=1)
    folds = folds_for(y, 3)
    grid = {"C": [1e-4, 1e4], "max_iter": [5, 100]}
    with warnings.catch_warnings(record=True) as theirs:
        warnings.simplefilter("always")
        pipe = make_pipeline(StandardScaler(), LogisticRegression())
        GridSearchCV(pipe, {f"logisticregression__{k}": v for k, v in grid.items()}, cv=folds,
                     refit=False).fit(X, y)
    expected = sorted(str(w.message) for w in theirs if issubclass(w.category, ConvergenceWarning))
    assert expected
    with pytest.warns(ConvergenceWarning, match="lbfgs failed to converge") as ours:
        fs = FastLogisticGridSearchCV(grid, cv=folds, refit=False).fit(X, y)
    assert sorted(str(w.message) for w in ours if issubclass(w.category, ConvergenceWarning)) == expected
    assert fs.n_unconverged_ == len(expected)
    with pytest.warns(ConvergenceWarning, match=r"max_iter=5"):
        fit_pipeline(X, y, {"C": 1e4, "max_iter": 5})
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        fit_pipeline(X, y, {})


def test_the_fallback_counts_its_unconverged_fits_and_still_shows_their_warnings():
    """The GridSearchCV fallback (here: sample weights) left ``n_unconverged_`` None, so run.json had no
    cv_unconverged_fits and fit no note for it. Now it counts the search's fits, not the refit's, and the
    warnings still reach the caller; the refit is GridSearchCV's own."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from featcache.heads.logreg import FastLogisticGridSearchCV

    X, y = _weak_signal(120, 30, seed=1)
    folds = folds_for(y, 3)
    grid = {"C": [1e4], "max_iter": [3, 100]}
    ref = GridSearchCV(make_pipeline(StandardScaler(), LogisticRegression()),
                       {f"logisticregression__{k}": v for k, v in grid.items()}, cv=folds)
    with warnings.catch_warnings(record=True) as theirs:
        warnings.simplefilter("always")
        ref.fit(X, y)
    n_theirs = sum(issubclass(w.category, ConvergenceWarning) for w in theirs)
    refit_warned = int(ref.best_estimator_[-1].n_iter_[0]) >= ref.best_params_["logisticregression__max_iter"]
    with pytest.warns(ConvergenceWarning, match="lbfgs failed to converge"):
        fs = FastLogisticGridSearchCV(grid, cv=folds).fit(X, y, sample_weight=np.ones(len(y)))
    assert fs.used_fallback_
    assert fs.n_unconverged_ == n_theirs - refit_warned >= 3  # max_iter=3 stops in each of the 3 folds
    assert fs.best_params_ == {k[len("logisticregression__"):]: v for k, v in ref.best_params_.items()}
    np.testing.assert_allclose(fs.best_estimator_[-1].coef_, ref.best_estimator_[-1].coef_, atol=1e-8)


def test_prefetcher_hands_errors_to_the_consumer_and_stops():
    from featcache.heads.logreg_space import Prefetcher, Tasks, Workspace

    works = [Workspace(4, 3, np.float64, 4) for _ in range(2)]
    made = []

    def make(job, work):
        made.append(job)
        if job == 2:
            return job, [Tasks([lambda: 1 / 0])]
        return job, [Tasks([lambda: None, lambda: None])]

    with pytest.raises(ZeroDivisionError), Prefetcher(make, list(range(6)), works) as ready:
        for _ in range(6):
            ready.get()
            ready.release()
    assert made == [0, 1, 2]  # nothing was prepared after the failure


def test_search_with_one_workspace_gives_the_same_results(monkeypatch):
    """When memory is tight the folds are prepared one at a time: same numbers as the prefetching path."""
    from featcache.heads import logreg

    X, y = separable(160, 400, k=2, shift=0.5)
    folds = folds_for(y, 4)
    grid = {"C": [0.01, 1.0], "class_weight": [None, "balanced"]}
    two = logreg.FastLogisticGridSearchCV(grid, cv=folds).fit(X, y)
    monkeypatch.setattr(logreg, "_available_memory", lambda: 0.0)
    one = logreg.FastLogisticGridSearchCV(grid, cv=folds).fit(X, y)
    np.testing.assert_array_equal(one.cv_results_["mean_test_score"], two.cv_results_["mean_test_score"])
    np.testing.assert_allclose(one.best_estimator_.predict_proba(X), two.best_estimator_.predict_proba(X),
                               rtol=0, atol=1e-12)


def test_available_memory_counts_reclaimable_page_cache(tmp_path):
    """MemAvailable (free + droppable page cache) is read, not the free pages alone."""
    from featcache.resources import available_memory as _available_memory

    info = tmp_path / "meminfo"
    info.write_text("MemTotal:       24000000 kB\nMemFree:          500000 kB\nMemAvailable:   20000000 kB\n")
    assert _available_memory(str(info)) == 20000000 * 1024.0
    fallback = _available_memory(str(tmp_path / "missing"))  # no such file: the free-pages reading
    assert fallback > 0


def test_svm_max_iter_none_is_each_kernels_default_and_numbers_are_kept():
    """-1 (SVC's "no limit") is out of the grid's range, so `max_iter=none` is the way to ask for it."""
    from featcache.grids import parse_grid_args

    head = get_head("svm")
    grid = parse_grid_args(["max_iter=none,50"], head.schema)
    assert grid["max_iter"] == [None, 50]
    svc = head.make_estimator({"kernel": "rbf", "max_iter": None}, for_search=True)[-1]
    linear = head.make_estimator({"kernel": "linear", "max_iter": None}, for_search=True)[-1]
    assert (svc.max_iter, linear.max_iter) == (-1, 5000)
    assert head.make_estimator({"kernel": "rbf", "max_iter": 50}, for_search=True)[-1].max_iter == 50


RESUMED_GRID = [  # one batch-size chunk, members leaving at different epochs, plus a lone sgd config
    {"layers": (16, 8), "lr": 0.01, "epochs": 3, "batch_size": 32, "dropout": 0.3},
    {"layers": (16, 8), "lr": 0.001, "epochs": 5, "batch_size": 32, "class_weight": "balanced",
     "dropout": 0.1},
    {"layers": (12,), "lr": 0.003, "epochs": 4, "batch_size": 32, "checkpoint": True, "dropout": 0.2},
    {"layers": (16, 8), "lr": 0.03, "epochs": 6, "batch_size": 32, "patience": 1},
    {"layers": (8,), "lr": 0.01, "epochs": 2, "batch_size": 64, "optimizer": "sgd"},
]


def _assert_trained_alike(a_run: tuple, b_run: tuple, exact: bool, where: object) -> None:
    """Two (head, history) results of one config: the same histories and weights, bit for bit when
    ``exact``, else to float rounding (JAX's stacked products of another width)."""
    (h_a, a), (h_b, b) = a_run, b_run
    for key in ("loss", "val_loss", "accuracy", "val_accuracy"):
        if exact:
            assert b[key] == a[key], (where, key)
        else:
            np.testing.assert_allclose(b[key], a[key], rtol=1e-5, atol=1e-6)
    for w_a, w_b in zip(h_a.model.get_weights(), h_b.model.get_weights(), strict=True):
        if exact:
            assert np.array_equal(w_a, w_b), where
        else:
            np.testing.assert_allclose(w_b, w_a, rtol=1e-5, atol=1e-6)


def _resumed_equals_whole(trainer: str, precision: str, exact: bool) -> None:
    X, y = separable(300, 32, k=2, shift=0.9)
    Xtr, ytr, Xva, yva = X[:220], y[:220], X[220:], y[220:]
    head = get_head("mlp")
    whole = head.train_many(Xtr, ytr, Xva, yva, RESUMED_GRID, seed=5, precision=precision, trainer=trainer)
    # the group's first member (its seed draws the group's minibatch stream) and the lone config are done;
    # the chunk keeps 3 members, then 1 (a chunk of one member stays fused, as in the whole grid)
    for skip in ({0, 4}, {0, 1, 3}):
        seen: list[int] = []
        rest = head.train_many(Xtr, ytr, Xva, yva, RESUMED_GRID, seed=5, precision=precision, trainer=trainer,
                               skip=skip, on_result=lambda i, h, hist, seen=seen: seen.append(i))
        assert sorted(seen) == sorted(set(range(5)) - skip)
        for i in range(5):
            if i in skip:
                assert rest[i] is None
                continue
            assert rest[i][0].trainer == whole[i][0].trainer
            _assert_trained_alike(whole[i], rest[i], exact, i)


def _chunking_changes_nothing(trainer: str, precision: str, exact: bool, monkeypatch) -> None:
    import featcache.heads.mlp as mlp

    X, y = separable(300, 32, k=2, shift=0.9)
    Xtr, ytr, Xva, yva = X[:220], y[:220], X[220:], y[220:]
    head = get_head("mlp")
    kw = {"seed": 5, "precision": precision, "trainer": trainer}
    whole = head.train_many(Xtr, ytr, Xva, yva, RESUMED_GRID, **kw)
    assert [r[0].trainer["group_size"] for r in whole[:4]] == [4] * 4  # the batch-32 group is one chunk
    # a smaller cache budget: the (16, 8) heads hold 10.9 kB of state, the (12,) head 6.8 kB
    for budget, sizes in ((12_000, [1, 1, 1, 1]), (25_000, [2, 2, 2, 2])):
        monkeypatch.setattr(mlp, "FUSE_STATE_BYTES", budget)
        split = head.train_many(Xtr, ytr, Xva, yva, RESUMED_GRID, **kw)
        assert [r[0].trainer["group_size"] for r in split[:4]] == sizes
        for i in range(5):
            _assert_trained_alike(whole[i], split[i], exact, (budget, i))


@pytest.mark.parametrize("precision", ["float32", "auto"])
def test_how_a_machine_chunks_a_group_does_not_change_its_numbers(precision, monkeypatch):
    """Chunks are sized by the CPU's last-level cache (one per group on a GPU), so two machines may split
    a batch-size group differently. Every chunk of a group must still draw the group's minibatch stream and
    each member keep its dropout masks: the same grid gives the same numbers on either machine."""
    _chunking_changes_nothing("tf", precision, exact=True, monkeypatch=monkeypatch)


def test_how_a_machine_chunks_a_group_does_not_change_its_numbers_on_jax(monkeypatch):
    pytest.importorskip("jax")
    _chunking_changes_nothing("jax", "float32", exact=False, monkeypatch=monkeypatch)


@pytest.mark.parametrize("precision", ["float32", "auto"])
def test_a_resumed_grid_trains_the_rest_as_the_whole_grid_did(precision):
    """fit resumes an interrupted grid by skipping its finished configs. Each remaining config must get the
    numbers of the uninterrupted grid: its seed, its fused chunk (not a lone model.fit), the chunk's
    minibatch stream and its dropout masks may not depend on which other configs are still to train."""
    _resumed_equals_whole("tf", precision, exact=True)


def test_a_resumed_grid_on_the_jax_trainer_trains_the_rest_as_the_whole_grid_did():
    """The same on JAX, whose members are stacked: dropout keys follow each member, not its row in a stack.
    Stacked products of another width may round differently in the last bits, hence a tolerance."""
    pytest.importorskip("jax")
    _resumed_equals_whole("jax", "float32", exact=False)


@pytest.mark.parametrize("trainer", ["tf", "jax"])
def test_an_interrupted_fused_chunk_resumes_from_its_checkpoint(trainer, tmp_path, monkeypatch):
    """Epoch checkpoints: an interrupted chunk restarts at its last checkpoint, not at epoch 0, and every
    config still gets the uninterrupted grid's numbers (also when a config the checkpoint holds was saved
    after it, and so is skipped). TF: bit for bit. JAX: its resumed stacks may have another width than the
    uninterrupted ones at that epoch, whose products may round differently in the last bits."""
    if trainer == "jax":
        pytest.importorskip("jax")
    X, y = separable(300, 32, k=2, shift=0.9)
    Xtr, ytr, Xva, yva = X[:220], y[:220], X[220:], y[220:]
    head = get_head("mlp")
    kw = {"seed": 5, "precision": "float32", "trainer": trainer}

    def same(a, b) -> bool:
        return np.array_equal(a, b) if trainer == "tf" else np.allclose(a, b, rtol=1e-5, atol=1e-6)

    whole = head.train_many(Xtr, ytr, Xva, yva, RESUMED_GRID, **kw)
    monkeypatch.setenv("FEATCACHE_MLP_CHECKPOINT_SECONDS", "0")  # a checkpoint before every epoch
    ckpt = tmp_path / "ckpt"

    class Killed(Exception):
        pass

    saved: list[int] = []

    def store(i, h, hist):  # the 2nd config of the chunk to finish is "killed" while being stored
        if len(saved) == 1:
            raise Killed
        saved.append(i)

    with pytest.raises(Killed):
        head.train_many(Xtr, ytr, Xva, yva, RESUMED_GRID, skip={4}, on_result=store, checkpoint_dir=ckpt,
                        **kw)
    # config 3 stops early after 2 epochs and is stored; config 0 ends after 3 and is "killed": the last
    # checkpoint is from after epoch 2 and holds configs 0, 1 and 2
    assert saved == [3] and [p.name for p in ckpt.iterdir()] == ["chunk-0.npz"]
    for skip in ({3, 4}, {0, 3, 4}):  # the second: as if config 0 had been stored after the checkpoint
        rest = head.train_many(Xtr, ytr, Xva, yva, RESUMED_GRID, skip=skip, checkpoint_dir=ckpt, **kw)
        for i in set(range(4)) - skip:
            (h_whole, a), (h_rest, b) = whole[i], rest[i]
            assert h_rest.trainer == {**h_whole.trainer, "resumed_from_epoch": 2}, i
            assert all(same(b[k], a[k]) for k in ("loss", "val_loss", "accuracy", "val_accuracy")), i
            for w_a, w_b in zip(h_whole.model.get_weights(), h_rest.model.get_weights(), strict=True):
                assert same(w_a, w_b), i
        assert not ckpt.exists() or not any(ckpt.iterdir())  # removed once the chunk finished
        if skip == {3, 4}:  # put the checkpoint back for the second variant
            with pytest.raises(Killed):
                saved.clear()
                head.train_many(Xtr, ytr, Xva, yva, RESUMED_GRID, skip={4}, on_result=store,
                                checkpoint_dir=ckpt, **kw)


def test_checkpoint_round_trip_keeps_every_member_field(tmp_path):
    """Every field the next epoch depends on survives save/restore; a checkpoint for other data is ignored."""
    from featcache.heads import mlp_checkpoint
    from featcache.heads.mlp import _params, build_model
    from featcache.heads.mlp_fused import _Member, group_setup

    ps = [_params({"layers": (4,), "epochs": 9, "batch_size": 8, "patience": 3, "checkpoint": True}),
          _params({"layers": (4,), "epochs": 9, "batch_size": 8, "lr": 0.01})]
    y = np.array([0, 1] * 10)

    def group(seed_shift: int):
        return group_setup(y, ps, 2, [3, 4], lambda p, s: build_model(p, 6, 2, s + seed_shift), _Member)[1]

    members = group(0)
    a = members[0]
    a.epoch, a.since_best, a.best_val = 4, 2, 0.25
    a.history = {"loss": [0.9, 0.5, 0.4, 0.45], "val_loss": [0.3, 0.25, 0.27, 0.26]}
    a.best_weights = [w + 1 for w in a.current()]
    a.m[0].assign(a.m[0] + 0.5)
    # a diverged member, saved by an older featcache: its wait counted from a best of inf (4), where Keras'
    # EarlyStopping counts the NaN first epoch as its best (3); restore follows the history
    members[1].epoch, members[1].since_best = 4, 4
    members[1].history = {"val_loss": [float("nan")] * 4}
    rng = np.random.default_rng(0)
    rng.random(3)
    fields = {"ps": ps, "seeds": [3, 4], "stream_seed": 3, "keys": None}
    key = mlp_checkpoint.group_key(fields, "float32", mlp_checkpoint.data_digest((y,)))
    state = lambda mb, part: (mb.vars, mb.m, mb.v)[part]  # noqa: E731
    assert mlp_checkpoint.save(tmp_path / "c.npz", key, members, state, 77, rng, {"epoch_no": 4})
    fresh = group(100)  # other initial weights: the states come back for the trainer to load
    rng2 = np.random.default_rng(1)
    got = mlp_checkpoint.restore(tmp_path / "c.npz", key, fresh, rng2)
    assert (got.t, got.extra, sorted(got.states)) == (77, {"epoch_no": 4}, [0, 1])
    b = fresh[0]
    assert (b.epoch, b.since_best, b.best_val, b.history, b.resumed_epoch) == (4, 2, 0.25, a.history, 4)
    assert b.stop_best == 0.25
    assert fresh[1].since_best == 3 and np.isnan(fresh[1].stop_best)
    w, m, v = got.states[0]
    for back, want in [(w, a.current()), (b.best_weights, a.best_weights),
                       (m, [x.numpy() for x in a.m]), (v, [x.numpy() for x in a.v])]:
        assert all(np.array_equal(g, x) for g, x in zip(back, want, strict=True))
    assert not np.array_equal(w[0], b.current()[0])  # restore itself leaves the trainer's arrays alone
    assert fresh[1].best_weights is None and fresh[1].best_val == np.inf
    assert rng2.random() == rng.random()
    untouched = group(100)
    for other in (mlp_checkpoint.group_key(fields, "float32", mlp_checkpoint.data_digest((y[::-1],))),
                  mlp_checkpoint.group_key({**fields, "stream_seed": 5}, "float32",
                                           mlp_checkpoint.data_digest((y,)))):
        assert mlp_checkpoint.restore(tmp_path / "c.npz", other, untouched, np.random.default_rng(1)) is None
    assert untouched[0].epoch == 0
    (tmp_path / "bad.npz").write_bytes(b"PK not really a zip")
    assert mlp_checkpoint.restore(tmp_path / "bad.npz", key, untouched, np.random.default_rng(1)) is None


def test_a_checkpoint_that_cannot_be_written_does_not_stop_training(tmp_path, monkeypatch):
    from featcache.heads import mlp_checkpoint

    X, y = separable(200, 16, k=2, shift=0.9)
    head = get_head("mlp")
    grid = RESUMED_GRID[:2]
    kw = {"seed": 1, "precision": "float32", "trainer": "tf"}
    whole = head.train_many(X[:150], y[:150], X[150:], y[150:], grid, **kw)
    monkeypatch.setenv("FEATCACHE_MLP_CHECKPOINT_SECONDS", "0")
    attempts = []

    def disk_full(*_a, **_k):
        attempts.append(1)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(mlp_checkpoint.np.lib.format, "write_array", disk_full)
    got = head.train_many(X[:150], y[:150], X[150:], y[150:], grid, checkpoint_dir=tmp_path / "ck",
                          checkpoint_about={"command": ["featcache", "fit"]}, **kw)
    assert len(attempts) == 1  # tried once, then trained on without checkpoints
    assert [h for _, h in got] == [h for _, h in whole]
    assert not list((tmp_path / "ck").glob("*"))  # no half-written file, no label without a checkpoint


def test_svm_calibration_folds_keep_each_patient_on_one_side():
    """Platt scaling's folds are grouped by patient: with plain folds a patient's other images (or other
    views of one image) were in the part a calibration model trained on, and its scores were too good."""
    from featcache.errors import DataError

    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(12), 3)  # 12 patients, 3 rows each
    y = (groups % 2).astype(int)
    X = rng.normal(size=(len(y), 5)) + y[:, None]
    model = get_head("svm").fit(X, y, {"kernel": "linear", "C": 1.0}, groups=groups)
    calibrated = model.estimator.steps[-1][1]
    assert len(calibrated.cv) == 3
    for tr, te in calibrated.cv:
        assert not set(groups[tr]) & set(groups[te])
    with pytest.raises(DataError, match="2 patients of every class"):
        get_head("svm").fit(X, y, {"kernel": "linear", "C": 1.0}, groups=y)  # one patient per class


def test_the_gram_buffers_unused_triangle_raises_no_warning() -> None:
    """The Gram fills K's lower triangle only; the upper one is a reused buffer's old bytes, and a
    signalling-NaN pattern there printed "RuntimeWarning: invalid value encountered in cast" during fit
    (features of random weights, about 1e-19, hit it)."""
    from featcache.heads.logreg_space import _float64_square

    K = np.eye(3, dtype=np.float32, order="F")
    K.view(np.uint32)[0, 2] = 0x7F800001  # a signalling NaN above the diagonal
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        A = _float64_square(K, 3, None)
    assert np.array_equal(np.tril(A), np.eye(3))


def test_a_linear_svm_search_gives_the_same_scores_every_time():
    """liblinear draws one process-wide random stream: two linear SVM fits in parallel threads took each
    other's draws, and six identical searches gave six different sets of CV scores."""
    from sklearn.model_selection import StratifiedGroupKFold

    rng = np.random.default_rng(1)
    n, d = 300, 2000
    y = (rng.random(n) < 0.6).astype(int)
    X = rng.normal(size=(n, d))
    X[:, :40] += 0.25 * y[:, None]
    folds = list(StratifiedGroupKFold(5, shuffle=True, random_state=0).split(X, y, np.arange(n) // 2))
    grid = [{"kernel": "linear", "C": c, "max_iter": 10} for c in (0.001, 0.01, 0.1, 1.0)]
    head = get_head("svm")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # max_iter 10: liblinear does not converge, on purpose (more draws)
        scores = {tuple(head.search(X, y, folds, grid, scoring="roc_auc").cv_results["mean_test_score"])
                  for _ in range(4)}
    assert len(scores) == 1


def test_an_svms_class_weight_survives_its_probability_calibration():
    """The search chose class_weight=balanced for the shift it gives an SVM's decisions, but the stored
    model's Platt sigmoid was fitted without the weights and undid it: at 0.5 the calibrated model
    predicted 2 positives of 54 (macro F1 0.49 against the search's 0.58). The weights now reach the
    sigmoid too, and the stored model scores what the search measured."""
    from sklearn.metrics import f1_score
    from sklearn.model_selection import StratifiedGroupKFold

    from featcache.metrics import predict_labels

    rng = np.random.default_rng(0)
    n = 600
    y = (rng.random(n) < 0.10).astype(int)
    g = np.arange(n) // 2
    X = rng.normal(size=(n, 20))
    X[:, :3] += 0.7 * y[:, None]
    folds = list(StratifiedGroupKFold(5, shuffle=True, random_state=0).split(X, y, g))
    head = get_head("svm")
    params = {"kernel": "linear", "C": 1.0, "class_weight": "balanced"}
    searched = head.search(X, y, folds, [params], scoring="f1_macro").cv_results["mean_test_score"][0]
    oof = np.zeros((n, 2))
    for tr, va in folds:
        oof[va] = head.fit(X[tr], y[tr], params, groups=g[tr]).predict_proba(X[va])
    calibrated = np.mean([f1_score(y[va], predict_labels(oof[va]), average="macro") for _, va in folds])
    assert abs(calibrated - searched) < 0.03 and predict_labels(oof).sum() > y.sum()


def test_a_three_class_svm_search_ranks_by_one_vs_rest_auc():
    """`fit --head svm --task 3class --metric auc` crashed: scikit-learn's roc_auc_ovr scorer needs
    predict_proba, which the search's uncalibrated SVM lacks. It is scored from the decision function,
    as the one-vs-rest macro AUC of each class's decision value."""
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold

    rng = np.random.default_rng(2)
    y = np.arange(150) % 3
    X = rng.normal(size=(150, 8)) + np.eye(3)[y] @ rng.normal(size=(3, 8))
    folds = list(StratifiedKFold(3, shuffle=True, random_state=0).split(X, y))
    head = get_head("svm")
    grid = [{"kernel": k, "C": 1.0} for k in ("linear", "rbf")]
    res = head.search(X, y, folds, grid, scoring="roc_auc_ovr")
    for i, params in enumerate(grid):
        want = []
        for tr, te in folds:
            est = head.make_estimator(head.check(params), for_search=True).fit(X[tr], y[tr])
            d = est.decision_function(X[te])
            want.append(np.mean([roc_auc_score(y[te] == k, d[:, k]) for k in range(3)]))
        np.testing.assert_allclose(res.cv_results["mean_test_score"][i], np.mean(want), rtol=1e-12)


def test_knn_metrics_that_need_more_than_a_name_and_svm_calibration_record():
    """`--grid metric=mahalanobis` passed the grid check and then failed inside scikit-learn with a
    traceback; an svm run recorded cv=3 (scikit-learn's plain folds) for its patient-grouped calibration."""
    for metric in ("mahalanobis", "seuclidean", "haversine", "precomputed"):
        with pytest.raises(ConfigError, match=f"knn metric '{metric}' needs more than its name"):
            get_head("knn").check({"metric": metric})
    assert get_head("knn").check({"metric": "cosine"})["metric"] == "cosine"
    assert get_head("svm").resolved({"kernel": "linear"})["cv"].startswith("patient-grouped")


def test_knn_search_scores_ties_and_caps_k_as_its_fitted_models_do():
    """The search scored an even k's tied votes with scikit-learn's predict (class 0) while the report
    labels P(class 1) >= 0.5 (class 1): k was chosen by another rule than the one it was judged by. And it
    capped k at the smallest fold's training rows for every fold, where each out-of-fold model capped at its
    own, recording the capped value (15 and 31 both listed as 7)."""
    from sklearn.model_selection import StratifiedGroupKFold

    from featcache.metrics import predict_labels

    rng = np.random.default_rng(0)
    n = 300
    y = (rng.random(n) < 0.7).astype(int)
    g = np.arange(n) // 2
    X = rng.normal(size=(n, 10))
    X[:, 0] += 0.8 * y
    folds = list(StratifiedGroupKFold(5, shuffle=True, random_state=0).split(X, y, g))
    head = get_head("knn")
    res = head.search(X, y, folds, [{"n_neighbors": 4}])
    per_fold = []
    for tr, va in folds:
        model = head.fit(X[tr], y[tr], {"n_neighbors": 4})
        per_fold.append(np.mean(predict_labels(model.predict_proba(X[va])) == y[va]))
    assert res.cv_results["mean_test_score"][0] == pytest.approx(np.mean(per_fold), abs=1e-12)

    X2 = rng.normal(size=(30, 4))
    y2 = np.array([0, 1] * 15)
    X2[:, 0] += y2
    uneven = [(np.arange(0, 12), np.arange(12, 30)), (np.arange(12, 30), np.arange(0, 12))]
    grid = [{"n_neighbors": 15, "weights": "distance"}, {"n_neighbors": 40, "weights": "distance"}]
    res = head.search(X2, y2, uneven, grid)
    assert [p["n_neighbors"] for p in res.cv_results["params"]] == [15, 40]  # what was asked for
    model = head.fit(X2[uneven[1][0]], y2[uneven[1][0]], grid[0])  # fold 2's model: k 15 of 18 rows
    want = np.mean(predict_labels(model.predict_proba(X2[uneven[1][1]])) == y2[uneven[1][1]])
    assert res.cv_results["split1_test_score"][0] == pytest.approx(want, abs=1e-12)


def test_knn_search_in_threads_does_not_warn_about_sklearns_parallel(monkeypatch):
    """A knn search warned "`sklearn.utils.parallel.delayed` should be used with
    `sklearn.utils.parallel.Parallel`": on few features each fold's model queries a KD tree through
    scikit-learn's Parallel, whose worker empties the process-wide warning filters and refills them, and a
    Parallel started in another search thread in between captured none. The moment is short, so the test
    widens it (a pause after the emptying) and runs 4 threads, where the old search warned on every run."""
    import os
    import time

    real_reset = warnings.resetwarnings

    def slow_reset() -> None:
        real_reset()
        time.sleep(0.002)  # the filters stay empty a little longer: what another thread may catch

    monkeypatch.setattr(warnings, "resetwarnings", slow_reset)
    monkeypatch.setattr(os, "cpu_count", lambda: 4)  # threads even on a 1-core runner
    X, y = separable(n=90, d=12, k=2)  # 12 features: the tree path
    head = get_head("knn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = head.search(X, y, folds_for(y), [{"n_neighbors": k} for k in (1, 3, 5, 7, 9, 11, 13, 15)])
    assert not [str(w.message) for w in caught if "sklearn.utils.parallel" in str(w.message)]
    assert all(np.isfinite(res.cv_results["mean_test_score"]))


def test_a_knn_search_counts_no_unconverged_fits_where_svm_counts_them():
    """A knn search recorded cv_unconverged_fits 0 (run.json), and `runs show` would read "every fit
    converged" of models that have no solver to converge: the count is None where no fit could say (knn),
    a number where each fit says (svm)."""
    X, y = separable(n=60, d=20, k=2)
    folds = folds_for(y)
    assert get_head("knn").search(X, y, folds, [{"n_neighbors": 3}]).n_unconverged is None
    assert get_head("svm").search(X, y, folds, [{"kernel": "rbf", "C": 1.0}]).n_unconverged == 0


def test_a_linear_svm_ignores_gamma_so_its_configs_are_not_trained_twice():
    """`--grid kernel=linear,rbf --grid gamma=0.1,1` trained two identical linear models, shown as two
    rows: gamma means nothing to a linear SVM."""
    from featcache.fit import FitOptions, build_configs

    grid = ["kernel=linear,rbf", "gamma=0.1,1", "C=1", "class_weight=none"]
    configs = build_configs(get_head("svm"), FitOptions(grid_args=grid))
    assert sorted((c["kernel"], c.get("gamma")) for c in configs) == [
        ("linear", None), ("rbf", 0.1), ("rbf", 1.0)]


@pytest.mark.parametrize("n_classes, output", [(2, "softmax"), (3, "softmax"), (2, "sigmoid")])
def test_keras_head_probabilities_are_model_predicts_in_and_across_batches(n_classes, output) -> None:
    """predict_proba calls the model directly on TensorFlow (model.predict traced a function per model,
    ~0.2 s, most of a small head's run): the numbers must stay predict's, past the 1,024-row batch edge,
    with dropout in the model, and for no rows at all."""
    import keras

    from featcache.heads.mlp import KerasHead, _params, build_model

    p = _params({"layers": (32, 8), "dropout": 0.3, "output_activation": output})
    model = build_model(p, 20, n_classes, 3)
    X = np.random.default_rng(1).normal(size=(2100, 20)).astype(np.float32)
    head = KerasHead(model, n_classes)
    got = head.predict_proba(X)
    ref = np.asarray(model.predict(X, batch_size=1024, verbose=0), dtype=np.float64)
    if ref.shape[1] == 1:
        ref = np.column_stack([1.0 - ref[:, 0], ref[:, 0]])
    assert keras.backend.backend() == "tensorflow"
    assert got.shape == (2100, n_classes) and got.dtype == np.float64
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)
    assert head.predict_proba(X[:0]).shape == (0, n_classes)
