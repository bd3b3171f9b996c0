"""Fused grid training for dense heads on JAX: the same semantics as ``mlp_fused``, built for accelerators.

Why a second implementation: with ``KERAS_BACKEND=jax`` TensorFlow may be absent (GPU images often ship
JAX alone), and on a GPU the TensorFlow trainer's shape -- one Python call per minibatch, one kernel
sequence per member -- is bound by launch overhead, not by FLOPs. Here:

* members with the same architecture are **stacked** (weights get a member axis) and trained together:
  the first layer, whose input all members share, as one wide matmul, the others as batched matmuls, so
  a step costs a few kernels per layer whatever the number of members;
* a whole epoch is **one compiled call** (``lax.scan`` over its minibatches, the short last one padded
  with rows of weight 0), plus the validation pass, so Python runs once per epoch, not once per step;
* members that finish (their epochs, or early stopping) are exported at once; on a CPU they are dropped
  from the stack when at most half of it is still training (one recompilation, not one per member), on an
  accelerator never (their arithmetic is nearly free there, a recompilation is not).

Semantics are ``mlp_fused``'s (and so ``model.fit``'s with Keras' Adam): mean over the batch of the class-
weighted cross-entropy plus the L2 penalties, Adam's bias-corrected step with epsilon outside the square
root, inverted dropout, validation after every epoch, early stopping on validation loss, best-weights
checkpointing. The minibatch order is the TensorFlow trainer's (the same numpy generator), so with no
dropout both trainers follow the same trajectory up to float rounding; dropout masks come from JAX's
generator. ``precision``: ``auto`` means bfloat16 matmuls (float32 accumulation, float32 master weights and
Adam state) on GPUs/TPUs and float32 on CPUs (XLA's CPU backend has no bf16 product with a float32 result;
an explicit ``bfloat16`` there rounds each product to bf16); ``float32`` asks for full float32 matmuls
(``Precision.HIGHEST``: no TF32 on GPUs).
"""
from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache, partial
from typing import Any

import numpy as np

from featcache.errors import ConfigError
from featcache.heads.mlp_checkpoint import Checkpointer
from featcache.heads.mlp_fused import ACTIVATIONS, FusedJob, MemberRecord

_B1, _B2, _EPS = 0.9, 0.999, 1e-7


def accelerator() -> str | None:
    """JAX's default platform when it is an accelerator ('gpu', 'tpu'...), else None (CPU or no JAX)."""
    try:
        import jax
    except ImportError:
        return None
    platform = jax.default_backend()
    return None if platform == "cpu" else platform


def _activation(name: str) -> Callable:
    import jax
    import jax.numpy as jnp

    table = {"relu": jax.nn.relu, "sigmoid": jax.nn.sigmoid, "tanh": jnp.tanh, "elu": jax.nn.elu,
             "selu": jax.nn.selu, "gelu": lambda z: jax.nn.gelu(z, approximate=False), "swish": jax.nn.silu,
             "silu": jax.nn.silu, "linear": lambda z: z, "softplus": jax.nn.softplus}
    if name not in table:
        raise ConfigError(f"activation '{name}' is not supported by grid training; use one of "
                          f"{', '.join(ACTIVATIONS)}.")
    return table[name]


class _Stack:
    """Members sharing an architecture: their weights stacked on a leading axis, plus per-member settings.

    ``members`` are ``MemberRecord``s (host-side bookkeeping); member k is row k of every stacked array.
    """

    def __init__(self, members: list[MemberRecord], sw: np.ndarray, state: list[tuple[list, list, list]]):
        p = members[0].p
        self.members = members
        self.activation = p["activation"]
        self.sigmoid = p["output_activation"] == "sigmoid"
        # (weights, Adam m, Adam v), each a list of stacked arrays (members on _member_axis(j))
        self.state = tuple([np.stack([st[part][j] for st in state], axis=_member_axis(j))
                            for j in range(len(state[0][0]))] for part in range(3))
        self.lr = np.array([float(mb.p["lr"]) for mb in members], np.float32)
        self.l2 = np.array([float(mb.p["l2"]) for mb in members], np.float32)
        self.rate = np.array([float(mb.p["dropout"]) for mb in members], np.float32)
        self.sw = sw  # [members, n_train] sample weights
        # each member's dropout keys come from its own key (its position in its batch-size group), not its
        # row in this stack: a restack, another chunking, or a resumed grid whose finished members are
        # absent leaves its masks unchanged
        self.ids = np.array([mb.key for mb in members], np.int32)
        self.dropout = bool(np.any(self.rate > 0))


