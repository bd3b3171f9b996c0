"""Backbone registry: feature shapes, preprocessing, seeded random weights, weight files, saved models.

Small on purpose (2 images; 32-75 px except where the shape check needs the real 224 px input).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

from featcache.backbones import (
    BACKBONE_NAMES,
    BackboneConfig,
    build_backbone,
    get_spec,
    imagenet_weights_file,
)
from featcache.errors import ConfigError, NetworkError


def _images(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _inner(bb):
    """The keras.applications model inside the wrapper (input -> preprocess -> base [-> flatten])."""
    return bb.model.layers[2]


def test_vgg16_flatten_is_25088_and_avg_is_512_with_keras_preprocessing():
    import keras

    x = _images(2, 224)
    flat = build_backbone(BackboneConfig("vgg16", weights="none"))
    f = flat(x)
    assert f.shape == (2, 25088) and f.dtype == np.float32
    assert flat.describe()["pooling"] == "flatten" and flat.describe()["preprocess"] == "vgg16"
    # preprocessing runs inside the graph but must equal keras' own numpy preprocess_input (caffe mode)
    ref = _inner(flat).predict_on_batch(keras.applications.vgg16.preprocess_input(x.astype("float32")))
    np.testing.assert_allclose(f, np.asarray(ref).reshape(2, -1), rtol=1e-5, atol=1e-5)
    avg = build_backbone(BackboneConfig("vgg16", weights="none", pooling="avg"))
    assert avg(x).shape == (2, 512)
    assert avg.weights_digest == flat.weights_digest  # same seed, same weights; pooling has none


def test_inceptionv3_avg_is_2048():
    bb = build_backbone(BackboneConfig("inceptionv3", weights="none", image_size=75))
    assert bb.config.pooling == "avg" and get_spec("inceptionv3").input_size == 299
    out = bb(_images(2, 75))
    assert out.shape == (2, 2048) and np.isfinite(out).all()


def test_weights_none_is_seeded_and_deterministic():
    x = _images(3, 32, seed=1)
    a = build_backbone(BackboneConfig("mobilenet-0.75", weights="none", image_size=32))
    b = build_backbone(BackboneConfig("mobilenet-0.75", weights="none", image_size=32))
    c = build_backbone(BackboneConfig("mobilenet-0.75", weights="none", image_size=32, seed=1))
    assert a.weights_digest == b.weights_digest != c.weights_digest
    assert a.describe() == b.describe()
    np.testing.assert_array_equal(a(x), b(x))
    assert a.feature_dim == 768


def test_fixed_batch_padding_gives_the_same_rows_as_single_images():
    """Short and long batches are padded/split to the first batch size; rows must not depend on it."""
    import keras

    bb = build_backbone(BackboneConfig("mobilenet-0.75", weights="none", image_size=32))
    x = _images(5, 32, seed=2)
    first = bb(x[:3])          # fixes the batch size at 3
    rest = bb(x)               # 5 rows: split into 3 + 2 (padded)
    np.testing.assert_array_equal(first, rest[:3])
    ref = _inner(bb).predict_on_batch(keras.applications.mobilenet.preprocess_input(x.astype("float32")))
    np.testing.assert_allclose(rest, np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_weights_file_roundtrip_and_mismatch(tmp_path: Path):
    src = build_backbone(BackboneConfig("mobilenet-0.75", weights="none", image_size=32))
    wfile = tmp_path / "mine.weights.h5"
    _inner(src).save_weights(str(wfile))
    loaded = build_backbone(BackboneConfig("mobilenet-0.75", weights=str(wfile), image_size=32))
    assert loaded.weights_digest == src.weights_digest
    desc = loaded.describe()
    assert desc["weights"] == "file"
    assert desc["weights_file_sha256"] == hashlib.sha256(wfile.read_bytes()).hexdigest()
    x = _images(2, 32)
    np.testing.assert_array_equal(loaded(x), src(x))
    with warnings.catch_warnings(record=True) as caught:  # Keras' per-container warnings stay inside
        warnings.simplefilter("always")
        expected = (r"does not fit backbone mobilenet \(\d+ layers do not match; e\.g\. conv1/kernel is "
                    r"\(3, 3, 3, 32\) in the model but \(3, 3, 3, 24\) in the file\)")
        with pytest.raises(ConfigError, match=expected):
            build_backbone(BackboneConfig("mobilenet", weights=str(wfile), image_size=32))
    assert not [w for w in caught if "Skipping nested container" in str(w.message)]


def test_half_loaded_weights_are_refused(tmp_path: Path):
    """Keras may only warn that it skipped parts of a model (they keep random weights): that is an error."""
    from featcache.backbones import _load_weights_file

    class HalfLoads:
        def load_weights(self, path: str) -> None:
            warnings.warn("Skipping nested container at 'block_3': no matching group found", UserWarning,
                          stacklevel=1)

    class LoadsWithANote:
        def load_weights(self, path: str) -> None:
            warnings.warn("some other note", UserWarning, stacklevel=1)

    wfile = tmp_path / "w.weights.h5"
    wfile.write_bytes(b"x")
    with pytest.raises(ConfigError, match="1 part\\(s\\) of the model were not found in it"):
        _load_weights_file(HalfLoads(), wfile, "testnet")
    with pytest.warns(UserWarning, match="some other note"):  # other warnings are passed on
        assert _load_weights_file(LoadsWithANote(), wfile, "testnet") == hashlib.sha256(b"x").hexdigest()


def test_imagenet_download_failure_is_one_sentence(tmp_path: Path, monkeypatch):
    """No network: a clear sentence naming the file Keras expects and the alternatives (no real download)."""
    from keras.src.utils import file_utils

    import featcache.backbones as bmod

    def offline(*args, **kwargs):
        raise Exception("URL fetch failure: no network")

    monkeypatch.setattr(file_utils, "get_file", offline)
    monkeypatch.setattr(bmod, "keras_models_dir", lambda: tmp_path / "models")
    with pytest.raises(NetworkError) as err:
        build_backbone(BackboneConfig("resnet50", image_size=32))
    assert err.value.exit_code == 1  # the network failed, not the user: not the usage-error status 2
    msg = str(err.value)
    assert "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5" in msg
    assert str(tmp_path / "models") in msg and "--weights none" in msg and "\n" not in msg


def test_a_damaged_imagenet_file_in_the_keras_cache_is_one_sentence(tmp_path: Path, monkeypatch):
    """Keras finds its cached weights file but cannot load it (truncated, or not Keras' original file):
    one sentence naming the file and what to do (before: a traceback from extract and predict)."""
    from keras.src.utils import file_utils

    import featcache.backbones as bmod

    models = tmp_path / "models"
    models.mkdir()
    damaged = models / "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"
    damaged.write_bytes(b"not an HDF5 file" * 100)
    monkeypatch.setattr(file_utils, "get_file", lambda *a, **k: str(damaged))
    monkeypatch.setattr(bmod, "keras_models_dir", lambda: models)
    with pytest.raises(ConfigError) as err:
        build_backbone(BackboneConfig("resnet50", image_size=32))
    msg = str(err.value)
    assert str(damaged) in msg and "could not be loaded" in msg and "delete it" in msg and "\n" not in msg
    # a $KERAS_HOME this user cannot write to: Keras looks elsewhere, so the good file is not to be deleted
    real_access = os.access
    monkeypatch.setattr(bmod.os, "access", lambda path, mode: False if Path(path) == tmp_path else
                        real_access(path, mode))
    with pytest.raises(ConfigError) as err:
        build_backbone(BackboneConfig("resnet50", image_size=32))
    msg = str(err.value)
    assert "cannot write to it" in msg and "delete" not in msg and f"--weights {damaged}" in msg


@pytest.mark.parametrize(
    ("config", "match"),
    [
        (BackboneConfig("resnet51"), "unknown backbone 'resnet51'"),
        (BackboneConfig("inceptionv3", image_size=60), "at least 75 px"),
        (BackboneConfig("xception", image_size=70), "at least 71 px"),
        (BackboneConfig("vgg16", image_size=22400), "--image-size 22400 is above the 2048 px"),
        (BackboneConfig("vgg16", pooling="mean"), "unknown pooling"),
        (BackboneConfig("vgg16", weights="/no/such/file.h5"), "does not exist"),
        (BackboneConfig("vgg16", layer="block5_pool"), "only applies to a saved-model"),
        (BackboneConfig("/no/such/model.keras", layer="x"), "does not exist"),
    ],
)
def test_config_errors_are_one_sentence(config: BackboneConfig, match: str):
    with pytest.raises(ConfigError, match=match) as err:
        config.resolved()
    assert "\n" not in str(err.value)


def test_registry_defaults_and_weight_file_names():
    assert set(BACKBONE_NAMES) >= {"vgg16", "inceptionv3", "resnet50", "densenet121", "densenet201",
                                   "xception", "mobilenet", "mobilenet-0.75"}
    assert BackboneConfig("VGG16", weights="None").resolved() == BackboneConfig(
        "vgg16", weights="none", pooling="flatten", image_size=224)
    assert imagenet_weights_file("mobilenet-0.75", 224) == "mobilenet_7_5_224_tf_no_top.h5"
    assert imagenet_weights_file("mobilenet", 96) == "mobilenet_1_0_224_tf_no_top.h5"
    assert imagenet_weights_file("inceptionv3", 299) == (
        "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5")


def _tiny_model(path: Path, rescale: bool) -> Path:
    import keras

    keras.utils.set_random_seed(0)
    inp = keras.Input((32, 32, 3))
    x = keras.layers.Rescaling(1 / 255.0)(inp) if rescale else inp
    x = keras.layers.Conv2D(6, 3, activation="relu", name="feat_conv")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    out = keras.layers.Dense(2, activation="softmax", name="head")(x)
    keras.Model(inp, out).save(path)
    return path


def test_saved_model_backbone_layer_pooling_and_preprocessing(tmp_path: Path):
    import keras

    plain = _tiny_model(tmp_path / "own_cnn.keras", rescale=False)
    bb = build_backbone(BackboneConfig(str(plain), layer="feat_conv"))
    x = _images(2, 32, seed=3)
    feats = bb(x)
    assert feats.shape == (2, 6) and bb.preprocess_name == "scale01"
    desc = bb.describe()
    assert desc["backbone"] == "saved-own_cnn" and desc["layer"] == "feat_conv" and desc["weights"] == "saved"
    full = keras.models.load_model(plain, compile=False)
    ref = keras.Model(full.inputs, full.get_layer("gap").output).predict_on_batch(x.astype("float32") / 255.0)
    np.testing.assert_allclose(feats, np.asarray(ref), rtol=1e-5, atol=1e-6)
    flat = build_backbone(BackboneConfig(str(plain), layer="feat_conv", pooling="flatten"))
    assert flat.feature_dim == 30 * 30 * 6

    own = _tiny_model(tmp_path / "with_rescaling.keras", rescale=True)
    assert build_backbone(BackboneConfig(str(own), layer="gap")).preprocess_name == "none"
    with pytest.raises(ConfigError, match="has no layer 'nope'"):
        build_backbone(BackboneConfig(str(own), layer="nope"))
    with pytest.raises(ConfigError, match="needs --layer"):
        BackboneConfig(str(own)).resolved()


@pytest.mark.shared
def test_mobilenet075_imagenet_offline_differs_from_random(shared_dir: Path, tmp_path: Path, monkeypatch):
    """Real ImageNet weights from ../shared/weights through a private Keras cache (no network)."""
    from keras.src.backend import config as kconfig

    weights = sorted((shared_dir / "weights").glob("mobilenet_7_5_224_tf*.h5"))
    if not weights:
        pytest.skip("no MobileNet weights in ../shared/weights")
    (tmp_path / "models").mkdir()
    for w in weights:
        shutil.copy(w, tmp_path / "models" / w.name)
    monkeypatch.setattr(kconfig, "_KERAS_DIR", str(tmp_path))  # KERAS_HOME is read once at import
    x = _images(2, 224, seed=4)
    real = build_backbone(BackboneConfig("mobilenet-0.75", weights="imagenet"))
    rand = build_backbone(BackboneConfig("mobilenet-0.75", weights="none"))
    fr, fn = real(x), rand(x)
    assert fr.shape == (2, 768) and np.isfinite(fr).all()
    assert real.weights_digest != rand.weights_digest
    assert not np.allclose(fr, fn, atol=1e-3)
    assert real.describe()["weights_file_sha256"] == hashlib.sha256(
        (tmp_path / "models" / "mobilenet_7_5_224_tf_no_top.h5").read_bytes()).hexdigest()


def test_a_saved_model_with_a_weights_file_is_keyed_by_both_files(tmp_path: Path):
    """Two saved models with the same weights file but other preprocessing layers shared one cache key (the
    weights file's hash replaced the model file's), so the second reused the first one's vectors."""
    import keras
    from conftest import save_rescaling_model as model

    from featcache.cache import cache_config

    a = model(tmp_path / "m.keras", 1 / 255.0, 0.0)
    sub = tmp_path / "other"
    sub.mkdir()
    b = model(sub / "m.keras", 1 / 127.5, -1.0)  # same name, same weights, other input scaling
    weights = tmp_path / "w.weights.h5"
    keras.models.load_model(a, compile=False).save_weights(weights)
    bb_a, bb_b = (build_backbone(BackboneConfig(str(p), layer="feat_conv", weights=str(weights)))
                  for p in (a, b))
    x = _images(2, 32, seed=5)
    assert not np.allclose(bb_a(x), bb_b(x))  # other features...
    desc_a, desc_b = bb_a.describe(), bb_b.describe()
    assert desc_a["weights_digest"] == desc_b["weights_digest"]
    assert cache_config(tmp_path, desc_a, "squash", "float32") != cache_config(tmp_path, desc_b, "squash",
                                                                               "float32")  # ...other cache


def test_a_one_channel_saved_model_sees_a_colour_images_luma(tmp_path: Path):
    """A 1-channel saved model was fed the red channel only: pure cyan (0, 255, 255) gave black's
    features. It gets the luma now; a grey pixel (every X-ray) keeps its value exactly."""
    import keras

    keras.utils.set_random_seed(0)
    inp = keras.Input((32, 32, 1))
    x = keras.layers.Rescaling(1 / 255.0)(inp)
    x = keras.layers.Conv2D(4, 3, activation="relu", name="feat_conv", bias_initializer="zeros")(x)
    path = tmp_path / "gray.keras"
    keras.Model(inp, keras.layers.GlobalAveragePooling2D()(x)).save(path)
    bb = build_backbone(BackboneConfig(str(path), layer="feat_conv"))
    cyan = np.zeros((1, 32, 32, 3), np.uint8)
    cyan[..., 1:] = 255
    black = np.zeros_like(cyan)
    assert not np.array_equal(bb(cyan), bb(black))
    from featcache.backbones import luma

    grey = np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 3, axis=2)
    assert np.array_equal(luma(grey)[..., 0], grey[..., 0])
    from PIL import Image

    colour = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    assert np.array_equal(luma(colour)[..., 0], np.asarray(Image.fromarray(colour).convert("L")))
    assert bb.describe()["input_channels"] == "luma"
