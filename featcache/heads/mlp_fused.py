"""Fused grid training for dense heads: many configs, one minibatch stream, one compiled step.

Why it is faster than one ``model.fit`` per config (measured in ``benchmarks/bench_mlp.py``):

* one tf.function step trains every member of a group on the same minibatch, so the per-step framework
  cost (Python, dispatch, gather of the batch) is paid once per group instead of once per config;
* each member keeps its own variables and the Adam update is TensorFlow's fused ``ResourceApplyAdam``
  kernel: one pass over (weights, gradient, m, v) instead of the dozen element-wise passes of the Keras
  optimizer. With batch 64 and a 2,048 -> 1,024 first layer the update's memory traffic rivals the matmuls;
* on CPUs with bfloat16 matrix units (Intel AMX / AVX512-BF16) the matmuls run in bfloat16 with float32
  accumulation and float32 master weights, Adam state, biases, activations and losses -- the usual "mixed
  precision" recipe. This CPU class measured ~1.4 TFLOP/s bf16 against ~0.35 TFLOP/s float32. ``precision``
  is recorded with every run; ``float32`` reproduces the float32 arithmetic of ``model.fit``.

Semantics follow ``model.fit`` with Keras' Adam: the loss is the mean over the batch of the (class-
weighted) cross-entropy plus the L2 penalties, Adam's bias-corrected step uses epsilon outside the square
root, dropout is inverted dropout, validation runs after every epoch, early stopping counts epochs without
a lower validation loss than its best (as in Keras, the first epoch's, even a NaN), and ``checkpoint``
keeps the best-validation weights (never a NaN epoch's). Members start from the Keras model built for their
own seed (Glorot-uniform kernels, zero biases) and are exported back into it, so save/load/predict are
those of ``train``. They see the same minibatch order, not the one ``model.fit``
would draw, so a member agrees with ``train`` within run-to-run noise, not bit for bit.
"""
from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from featcache.errors import ConfigError
from featcache.heads.base import sample_weights

if TYPE_CHECKING:
    from featcache.heads.mlp_checkpoint import Checkpointer

PRECISIONS = ("auto", "float32", "bfloat16")
PRECISION_ENV = "FEATCACHE_MLP_PRECISION"