def _member_axis(j: int) -> int:
    """Axis that holds the members in stacked array j of a member's (kernel, bias, kernel, ...) list.

    Axis 0, except for the first kernel, stacked as [inputs, members, units]: every member reads the same
    input rows, so the first layer is one wide matmul ``x @ W.reshape(inputs, members * units)`` (and its
    weight gradient one ``x.T @ dZ``). As a batched product over a leading member axis, XLA first
    transposed the weights on every step: the first layer's forward and weight gradient took 106-153 ms
    on this CPU for 11 members of 2,048 x 1,024 at batch 64, against 58 ms for the wide matmul.
    """
    return 1 if j == 0 else 0


def _arch(p: dict, weights: list[np.ndarray]) -> tuple:
    """Members with equal keys can share a stack."""
    return (p["activation"], p["output_activation"], tuple(w.shape for w in weights))


def _build_epoch(stacks: list[_Stack], compute: str) -> Callable:
    """One compiled call per epoch: a scan over its minibatches, then the validation pass.

    Every minibatch has the batch size: the epoch's short last one is padded with rows of weight 0 and
    averaged over its real rows (``count``), so one step graph serves all of them. That halves what
    XLA compiles, next to a separate graph for the short batch.
    """
    import jax
    import jax.numpy as jnp
    from jax import lax

    cdt = jnp.bfloat16 if compute == "bfloat16" else jnp.float32
    prec = lax.Precision.HIGHEST if compute == "float32" else None
    # XLA's CPU backend cannot return a float32 product of bf16 operands: there it returns bf16
    out_dt = jnp.float32 if compute == "float32" or accelerator() is not None else jnp.bfloat16
    acts = [_activation(s.activation) for s in stacks]
    sigm = [s.sigmoid for s in stacks]
    drops = [s.dropout for s in stacks]

    def mm(h: Any, w: Any, shared: bool) -> Any:
        """[members, batch, out] products; ``shared``: h is the input [batch, in], w the first kernel
        [in, members, out] (see _member_axis)."""
        if shared:
            n_in, m, n_out = w.shape
            z = jnp.dot(h.astype(cdt), w.reshape(n_in, m * n_out).astype(cdt), precision=prec,
                        preferred_element_type=out_dt)
            return z.reshape(h.shape[0], m, n_out).transpose(1, 0, 2).astype(jnp.float32)
        return jnp.einsum("mbi,mio->mbo", h.astype(cdt), w.astype(cdt), precision=prec,
                          preferred_element_type=out_dt).astype(jnp.float32)

    def forward(si: int, params: list, rate: Any, x: Any, keys: Any) -> Any:
        """Logits [members, batch, out] of stack ``si``; ``keys`` (one per member) None means no dropout."""
        h, shared = x, True
        n_hidden = len(params) // 2 - 1
        for i in range(n_hidden):
            z = acts[si](mm(h, params[2 * i], shared) + params[2 * i + 1][:, None, :])
            if keys is not None:
                u = jax.vmap(lambda k, shape=z.shape[1:], i=i: jax.random.uniform(jax.random.fold_in(k, i),
                                                                                   shape))(keys)
                keep = u >= rate[:, None, None]
                z = jnp.where(keep, z / (1.0 - rate)[:, None, None], 0.0)
            h, shared = z, False
        return mm(h, params[-2], shared) + params[-1][:, None, :]

    def losses(si: int, logits: Any, y: Any) -> tuple[Any, Any]:
        """Per-member, per-sample cross-entropy and correctness [members, batch], as Keras computes them."""
        if sigm[si]:  # from the logit, as mlp_fused (and Keras on TensorFlow): no clipped probability
            z = logits[..., 0]
            yf = y.astype(jnp.float32)[None, :]
            ce = -(yf * jax.nn.log_sigmoid(z) + (1 - yf) * jax.nn.log_sigmoid(-z))
            correct = ((jax.nn.sigmoid(z) > 0.5).astype(jnp.int32) == y[None, :]).astype(jnp.float32)
        else:
            logz = jax.nn.logsumexp(logits, axis=-1)
            picked = jnp.take_along_axis(logits, jnp.broadcast_to(y[None, :, None], logits.shape[:2] + (1,)),
                                         axis=-1)[..., 0]
            ce = logz - picked
            correct = (jnp.argmax(logits, -1) == y[None, :]).astype(jnp.float32)
        return ce, correct

    def penalty(params: list, l2: Any) -> Any:
        """Per-member L2 term over the kernels (even positions), summed over all but the member axis."""
        return l2 * sum(jnp.sum(jnp.square(params[j]), axis=tuple(a for a in range(params[j].ndim)
                                                                  if a != _member_axis(j)))
                        for j in range(0, len(params), 2))

    def step(state: tuple, idx: Any, count: Any, t: Any, key: Any, consts: tuple) -> tuple[tuple, tuple]:
        xtr, ytr, settings, _val = consts
        x, y = xtr[idx], ytr[idx]
        real = (jnp.arange(idx.shape[0]) < count).astype(jnp.float32)  # 0 on the padding rows
        nb = count.astype(jnp.float32)
        params_all = [s[0] for s in state]

        def total(params_all: list) -> tuple[Any, tuple]:
            out_l, out_a = [], []
            for si, params in enumerate(params_all):
                lr, l2, rate, sw, ids = settings[si]
                keys = jax.vmap(lambda m: jax.random.fold_in(key, m))(ids) if drops[si] else None
                logits = forward(si, params, rate, x, keys)
                ce, correct = losses(si, logits, y)
                member_loss = jnp.sum(ce * (sw[:, idx] * real), axis=1) / nb + penalty(params, l2)
                out_l.append(member_loss)
                out_a.append(jnp.sum(correct * real, axis=1) / nb)
            return sum(jnp.sum(v) for v in out_l), (tuple(out_l), tuple(out_a))

        grads, (ls, accs) = jax.grad(total, has_aux=True)(params_all)
        tf = t.astype(jnp.float32)
        corr = jnp.sqrt(1 - _B2 ** tf) / (1 - _B1 ** tf)
        new_state = []
        for si, (params, m, v) in enumerate(state):
            lr_t = (settings[si][0] * corr)
            np_, nm, nv = [], [], []
            for j, (w, g, mi, vi) in enumerate(zip(params, grads[si], m, v, strict=True)):
                mi = mi + (g - mi) * (1 - _B1)
                vi = vi + (g * g - vi) * (1 - _B2)
                scale = lr_t.reshape(tuple(-1 if a == _member_axis(j) else 1 for a in range(w.ndim)))
                np_.append(w - scale * mi / (jnp.sqrt(vi) + _EPS))
                nm.append(mi)
                nv.append(vi)
            new_state.append((np_, nm, nv))
        return tuple(new_state), (ls, accs)

    def epoch(state: tuple, idx: Any, counts: Any, t0: Any, key: Any, consts: tuple) -> tuple:
        """One epoch over minibatches ``idx`` [steps, batch] with ``counts`` real rows each; returns the new
        state and per-stack sums of (loss x real rows, accuracy x real rows)."""
        def body(carry: tuple, inp: tuple) -> tuple:
            st, sums = carry
            i, rows, count = inp
            st, (ls, accs) = step(st, rows, count, t0 + i + 1, jax.random.fold_in(key, i), consts)
            w = count.astype(jnp.float32)
            sums = tuple((sl + ls[si] * w, sa + accs[si] * w) for si, (sl, sa) in enumerate(sums))
            return (st, sums), None

        zeros = tuple((jnp.zeros(len(s.members), jnp.float32), jnp.zeros(len(s.members), jnp.float32))
                      for s in stacks)
        (state, sums), _ = lax.scan(body, (state, zeros), (jnp.arange(idx.shape[0]), idx, counts))
        return state, sums, evaluate(state, consts)

    def evaluate(state: tuple, consts: tuple) -> tuple:
        """Per stack: (validation loss with the L2 term, as Keras reports it; validation accuracy)."""
        xva, yva = consts[3]
        out = []
        for si, (params, _m, _v) in enumerate(state):
            l2 = consts[2][si][1]
            ce, correct = losses(si, forward(si, params, None, xva, None), yva)
            out.append((jnp.mean(ce, axis=1) + penalty(params, l2), jnp.mean(correct, axis=1)))
        return tuple(out)

    return jax.jit(epoch, donate_argnums=(0,))


