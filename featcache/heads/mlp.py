"""Keras dense head (``mlp``) and grid training (``train_many``).

``train`` builds one ordinary Keras model and calls ``model.fit`` -- the reference behaviour, float32.

``train_many`` is the grid path. Configs the fused trainer reproduces (Adam, constant learning rate) and
that share a batch size are trained together by ``featcache.heads.mlp_fused`` (one minibatch stream, one
compiled step, TensorFlow's fused Adam kernel, bfloat16 matmuls where the CPU has bf16 matrix units); see
that module for why it is faster and how it matches ``model.fit``. Other configs (SGD/RMSprop/Nadam, lr
decay, ReduceLROnPlateau) and groups of one are trained one by one with ``train``. Every trained head says
how it was trained in ``KerasHead.trainer`` (recorded in run.json).
"""
from __future__ import annotations

import functools
import json
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from featcache.errors import ConfigError
from featcache.heads.base import check_params, sample_weights
from featcache.heads.mlp_checkpoint import Checkpointer, data_digest
from featcache.heads.mlp_fused import ACTIVATIONS, FusedJob, fused_train, resolve_precision, resolve_trainer
from featcache.progress import ProgressFn, emit

MODEL_FILE = "head.keras"
OUTPUT_ACTIVATION_LAYER = "output_activation"  # the layer after the linear "output" (see build_model)
DEFAULTS: dict[str, Any] = {
    "layers": (1024, 512), "dropout": 0.0, "activation": "relu", "output_activation": "softmax",
    "optimizer": "adam", "lr": 1e-3, "lr_decay": None, "lr_decay_type": "inverse_time",
    "reduce_lr_patience": None, "batch_size": 64, "epochs": 50, "patience": None, "checkpoint": False,
    "class_weight": None, "l2": 0.0,
}
OPTIMIZERS = ("adam", "sgd", "nadam", "rmsprop")


def _params(params: dict) -> dict:
    p = {**DEFAULTS, **check_params("mlp", params, MLPHead.schema)}
    p["layers"] = tuple(int(v) for v in p["layers"])
    if p["optimizer"] not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer '{p['optimizer']}'; choose one of: {', '.join(OPTIMIZERS)}.")
    if p["output_activation"] not in ("softmax", "sigmoid"):
        raise ConfigError(f"output_activation '{p['output_activation']}' is not supported; "
                          "use softmax or sigmoid.")
    if p["lr_decay_type"] not in ("inverse_time", "exponential"):
        raise ConfigError(f"lr_decay_type '{p['lr_decay_type']}' is not supported; "
                          "use inverse_time or exponential.")
    if not 0.0 <= float(p["dropout"]) < 1.0:
        raise ConfigError(f"dropout {p['dropout']} is out of range; use a value in [0, 1).")
    _check_activation(p["activation"])
    return p


def _check_activation(name: str) -> None:
    """An activation Keras does not know fails here, not as a Keras traceback when the model is built.

    The names grid training takes are all Keras activations: known without importing Keras, which imported
    TensorFlow (5-30 s) in a rerun that only found its runs done."""
    if name in ACTIVATIONS:
        return
    import keras

    try:
        keras.activations.get(name)
    except ValueError:
        raise ConfigError(f"unknown activation '{name}'; use a Keras activation name such as relu, elu, "
                          "tanh or sigmoid.") from None


def _n_out(p: dict, n_classes: int) -> int:
    if p["output_activation"] == "sigmoid":
        if n_classes != 2:
            raise ConfigError("output_activation sigmoid needs a binary task; use softmax for more classes.")
        return 1
    return n_classes


