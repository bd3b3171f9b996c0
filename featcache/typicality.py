"""Is an image like the ones a run was trained on? A small reference of the training features, for predict.

Why: a head gives every input a label and a probability. From a mobilenet-0.75 ImageNet logreg run on
Kermany, a black image got P(PNEUMONIA) 0.81 and grey noise P(NORMAL) 1.000, like any X-ray. The
reference lets predict say which images lie outside what the run was trained on.

How: the training (pool) images' orig-view features, split by patient group: a PCA of
:data:`N_COMPONENTS` components is fitted on four fifths, and the other fifth (images of patients the PCA
never saw) sets two limits, :data:`MARGIN` times their :data:`QUANTILE` quantile: of the distance from the
mean within the PCA subspace (Mahalanobis, each component scaled by its variance) and of the distance to
the subspace (the residual). An image beyond either limit is unusual. Measured on the Kermany training
split's mobilenet-0.75 ImageNet features (5,206 images, 1,027 held out by patient; seed 0): none of the 5,206
pool images and none of the 42 full-resolution originals was beyond a limit (the largest reached 0.97 and
0.87 of one), while all 27 noise, blank, gradient, coloured-shape, text and 90-degree-turned images were
(1.24 to 1.68 times a limit); inverted and upside-down X-rays were mostly not (3 of 12). With seeds 1 and
2, 4 and 2 of the 5,206 pool images were beyond a limit, the originals reached 0.94.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

N_COMPONENTS = 32
"""PCA components kept (fewer with few images: an eighth of those it is fitted on)."""
QUANTILE = 0.995
"""Held-out quantile each limit starts from."""
MARGIN = 1.25
"""Limits are this many times the held-out quantile. Why a margin: full-resolution originals of the same
dataset, resized by featcache rather than beforehand, reached 1.17 times the bare 0.995 quantile (more than
half of them were beyond it), and a note on genuine X-rays teaches users to ignore it."""
MIN_IMAGES = 200
"""Fewer training images than this: no reference. Why: a fifth of a small set is too few to set a limit:
of 60 synthetic images (12 held out, 12 components) 4 of the 30 NORMAL ones were beyond a limit, of 200 (40
held out, 20 components) none of the 100."""
MAX_FIT_ROWS = 3000
"""At most this many images fit the PCA (a VGG16 flatten row is 25,088 floats: 300 MB for 3,000)."""
MAX_HELD_OUT = 2000
"""At most this many held-out images set the limits."""


@dataclass(frozen=True)
class FeatureReference:
    """The training features' mean, PCA components and the two limits (see the module's docstring)."""

    mean: np.ndarray  # (d,) float32
    components: np.ndarray  # (k, d) float32, rows orthonormal (stored as float16, used as read)
    variances: np.ndarray  # (k,) float64: each component's variance on the images it was fitted on
    distance_limit: float  # Mahalanobis distance within the subspace
    residual_limit: float  # Euclidean distance to the subspace
    n_fit: int
    n_held_out: int

    def _distances(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(Mahalanobis distance within the subspace, distance to it) of each row, 512 rows at a time (a
        VGG16 flatten row is 100 KB: two temporary copies of 2,000 rows were 400 MB)."""
        distance, residual = np.empty(len(X)), np.empty(len(X))
        for start in range(0, len(X), 512):
            centred = np.asarray(X[start:start + 512], dtype=np.float32) - self.mean
            z = centred @ self.components.T
            centred -= z @ self.components
            residual[start:start + 512] = np.linalg.norm(centred, axis=1)
            distance[start:start + 512] = np.sqrt(((z.astype(np.float64) ** 2) / self.variances).sum(axis=1))
        return distance, residual

    def scores(self, X: np.ndarray) -> np.ndarray:
        """How far each row lies, as a fraction of the nearer-to-exceeded limit: above 1 is unusual."""
        if X.ndim != 2 or X.shape[1] != self.mean.shape[0]:
            raise ValueError(f"features of {X.shape[-1]} values, the reference has {self.mean.shape[0]}")
        distance, residual = self._distances(X)
        return np.maximum(distance / self.distance_limit, residual / self.residual_limit)

    def save(self, path: Path) -> None:
        np.savez(path, mean=self.mean, components=self.components.astype(np.float16),
                 variances=self.variances, limits=np.array([self.distance_limit, self.residual_limit]),
                 counts=np.array([self.n_fit, self.n_held_out], dtype=np.int64))

    @classmethod
    def load(cls, path: Path) -> FeatureReference:
        """Read a saved reference (OSError, ValueError, KeyError or zipfile's error when it is damaged)."""
        with np.load(path, allow_pickle=False) as z:
            limits, counts = z["limits"], z["counts"]
            return cls(mean=z["mean"].astype(np.float32), components=z["components"].astype(np.float32),
                       variances=z["variances"].astype(np.float64), distance_limit=float(limits[0]),
                       residual_limit=float(limits[1]), n_fit=int(counts[0]), n_held_out=int(counts[1]))


def build_reference(
    rows: Callable[[np.ndarray], np.ndarray], groups: np.ndarray, seed: int
) -> FeatureReference | None:
    """The reference of the training images whose features ``rows(indices)`` returns (indices into
    ``groups``, the images' patient groups). None with fewer than :data:`MIN_IMAGES` images. ``rows`` must
    return a new array each call (fit's do): the PCA's rows are centred in place, so that a VGG16-sized
    fit holds one copy of them, not two.

    Deterministic for one seed (the group split, the subsample and the randomized SVD all draw from it).
    Why a patient split: the limits must come from images the PCA did not see, of patients it did not
    see, as a new patient's image is; fitted images sit closer to the subspace than new ones do.
    """
    from sklearn.utils.extmath import randomized_svd

    groups = np.asarray(groups).astype(str)
    if len(groups) < MIN_IMAGES:
        return None
    rng = np.random.default_rng(seed)
    names = rng.permutation(np.unique(groups))
    held_names = set(names[: max(1, len(names) // 5)])
    held = np.flatnonzero([g in held_names for g in groups])
    fit = np.setdiff1d(np.arange(len(groups)), held)
    if len(held) < MIN_IMAGES // 10 or len(fit) < MIN_IMAGES // 2:  # a few patients hold most images
        return None
    fit = np.sort(rng.choice(fit, MAX_FIT_ROWS, replace=False)) if len(fit) > MAX_FIT_ROWS else fit
    held = np.sort(rng.choice(held, MAX_HELD_OUT, replace=False)) if len(held) > MAX_HELD_OUT else held
    X = np.asarray(rows(fit), dtype=np.float32)
    mean = X.mean(axis=0)
    X -= mean
    k = int(min(N_COMPONENTS, len(fit) // 8, X.shape[1]))
    _, s, vt = randomized_svd(X, n_components=k, n_iter=4, random_state=seed)
    del X
    components = vt.astype(np.float16).astype(np.float32)  # as saved, so the limits hold for what is read
    variances = np.maximum(s.astype(np.float64) ** 2 / max(len(fit) - 1, 1), 1e-12 * float(s[0]) ** 2 + 1e-30)
    ref = FeatureReference(mean, components, variances, 1.0, 1.0, len(fit), len(held))
    distance, residual = ref._distances(rows(held))
    d_lim, r_lim = (MARGIN * float(np.quantile(v, QUANTILE)) for v in (distance, residual))
    return FeatureReference(mean, components, variances, max(d_lim, 1e-12), max(r_lim, 1e-12),
                            len(fit), len(held))