OnMember = Callable[..., None]
"""Called with (member index, trained Keras model, history, epoch resumed at) as each member ends."""


@dataclass
class _Prepared:
    """One batch-size group ready to train: members built, device data placed, and on an accelerator its
    epoch program compiling in a background thread (``compiled``)."""

    precision: str
    batch: int
    members: list
    sw_rows: dict
    carried: dict
    seed: int
    data: tuple              # device arrays: xtr, ytr, xva, yva, counts
    on_member: OnMember
    rng: np.random.Generator        # the group's minibatch stream
    t: int = 0                      # steps and epochs already trained (> 0 when resumed from a checkpoint)
    epoch_no: int = 0
    checkpoint: Checkpointer | None = None
    stacks: list | None = None      # with ``compiled``: the first phase's stacks, which it was compiled for
    compiled: Future | None = None


def fused_train_jax_groups(Xtr: np.ndarray, ytr: np.ndarray, Xva: np.ndarray, yva: np.ndarray,
                           jobs: list[FusedJob],
                           n_classes: int, *, build: Callable[[dict, int], Any],
                           precision: str = "auto", checkpoints: list[Checkpointer | None] | None = None
                           ) -> str:
    """``mlp_fused.fused_train`` on JAX for several groups, each a ``FusedJob`` (with the callbacks of
    ``fused_train``); returns the precision used.

    On an accelerator every group is prepared before the first one trains, and each group's epoch program
    compiles in a background thread as soon as its members are built: the compilations (seconds each, and
    on a GPU a large part of a grid's time) overlap each other, the next groups' model building and the
    first groups' training. On a CPU the groups run one after the other as before: compiling there would
    take cores from training, and later phases (restacks) compile anyway.
    """
    host = (np.asarray(Xtr, np.float32), np.asarray(ytr, np.int32), np.asarray(Xva, np.float32),
            np.asarray(yva, np.int32))
    device = tuple(_put(a) for a in host)  # once, shared by every group

    where = checkpoints or [None] * len(jobs)

    def prepare(i: int, ahead: bool) -> _Prepared:
        return _prepare(host, device, jobs[i], n_classes, build, precision, ahead, where[i])

    ahead = accelerator() is not None
    preps = [prepare(i, True) for i in range(len(jobs))] if ahead else None
    used = precision
    for i in range(len(jobs)):
        used = _train(preps[i] if preps else prepare(i, False))
    return used