def build_model(p: dict, n_features: int, n_classes: int, seed: int = 0) -> Any:
    """The plain Keras model for config ``p`` (also the export target of fused training)."""
    import keras

    reg = keras.regularizers.L2(float(p["l2"])) if p["l2"] else None
    inputs = keras.Input((n_features,), name="features")
    h = inputs
    for i, units in enumerate(p["layers"]):
        h = keras.layers.Dense(units, activation=p["activation"], kernel_regularizer=reg,
                               kernel_initializer=keras.initializers.GlorotUniform(seed + 7919 * i),
                               name=f"dense_{i}")(h)
        if p["dropout"]:
            h = keras.layers.Dropout(float(p["dropout"]), seed=seed + i, name=f"dropout_{i}")(h)
    # the output layer is linear and its activation a layer of its own: ``train`` fits on the logits (see
    # ``_logit_model``); the weights are the same list as with Dense(activation=...), so fused exports fit
    logits = keras.layers.Dense(_n_out(p, n_classes), activation=None, kernel_regularizer=reg,
                                kernel_initializer=keras.initializers.GlorotUniform(seed + 104729),
                                name="output")(h)
    out = keras.layers.Activation(p["output_activation"], name=OUTPUT_ACTIVATION_LAYER)(logits)
    return keras.Model(inputs, out, name="featcache_mlp")


def _logit_model(model: Any, sigmoid: bool) -> tuple[Any, Any, list[Any]]:
    """(the model up to its logits, sharing every layer and weight; its loss; its accuracy metric).

    Why: a loss on the softmax/sigmoid output is computed from the logit by Keras on TensorFlow but from a
    clipped probability by Keras on JAX (a saturated output then has a capped loss and zero gradient), so
    ``model.fit`` trained differently per backend, and unlike the fused trainers on JAX. On the logits,
    both backends (and both fused trainers) compute the same loss; under TensorFlow the numbers are those
    ``model.fit`` gave before.
    """
    import keras

    logits = keras.Model(model.inputs, model.get_layer("output").output, name="featcache_mlp_logits")
    if sigmoid:
        return (logits, keras.losses.BinaryCrossentropy(from_logits=True),
                [keras.metrics.BinaryAccuracy(threshold=0.0, name="binary_accuracy")])
    return (logits, keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            [keras.metrics.SparseCategoricalAccuracy(name="sparse_categorical_accuracy")])


def _optimizer(p: dict) -> Any:
    import keras

    lr: Any = float(p["lr"])
    if p["lr_decay"]:
        if p["lr_decay_type"] == "inverse_time":  # legacy Keras `decay`: lr / (1 + decay * step)
            lr = keras.optimizers.schedules.InverseTimeDecay(lr, decay_steps=1,
                                                             decay_rate=float(p["lr_decay"]))
        else:
            lr = keras.optimizers.schedules.ExponentialDecay(lr, decay_steps=1000,
                                                            decay_rate=float(p["lr_decay"]))
    cls = {"adam": keras.optimizers.Adam, "sgd": keras.optimizers.SGD, "nadam": keras.optimizers.Nadam,
           "rmsprop": keras.optimizers.RMSprop}[p["optimizer"]]
    return cls(learning_rate=lr)


def _class_weight_dict(p: dict, y: np.ndarray, n_classes: int) -> dict[int, float] | None:
    sw = sample_weights(y, p["class_weight"], n_classes)
    if sw is None:
        return None
    return {int(c): float(sw[np.argmax(y == c)]) for c in np.unique(y)}


