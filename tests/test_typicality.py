"""The training-feature reference behind predict's `unusual` column (featcache.typicality)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from featcache.typicality import MIN_IMAGES, FeatureReference, build_reference


def _training(n: int = 600, d: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows near an 8-dimensional subspace (as CNN features of one kind of image are), two per patient;
    returns (rows, groups, the subspace's basis)."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.normal(size=(d, 8)))[0].T
    rows = rng.normal(size=(n, 8)) * np.linspace(3, 1, 8) @ basis + 0.2 * rng.normal(size=(n, d)) + 5.0
    return rows.astype(np.float32), np.repeat(np.arange(n // 2), 2).astype(str), basis


def test_new_rows_of_the_same_kind_pass_and_others_are_unusual() -> None:
    X, groups, basis = _training()
    ref = build_reference(lambda i: X[i], groups, seed=0)
    assert ref is not None and ref.n_fit + ref.n_held_out == len(X)
    fresh, _, _ = _training(n=2000, seed=1)  # another draw: of the same kind only if the basis is the same
    rng = np.random.default_rng(1)
    same = rng.normal(size=(2000, 8)) * np.linspace(3, 1, 8) @ basis + 0.2 * rng.normal(size=(2000, 64)) + 5.0
    assert np.mean(ref.scores(same.astype(np.float32)) > 1) < 0.005  # a 1.25 margin on the 0.995 quantile
    assert np.mean(ref.scores(fresh) > 1) > 0.99  # off the subspace: the residual limit
    far = same[:50] + 40 * basis[0]  # on the subspace, 13 sd out along it: the distance limit
    assert np.all(ref.scores(far.astype(np.float32)) > 1)
    assert np.all(ref.scores(np.full((3, 64), 5.0, dtype=np.float32)) < 1)  # the mean itself


def test_the_same_seed_gives_the_same_reference_and_a_saved_one_scores_alike(tmp_path: Path) -> None:
    X, groups, _ = _training()
    a, b = (build_reference(lambda i: X[i], groups, seed=3) for _ in range(2))
    c = build_reference(lambda i: X[i], groups, seed=4)
    assert a is not None and b is not None and c is not None
    assert np.array_equal(a.components, b.components) and a.residual_limit == b.residual_limit
    assert a.residual_limit != c.residual_limit  # another patient split
    a.save(tmp_path / "ref.npz")
    back = FeatureReference.load(tmp_path / "ref.npz")
    assert np.array_equal(back.scores(X[:20]), a.scores(X[:20]))  # components stored as float16, used so
    with pytest.raises(ValueError, match="features of 63 values, the reference has 64"):
        a.scores(X[:, :63])


def test_too_few_images_or_patients_give_no_reference() -> None:
    X, groups, _ = _training(n=MIN_IMAGES - 2)
    assert build_reference(lambda i: X[i], groups, seed=0) is None
    X, _, _ = _training(n=400)
    one_patient = np.array(["p1"] * 390 + [f"q{i}" for i in range(10)])  # held out: 0 or 1 patient's images
    ref = build_reference(lambda i: X[i], one_patient, seed=0)
    assert ref is None or ref.n_held_out >= MIN_IMAGES // 10