def _prepare(host: tuple, device: tuple, job: FusedJob, n_classes: int, build: Callable[[dict, int], Any],
             precision: str, compile_ahead: bool, checkpoint: Checkpointer | None = None) -> _Prepared:
    """One group: its members built, ``device`` (``host``'s xtr, ytr, xva, yva, already placed) plus its own
    minibatch counts as its data, and with ``compile_ahead`` its first stacks and their epoch program
    submitted for compilation."""
    from featcache.heads.mlp_fused import group_setup, resolve_precision

    precision = resolve_precision(precision, trainer="jax")
    ytr = host[1]
    batch, members, sw_rows = group_setup(ytr, job.ps, n_classes, job.seeds, build, MemberRecord, job.only,
                                          job.keys)
    n = len(ytr)
    steps = -(-n // batch)
    counts = np.minimum(batch, n - batch * np.arange(steps)).astype(np.int32)
    # every member's (weights, Adam m, Adam v) on the host between phases: initial weights, zero moments
    carried: dict[int, tuple[list, list, list]] = {}
    for mb in members:
        w = [np.asarray(a, np.float32) for a in mb.model.get_weights()]
        carried[mb.index] = (w, [np.zeros_like(a) for a in w], [np.zeros_like(a) for a in w])
    prep = _Prepared(precision, batch, members, sw_rows, carried, job.stream(), (*device, _put(counts)),
                     job.on_member, np.random.default_rng(job.stream()), checkpoint=checkpoint)
    if checkpoint is not None:  # before the stacks below are built from ``carried``
        restored = checkpoint.restore(job.key_fields(), precision, members, prep.rng)
        if restored is not None:
            for mb in members:
                carried[mb.index] = tuple([np.asarray(a, np.float32) for a in part]
                                          for part in restored.states[mb.index])
            prep.t, prep.epoch_no = restored.t, int(restored.extra["epoch_no"])
    if compile_ahead:
        prep.stacks = _stacks(members, carried, sw_rows)
        prep.compiled = _compiler().submit(_compile_epoch, prep.stacks, precision, (*host, counts), batch,
                                           prep.seed)
    return prep


def _stacks(live: list[MemberRecord], carried: dict, sw_rows: dict) -> list[_Stack]:
    """The live members grouped by architecture, one ``_Stack`` each (in first-seen order)."""
    by_arch: dict[tuple, list[MemberRecord]] = {}
    for mb in live:
        by_arch.setdefault(_arch(mb.p, carried[mb.index][0]), []).append(mb)
    return [_Stack(g, np.stack([sw_rows[mb.index] for mb in g]), [carried[mb.index] for mb in g])
            for g in by_arch.values()]


def _phase_args(stacks: list[_Stack], put: Callable) -> tuple[tuple, tuple]:
    """A phase's stacked state and per-stack settings (lr, l2, dropout rate, sample weights, member
    indices), through ``put``: to the device for training, to shape specs for compiling ahead. One builder
    for both, so the ahead-of-time program is called with exactly the structure it was compiled for."""
    state = tuple(tuple([put(a) for a in part] for part in s.state) for s in stacks)
    settings = tuple((put(s.lr), put(s.l2), put(s.rate), put(s.sw), put(s.ids)) for s in stacks)
    return state, settings


def _compile_epoch(stacks: list[_Stack], precision: str, host: tuple, batch: int, seed: int) -> Callable:
    """Background thread body: the first phase's epoch program, compiled from shapes alone."""
    import jax

    def spec(a: np.ndarray) -> Any:
        return jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype)

    xtr, ytr, xva, yva, counts = (spec(a) for a in host)
    state, settings = _phase_args(stacks, spec)
    steps = counts.shape[0]
    return _build_epoch(stacks, precision).lower(
        state, jax.ShapeDtypeStruct((steps, batch), np.int32), counts, spec(np.int32(0)),
        jax.random.key(seed), (xtr, ytr, settings, (xva, yva))).compile()