class KerasHead:
    """A trained Keras head; saved as ``head.keras`` and loaded with ``safe_mode=True`` (no pickles)."""

    def __init__(self, model: Any, n_classes: int, trainer: dict | None = None):
        self.model = model
        self.n_classes = int(n_classes)
        self.classes_ = np.arange(self.n_classes)
        self.trainer: dict = dict(trainer or {"path": "keras.fit", "precision": "float32"})

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Class probabilities, in batches of 1,024 rows.

        On TensorFlow the model is called directly: ``model.predict`` traces a predict function for every
        new model (about 0.2 s), which in a grid of small heads was most of each run's time (3 calls per
        run), and the eager call runs the same kernels (equal outputs, checked by a test). On JAX ``predict``
        stays: the eager call compiles op by op for every new batch shape, so it lost where a process has
        one model (predict) and won only over a grid whose later heads reuse those shapes (equal
        probabilities either way; a grid could call its heads eagerly, a follow-up). Measured on
        2 busy CPU cores, 1280-d features, a (1024, 512) head: six chunks of <= 64 rows as `featcache
        predict` sends them, first call in the process 1.5-2.3 s eager vs 0.6-1.1 s, same model again
        0.07-0.11 s vs 0.04-0.06 s; 8 new heads of 2 shapes, 3 calls each (5,840 rows), 8.0-9.4 s vs
        12.8-19.0 s (the first head 4.5-5.0 s vs 1.8-2.9 s, each later one 0.35-0.48 s vs 1.5-2.3 s).
        """
        import keras

        X = np.asarray(X, dtype=np.float32)
        if not len(X):  # model.predict fails on no rows (Keras 3.15: UnboundLocalError)
            return np.zeros((0, self.n_classes))
        if keras.backend.backend() == "tensorflow":
            out = np.concatenate([keras.ops.convert_to_numpy(self.model(X[i:i + 1024], training=False))
                                  for i in range(0, len(X), 1024)]).astype(np.float64)
        else:
            out = np.asarray(self.model.predict(X, batch_size=1024, verbose=0), dtype=np.float64)
        if out.shape[1] == 1:
            out = np.column_stack([1.0 - out[:, 0], out[:, 0]])
        return out

    def save(self, directory: Path) -> list[Path]:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / MODEL_FILE
        tmp = directory / ("tmp-" + MODEL_FILE)
        self.model.save(tmp)
        tmp.replace(path)
        return [path]

    @classmethod
    def load(cls, directory: Path) -> KerasHead:
        import keras

        model = keras.models.load_model(Path(directory) / MODEL_FILE, safe_mode=True, compile=False)
        units = int(model.output_shape[-1])
        return cls(model, 2 if units == 1 else units)


def _history_callback(record: dict) -> Any:
    import keras

    class _LR(keras.callbacks.Callback):
        """Record the effective learning rate at the end of each epoch (schedules included)."""

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            opt = self.model.optimizer
            lr = opt.learning_rate
            value = lr(opt.iterations) if callable(lr) else lr
            record.setdefault("lr", []).append(float(keras.ops.convert_to_numpy(value)))

    return _LR()


def _best_weights_callback(monitor: str = "val_loss") -> Any:
    import keras

    class _Best(keras.callbacks.Callback):
        """Keep the weights of the best validation epoch in memory and restore them at the end."""

        best = np.inf
        weights = None

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            value = (logs or {}).get(monitor)
            if value is not None and value < self.best:
                self.best, self.weights = value, self.model.get_weights()

        def on_train_end(self, logs: dict | None = None) -> None:
            if self.weights is not None:
                self.model.set_weights(self.weights)

    return _Best()


def _replay_lr_callback(rates: list[float]) -> Any:
    import keras

    class _Replay(keras.callbacks.Callback):
        """Set each epoch's learning rate from a recorded schedule (the last one past its end)."""

        def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
            self.model.optimizer.learning_rate = float(rates[min(epoch, len(rates) - 1)])

    return _Replay()


def watches_holdout(params: dict) -> bool:
    """Whether training reads the validation rows: early stopping, best-epoch checkpoint, or
    learning-rate reduction on a plateau. Reads the three keys only (their defaults are off), so the
    report can ask it of the params a run recorded without validating them again."""
    return (params.get("patience") is not None or bool(params.get("checkpoint"))
            or params.get("reduce_lr_patience") is not None)


