"""Backbone registry: frozen ImageNet CNNs (and saved Keras models) as feature extractors.

Features must be a pure function of (image pixels, backbone, weights, size, pooling, preprocessing),
so everything that decides them is pinned here and reported by :meth:`Backbone.describe`, which
goes into the cache config hash. Two design points matter for speed and reproducibility:

* Preprocessing (each model's own ``keras.applications.<module>.preprocess_input``) runs *inside*
  the compiled forward function, on a uint8 input: the decode threads hand over 4x fewer bytes and
  the arithmetic is fused with the first convolution instead of costing a numpy pass on 2 cores.
* The forward pass is ``model.predict_on_batch`` (measured as fast as a hand-written
  ``tf.function`` on the TF backend, 3x faster than eager calls and far faster than XLA on this CPU,
  and backend-agnostic, so JAX works too) with a fixed batch shape: short batches are padded so the
  function is traced once.

TensorFlow/Keras are imported lazily so ``featcache --help`` stays fast.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from featcache.errors import ConfigError, WeightsDownloadError
from featcache.hashing import sha256_file

POOLINGS = ("avg", "max", "flatten")
_WEIGHT_KEYWORDS = ("imagenet", "none")
MAX_IMAGE_SIZE = 2048  # --image-size cap: one batch of 32 such images is 1.2 GB of float32 pixels
_SAVED_MODEL_SUFFIXES = (".keras", ".h5", ".hdf5")


@dataclass(frozen=True)
class BackboneSpec:
    """One registry entry: what a name means (input size, pooling, preprocessing)."""

    name: str
    input_size: int
    default_pooling: str
    preprocess: str          # keras.applications module whose preprocess_input applies
    min_size: int = 32       # smallest input keras.applications accepts for this architecture


_SPECS: dict[str, BackboneSpec] = {
    "vgg16": BackboneSpec("vgg16", 224, "flatten", "vgg16"),
    "inceptionv3": BackboneSpec("inceptionv3", 299, "avg", "inception_v3", min_size=75),
    "resnet50": BackboneSpec("resnet50", 224, "avg", "resnet50"),
    "densenet121": BackboneSpec("densenet121", 224, "avg", "densenet"),
    "densenet201": BackboneSpec("densenet201", 224, "avg", "densenet"),
    "xception": BackboneSpec("xception", 299, "avg", "xception", min_size=71),
    "mobilenet": BackboneSpec("mobilenet", 224, "avg", "mobilenet"),
    "mobilenet-0.75": BackboneSpec("mobilenet-0.75", 224, "avg", "mobilenet"),
}
_CONSTRUCTORS: dict[str, tuple[str, dict[str, Any]]] = {
    "vgg16": ("VGG16", {}),
    "inceptionv3": ("InceptionV3", {}),
    "resnet50": ("ResNet50", {}),
    "densenet121": ("DenseNet121", {}),
    "densenet201": ("DenseNet201", {}),
    "xception": ("Xception", {}),
    "mobilenet": ("MobileNet", {"alpha": 1.0}),
    "mobilenet-0.75": ("MobileNet", {"alpha": 0.75}),
}
# name -> (keras.applications constructor, extra keyword arguments)
BACKBONE_NAMES = tuple(_SPECS)


def get_spec(name: str) -> BackboneSpec:
    """Registry lookup; an unknown name is a user error that lists the valid ones."""
    spec = _SPECS.get(name.lower())
    if spec is None:
        raise ConfigError(
            f"unknown backbone '{name}'; choose one of: {', '.join(BACKBONE_NAMES)} "
            "(or give the path of a saved .keras model with --layer NAME)"
        )
    return spec


def is_saved_model(name: str) -> bool:
    """A backbone name that looks like a model file (not a registry name) is a saved Keras model."""
    return name.lower() not in _SPECS and (name.lower().endswith(_SAVED_MODEL_SUFFIXES) or os.sep in name)


@dataclass(frozen=True)
class BackboneConfig:
    """Everything the user chooses about a backbone; :meth:`resolved` fills in defaults."""

    name: str
    weights: str = "imagenet"
    pooling: str | None = None
    image_size: int | None = None
    layer: str | None = None
    seed: int = 0

    def resolved(self) -> BackboneConfig:
        """Fill defaults and validate, so two spellings of the same setup give the same cache."""
        weights = self.weights.strip()
        if weights.lower() in _WEIGHT_KEYWORDS:
            weights = weights.lower()
        pooling = self.pooling.lower() if self.pooling else None
        if pooling is not None and pooling not in POOLINGS:
            raise ConfigError(f"--pooling: unknown pooling '{self.pooling}'; choose one of: "
                              f"{', '.join(POOLINGS)}")
        if self.image_size is not None and self.image_size < 1:
            raise ConfigError(f"--image-size must be a positive number of pixels, got {self.image_size}")
        if self.image_size is not None and self.image_size > MAX_IMAGE_SIZE:
            # a typo (22400 for 224) would otherwise fill memory with one batch and be killed without a word
            raise ConfigError(f"--image-size {self.image_size} is above the {MAX_IMAGE_SIZE} px featcache "
                              "allows (ImageNet backbones are trained at 224-331 px); use a smaller one")
        if weights not in _WEIGHT_KEYWORDS and not Path(weights).is_file():
            raise ConfigError(
                f"weights file '{weights}' does not exist; "
                "give --weights imagenet, none or the path of a .h5 file"
            )
        if is_saved_model(self.name):
            return self._resolved_saved(weights, pooling)
        spec = get_spec(self.name)
        size = self.image_size or spec.input_size
        if size < spec.min_size:
            raise ConfigError(
                f"{spec.name} needs images of at least {spec.min_size} px, got --image-size {size}; "
                f"use {spec.min_size} or more"
            )
        if self.layer is not None:
            raise ConfigError(f"--layer only applies to a saved-model backbone, not to '{spec.name}'")
        return replace(self, name=spec.name, weights=weights, pooling=pooling or spec.default_pooling,
                       image_size=size)

    def _resolved_saved(self, weights: str, pooling: str | None) -> BackboneConfig:
        path = Path(self.name).expanduser()
        if not path.is_file():
            raise ConfigError(
                f"saved model '{self.name}' does not exist; give a registry name or a .keras file"
            )
        if weights == "none":
            raise ConfigError("a saved-model backbone uses its own trained weights; drop --weights none")
        if not self.layer:
            raise ConfigError(f"a saved-model backbone needs --layer NAME (the layer whose output is the "
                              f"feature) for '{self.name}'")
        return replace(self, name=str(path.resolve()), weights=weights, pooling=pooling or "avg")


class Backbone:
    """A built, frozen feature extractor: uint8 images in, float32 feature rows out."""

    def __init__(self, config: BackboneConfig, model: Any, *, preprocess_name: str, weights_digest: str,
                 weights_file_sha256: str | None = None, channels: int = 3,
                 model_file_sha256: str | None = None, notes: list[str] | None = None) -> None:
        self.config = config
        # what the user should know about how it was built (extract prints them as notes); the library
        # never prints, and Keras' own UserWarnings about it are turned into these
        self.notes = list(notes or [])
        # a saved model given a separate weights file: the model file still decides the features (its
        # preprocessing layers, its architecture), so it is part of the cache key beside the weights
        self.model_file_sha256 = model_file_sha256
        self.model = model
        self.preprocess_name = preprocess_name
        self.weights_digest = weights_digest
        self.weights_file_sha256 = weights_file_sha256
        self.feature_dim = int(model.output_shape[-1])
        self.input_size = int(config.image_size or 0)
        self._channels = channels
        self._fixed_batch: int | None = None

    def fix_batch_size(self, n: int) -> None:
        """Compile for batches of ``n`` before the first call, whatever size that call has.

        Why: callers that feed uneven batches (predict, where part of each chunk comes from the cache)
        would otherwise fix a tiny batch on a small first call and then split every later batch into it.
        """
        if self._fixed_batch is None:
            self._fixed_batch = max(1, int(n))

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """Features of a uint8 [B, H, W, 3] batch as float32 [B, D].

        The first call fixes the batch size: shorter batches are padded (and larger ones split) so
        the compiled function keeps one input shape and is never retraced.
        """
        batch = np.asarray(batch)
        s = self.input_size
        if batch.ndim != 4 or batch.shape[1:] != (s, s, 3):
            raise ValueError(f"expected a batch of shape [B, {s}, {s}, 3], got {batch.shape}")
        if batch.dtype != np.uint8:
            batch = np.clip(batch, 0, 255).astype(np.uint8)
        n = batch.shape[0]
        if n == 0:
            return np.zeros((0, self.feature_dim), np.float32)
        if self._fixed_batch is None:
            self._fixed_batch = n
        fixed = self._fixed_batch
        out = np.empty((n, self.feature_dim), np.float32)
        for start in range(0, n, fixed):
            part = batch[start:start + fixed]
            m = part.shape[0]
            if m < fixed:
                pad = np.zeros((fixed - m, s, s, 3), np.uint8)
                part = np.concatenate([part, pad])
            if self._channels == 1:
                part = luma(part)
            out[start:start + m] = np.asarray(self.model.predict_on_batch(part), np.float32)[:m]
        return out

    def describe(self) -> dict:
        """Every setting that determines the features (the cache config hashes this)."""
        cfg = self.config
        saved = is_saved_model(cfg.name)
        if cfg.weights in _WEIGHT_KEYWORDS:
            weights = "saved" if saved and cfg.weights == "imagenet" else cfg.weights
        else:
            weights = "file"
        out = {
            "backbone": saved_name(cfg.name) if saved else cfg.name,
            "weights": weights,
            "weights_digest": self.weights_digest,
            "pooling": cfg.pooling,
            "image_size": self.input_size,
            "preprocess": self.preprocess_name,
            "feature_dim": self.feature_dim,
        }
        if self.weights_file_sha256:
            out["weights_file_sha256"] = self.weights_file_sha256
        if self.model_file_sha256:
            out["model_file_sha256"] = self.model_file_sha256
        if saved:
            out["layer"] = cfg.layer
        if self._channels == 1:  # a colour image reaches it as its luma (it took the red channel before)
            out["input_channels"] = "luma"
        return out


def luma(rgb: np.ndarray) -> np.ndarray:
    """uint8 [..., 3] RGB as its uint8 [..., 1] luma (ITU-R 601 weights in Pillow's own fixed-point form, so
    the same values as ``Image.convert("L")``): grey pixels (R = G = B, every X-ray) keep their value
    exactly; a colour image is no longer reduced to its red channel."""
    r, g, b = (rgb[..., i].astype(np.uint32) for i in range(3))
    return ((19595 * r + 38470 * g + 7471 * b + 0x8000) >> 16).astype(np.uint8)[..., None]


def saved_name(path: str) -> str:
    """A file-name-safe backbone label for a saved model, distinct from every registry name."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(path).stem)[:40] or "model"
    return f"saved-{stem}"


