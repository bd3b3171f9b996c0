"""Patient-grouped, class-stratified splits.

About 66% of Kermany's training images belong to patients with several X-rays (2,861 patients, 38% of them
with more than one image); an image-level split puts the same child on both
sides and inflates every validation number. Every split here is grouped: all images of one patient
(``groups``) land on the same side. Stratification keeps the class balance of each side close to
the pool's so a fold never ends up without a class.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np

from featcache.errors import ConfigError, DataError

_KFOLD_ADVICE = "add data or lower --cv-folds"
_HOLDOUT_ADVICE = "add images of more patients"  # the hold-out already takes fewer folds where it must


def _check(y: Sequence, groups: Sequence, n_splits: int, advice: str) -> tuple[np.ndarray, np.ndarray]:
    """Validate inputs shared by both splitters and return them as arrays; ``advice`` names what helps the
    splitter in use (the hold-out has no --cv-folds, and raising --val-fraction cannot add a patient)."""
    y_arr = np.asarray(y)
    g_arr = np.asarray(groups)
    if y_arr.shape[0] != g_arr.shape[0]:
        raise ValueError(f"y has {y_arr.shape[0]} entries but groups has {g_arr.shape[0]}")
    n_groups = len(np.unique(g_arr))
    if n_groups < n_splits:
        raise DataError(
            f"only {n_groups} {'patient is' if n_groups == 1 else 'patients are'} available but the split "
            f"needs at least {n_splits}; "
            f"{advice}."
        )
    largest = int(np.max(np.unique(y_arr, return_counts=True)[1])) if len(y_arr) else 0
    if largest < n_splits:  # scikit-learn's splitter needs one class with an image for every fold
        raise DataError(
            f"every class has fewer than {n_splits} images (the largest has {largest}), and the split "
            f"needs {n_splits} folds; {advice}."
        )
    return y_arr, g_arr


def grouped_kfold(y: Sequence, groups: Sequence, n_splits: int = 5, seed: int = 0, *,
                  advice: str = _KFOLD_ADVICE) -> list[tuple[np.ndarray, np.ndarray]]:
    """K folds as (train_idx, val_idx) pairs; a patient is in exactly one validation fold.

    Uses scikit-learn's StratifiedGroupKFold with a seeded shuffle so folds are reproducible.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    if n_splits < 2:
        raise ConfigError(f"--cv-folds must be at least 2, got {n_splits}.")
    y_arr, g_arr = _check(y, groups, n_splits, advice)
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    with warnings.catch_warnings():  # "least populated class has only k members": expected on tiny data
        warnings.simplefilter("ignore", UserWarning)
        folds = [(np.sort(tr).astype(np.int64), np.sort(va).astype(np.int64))
                 for tr, va in splitter.split(np.zeros(len(y_arr)), y_arr, g_arr)]
    return folds


def grouped_holdout(y: Sequence, groups: Sequence, fraction: float = 0.2, seed: int = 0
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(train_idx, val_idx) with about ``fraction`` of the images (whole patients) in validation.

    Implemented as the first fold of a grouped stratified K-fold with the K whose 1/K is nearest to
    ``fraction`` (0.2 -> 5 folds -> 20%; 0.4 -> 3 folds -> 33%: Python's round(2.5) = 2 gave 50% for
    both 0.4 and 0.6); callers record the achieved size.
    """
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"--val-fraction must be between 0 and 1 (exclusive), got {fraction}.")
    n_groups = len(np.unique(np.asarray(groups)))
    # a tiny fraction asks for more folds than patients, or than the largest class has images: fewer folds
    n_groups = min(n_groups, int(np.max(np.unique(np.asarray(y), return_counts=True)[1])) if len(y) else 0)
    # the splitter's own check, before n_splits falls to 1 (which it would refuse as a bad --cv-folds)
    _check(y, groups, 2, _HOLDOUT_ADVICE)
    if fraction > 0.5:  # a fraction above one half: validation is the complement of one fold
        n_splits = min(n_groups, nearest_folds(1.0 - fraction))
        tr, va = grouped_kfold(y, groups, n_splits=n_splits, seed=seed, advice=_HOLDOUT_ADVICE)[0]
        return va, tr
    # few patients: fewer folds (a larger validation share) rather than failing
    n_splits = min(max(2, n_groups), nearest_folds(fraction))
    return grouped_kfold(y, groups, n_splits=n_splits, seed=seed, advice=_HOLDOUT_ADVICE)[0]


def nearest_folds(fraction: float) -> int:
    """The K >= 2 whose one fold, 1/K, is nearest to ``fraction`` (<= 0.5); the smaller K on a tie."""
    low = max(2, int(1.0 / fraction))  # 1/low >= fraction >= 1/(low + 1)
    return min((low, low + 1), key=lambda k: (abs(1.0 / k - fraction), k))


def index_digest(indices: np.ndarray) -> str:
    """SHA-256 of an index array (int64, sorted): recorded in run.json to prove which rows were used."""
    import hashlib

    arr = np.sort(np.asarray(indices, dtype=np.int64))
    return hashlib.sha256(arr.tobytes()).hexdigest()


def holdout_rule_change(fraction: float) -> int | None:
    """The hold-out's fold count where it differs from the old rule K = round(1 / fraction) (Python's
    round: 2.5 -> 2), else None. fit puts it in the hash of hold-out runs, so that runs made under the
    old rule (another split: 50% for 0.4) are not found "already done"; other fractions keep their runs.
    """
    if not 0.0 < fraction < 1.0:
        return None
    side = fraction if fraction <= 0.5 else 1.0 - fraction
    new = nearest_folds(side)
    return new if new != max(2, int(round(1.0 / side))) else None