def cpu_has_bf16_matmul() -> bool:
    """True when the CPU advertises bfloat16 matrix instructions (AMX-BF16 or AVX512-BF16)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"amx_bf16", "avx512_bf16"})
    except OSError:
        return False
    return False


def _choice(value: str | None, env: str, allowed: tuple[str, ...], what: str) -> str:
    """``value``, or the environment variable ``env`` when it is auto/unset; a clear error if not allowed."""
    choice = value or "auto"
    if choice == "auto":
        choice = os.environ.get(env, "auto") or "auto"
    if choice not in allowed:
        raise ConfigError(f"unknown {what} '{choice}'; use one of {', '.join(allowed)}.")
    return choice


def resolve_precision(precision: str | None = None, trainer: str = "tf") -> str:
    """``auto`` (or unset) -> bfloat16 where the matmuls run on bf16 matrix units, else float32.

    bf16 units: for the TensorFlow trainer a CPU with AMX-BF16/AVX512-BF16; for the JAX trainer a GPU/TPU
    (XLA's CPU backend has no bf16 x bf16 -> float32 product, so JAX on a CPU stays in float32).
    The environment variable ``FEATCACHE_MLP_PRECISION`` overrides ``auto`` (handy for comparisons).
    """
    choice = _choice(precision, PRECISION_ENV, PRECISIONS, "MLP precision")
    if choice == "auto":
        if trainer == "jax":
            from featcache.heads.mlp_fused_jax import accelerator

            return "bfloat16" if accelerator() is not None else "float32"
        return "bfloat16" if cpu_has_bf16_matmul() else "float32"
    return choice


TRAINERS = ("auto", "tf", "jax")
TRAINER_ENV = "FEATCACHE_MLP_TRAINER"


def resolve_trainer(trainer: str | None = None) -> str:
    """Which fused implementation trains grids: ``tf`` (TensorFlow) or ``jax``.

    ``auto`` (or unset; ``FEATCACHE_MLP_TRAINER`` overrides it) follows Keras' backend: JAX when Keras runs
    on JAX (GPU images often have no TensorFlow), TensorFlow otherwise.
    """
    choice = _choice(trainer, TRAINER_ENV, TRAINERS, "MLP grid trainer")
    if choice == "auto":  # Keras' own rule, without importing it (and TensorFlow): see keras_backend
        from featcache.runs import keras_backend

        choice = "jax" if keras_backend() == "jax" else "tf"
    if choice == "jax" and importlib.util.find_spec("jax") is None:
        raise ConfigError("the JAX grid trainer needs JAX: pip install jax (or jax[cuda12] for a GPU), "
                          f"or unset {TRAINER_ENV} to train with TensorFlow.")
    return choice


ACTIVATIONS = ("relu", "sigmoid", "tanh", "elu", "selu", "gelu", "swish", "silu", "linear", "softplus")


def _activation(name: str) -> Callable:
    import tensorflow as tf

    table = {"relu": tf.nn.relu, "sigmoid": tf.sigmoid, "tanh": tf.tanh, "elu": tf.nn.elu, "selu": tf.nn.selu,
             "gelu": tf.nn.gelu, "swish": tf.nn.silu, "silu": tf.nn.silu, "linear": tf.identity,
             "softplus": tf.nn.softplus}
    if name not in table:
        raise ConfigError(f"activation '{name}' is not supported by grid training; use one of "
                          f"{', '.join(ACTIVATIONS)}.")
    return table[name]


class MemberRecord:
    """One config inside a fused group, backend-neutral part: its Keras model (initial weights, export
    target), history, early stopping and best weights. ``weights()`` callables fetch the member's current
    weights from wherever the trainer keeps them, only when needed."""

    def __init__(self, p: dict, model: Any, seed: int, index: int, key: int | None = None):
        self.p, self.model, self.seed, self.index = p, model, seed, index
        # the member's dropout identity: its position in its batch-size group, not in its chunk, so how a
        # machine splits the group into chunks does not change its masks (defaults to ``index``)
        self.key = index if key is None else key
        self.epoch = 0
        self.history: dict[str, list[float]] = {k: [] for k in ("loss", "val_loss", "accuracy",
                                                                 "val_accuracy", "lr")}
        # two "bests", as in ``train``: the checkpoint's starts at inf and only a lower val_loss replaces it
        # (``_best_weights_callback``), so a NaN epoch never becomes the best weights; early stopping's
        # starts unset, as Keras' EarlyStopping's does (see ``stopping_step``)
        self.best_val, self.best_weights = np.inf, None
        self.stop_best: float | None = None
        self.since_best = 0  # epochs since early stopping's best (Keras' ``wait``)
        self.stopped = False
        self.resumed_epoch = 0  # > 0: restored from a checkpoint taken after this many epochs

    def finished(self) -> bool:
        return self.stopped or self.epoch >= int(self.p["epochs"])

    def end_epoch(self, loss: float, acc: float, val_loss: float, val_acc: float,
                  weights: Callable[[], list[np.ndarray]]) -> None:
        self.epoch += 1
        for key, val in zip(("loss", "accuracy", "val_loss", "val_accuracy", "lr"),
                            (loss, acc, val_loss, val_acc, float(self.p["lr"])), strict=True):
            self.history[key].append(float(val))
        if val_loss < self.best_val:
            self.best_val = val_loss
            if self.p["checkpoint"]:
                self.best_weights = weights()
        # Keras' EarlyStopping never stops after the first epoch (``epoch > 0``), whatever the patience,
        # nor after an improvement
        if (not self.stopping_step(val_loss) and self.p["patience"] is not None
                and self.since_best >= int(self.p["patience"]) and self.epoch > 1):
            self.stopped = True

    def stopping_step(self, val_loss: float) -> bool:
        """Early stopping's bookkeeping for one epoch, exactly as Keras 3's EarlyStopping (min_delta 0, no
        baseline): its best starts unset, so the first epoch is always an improvement, even a NaN or inf
        val_loss (a diverged config); later only a strictly lower val_loss is, so after a NaN first epoch
        nothing improves again. True when this epoch improved. Starting from inf instead made a NaN first
        epoch count as one without improvement, and such a config stopped an epoch before ``train``'s."""
        if self.stop_best is None or val_loss < self.stop_best:
            self.stop_best, self.since_best = float(val_loss), 0
            return True
        self.since_best += 1
        return False

    def replay_stopping(self) -> None:
        """Rebuild early stopping's best and wait from the validation losses in ``history`` (on a checkpoint
        restore: the state follows from the history, and an older featcache's checkpoint holds a wait
        counted from inf)."""
        self.stop_best, self.since_best = None, 0
        for val_loss in self.history["val_loss"]:
            self.stopping_step(val_loss)

    def export(self, weights: Callable[[], list[np.ndarray]]) -> Any:
        self.model.set_weights(self.best_weights if self.best_weights is not None else weights())
        return self.model


class _Member(MemberRecord):
    """A member of the TensorFlow trainer: its own variables and Adam moments."""

    salt = 0  # the grid's --seed in its dropout masks (``FusedJob.dropout_seed``), set by ``fused_train``

    def __init__(self, p: dict, model: Any, seed: int, index: int, key: int | None = None):
        import tensorflow as tf

        super().__init__(p, model, seed, index, key)
        weights = [np.asarray(w, np.float32) for w in model.get_weights()]  # kernel, bias per layer
        self.vars = [tf.Variable(w) for w in weights]
        self.m = [tf.Variable(np.zeros_like(w)) for w in weights]
        self.v = [tf.Variable(np.zeros_like(w)) for w in weights]
        self.act = _activation(p["activation"])
        self.sigmoid = p["output_activation"] == "sigmoid"

    def current(self) -> list[np.ndarray]:
        return [v.numpy() for v in self.vars]


def _member_state(mb: _Member, part: int) -> list[Any]:
    """Part 0/1/2 (weights, Adam m, Adam v) of a TF member, for ``Checkpointer.save``."""
    return (mb.vars, mb.m, mb.v)[part]


def _forward(mb: _Member, x: Any, compute: Any, training: bool, seed: Any) -> Any:
    """Logits of one member (float32); matmuls in ``compute`` dtype, everything else float32."""
    import tensorflow as tf

    def dense(h: Any, i: int) -> Any:
        return tf.cast(tf.matmul(h, tf.cast(mb.vars[2 * i], compute)), tf.float32) + mb.vars[2 * i + 1]

    n_hidden = len(mb.vars) // 2 - 1
    rate = float(mb.p["dropout"])
    h = x
    for i in range(n_hidden):
        z = mb.act(dense(h, i))
        if training and rate > 0:
            # int64: the salt (< 2**31) times 2**31 fits; equal values draw equal masks in either dtype
            key = tf.stack([tf.cast(seed, tf.int64),
                            tf.constant(mb.key * 1000 + i + mb.salt * 2**31, tf.int64)])
            keep = tf.random.stateless_uniform(tf.shape(z), seed=key) >= rate
            z = tf.where(keep, z / (1.0 - rate), 0.0)
        h = tf.cast(z, compute)
    return dense(h, n_hidden)


def _losses(mb: _Member, logits: Any, y: Any) -> tuple[Any, Any]:
    """Per-sample cross-entropy and correctness, as Keras computes them for this output."""
    import tensorflow as tf

    if mb.sigmoid:
        # from the logit, as Keras on TensorFlow computes a sigmoid output's loss (it keeps the logit); a
        # clipped probability capped the loss near 16 with a zero gradient, so a saturated member never
        # recovered and its capped val_loss misled early stopping and checkpoint
        z = logits[:, 0]
        ce = tf.nn.sigmoid_cross_entropy_with_logits(labels=tf.cast(y, tf.float32), logits=z)
        correct = tf.cast(tf.equal(tf.cast(tf.sigmoid(z) > 0.5, tf.int32), y), tf.float32)
    else:
        ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits)
        correct = tf.cast(tf.equal(tf.cast(tf.argmax(logits, -1), tf.int32), y), tf.float32)
    return ce, correct


