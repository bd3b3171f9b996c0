"""Epoch checkpoints of a fused MLP group, so an interrupted grid loses minutes, not the whole group.

Why: the configs of a fused group all finish at the end of their epochs, and a paper-sized group (18
members of paper 000's grid on 2,048-d features) trains for about ten minutes on a 2-core CPU. Without a
checkpoint, Ctrl-C or a kill in its ninth minute threw all of that away. A resumed grid already trains its
remaining configs exactly as the uninterrupted grid would (``MLPHead.train_many(skip=...)``); restoring a
checkpoint keeps that promise, because it holds everything the next epoch depends on: each live member's
weights, Adam moments, epoch, history, early-stopping and best-weights state, the step count and the
minibatch generator's state.

The file is one uncompressed ``.npz``, written one array at a time under a temporary name and renamed into
place, so a crash while saving leaves the previous checkpoint. ``key`` (the group's configs, seeds,
stream seed, dropout keys, precision and a digest of the training data) must match for a checkpoint to be
used; any mismatch or damage means training from the start, which gives the same numbers, only later.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from featcache.errors import ConfigError
from featcache.faults import crash_point
from featcache.runs import write_json_atomic

CHECKPOINT_SECONDS = 180.0
"""Least time between two checkpoints of a group (the environment variable below overrides it). Measured
on the 2-core Zen 4 VM: paper 000's batch-64 chunk (18 members on 2,048-d features, 592 MB of weights
and Adam moments) saved in 1.2 s without growing the process's peak memory, and restored in 1.35 s; at
this interval saving is 0.7% of training time, and an interruption costs at most three minutes and an
epoch."""
CHECKPOINT_SECONDS_ENV = "FEATCACHE_MLP_CHECKPOINT_SECONDS"


def checkpoint_seconds() -> float:
    """The configured interval (``FEATCACHE_MLP_CHECKPOINT_SECONDS``, else ``CHECKPOINT_SECONDS``)."""
    raw = os.environ.get(CHECKPOINT_SECONDS_ENV)
    if raw is None or not raw.strip():
        return CHECKPOINT_SECONDS
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not math.isfinite(value) or value < 0:  # was read as the default (or 0) without a word
        raise ConfigError(f"${CHECKPOINT_SECONDS_ENV} must be a number of seconds, 0 or more, got '{raw}'.")
    return value


def data_digest(arrays: tuple[np.ndarray, ...]) -> str:
    """SHA-256 of the training and validation arrays (dtype, shape and bytes): computed once per grid, since
    for 25,088-d features it reads hundreds of MB."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()


def group_key(fields: dict, precision: str, digest: str) -> str:
    """What a checkpoint must have been written for: the group's ``fields`` (``FusedJob.key_fields``: its
    configs, seeds, stream seed and dropout keys), precision and data."""
    spec = {**fields, "precision": precision, "data": digest}
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()


PARTS = ("w", "m", "v")
"""A member's state: weights, Adam m, Adam v (each a list in ``model.weights`` order)."""


@dataclass
class Restored:
    """What ``restore`` found: the step count, the trainer's ``extra`` values and each member's state."""

    t: int
    extra: dict
    states: dict[int, tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]]