@cache
def _compiler() -> ThreadPoolExecutor:
    """Threads for ahead-of-time compilation (XLA releases the GIL while it compiles)."""
    return ThreadPoolExecutor(max_workers=4, thread_name_prefix="featcache-xla")


def _train(prep: _Prepared) -> str:
    """Train one prepared group to the end; members are reported through ``prep.on_member`` as they end."""
    import jax

    xtr, ytr_d, xva, yva_d, counts = prep.data
    batch, sw_rows, carried = prep.batch, prep.sw_rows, prep.carried
    rng = prep.rng
    n = int(xtr.shape[0])
    steps = int(counts.shape[0])
    base_key = jax.random.key(prep.seed)
    t, epoch_no = prep.t, prep.epoch_no
    live = list(prep.members)
    # Finished members stay in their stack (computed, ignored) until at most half of it still trains; then
    # the survivors are restacked, which costs a compilation. On an accelerator a step is bound by kernel
    # launches, not by the members' arithmetic, so the stack is never restacked there: one compilation.
    compact = accelerator() is None
    while live:
        if prep.compiled is not None:  # the first phase: its stacks and their program were built ahead
            stacks, epoch_fn = prep.stacks, prep.compiled.result()
            prep.stacks = prep.compiled = None
        else:
            stacks = _stacks(live, carried, sw_rows)
            epoch_fn = _build_epoch(stacks, prep.precision)
        state, settings = _phase_args(stacks, _put)
        consts = (xtr, ytr_d, settings, (xva, yva_d))
        training = len(live)
        while True:
            if prep.checkpoint is not None and prep.checkpoint.due(t):
                # between epochs: members still training, where they sit in the stacks
                at = {mb.index: (si, k) for si, s in enumerate(stacks) for k, mb in enumerate(s.members)
                      if not mb.finished()}

                def member_state(mb: MemberRecord, part: int, st: tuple = state, at: dict = at) -> list:
                    return _member_part(st, *at[mb.index], part)

                prep.checkpoint.save([mb for mb in live if mb.index in at], member_state, t, rng,
                                     {"epoch_no": epoch_no})
            perm = rng.permutation(n).astype(np.int32)
            idx = _put(np.resize(perm, steps * batch).reshape(steps, batch))  # pads with early rows
            key = jax.random.fold_in(base_key, epoch_no)
            state, sums, val = epoch_fn(state, idx, counts, np.int32(t), key, consts)
            t += steps
            epoch_no += 1
            val, sums = jax.device_get((val, sums))
            ended = []
            for si, s in enumerate(stacks):
                for k, mb in enumerate(s.members):
                    if mb.finished():
                        continue
                    mb.end_epoch(sums[si][0][k] / n, sums[si][1][k] / n, float(val[si][0][k]),
                                 float(val[si][1][k]), partial(_member_part, state, si, k, 0))
                    if mb.finished():
                        ended.append((si, k, mb))
            for si, k, mb in ended:
                prep.on_member(mb.index, mb.export(partial(_member_part, state, si, k, 0)), mb.history,
                               mb.resumed_epoch)
            training -= len(ended)
            if training == 0 or (compact and 2 * training <= len(live)):
                break
        carried = {mb.index: tuple(_member_part(state, si, k, part) for part in range(3))
                   for si, s in enumerate(stacks) for k, mb in enumerate(s.members) if not mb.finished()}
        live = [mb for mb in live if not mb.finished()]
    if prep.checkpoint is not None:
        prep.checkpoint.done()
    return prep.precision


def _member_part(state: tuple, si: int, k: int, part: int) -> list[np.ndarray]:
    """Member k of stack si on the host: its weights (part 0) or Adam m (1) or v (2)."""
    import jax

    return [np.asarray(a) for a in jax.device_get(_take_member()(state[si][part], np.int32(k)))]


def _put(a: np.ndarray) -> Any:
    """Host array -> device. ``jnp.asarray`` would compile a small staging program per shape and dtype
    (55 of the 139 compilations of paper 000's grid on this CPU); ``device_put`` compiles nothing."""
    import jax

    return jax.device_put(a)


@cache
def _take_member() -> Callable:
    """One compiled program per stack layout that slices member k (a traced index) out of every array.

    Indexing each array with a Python int compiled two programs per array shape (a dynamic slice and a
    squeeze: 40 of the 139 compilations of paper 000's grid on this CPU); here the three parts (weights,
    Adam m and v) share one program, and so do all members and epochs of a stack."""
    import jax
    from jax import lax

    def take(arrays: list, k: Any) -> list:
        return [lax.dynamic_index_in_dim(a, k, axis=_member_axis(j), keepdims=False)
                for j, a in enumerate(arrays)]

    return jax.jit(take)