def _penalty(mb: _Member) -> Any:
    """The L2 kernel penalty Keras adds to the loss (0.0 when the config has none)."""
    import tensorflow as tf

    l2 = float(mb.p["l2"])
    if not l2:
        return 0.0
    return l2 * tf.add_n([tf.reduce_sum(tf.square(w)) for w in mb.vars[0::2]])


def _make_fns(members: list[_Member], precision: str, xtr: Any, ytr: Any,
              sw: Any) -> tuple[Callable, Callable]:
    """Compiled train step and evaluation for exactly these members (traced once per phase).

    The step takes only the minibatch's row indices and the step count: the gathers run inside the
    graph, so the Python loop pays one call per step (batch 64 means thousands of steps)."""
    import tensorflow as tf

    compute = tf.bfloat16 if precision == "bfloat16" else tf.float32
    lrs = [tf.constant(float(mb.p["lr"]), tf.float32) for mb in members]
    b1, b2, eps = tf.constant(0.9), tf.constant(0.999), tf.constant(1e-7)

    @tf.function
    def train_step(idx, step):
        x, y, swb = tf.gather(xtr, idx), tf.gather(ytr, idx), tf.gather(sw, idx, axis=1)
        t, seed = tf.cast(step, tf.float32), step
        xc = tf.cast(x, compute)
        batch = tf.cast(tf.shape(x)[0], tf.float32)
        with tf.GradientTape() as tape:
            losses, accs = [], []
            for k, mb in enumerate(members):
                ce, correct = _losses(mb, _forward(mb, xc, compute, True, seed), y)
                losses.append(tf.reduce_sum(ce * swb[k]) / batch + _penalty(mb))
                accs.append(tf.reduce_mean(correct))
            total = tf.add_n(losses)
        variables = [v for mb in members for v in mb.vars]
        grads = tape.gradient(total, variables)
        b1p, b2p = tf.pow(b1, t), tf.pow(b2, t)
        j = 0
        for k, mb in enumerate(members):
            for var, m, v in zip(mb.vars, mb.m, mb.v, strict=True):
                tf.raw_ops.ResourceApplyAdam(var=var.handle, m=m.handle, v=v.handle, beta1_power=b1p,
                                             beta2_power=b2p, lr=lrs[k], beta1=b1, beta2=b2, epsilon=eps,
                                             grad=grads[j])
                j += 1
        return tf.stack(losses), tf.stack(accs)

    @tf.function
    def evaluate(x, y):
        xc = tf.cast(x, compute)
        out_l, out_a = [], []
        for mb in members:
            ce, correct = _losses(mb, _forward(mb, xc, compute, False, tf.constant(0)), y)
            out_l.append(tf.reduce_mean(ce) + _penalty(mb))  # Keras' val_loss includes the L2 term
            out_a.append(tf.reduce_mean(correct))
        return tf.stack(out_l), tf.stack(out_a)

    return train_step, evaluate


