"""Shared fixtures: small generated image trees, so tests never need ../shared or a network."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _share_jax_compilations() -> None:
    """One persistent XLA compilation cache for the whole test session (and its subprocesses).

    Why: the JAX trainer jits a new epoch function per grid, so every test that trains the same small grid
    on JAX compiled the same programs again; compiling was about two thirds of those tests' time on a
    2-core CI machine. A program loaded from the cache is the one compiled for that HLO, so the numbers do
    not change. The folder is new per session (no state from earlier runs); set JAX_COMPILATION_CACHE_DIR
    to choose another.
    """
    import atexit
    import shutil
    import tempfile

    if "JAX_COMPILATION_CACHE_DIR" in os.environ:
        return
    folder = tempfile.mkdtemp(prefix="featcache-tests-xla-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = folder
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")  # the small grids compile fast
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


_share_jax_compilations()

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def write_xray(path: Path, seed: int, size: int = 64, bright: float = 0.0) -> Path:
    """Write a small synthetic grayscale 'X-ray' JPEG (saved as RGB like the Kermany copy)."""
    rng = np.random.default_rng(seed)
    base = rng.normal(110 + 60 * bright, 30, (size, size)).clip(0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(base).convert("RGB").save(path, quality=90)
    return path


def save_rescaling_model(path: Path, scale: float, offset: float) -> Path:
    """A tiny saved .keras model (Rescaling, a conv layer "feat_conv", average pooling) whose weights do not
    depend on ``scale``/``offset``: two of them share a weights file but not their features."""
    import keras

    keras.utils.set_random_seed(0)
    inp = keras.Input((32, 32, 3))
    x = keras.layers.Rescaling(scale, offset)(inp)
    x = keras.layers.Conv2D(6, 3, activation="relu", name="feat_conv")(x)
    keras.Model(inp, keras.layers.GlobalAveragePooling2D()(x)).save(path)
    return path


def ctrl_c_at_forward_pass(monkeypatch: pytest.MonkeyPatch, n: int = 3) -> None:
    """Make extract raise KeyboardInterrupt at its ``n``-th forward pass (through its ``crash_point`` hook),
    as a user's Ctrl-C would; for the tests of what extract, run and demo then say."""
    import featcache.extract as extract_module

    forwards: list[str] = []

    def ctrl_c(name: str) -> None:
        if name == "extract.forward":
            forwards.append(name)
            if len(forwards) == n:
                raise KeyboardInterrupt

    monkeypatch.setattr(extract_module, "crash_point", ctrl_c)


def make_kermany_tree(root: Path, n_normal: int = 6, n_pneu: int = 6, splits=("train", "test"),
                      size: int = 64) -> Path:
    """A Kermany-layout tree with real-looking names (patients, bacteria/virus subtypes)."""
    seed = 0
    for s_i, split in enumerate(splits):
        for i in range(n_normal):
            seed += 1
            write_xray(root / split / "NORMAL" / f"IM-{1000 + 100 * s_i + i:04d}-0001.jpeg", seed, size, 0.0)
        for i in range(n_pneu):
            seed += 1
            kind = "bacteria" if i % 2 == 0 else "virus"
            write_xray(root / split / "PNEUMONIA" / f"person{100 + 50 * s_i + i}_{kind}_{seed}.jpeg",
                       seed, size, 1.0)
    return root


@pytest.fixture
def kermany_tree(tmp_path: Path) -> Path:
    """A 24-image Kermany-layout dataset under tmp_path/data."""
    return make_kermany_tree(tmp_path / "data")


@pytest.fixture
def shared_dir() -> Path:
    """../shared when present (developer machines and CI); skip the test otherwise."""
    if not SHARED.is_dir():
        pytest.skip("../shared is not present (user clone): real-data check not applicable")
    return SHARED