def refit_plan(params: dict, history: dict | None) -> tuple[dict, list[float] | None, dict]:
    """How ``--refit`` retrains a config chosen on the hold-out: (params, learning rates to replay, record).

    Why: the refit trains on the hold-out rows too, so the hold-out can no longer stop it, keep its best
    epoch or lower its learning rate; with those callbacks left on, the refit monitored rows it trained
    on and ran (17 epochs against the hold-out model's 5) on a rule that no longer meant anything. So it
    trains for the number of epochs the hold-out model's weights came from (its best epoch with
    ``checkpoint``, else the epochs it ran), with no validation callbacks, and replays the learning
    rates ReduceLROnPlateau gave the hold-out model (not with ``lr_decay``: a schedule cannot be set per
    epoch, so the refit keeps the schedule and drops the plateau rule). Without those options it trains
    as configured.
    """
    p = _params(params)
    stops = watches_holdout(p)
    h = history or {}
    losses = [float(v) for v in h.get("val_loss") or []]
    if not stops or not h.get("loss"):
        return dict(params), None, {"epochs": int(p["epochs"]), "as_configured": True}
    ran = len(h["loss"])
    finite = [v if np.isfinite(v) else np.inf for v in losses]
    epochs = int(np.argmin(finite)) + 1 if p["checkpoint"] and finite and min(finite) < np.inf else ran
    # a decay schedule cannot be set epoch by epoch (Keras refuses), and the refit keeps the schedule anyway
    replay = p["reduce_lr_patience"] is not None and not p["lr_decay"]
    rates = [float(v) for v in (h.get("lr") or [])][:epochs] if replay else None
    fixed = {**params, "epochs": epochs, "patience": None, "checkpoint": False, "reduce_lr_patience": None}
    record = {"epochs": epochs, "as_configured": False,
              "epochs_from": ("best hold-out epoch (checkpoint)" if p["checkpoint"]
                              else "epochs the hold-out ran"),
              "hold_out_epochs_run": ran, "learning_rates_replayed": bool(rates)}
    return fixed, rates or None, record