class FusedJob(NamedTuple):
    """One fused chunk for a trainer: its configs, their seeds, the callback for each finished member
    (with its index, model, history and resumed epoch), the positions to train (``only``, see
    ``group_setup``) and where the chunk's randomness comes from: ``stream_seed`` seeds its minibatch
    stream (default ``seeds[0]``) and ``keys`` are its members' dropout identities (default positions);
    ``dropout_seed`` (the grid's --seed) salts the TensorFlow trainer's dropout masks, which it left out (a
    new --seed drew the same masks; the JAX trainer draws its masks from the stream seed already). Seed 0
    draws the masks it always drew.

    ``MLPHead.train_many`` gives every chunk of a batch-size group the group's first seed and each member
    its position in the group: how a machine splits a group into chunks (by its cache size on a CPU, one
    chunk on an accelerator) then changes no member's minibatch order or dropout masks."""

    ps: list[dict]
    seeds: list[int]
    on_member: Callable[..., None]
    only: Sequence[int] | None = None
    stream_seed: int | None = None
    keys: Sequence[int] | None = None
    dropout_seed: int = 0

    def stream(self) -> int:
        """The seed of the chunk's minibatch stream."""
        return self.seeds[0] if self.stream_seed is None else int(self.stream_seed)

    def key_fields(self) -> dict:
        """What a checkpoint of this chunk must have been written for (beside precision and data)."""
        return {"ps": self.ps, "seeds": self.seeds, "stream_seed": self.stream(),
                "keys": None if self.keys is None else [int(k) for k in self.keys],
                **({"dropout_seed": int(self.dropout_seed)} if self.dropout_seed else {})}