def weights_digest(model: Any) -> str:
    """sha256 over the model's weight arrays (shape, dtype, bytes; names excluded because Keras
    numbers auto-named layers per process). Identical weights give the same digest in any process."""
    h = hashlib.sha256()
    for w in model.weights:
        arr = np.ascontiguousarray(np.asarray(w.numpy() if hasattr(w, "numpy") else w))
        h.update(f"{arr.dtype.str}{arr.shape}".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def imagenet_weights_file(name: str, image_size: int) -> str:
    """The no-top weights file name keras.applications looks for in $KERAS_HOME/models."""
    if name.startswith("mobilenet"):
        alpha_text = "7_5" if name == "mobilenet-0.75" else "1_0"
        rows = image_size if image_size in (128, 160, 192, 224) else 224
        return f"mobilenet_{alpha_text}_{rows}_tf_no_top.h5"
    stem = {"inceptionv3": "inception_v3"}.get(name, name)
    return f"{stem}_weights_tf_dim_ordering_tf_kernels_notop.h5"


def keras_models_dir() -> Path:
    """Where keras.applications caches downloaded weights ($KERAS_HOME/models, default ~/.keras/models).

    Without Keras imported, Keras' own rule ($KERAS_HOME, else ~/.keras, else /tmp/.keras where the home
    folder is not writable): extract finds a complete cache's settings without importing it.
    """
    if "keras" in sys.modules:
        from keras.src.backend import config as kconfig

        home = kconfig.keras_home()
    elif "KERAS_HOME" in os.environ:
        home = os.environ["KERAS_HOME"]
    else:
        base = os.path.expanduser("~")
        home = os.path.join(base if os.access(base, os.W_OK) else "/tmp", ".keras")
    return Path(os.path.expanduser(home)) / "models"


BUILD_RULES = 1
"""Bump whenever what a build of a given configuration computes or describes changes (``describe()``'s keys or
values, preprocessing, channel handling, how weights are loaded or seeded). Each cache file records it with
its library versions, and a cache hit takes a build's weights digest and feature size only from files
recorded under the same number (``extract._described_before``): an older file cannot pass for what today's
build would give. Files written before it existed have none, so their hits build as before."""


@dataclass(frozen=True)
class Unbuilt:
    """What :meth:`Backbone.describe` and ``Backbone.notes`` will say, as far as the configuration and the
    files it names tell without building the model (see :func:`describe_unbuilt`)."""

    known: dict                 # describe() entries with their values
    from_build: frozenset[str]  # describe() entries only a build (or a cache it made) can give
    notes: tuple[str, ...]      # the notes a build gives


def describe_unbuilt(config: BackboneConfig) -> Unbuilt | None:
    """The settings a build of ``config`` would describe, except those that need the built model (the
    weights digest, the feature size; a saved model's input and preprocessing), or None when it cannot
    be known without building (ImageNet weights Keras has not downloaded yet).

    Why: a fully cached extract only needs to find its cache file; building the model for that cost
    seconds (and TensorFlow). Files are hashed as the build hashes them, so the values are the same.
    """
    cfg = config.resolved()
    if cfg.weights == "none" and cfg.seed != BackboneConfig.seed:
        return None  # the seed draws the weights but is not in describe(): only a build tells the digest
    try:
        return _describe_unbuilt(cfg)
    except OSError:
        return None  # an unreadable file: the build says what is wrong with it, in its own words


def _describe_unbuilt(cfg: BackboneConfig) -> Unbuilt | None:
    if is_saved_model(cfg.name):
        path = Path(cfg.name)
        known: dict[str, Any] = {"backbone": saved_name(cfg.name), "pooling": cfg.pooling, "layer": cfg.layer,
                                 "weights": "saved" if cfg.weights == "imagenet" else "file"}
        if cfg.weights == "imagenet":
            known["weights_file_sha256"] = sha256_file(path)
        else:
            known.update(weights_file_sha256=sha256_file(Path(cfg.weights)),
                         model_file_sha256=sha256_file(path))
        from_build = {"weights_digest", "feature_dim", "preprocess", "input_channels"}
        if cfg.image_size:
            known["image_size"] = int(cfg.image_size)
        else:
            from_build.add("image_size")
        return Unbuilt(known, frozenset(from_build), ())
    spec = get_spec(cfg.name)
    size = int(cfg.image_size or spec.input_size)
    known = {"backbone": cfg.name, "pooling": cfg.pooling, "image_size": size, "preprocess": spec.preprocess,
             "weights": cfg.weights if cfg.weights in _WEIGHT_KEYWORDS else "file"}
    if cfg.weights == "imagenet":
        cached = keras_models_dir() / imagenet_weights_file(spec.name, size)
        if not cached.is_file():
            return None  # the build downloads it
        known["weights_file_sha256"] = sha256_file(cached)
    elif cfg.weights != "none":
        known["weights_file_sha256"] = sha256_file(Path(cfg.weights))
    notes = ()
    if cfg.weights == "imagenet" and spec.name.startswith("mobilenet") and size not in (128, 160, 192, 224):
        notes = (_other_size_note(spec.name, size, ("224", "224")),)  # Keras' rule in mobilenet.py
    return Unbuilt(known, frozenset({"weights_digest", "feature_dim"}), notes)


def _other_size_note(name: str, size: int, trained: tuple[str, str]) -> str:
    """The note for ImageNet weights trained at another size than the one asked for (see _construct)."""
    return (f"{name} at --image-size {size}: Keras has no ImageNet weights trained at that "
            f"size and loaded the {'x'.join(trained)}-px ones; convolutions take any size, so the "
            f"features are sound, but not those of a network trained at {size} px "
            f"(--image-size {trained[0]} matches its weights)")


def build_backbone(config: BackboneConfig) -> Backbone:
    """Build (and load weights into) the frozen extractor described by ``config``."""
    cfg = config.resolved()
    if is_saved_model(cfg.name):
        return _build_saved(cfg)
    return _build_registry(cfg)


def _preprocess_layer(mode: str, channels: int = 3) -> Any:
    """A layer that casts uint8 to float32 and applies ``mode`` inside the compiled graph."""
    import importlib

    import keras
    from keras import ops

    if mode in ("scale01", "none"):
        fn = (lambda x: x / 255.0) if mode == "scale01" else (lambda x: x)
    else:
        fn = importlib.import_module(f"keras.applications.{mode}").preprocess_input

    class FeatcachePreprocess(keras.layers.Layer):
        """uint8 -> float32 -> the backbone's own preprocess_input (graph ops, backend-agnostic)."""

        def call(self, x):
            return fn(ops.cast(x, "float32"))

    return FeatcachePreprocess(name=f"featcache_preprocess_{mode}")


def _build_registry(cfg: BackboneConfig) -> Backbone:
    import keras

    spec = get_spec(cfg.name)
    ctor_name, kwargs = _CONSTRUCTORS[spec.name]
    ctor = getattr(keras.applications, ctor_name)
    size = int(cfg.image_size or spec.input_size)
    keras_pool = None if cfg.pooling == "flatten" else cfg.pooling
    file_sha = None
    if cfg.weights == "none":
        keras.utils.set_random_seed(cfg.seed)   # random init is seeded: features stay deterministic
    base, notes = _construct(ctor, spec, cfg, size, keras_pool, kwargs)
    if cfg.weights == "imagenet":
        cached = keras_models_dir() / imagenet_weights_file(spec.name, size)
        file_sha = sha256_file(cached) if cached.is_file() else None
    elif cfg.weights != "none":
        file_sha = _load_weights_file(base, Path(cfg.weights), spec.name)
    inp = keras.Input((size, size, 3), dtype="uint8", name="image")
    x = base(_preprocess_layer(spec.preprocess)(inp))
    if cfg.pooling == "flatten":
        x = keras.layers.Flatten(name="featcache_flatten")(x)
    model = keras.Model(inp, x, name=f"featcache_{spec.name}")
    model.trainable = False
    return Backbone(replace(cfg, image_size=size), model, preprocess_name=spec.preprocess,
                    weights_digest=weights_digest(base), weights_file_sha256=file_sha, notes=notes)


# Keras (mobilenet.py) when it has no ImageNet weights trained at the asked size and loads another's
_OTHER_SIZE_WEIGHTS = re.compile(r"Weights for input shape \((\d+), (\d+)\) will be loaded as the default")


def _construct(ctor: Any, spec: BackboneSpec, cfg: BackboneConfig, size: int, pooling: str | None,
               kwargs: dict[str, Any]) -> tuple[Any, list[str]]:
    """Call the keras.applications constructor; a failed ImageNet download becomes one sentence.

    Returns the model and the notes for the user. Why the warnings are caught: at a size Keras has no
    weights for (mao2018's 300 px on mobilenet-0.75), Keras warns "`input_shape` is undefined or
    non-square, or `rows` is not in [128, 160, 192, 224]..." through Python's warnings, a two-line
    UserWarning naming a line of featcache on the CLI's stderr, which reads as a bug and says nothing of
    what it means for the features. That one becomes a note (extract prints it); any other warning is
    passed on unchanged.
    """
    import warnings

    weights = "imagenet" if cfg.weights == "imagenet" else None
    try:
        # Keras prints its download progress on stdout; send it to stderr so `--json` output stays clean.
        with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            base = ctor(include_top=False, weights=weights, input_shape=(size, size, 3), pooling=pooling,
                        **kwargs)
    except Exception as exc:
        expected = keras_models_dir() / imagenet_weights_file(spec.name, size)
        if weights != "imagenet":
            raise
        home = expected.parent.parent
        if expected.is_file() and not os.access(home, os.W_OK):  # Keras looked in /tmp/.keras instead
            raise ConfigError(
                f"Keras does not use {home} ($KERAS_HOME) because this user cannot write to it: it looks "
                f"for {expected.name} under /tmp/.keras instead and tries to download it. Make {home} "
                "writable, point $KERAS_HOME at a writable folder holding models/ with that file, or use "
                f"--weights {expected}"
            ) from exc
        if expected.is_file():  # Keras found the file and could not load it: damaged or not Keras' own
            raise ConfigError(
                f"the ImageNet weights file Keras keeps for {spec.name}, {expected}, could not be loaded "
                f"({_load_reason(exc)}); it is damaged or not Keras' original file: delete it so Keras "
                "downloads it again, replace it with the original, or use --weights PATH"
            ) from exc
        raise WeightsDownloadError(
            f"could not download the ImageNet weights for {spec.name} (no network?)",
            f"put {expected.name} in {expected.parent} (the Keras cache, set by $KERAS_HOME)",
        ) from exc
    notes = []
    for w in caught:
        other = _OTHER_SIZE_WEIGHTS.search(str(w.message))
        if other and issubclass(w.category, UserWarning):
            notes.append(_other_size_note(spec.name, size, other.groups()))
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return base, notes


_SHAPE_MISMATCH = re.compile(r"variable\.shape=(\([^)]*\)), Received: value\.shape=(\([^)]*\))"
                            r".*?Target variable: <Variable path=([^,>]+)", re.S)


def _load_weights_file(model: Any, path: Path, label: str) -> str:
    """Load a weights file into ``model``; ConfigError if it does not fit. Returns the file's sha256.

    Why the warnings are caught: on a mismatch Keras 3 first warns once per nested container it skips
    (dozens of two-line UserWarnings) and then raises, so the user's one-sentence error came last
    under a screenful of noise. And when it only warns, the skipped layers keep their random initial
    weights: features from such a half-loaded model would be silently wrong, so that is an error too.
    """
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            model.load_weights(str(path))
        except Exception as exc:
            reason = _load_reason(exc)
            raise ConfigError(f"weights file '{path}' does not fit backbone {label} ({reason})") from exc
    skipped = [w for w in caught if "Skipping nested container" in str(w.message)]
    if skipped:
        raise ConfigError(f"weights file '{path}' does not fit backbone {label}: {len(skipped)} part(s) of "
                          "the model were not found in it and would keep random weights")
    for w in caught:  # anything else Keras said is passed on unchanged
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return sha256_file(path)


def _load_reason(exc: Exception) -> str:
    """The gist of a Keras loading error: the first mismatched variable's shapes, else its first line."""
    text = str(exc).strip()
    if not text:
        return type(exc).__name__
    first = text.splitlines()[0]
    count = re.match(r"A total of (\d+) objects could not be loaded", first)
    head = f"{count.group(1)} layers do not match; e.g. " if count else ""
    shapes = _SHAPE_MISMATCH.search(text)
    if shapes:
        want, got, var = shapes.groups()
        return f"{head}{var} is {want} in the model but {got} in the file"
    paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
    if count and len(paragraphs) > 1:  # Keras' example error for the first layer that failed
        return f"{head}{paragraphs[1].splitlines()[0][:160]}"
    return first.rstrip(":")[:160]


def _build_saved(cfg: BackboneConfig) -> Backbone:
    import keras

    path = Path(cfg.name)
    try:
        full = keras.models.load_model(str(path), safe_mode=True, compile=False)
    except Exception as exc:
        raise ConfigError(f"could not load saved model '{path}' as a backbone ({type(exc).__name__}: "
                          f"{str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ''})") from exc
    file_sha = None
    if cfg.weights not in _WEIGHT_KEYWORDS:
        file_sha = _load_weights_file(full, Path(cfg.weights), path.name)
    try:
        layer = full.get_layer(cfg.layer)
    except ValueError as exc:
        names = ", ".join(ly.name for ly in full.layers[-8:])
        raise ConfigError(f"saved model '{path.name}' has no layer '{cfg.layer}'; its last layers are: "
                          f"{names}") from exc
    in_shape = full.input_shape
    if isinstance(in_shape, list):
        raise ConfigError(
            f"saved model '{path.name}' has several inputs; a backbone needs exactly one image input"
        )
    h, w, channels = in_shape[1], in_shape[2], in_shape[3]
    if channels not in (1, 3):
        raise ConfigError(f"saved model '{path.name}' expects {channels} channels; a backbone needs 1 or 3")
    size = cfg.image_size or h or 224
    if (h and h != size) or (w and w != size):
        raise ConfigError(f"saved model '{path.name}' takes {h}x{w} images, not --image-size {size}; "
                          "drop --image-size")
    preprocess = "none" if _has_own_preprocessing(full) else "scale01"
    feat = keras.Model(full.inputs, layer.output)
    inp = keras.Input((size, size, channels), dtype="uint8", name="image")
    x = feat(_preprocess_layer(preprocess)(inp))
    if len(x.shape) == 4:
        if cfg.pooling == "flatten":
            x = keras.layers.Flatten()(x)
        elif cfg.pooling == "max":
            x = keras.layers.GlobalMaxPooling2D()(x)
        else:
            x = keras.layers.GlobalAveragePooling2D()(x)
    elif len(x.shape) != 2:
        x = keras.layers.Flatten()(x)
    model = keras.Model(inp, x, name="featcache_saved")
    model.trainable = False
    resolved = replace(cfg, image_size=int(size))
    return Backbone(resolved, model, preprocess_name=preprocess, weights_digest=weights_digest(feat),
                    weights_file_sha256=file_sha or sha256_file(path), channels=channels,
                    model_file_sha256=sha256_file(path) if file_sha else None)


def _has_own_preprocessing(model: Any) -> bool:
    """True when the model rescales its own input (a Rescaling/Normalization layer before any conv)."""
    for ly in model.layers:
        kind = type(ly).__name__
        if kind in ("Rescaling", "Normalization"):
            return True
        if "Conv" in kind or kind == "Dense":
            return False
    return False