def save(path: Path, key: str, members: list[Any], state: Callable[[Any, int], list[Any]], t: int,
         rng: np.random.Generator, extra: dict | None = None) -> bool:
    """Write the live ``members`` (``MemberRecord``s; ``state(member, part)`` gives part 0/1/2 of ``PARTS``
    as arrays, or tensors with ``.numpy()``), the step count, the generator's state and ``extra``.

    Returns False when it could not be written (a full disk, say): the checkpoint is a convenience, so
    training goes on, and an older checkpoint, if any, stays valid."""
    records = [{"index": mb.index, "epoch": mb.epoch, "history": mb.history,
                "best_val": None if not np.isfinite(mb.best_val) else float(mb.best_val),
                "since_best": mb.since_best, "has_best": mb.best_weights is not None,
                "n_arrays": len(mb.model.weights)} for mb in members]
    meta = {"key": key, "t": t, "rng": rng.bit_generator.state, "members": records, "extra": extra or {}}

    def arrays() -> Iterator[tuple[str, np.ndarray]]:
        """One array at a time: a chunk's state can be gigabytes, so it is never copied whole."""
        yield "meta", np.frombuffer(json.dumps(meta).encode(), np.uint8)
        for mb in members:
            parts = [(name, state(mb, i)) for i, name in enumerate(PARTS)] + [("best", mb.best_weights or [])]
            for part, values in parts:
                for j, a in enumerate(values):
                    yield f"{mb.index}_{part}_{j}", np.asarray(a.numpy() if hasattr(a, "numpy") else a)

    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:  # np.load reads it
                for name, a in arrays():
                    with zf.open(f"{name}.npy", "w", force_zip64=True) as member:
                        np.lib.format.write_array(member, a, allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        return False
    return True


def restore(path: Path, key: str, members: list[Any], rng: np.random.Generator) -> Restored | None:
    """Read ``path`` if it was written for ``key`` and holds every one of ``members`` (others it holds
    finished meanwhile and are not trained again): set each member's epoch, history, early-stopping and
    best-weights state and ``resumed_epoch``, and ``rng``'s state, and return the step count, ``extra`` and
    the members' states for the trainer to load. None, with nothing changed, when there is no usable
    checkpoint."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(bytes(data["meta"]).decode())
            if meta.get("key") != key:
                return None
            saved = {r["index"]: r for r in meta["members"]}
            if any(mb.index not in saved for mb in members):
                return None
            loaded = []
            for mb in members:
                r = saved[mb.index]
                n = r["n_arrays"]
                parts = tuple([data[f"{mb.index}_{part}_{j}"] for j in range(n)] for part in PARTS)
                best = [data[f"{mb.index}_best_{j}"] for j in range(n)] if r["has_best"] else None
                shapes = [tuple(w.shape) for w in mb.model.weights]
                if [a.shape for a in parts[0]] != shapes:
                    return None
                loaded.append((mb, r, parts, best))
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile):
        return None  # damaged or foreign: train from the start (same numbers, only later)
    for mb, r, _parts, best in loaded:
        mb.epoch = int(r["epoch"])
        mb.history = {k: [float(x) for x in v] for k, v in r["history"].items()}
        mb.best_val = np.inf if r["best_val"] is None else float(r["best_val"])
        mb.replay_stopping()  # early stopping's state follows from the history (see there)
        mb.best_weights = [np.array(a) for a in best] if best is not None else None
        mb.resumed_epoch = mb.epoch
    rng.bit_generator.state = meta["rng"]
    return Restored(int(meta["t"]), dict(meta.get("extra") or {}),
                    {mb.index: parts for mb, _r, parts, _b in loaded})


ABOUT_FILE = "sweep.json"
"""Written beside a sweep's first checkpoint: what the caller says about the sweep (``fit``: its id and
command), so a listing of leftover checkpoints can say which command resumes them."""


class Checkpointer:
    """One fused group's checkpoints, as both trainers use them: restore once at the start, save between
    epochs when ``checkpoint_seconds()`` have passed, remove at the end.

    ``about``: a JSON-able description of the sweep, written to ``ABOUT_FILE`` in the checkpoint's folder
    once a checkpoint is there (not before, so an interruption before the first checkpoint leaves nothing)."""

    def __init__(self, path: Path, digest: str, about: dict | None = None):
        self.path, self.digest, self.about = path, digest, about
        self.key = ""
        self.every = checkpoint_seconds()
        self.last = time.monotonic()
        self.failed = False  # a write failed: the group trained on without checkpoints (the run says so)

    def restore(self, fields: dict, precision: str, members: list[Any],
                rng: np.random.Generator) -> Restored | None:
        """``restore`` for this group (see there; ``fields`` as for ``group_key``); also fixes the key
        later saves are written with."""
        self.key = group_key(fields, precision, self.digest)
        return restore(self.path, self.key, members, rng)

    def due(self, t: int) -> bool:
        """Whether to save now: some training done since the start and the interval passed."""
        return t > 0 and time.monotonic() - self.last >= self.every

    def save(self, members: list[Any], state: Callable[[Any, int], list[Any]], t: int,
             rng: np.random.Generator, extra: dict | None = None) -> None:
        """``save`` (see there); after a failed write the group trains on without checkpoints."""
        if not save(self.path, self.key, members, state, t, rng, extra):
            self.every = float("inf")
            self.failed = True
        elif self.about is not None:
            with contextlib.suppress(OSError):  # a label, not needed to resume
                write_json_atomic(self.path.parent / ABOUT_FILE, self.about)
            self.about = None
        self.last = time.monotonic()
        crash_point("mlp.after_checkpoint")

    def done(self) -> None:
        """The group has finished: its checkpoint is no longer needed."""
        remove(self.path)


def remove(path: Path) -> None:
    """Drop a group's checkpoint once every member is saved (it may be large)."""
    for p in (path, path.with_name(path.name + ".tmp")):
        p.unlink(missing_ok=True)