def _progress_callback(progress: ProgressFn | None, total: int) -> Any:
    import keras

    class _P(keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            emit(progress, "fit", epoch + 1, total, f"epoch {epoch + 1}/{total}")

    return _P()


def _in_float32(method: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``method`` with Keras' floatx at float32, then put the user's back.

    Why: ``"floatx": "float64"`` in keras.json built float64 heads (other initial weights, other numbers)
    that run.json recorded as float32 under the same run id, and a rerun at float32 then skipped them as
    done. A head's precision is featcache's (``--mlp-precision``), not a global Keras setting.
    """

    @functools.wraps(method)
    def in_float32(*args: Any, **kwargs: Any) -> Any:
        import keras

        before = keras.config.floatx()
        if before == "float32":
            return method(*args, **kwargs)
        keras.config.set_floatx("float32")
        try:
            return method(*args, **kwargs)
        finally:
            keras.config.set_floatx(before)

    return in_float32


class MLPHead:
    """``mlp``: Keras dense head selected on a grouped hold-out fraction."""

    name: ClassVar[str] = "mlp"
    selection: ClassVar[str] = "holdout"
    schema: ClassVar[dict[str, str]] = {
        "layers": "layers", "dropout": "float", "activation": "str", "output_activation": "str",
        "optimizer": "str", "lr": "float", "lr_decay": "float?", "lr_decay_type": "str",
        "reduce_lr_patience": "int?", "batch_size": "int", "epochs": "int", "patience": "int?",
        "checkpoint": "bool", "class_weight": "class_weight", "l2": "float",
    }
    default_grid: ClassVar[dict[str, list]] = {"layers": [(1024, 512)], "lr": [1e-3, 1e-4],
                                               "dropout": [0.0, 0.5], "epochs": [50]}

    def resolved(self, params: dict, *, seed: int = 0) -> dict:
        """The config with every default filled in (batch size, optimizer, activation...): what trains."""
        p = _params(params)
        return {**p, "layers": list(p["layers"])}

    @_in_float32
    def train(self, Xtr: np.ndarray, ytr: np.ndarray, Xva: np.ndarray, yva: np.ndarray, params: dict, *,
              seed: int = 0, progress: ProgressFn | None = None,
              lr_per_epoch: Sequence[float] | None = None) -> tuple[KerasHead, dict]:
        """One Keras model, one ``model.fit`` (the reference behaviour).

        ``lr_per_epoch``: learning rates to set at the start of each epoch (a refit replaying the
        schedule ReduceLROnPlateau gave the hold-out model, see :func:`refit_plan`)."""
        import keras

        p = _params(params)
        ytr, yva = np.asarray(ytr, dtype=int), np.asarray(yva, dtype=int)
        n_classes = int(max(ytr.max(), yva.max() if len(yva) else 0)) + 1
        keras.utils.set_random_seed(seed)
        model = build_model(p, Xtr.shape[1], n_classes, seed)
        sigmoid = p["output_activation"] == "sigmoid"
        trained, loss, metrics = _logit_model(model, sigmoid)  # shares model's layers: fitting it fits model
        trained.compile(optimizer=_optimizer(p), loss=loss, metrics=metrics)
        record: dict = {}
        callbacks = [_history_callback(record), _progress_callback(progress, int(p["epochs"]))]
        if p["patience"] is not None:
            callbacks.append(keras.callbacks.EarlyStopping(patience=int(p["patience"]), monitor="val_loss"))
        if p["reduce_lr_patience"] is not None:
            callbacks.append(keras.callbacks.ReduceLROnPlateau(patience=int(p["reduce_lr_patience"])))
        if p["checkpoint"]:
            callbacks.append(_best_weights_callback())
        if lr_per_epoch:
            callbacks.append(_replay_lr_callback(list(lr_per_epoch)))
        hist = trained.fit(np.asarray(Xtr, np.float32), ytr,
                           validation_data=(np.asarray(Xva, np.float32), yva),
                           batch_size=int(p["batch_size"]), epochs=int(p["epochs"]), verbose=0, shuffle=True,
                           class_weight=_class_weight_dict(p, ytr, n_classes), callbacks=callbacks)
        h = hist.history
        acc = "binary_accuracy" if sigmoid else "sparse_categorical_accuracy"
        history = {"loss": h["loss"], "val_loss": h["val_loss"], "accuracy": h[acc],
                   "val_accuracy": h["val_" + acc], "lr": record.get("lr", [])}
        return KerasHead(model, n_classes), {k: [float(v) for v in vals] for k, vals in history.items()}

    @_in_float32
    def train_many(self, Xtr: np.ndarray, ytr: np.ndarray, Xva: np.ndarray, yva: np.ndarray,
                   configs: list[dict], *, seed: int = 0, progress: ProgressFn | None = None,
                   on_result: Callable[[int, KerasHead, dict], None] | None = None,
                   fuse: bool | None = None, precision: str = "auto",
                   trainer: str | None = None, skip: Collection[int] = (),
                   checkpoint_dir: Path | None = None, checkpoint_about: dict | None = None
                   ) -> list[tuple[KerasHead, dict]]:
        """Train many configs, fusing compatible ones (see ``mlp_fused``); results in config order.

        ``skip``: indices of configs not to train (a resumed grid's finished ones; their results are None).
        Everything that shapes a config's numbers -- its seed, fused or alone, its minibatch stream and its
        dropout keys -- still comes from the whole list, so a resumed grid trains the rest exactly as the
        uninterrupted one would have. The stream and the dropout keys come from the config's batch-size
        group, not from the chunk it is trained in, so how the group is chunked (by the CPU's cache size;
        one chunk on an accelerator) does not change them either (see ``mlp_fused.FusedJob``).
        ``checkpoint_dir``: where each fused chunk keeps its epoch checkpoints (see ``mlp_checkpoint``),
        resumed from when present; a chunk's file is removed once it has finished. ``checkpoint_about``:
        what to write beside them about the sweep (``mlp_checkpoint.ABOUT_FILE``: which command resumes it).

        ``fuse``: None = fuse compatible configs sharing a batch size, in groups of 2 or more;
        True = also fuse groups of one; False = train each config with ``train``.
        ``precision`` of the fused matmuls: auto (bfloat16 on bf16 matrix units), float32, bfloat16.
        ``trainer``: the fused implementation, tf or jax (None/auto: follow Keras' backend, see
        ``mlp_fused.resolve_trainer``).
        """
        ps = [_params(c) for c in configs]
        ytr, yva = np.asarray(ytr, dtype=int), np.asarray(yva, dtype=int)
        n_classes = int(max(ytr.max(), yva.max() if len(yva) else 0)) + 1
        results: list[Any] = [None] * len(ps)
        skip = set(skip)
        done = [0]
        to_train = sum(i not in skip for i in range(len(ps)))

        def finish(i: int, head: KerasHead, hist: dict) -> None:
            results[i] = (head, hist)
            done[0] += 1
            emit(progress, "fit", done[0], to_train, f"config {i + 1} done")
            if on_result is not None:
                on_result(i, head, hist)

        groups, alone = _fused_groups(ps, fuse)
        backend = resolve_trainer(trainer) if groups else "tf"
        resolved = resolve_precision(precision, backend) if groups else "float32"
        d = int(np.shape(Xtr)[1])
        on_cpu = True
        if backend == "jax":
            from featcache.heads.mlp_fused_jax import accelerator

            on_cpu = accelerator() is None
        # cache-sized chunks are a CPU matter: on an accelerator each batch-size group is one chunk
        llc = last_level_cache_bytes() if on_cpu else None
        # a chunk's randomness comes from its batch-size group, not from the chunk: every chunk of a group
        # draws the group's minibatch stream (seeded by its first config) and each member keeps its position
        # in the group as its dropout key, so the cache size (or a GPU's one chunk per group) changes speed,
        # not numbers
        lineage: dict[int, tuple[int, int]] = {}  # config -> (stream seed, dropout key)
        for group in groups.values():
            lineage.update({i: (seed + group[0], k) for k, i in enumerate(group)})
        chunks = [chunk for group in groups.values()
                  for chunk in (_cache_sized_chunks(group, ps, d, llc) if on_cpu else [group])]
        for i in sorted(alone):
            if i not in skip:
                head, hist = self.train(Xtr, ytr, Xva, yva, configs[i], seed=seed + i)
                finish(i, head, hist)
        Xtr32, Xva32 = np.asarray(Xtr, np.float32), np.asarray(Xva, np.float32)  # once, not per chunk
        jobs = []
        kept_chunks = []
        ckpt_of: dict[int, Checkpointer] = {}  # a chunk's first config -> its checkpointer (filled below)
        for idx in chunks:
            keep = [j for j, i in enumerate(idx) if i not in skip]
            if not keep:
                continue
            kept_chunks.append(idx)
            how = {"path": "fused" if backend == "tf" else "fused-jax", "precision": resolved,
                   "group_size": len(idx)}

            def member_done(j: int, model: Any, hist: dict, resumed: int = 0, *, idx: list[int] = idx,
                            how: dict = how) -> None:
                trainer_info = {**how, "resumed_from_epoch": resumed} if resumed else dict(how)
                ckpt = ckpt_of.get(idx[0])
                if ckpt is not None and ckpt.failed:  # an interruption would have lost its training
                    trainer_info["checkpoint_failed"] = True
                finish(idx[j], KerasHead(model, n_classes, trainer_info), hist)

            jobs.append(FusedJob([ps[i] for i in idx], [seed + i for i in idx], member_done, keep,
                                 lineage[idx[0]][0], [lineage[i][1] for i in idx], dropout_seed=seed))

        def build(p: dict, s: int) -> Any:
            return build_model(p, d, n_classes, s)

        # one checkpoint file per chunk, named by its first config's index in the grid; the data digested once
        where: list[Checkpointer | None] = [None] * len(kept_chunks)
        if checkpoint_dir is not None and kept_chunks:
            digest = data_digest((Xtr32, np.asarray(ytr, np.int32), Xva32, np.asarray(yva, np.int32)))
            where = [Checkpointer(Path(checkpoint_dir) / f"chunk-{idx[0]}.npz", digest, checkpoint_about)
                     for idx in kept_chunks]
            ckpt_of.update({idx[0]: c for idx, c in zip(kept_chunks, where, strict=True) if c is not None})

        if backend == "jax":  # all groups at once: on an accelerator their compilations overlap
            from featcache.heads.mlp_fused_jax import fused_train_jax_groups

            fused_train_jax_groups(Xtr32, ytr, Xva32, yva, jobs, n_classes, build=build, precision=resolved,
                                   checkpoints=where)
        else:
            for job, ckpt in zip(jobs, where, strict=True):
                fused_train(Xtr32, ytr, Xva32, yva, job, n_classes, build=build, precision=resolved,
                            checkpoint=ckpt)
        return results


# Members of one fused step together keep this many bytes of float32 state (weights, Adam m and v,
# gradient), when each member's state fits in the CPU's last-level cache. Why a limit: a lone 2,048 ->
# 1,024 -> 512 head (2.7M parameters, ~44 MB of state) stays in a large last-level cache from step to step,
# while 18 of them fused (~780 MB) stream every byte from DRAM each step. Measured (2-core Xeon, batch 64,
# bf16): 4.1 ms per member-step fused in pairs against 5.4 in a group of 18; small heads fit many to a
# chunk, where fusing is what pays.
FUSE_STATE_BYTES = 96 * 2**20
# A member whose state is larger than the last-level cache streams from DRAM whatever its company, so
# small chunks buy nothing; more members per step give the executor independent ops for both cores.
# Measured (2-core AMD EPYC, 32 MiB L3, bf16, 2,048 -> 1,024 -> 512 heads): batch 64, 7.8-9.8 ms per
# member-step in pairs against 6.8-6.9 in twelves; batch 1,000, 42-45 ms in pairs against 38-41 in eights.
# Such members are fused up to this much state (a bound on memory, not a speed choice).
STREAMING_STATE_BYTES = 2 * 2**30


def _size_bytes(text: str) -> int | None:
    """'32768K' / '105M' / '1024' (sysfs cache sizes) -> bytes; None if unreadable."""
    text = text.strip().upper()
    scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
    digits = text[:-1] if text[-1:] in "KMG" else text
    return int(digits) * scale if digits.isdigit() else None


def last_level_cache_bytes(root: str = "/sys/devices/system/cpu/cpu0/cache") -> int | None:
    """Size of the CPU's last-level (highest-level data/unified) cache from sysfs; None where unknown."""
    best: tuple[int, int] | None = None
    for index in sorted(Path(root).glob("index*")):
        try:
            kind = (index / "type").read_text().strip()
            level = int((index / "level").read_text())
            size = _size_bytes((index / "size").read_text())
        except (OSError, ValueError):
            continue
        if kind != "Instruction" and size and (best is None or level > best[0]):
            best = (level, size)
    return None if best is None else best[1]


def _n_params(p: dict, n_features: int, n_out: int = 2) -> int:
    """Weights + biases of config ``p`` (for chunk sizing; the tiny output layer counted as ``n_out``)."""
    sizes = [n_features, *p["layers"], n_out]
    return sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:], strict=True))


