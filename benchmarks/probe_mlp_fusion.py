"""Probe: fused vs one-by-one dense-head training for one head shape (fused path forced, default precision).

    python benchmarks/probe_mlp_fusion.py D LAYERS BATCH K     e.g.  768 128-64 64 4   or   2048 1024-512 64 4

Trains K Adam configs (different learning rates, 4 epochs) on synthetic GAP-like features (5,232 rows,
80/20 split) once with ``train_many(fuse=True)`` and once with ``train`` per config, after one warm-up
epoch, and prints both wall times and their ratio. Not a test: it prints what it measured.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv: list[str]) -> None:
    from bench_mlp import synthetic_gap

    from featcache.heads import get_head

    if len(argv) != 4:
        raise SystemExit(__doc__)
    d, layers, bs, k = int(argv[0]), tuple(int(x) for x in argv[1].split("-")), int(argv[2]), int(argv[3])
    X, y = synthetic_gap(5232, d)
    Xtr, ytr, Xva, yva = X[:4185], y[:4185], X[4185:], y[4185:]
    lrs = [1e-2, 1e-3, 1e-4, 3e-4, 3e-3, 3e-5, 3e-2, 1e-5][:k]
    cfgs = [{"layers": layers, "batch_size": bs, "epochs": 4, "lr": lr, "optimizer": "adam"} for lr in lrs]
    head = get_head("mlp")
    head.train(Xtr, ytr, Xva, yva, dict(cfgs[0], epochs=1))  # warm-up: TF start-up is not measured
    t = time.perf_counter()
    head.train_many(Xtr, ytr, Xva, yva, cfgs, fuse=True)
    fused = time.perf_counter() - t
    t = time.perf_counter()
    for c in cfgs:
        head.train(Xtr, ytr, Xva, yva, c)
    seq = time.perf_counter() - t
    print(f"d={d} layers={layers} batch={bs} k={k}: fused {fused:.1f} s, one by one {seq:.1f} s, "
          f"speedup {seq / fused:.2f}x")


if __name__ == "__main__":
    main(sys.argv[1:])
