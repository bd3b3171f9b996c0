"""Keras dense head (``mlp``) and fused grid training (``train_many``).

``train`` builds one ordinary Keras model and calls ``model.fit`` -- the reference behaviour.

``train_many`` is the grid path. For small heads it is faster: a Keras step is short, so per-step framework
overhead, small GEMMs and the per-model Python loop dominate. For wide first layers (2,048 -> 1,024, paper
000's grid) it is NOT: there the sequential Keras loop already reaches about a third of this CPU's matmul
peak and fusion measured 0.65-0.81x, so ``train_many`` only fuses below ``FUSE_MAX_FIRST_LAYER`` first-layer
weights per member (``fuse=True`` forces it). Configs that share (batch size, layers, activation, output,
loss) are trained together as ONE fused model written directly in TensorFlow (tf.function): the same
minibatch order for all k members, layer weights stacked as [k, in, out] (the first layer is a single wide
matmul ``X_b @ [W1_1 | ... | W1_k]``, later layers batched matmuls), per-member learning rate, dropout rate,
L2, class weights and Adam state, each member stopping at its own epoch count (or early-stopping patience)
and keeping its own best-validation weights when ``checkpoint`` is on. Each member is then exported as an
ordinary Keras model, so save/load/predict are the same as ``train``. Configs the fused trainer does not
support (optimizers other than Adam, lr decay, ReduceLROnPlateau) are trained one by one with ``train``.
Members are initialised like Keras (Glorot-uniform kernels, zero biases) but from their own seeds, so a
config's result agrees with ``train`` within run-to-run noise, not bit for bit.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from featcache.errors import ConfigError
from featcache.heads.base import check_params, sample_weights
from featcache.progress import ProgressFn, emit

MODEL_FILE = "head.keras"
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
    return p


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
    out = keras.layers.Dense(_n_out(p, n_classes), activation=p["output_activation"], kernel_regularizer=reg,
                             kernel_initializer=keras.initializers.GlorotUniform(seed + 104729),
                             name="output")(h)
    return keras.Model(inputs, out, name="featcache_mlp")


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

    def __init__(self, model: Any, n_classes: int):
        self.model = model
        self.n_classes = int(n_classes)
        self.classes_ = np.arange(self.n_classes)

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        out = np.asarray(self.model.predict(np.asarray(X, dtype=np.float32), batch_size=1024, verbose=0),
                         dtype=np.float64)
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


def _progress_callback(progress: ProgressFn | None, total: int) -> Any:
    import keras

    class _P(keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            emit(progress, "fit", epoch + 1, total, f"epoch {epoch + 1}/{total}")

    return _P()


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

    def train(self, Xtr: np.ndarray, ytr: np.ndarray, Xva: np.ndarray, yva: np.ndarray, params: dict, *,
              seed: int = 0, progress: ProgressFn | None = None) -> tuple[KerasHead, dict]:
        """One Keras model, one ``model.fit`` (the reference behaviour)."""
        import keras

        p = _params(params)
        ytr, yva = np.asarray(ytr, dtype=int), np.asarray(yva, dtype=int)
        n_classes = int(max(ytr.max(), yva.max() if len(yva) else 0)) + 1
        keras.utils.set_random_seed(seed)
        model = build_model(p, Xtr.shape[1], n_classes, seed)
        sigmoid = p["output_activation"] == "sigmoid"
        model.compile(optimizer=_optimizer(p),
                      loss="binary_crossentropy" if sigmoid else "sparse_categorical_crossentropy",
                      metrics=["binary_accuracy" if sigmoid else "sparse_categorical_accuracy"])
        record: dict = {}
        callbacks = [_history_callback(record), _progress_callback(progress, int(p["epochs"]))]
        if p["patience"] is not None:
            callbacks.append(keras.callbacks.EarlyStopping(patience=int(p["patience"]), monitor="val_loss"))
        if p["reduce_lr_patience"] is not None:
            callbacks.append(keras.callbacks.ReduceLROnPlateau(patience=int(p["reduce_lr_patience"])))
        if p["checkpoint"]:
            callbacks.append(_best_weights_callback())
        hist = model.fit(np.asarray(Xtr, np.float32), ytr, validation_data=(np.asarray(Xva, np.float32), yva),
                         batch_size=int(p["batch_size"]), epochs=int(p["epochs"]), verbose=0, shuffle=True,
                         class_weight=_class_weight_dict(p, ytr, n_classes), callbacks=callbacks)
        h = hist.history
        acc = "binary_accuracy" if sigmoid else "sparse_categorical_accuracy"
        history = {"loss": h["loss"], "val_loss": h["val_loss"], "accuracy": h[acc],
                   "val_accuracy": h["val_" + acc], "lr": record.get("lr", [])}
        return KerasHead(model, n_classes), {k: [float(v) for v in vals] for k, vals in history.items()}

    def train_many(self, Xtr: np.ndarray, ytr: np.ndarray, Xva: np.ndarray, yva: np.ndarray,
                   configs: list[dict], *, seed: int = 0, progress: ProgressFn | None = None,
                   on_result: Callable[[int, KerasHead, dict], None] | None = None,
                   fuse: bool | None = None) -> list[tuple[KerasHead, dict]]:
        """Train many configs, fusing compatible ones (see module docstring); results in config order.

        ``fuse``: None = fuse only where it measured faster (small first layers, groups of 2+);
        True = fuse every compatible config; False = train each config with ``train``.
        """
        ps = [_params(c) for c in configs]
        ytr, yva = np.asarray(ytr, dtype=int), np.asarray(yva, dtype=int)
        n_classes = int(max(ytr.max(), yva.max() if len(yva) else 0)) + 1
        results: list[Any] = [None] * len(ps)
        done = [0]

        def finish(i: int, head: KerasHead, hist: dict) -> None:
            results[i] = (head, hist)
            done[0] += 1
            emit(progress, "fit", done[0], len(ps), f"config {i + 1} done")
            if on_result is not None:
                on_result(i, head, hist)

        groups: dict[tuple, list[int]] = {}
        alone: list[int] = []
        for i, p in enumerate(ps):
            if _fusable(p, int(np.shape(Xtr)[1]), fuse):
                key = (p["batch_size"], p["layers"], p["activation"], p["output_activation"])
                groups.setdefault(key, []).append(i)
            else:
                alone.append(i)
        if fuse is None:  # a group of one gains nothing from fusion
            alone += [idx[0] for idx in groups.values() if len(idx) == 1]
            groups = {k: idx for k, idx in groups.items() if len(idx) > 1}
        for i in sorted(alone):
            head, hist = self.train(Xtr, ytr, Xva, yva, configs[i], seed=seed + i)
            finish(i, head, hist)
        for idx in groups.values():
            fused_train(np.asarray(Xtr, np.float32), ytr, np.asarray(Xva, np.float32), yva,
                        [ps[i] for i in idx], n_classes, seeds=[seed + i for i in idx],
                        on_member=lambda j, model, hist, idx=idx: finish(idx[j], KerasHead(model, n_classes),
                                                                         hist))
        return results


# Fusion pays when per-step overhead dominates, i.e. for small first layers. Measured on a 2-core Xeon
# (4 Adam configs, batch 64, 4,185 rows): 768 -> 128 fused 2.8x faster; 2,048 -> 256 equal (1.05x);
# 768 -> 1024 0.82x and 2,048 -> 1024 0.65x (the sequential Keras loop already runs its GEMMs at ~1/3 of
# the CPU's matmul peak, and the fused stacked matmuls do worse). Above this many first-layer weights
# per member, configs are trained one by one.
FUSE_MAX_FIRST_LAYER = 262_144


def _fusable(p: dict, n_features: int = 0, fuse: bool | None = None) -> bool:
    """Configs the fused trainer reproduces (Adam, constant learning rate) and where fusing is faster."""
    if fuse is False:
        return False
    compatible = p["optimizer"] == "adam" and not p["lr_decay"] and p["reduce_lr_patience"] is None
    if fuse is True or not compatible:
        return compatible
    first = p["layers"][0] if p["layers"] else 2
    return n_features * first <= FUSE_MAX_FIRST_LAYER


def history_json(history: dict) -> str:
    """Compact JSON of a history (used by benchmarks and for debugging)."""
    return json.dumps({k: [round(v, 6) for v in vals] for k, vals in history.items()})


# ---------------------------------------------------------------- fused training

class _Member:
    """Host-side state of one config inside a fused group (weights, Adam moments, history, best weights)."""

    def __init__(self, p: dict, model: Any, seed: int):
        self.p, self.model, self.seed = p, model, seed
        self.weights = [np.asarray(w, np.float32) for w in model.get_weights()]  # kernel, bias per layer
        self.m = [np.zeros_like(w) for w in self.weights]
        self.v = [np.zeros_like(w) for w in self.weights]
        self.t = 0
        self.epoch = 0
        self.history: dict[str, list[float]] = {k: [] for k in ("loss", "val_loss", "accuracy",
                                                                 "val_accuracy", "lr")}
        self.best_val, self.best_weights, self.since_best = np.inf, None, 0
        self.stopped = False

    def finished(self) -> bool:
        return self.stopped or self.epoch >= int(self.p["epochs"])

    def end_epoch(self, loss: float, acc: float, val_loss: float, val_acc: float) -> None:
        self.epoch += 1
        for key, val in zip(("loss", "accuracy", "val_loss", "val_accuracy", "lr"),
                            (loss, acc, val_loss, val_acc, float(self.p["lr"])), strict=True):
            self.history[key].append(float(val))
        if val_loss < self.best_val:
            self.best_val, self.since_best = val_loss, 0
            if self.p["checkpoint"]:
                self.best_weights = [w.copy() for w in self.weights]
        else:
            self.since_best += 1
            if self.p["patience"] is not None and self.since_best >= int(self.p["patience"]) + 0:
                self.stopped = True

    def export(self) -> Any:
        self.model.set_weights(self.best_weights if self.best_weights is not None else self.weights)
        return self.model


def _make_step(n_layers: int, activation: str, sigmoid: bool, D: int):
    """Build the compiled fused train/eval functions for one group shape."""
    import tensorflow as tf

    act = {"relu": tf.nn.relu, "sigmoid": tf.sigmoid, "tanh": tf.tanh, "elu": tf.nn.elu, "selu": tf.nn.selu,
           "gelu": tf.nn.gelu, "swish": tf.nn.silu, "silu": tf.nn.silu, "linear": tf.identity,
           "softplus": tf.nn.softplus}.get(activation)
    if act is None:
        raise ConfigError(f"activation '{activation}' is not supported by grid training; use relu, sigmoid, "
                          "tanh, elu, selu, gelu, swish, softplus or linear.")

    def forward(Ws, bs, x, drop, seed, training):
        M = tf.shape(bs[0])[0]
        h0 = tf.shape(bs[0])[1]
        h = tf.matmul(x, tf.reshape(Ws[0], [D, -1]))               # one wide matmul for all members
        h = tf.transpose(tf.reshape(h, [tf.shape(x)[0], M, h0]), [1, 0, 2]) + bs[0][:, None, :]
        for i in range(n_layers):
            if i > 0:
                h = tf.matmul(h, Ws[i]) + bs[i][:, None, :]          # batched [M, B, in] @ [M, in, out]
            if i < n_layers - 1:
                h = act(h)
                if training:
                    keep = tf.random.stateless_uniform(tf.shape(h), seed=[seed, i]) >= drop[:, None, None]
                    h = tf.where(keep, h / (1.0 - drop[:, None, None]), 0.0)
        return h                                                    # logits [M, B, k]

    def member_losses(logits, y):
        if sigmoid:
            p = tf.clip_by_value(tf.sigmoid(logits[..., 0]), 1e-7, 1 - 1e-7)
            yf = tf.cast(y, tf.float32)[None, :]
            ce = -(yf * tf.math.log(p) + (1 - yf) * tf.math.log(1 - p))
            correct = tf.cast(tf.equal(tf.cast(p > 0.5, tf.int32), y[None, :]), tf.float32)
        else:
            labels = tf.broadcast_to(y[None, :], tf.shape(logits)[:2])
            ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
            correct = tf.cast(tf.equal(tf.cast(tf.argmax(logits, -1), tf.int32), y[None, :]), tf.float32)
        return ce, correct

    @tf.function(reduce_retracing=True)
    def train_step(Ws, bs, ms, vs, x, y, sw, lr, drop, l2, active, t, seed):
        with tf.GradientTape() as tape:
            logits = forward(Ws, bs, x, drop, seed, True)
            ce, correct = member_losses(logits, y)
            B = tf.cast(tf.shape(x)[0], tf.float32)
            loss_m = tf.reduce_sum(ce * sw, axis=1) / B
            reg = tf.add_n([tf.reduce_sum(tf.square(Ws[0]), axis=[0, 2])]
                           + [tf.reduce_sum(tf.square(w), axis=[1, 2]) for w in Ws[1:]])
            loss_m = loss_m + l2 * reg
            total = tf.reduce_sum(loss_m * active)
        variables = list(Ws) + list(bs)
        grads = tape.gradient(total, variables)
        b1, b2, eps = 0.9, 0.999, 1e-7
        alpha = lr * tf.sqrt(1 - tf.pow(b2, t)) / (1 - tf.pow(b1, t)) * active
        for var, g, m, v in zip(variables, grads, ms, vs, strict=True):
            shape_m = [1, -1, 1] if var is Ws[0] else ([-1, 1, 1] if len(var.shape) == 3 else [-1, 1])
            a = tf.reshape(active, shape_m)
            m.assign_add(a * (1 - b1) * (g - m))
            v.assign_add(a * (1 - b2) * (tf.square(g) - v))
            var.assign_sub(tf.reshape(alpha, shape_m) * m / (tf.sqrt(v) + eps))
        return loss_m, tf.reduce_mean(correct, axis=1)

    @tf.function(reduce_retracing=True)
    def evaluate(Ws, bs, x, y):
        logits = forward(Ws, bs, x, tf.zeros([tf.shape(bs[0])[0]]), 0, False)
        ce, correct = member_losses(logits, y)
        return tf.reduce_mean(ce, axis=1), tf.reduce_mean(correct, axis=1)

    return train_step, evaluate


def _run_phase(members: list[_Member], Xtr: np.ndarray, ytr: np.ndarray, Xva: np.ndarray, yva: np.ndarray,
               sw: np.ndarray, rng: np.random.Generator, fns: tuple) -> None:
    """Train the members together until at least one of them is finished; copy state back to the host."""
    import tensorflow as tf

    train_step, evaluate = fns
    L = len(members[0].weights) // 2

    def stack(attr: str, j: int) -> Any:
        arrs = [getattr(mb, attr)[j] for mb in members]
        if j == 0:  # first kernel stored [D, M, h] so the wide matmul needs no copy
            return tf.Variable(np.stack(arrs, axis=1))
        return tf.Variable(np.stack(arrs, axis=0))

    Ws = [stack("weights", 2 * i) for i in range(L)]
    bs = [stack("weights", 2 * i + 1) for i in range(L)]
    order = list(range(0, 2 * L, 2)) + list(range(1, 2 * L, 2))
    ms = [stack("m", j) for j in order]
    vs = [stack("v", j) for j in order]
    lr = tf.constant([float(mb.p["lr"]) for mb in members], tf.float32)
    drop = tf.constant([float(mb.p["dropout"]) for mb in members], tf.float32)
    l2 = tf.constant([float(mb.p["l2"]) for mb in members], tf.float32)
    active = tf.ones([len(members)], tf.float32)
    swm = tf.constant(sw, tf.float32)
    batch = int(members[0].p["batch_size"])
    n = len(ytr)
    xtr_t, ytr_t = tf.constant(Xtr), tf.constant(ytr.astype(np.int32))
    xva_t, yva_t = tf.constant(Xva), tf.constant(yva.astype(np.int32))
    t = members[0].t
    while not any(mb.finished() for mb in members):
        perm = tf.constant(rng.permutation(n).astype(np.int32))
        losses, accs, steps = 0.0, 0.0, 0
        for start in range(0, n, batch):
            idx = perm[start:start + batch]
            t += 1
            lm, am = train_step(Ws, bs, ms, vs, tf.gather(xtr_t, idx), tf.gather(ytr_t, idx),
                                tf.gather(swm, idx, axis=1), lr, drop, l2, active,
                                tf.constant(float(t)), tf.constant(t, tf.int32))
            w = float(idx.shape[0])
            losses, accs, steps = losses + lm.numpy() * w, accs + am.numpy() * w, steps + w
        vl, va = evaluate(Ws, bs, xva_t, yva_t)
        vl, va = vl.numpy(), va.numpy()
        host = _host(Ws, bs) if any(mb.p["checkpoint"] for mb in members) else None
        for k, mb in enumerate(members):
            if host is not None:
                mb.weights = _member_slice(host, k)
            mb.end_epoch(losses[k] / steps, accs[k] / steps, float(vl[k]), float(va[k]))
    host = _host(Ws, bs)
    mh = _host(ms[:L], ms[L:])
    vh = _host(vs[:L], vs[L:])
    for k, mb in enumerate(members):
        mb.t = t
        mb.weights, mb.m, mb.v = _member_slice(host, k), _member_slice(mh, k), _member_slice(vh, k)


def _host(Ws: list, bs: list) -> list[np.ndarray]:
    """Fused variables as host arrays in Keras order [W0, b0, W1, b1, ...] (W0 is [D, M, h])."""
    return [a.numpy() for i in range(len(Ws)) for a in (Ws[i], bs[i])]


def _member_slice(host: list[np.ndarray], k: int) -> list[np.ndarray]:
    return [arr[:, k].copy() if j == 0 else arr[k].copy() for j, arr in enumerate(host)]


def fused_train(Xtr: np.ndarray, ytr: np.ndarray, Xva: np.ndarray, yva: np.ndarray, ps: list[dict],
                n_classes: int, *, seeds: list[int], on_member: Callable[[int, Any, dict], None]) -> None:
    """Train configs sharing batch size and architecture as one fused model; report each as it ends."""
    import keras

    keras.utils.set_random_seed(seeds[0])
    members = [_Member(p, build_model(p, Xtr.shape[1], n_classes, s), s)
               for p, s in zip(ps, seeds, strict=True)]
    sigmoid = ps[0]["output_activation"] == "sigmoid"
    rng = np.random.default_rng(seeds[0])
    index = {id(mb): j for j, mb in enumerate(members)}
    live = list(members)
    while live:
        sw_rows = []
        for mb in live:
            w = sample_weights(ytr, mb.p["class_weight"], n_classes)
            sw_rows.append(np.ones(len(ytr)) if w is None else w)
        # a fresh compiled step per phase: the member count (a traced shape) just changed
        fns = _make_step(len(ps[0]["layers"]) + 1, ps[0]["activation"], sigmoid, Xtr.shape[1])
        _run_phase(live, Xtr, ytr, Xva, yva, np.stack(sw_rows).astype(np.float32), rng, fns)
        for mb in [mb for mb in live if mb.finished()]:
            on_member(index[id(mb)], mb.export(), mb.history)
        live = [mb for mb in live if not mb.finished()]