def _cache_sized_chunks(idx: list[int], ps: list[dict], n_features: int,
                        llc_bytes: int | None = None) -> list[list[int]]:
    """Split one batch-size group into chunks; configs with the same epoch count are kept together (a
    chunk whose members finish together is traced once).

    Members whose state fits in the last-level cache (``llc_bytes``; all of them when it is unknown) go
    in chunks within ``FUSE_STATE_BYTES``; the others, which stream from DRAM anyway, in chunks within
    ``STREAMING_STATE_BYTES``.
    """
    def state(i: int) -> int:
        return 16 * _n_params(ps[i], n_features)

    def pack(members: list[int], budget: int) -> list[list[int]]:
        chunks: list[list[int]] = []
        used = 0
        for i in sorted(members, key=lambda i: (int(ps[i]["epochs"]), state(i), i)):
            if chunks and used + state(i) <= budget:
                chunks[-1].append(i)
                used += state(i)
            else:
                chunks.append([i])
                used = state(i)
        return chunks

    cached = [i for i in idx if llc_bytes is None or state(i) <= llc_bytes]
    return pack(cached, FUSE_STATE_BYTES) + pack([i for i in idx if i not in cached], STREAMING_STATE_BYTES)


def unpartnered(configs: list[dict]) -> set[int]:
    """Indices of the fusable configs that ``train_many`` (``fuse=None``) trains alone with ``model.fit``
    (float32) because no other config of the grid shares their batch size.

    Why it is public: for these configs, and only these, the path depends on the rest of the grid (the
    same config trains fused once a later config shares its batch size), and the two paths give different
    numbers, so ``fit`` puts it into their run ids.
    """
    ps = [_params(c) for c in configs]
    return {i for i in _fused_groups(ps, None)[1] if _fusable(ps[i])}