def group_setup(ytr: np.ndarray, ps: list[dict], n_classes: int, seeds: list[int],
                build: Callable[[dict, int], Any], member: type[MemberRecord],
                only: Sequence[int] | None = None, keys: Sequence[int] | None = None
                ) -> tuple[int, list[Any], dict[int, np.ndarray]]:
    """What both trainers start from: the shared batch size, one ``member`` per config to train (its Keras
    model built from its own seed) and each member's float32 sample weights (class weights, or ones), by
    member index.

    ``only``: the positions in ``ps`` to train (default all). The others are a resumed grid's finished
    configs; members keep their positions, so the rest train as they did in the whole chunk.
    ``keys``: each position's dropout identity (``MemberRecord.key``; default the position)."""
    import keras

    batches = {int(p["batch_size"]) for p in ps}
    if len(batches) != 1:
        raise ConfigError("a fused group needs one batch size (the members share the minibatch stream).")
    keras.utils.set_random_seed(seeds[0])
    positions = range(len(ps)) if only is None else sorted(only)
    # build() is build_model, which already refuses a sigmoid output on a multi-class task
    members = [member(ps[j], build(ps[j], seeds[j]), seeds[j], j, None if keys is None else int(keys[j]))
               for j in positions]
    sw = {}
    for mb in members:
        w = sample_weights(ytr, mb.p["class_weight"], n_classes)
        sw[mb.index] = np.ones(len(ytr), np.float32) if w is None else w.astype(np.float32)
    return batches.pop(), members, sw


def fused_train(Xtr: np.ndarray, ytr: np.ndarray, Xva: np.ndarray, yva: np.ndarray, job: FusedJob,
                n_classes: int, *, build: Callable[[dict, int], Any], precision: str = "auto",
                checkpoint: Checkpointer | None = None) -> str:
    """Train ``job``'s configs (sharing a batch size) as one fused group; report each (index, model, history,
    resumed_epoch) to ``job.on_member`` as it ends. ``build(p, seed)`` returns the config's Keras model
    (initial weights and export target). ``checkpoint``: where the group resumes from and saves to between
    epochs (see ``mlp_checkpoint``). Returns the precision used."""
    import tensorflow as tf

    precision = resolve_precision(precision)
    batch, members, sw = group_setup(ytr, job.ps, n_classes, job.seeds, build, _Member, job.only, job.keys)
    for mb in members:
        mb.salt = int(job.dropout_seed)
    rng = np.random.default_rng(job.stream())
    n = len(ytr)
    xtr_t, ytr_t = tf.constant(np.asarray(Xtr, np.float32)), tf.constant(np.asarray(ytr, np.int32))
    xva_t, yva_t = tf.constant(np.asarray(Xva, np.float32)), tf.constant(np.asarray(yva, np.int32))
    t = 0
    if checkpoint is not None:
        restored = checkpoint.restore(job.key_fields(), precision, members, rng)
        if restored is not None:
            t = restored.t
            for mb in members:
                for variables, arrays in zip((mb.vars, mb.m, mb.v), restored.states[mb.index], strict=True):
                    for var, a in zip(variables, arrays, strict=True):
                        var.assign(a)
    live = list(members)
    while live:
        # a fresh compiled step per phase: the member set (baked into the graph) just changed
        sw_live = tf.constant(np.stack([sw[mb.index] for mb in live]))
        train_step, evaluate = _make_fns(live, precision, xtr_t, ytr_t, sw_live)
        while not any(mb.finished() for mb in live):
            # between epochs every live member is unfinished and every finished one already reported
            if checkpoint is not None and checkpoint.due(t):
                checkpoint.save(live, _member_state, t, rng)
            perm = rng.permutation(n).astype(np.int32)
            losses = np.zeros(len(live))
            accs = np.zeros(len(live))
            for start in range(0, n, batch):
                idx = perm[start:start + batch]
                t += 1
                lm, am = train_step(tf.constant(idx), tf.constant(t, tf.int32))
                w = float(len(idx))
                losses += lm.numpy() * w
                accs += am.numpy() * w
            vl, va = evaluate(xva_t, yva_t)
            vl, va = vl.numpy(), va.numpy()
            for k, mb in enumerate(live):
                mb.end_epoch(losses[k] / n, accs[k] / n, float(vl[k]), float(va[k]), mb.current)
        for mb in [mb for mb in live if mb.finished()]:
            job.on_member(mb.index, mb.export(mb.current), mb.history, mb.resumed_epoch)
        live = [mb for mb in live if not mb.finished()]
    if checkpoint is not None:
        checkpoint.done()
    return precision