def fused_configs(configs: list[dict]) -> set[int]:
    """Indices of the configs that ``train_many`` (``fuse=None``) trains fused, the only ones that
    ``--mlp-precision`` and ``--mlp-trainer`` shape (the rest train alone with ``model.fit`` in float32);
    public so that ``fit`` can say when those options change nothing."""
    ps = [_params(c) for c in configs]
    return {i for idx in _fused_groups(ps, None)[0].values() for i in idx}


def fused_sigmoid(configs: list[dict]) -> set[int]:
    """Indices of the sigmoid-output configs that ``train_many`` (``fuse=None``) trains fused.

    Why it is public: until the fused trainers took a sigmoid output's loss from its logit (as Keras on
    TensorFlow does), they clipped the probability, and a saturated member stopped learning; ``fit`` marks
    these configs' run ids so their earlier, clipped runs are not found "already done".
    """
    ps = [_params(c) for c in configs]
    groups = _fused_groups(ps, None)[0]
    return {i for idx in groups.values() for i in idx if ps[i]["output_activation"] == "sigmoid"}


def _fused_groups(ps: list[dict], fuse: bool | None) -> tuple[dict[int, list[int]], list[int]]:
    """({batch size: indices trained fused together}, [indices trained alone]) of resolved params."""
    groups: dict[int, list[int]] = {}
    alone: list[int] = []
    for i, p in enumerate(ps):
        if _fusable(p, fuse):
            groups.setdefault(int(p["batch_size"]), []).append(i)
        else:
            alone.append(i)
    if fuse is None:  # a lone config keeps the reference path (model.fit, float32)
        alone += [idx[0] for idx in groups.values() if len(idx) == 1]
        groups = {k: idx for k, idx in groups.items() if len(idx) > 1}
    return groups, alone


def _fusable(p: dict, fuse: bool | None = None) -> bool:
    """Configs the fused trainer reproduces: Adam with a constant learning rate and an activation it has
    (another Keras activation, e.g. leaky_relu, trains alone with ``model.fit`` instead of failing)."""
    if fuse is False:
        return False
    return (p["optimizer"] == "adam" and not p["lr_decay"] and p["reduce_lr_patience"] is None
            and p["activation"] in ACTIVATIONS)


def history_json(history: dict) -> str:
    """Compact JSON of a history (used by benchmarks and for debugging)."""
    return json.dumps({k: [round(v, 6) for v in vals] for k, vals in history.items()})
