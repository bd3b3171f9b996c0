"""Probe: how often each trainer collapses to the majority class on chosen configs of paper 000's grid.

    python benchmarks/probe_mlp_collapse.py [--configs 2,28] [--seeds 8] [--epoch-scale 0.1] [--json]

Why: at a tenth of the paper's epochs some configs (large learning rates, deep stacks) end either near
1.0 or at the majority class's accuracy depending on the seed, so bench_mlp's rule "featcache's accuracy
within 0.005 of some reference run" flags a config whenever featcache's one run collapsed and the few
reference runs did not. This trains each named config N times with featcache's grid trainer
(``bench_mlp.train_alone_fused``, seeds 1..N) and N times with the reference's one-model ``train``
(seeds 5000 + 10 k + config), on bench_mlp's data and split, and prints every validation accuracy and
the collapse counts. Not a test: it prints what it measured (results, not times).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent))

COLLAPSE_TOL = 0.01  # as bench_mlp.judge_agreement: within 0.01 of always predicting the majority class


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="2,28", help="indices into paper 000's 33-config grid")
    ap.add_argument("--seeds", type=int, default=8, help="runs per config and side")
    ap.add_argument("--epoch-scale", type=float, default=0.1, help="as bench_mlp.py --epoch-scale")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    import bench_mlp as bm

    from featcache.heads import get_head

    cfgs = bm.configs(False, args.epoch_scale)
    try:
        chosen = [int(c) for c in args.configs.split(",") if c.strip()]
    except ValueError:
        ap.error(f"--configs takes indices 0-{len(cfgs) - 1} separated by commas, got {args.configs!r}")
    if not chosen or any(not 0 <= i < len(cfgs) for i in chosen) or args.seeds < 1:
        ap.error(f"--configs takes indices 0-{len(cfgs) - 1}; --seeds at least 1")
    X, y = bm.synthetic_gap(5232, 2048)
    idx = np.random.default_rng(0).permutation(len(y))  # bench_mlp.run's split (seed 0)
    cut = int(0.8 * len(y))
    Xtr, ytr, Xva, yva = X[idx[:cut]], y[idx[:cut]], X[idx[cut:]], y[idx[cut:]]
    majority = float(np.mean(yva == np.bincount(ytr).argmax()))
    head = get_head("mlp")
    out: dict = {"epoch_scale": args.epoch_scale, "majority_class_accuracy": round(majority, 4),
                 "configs": {}}
    for i in chosen:
        c = cfgs[i]
        # bm.train_alone_fused (fuse=True): before 2026-12-08 this called train_many([c]) without it, and a
        # lone config takes the reference's path (model.fit): the "featcache" side was the reference's
        runs = [bm.train_alone_fused(head, (Xtr, ytr, Xva, yva), c, s) for s in range(1, args.seeds + 1)]
        ours = [acc for acc, _ in runs]
        ref = [head.train(Xtr, ytr, Xva, yva, c, seed=5000 + 10 * k + i)[1]["val_accuracy"][-1]
               for k in range(args.seeds)]
        out["configs"][i] = {
            "config": {k: list(v) if isinstance(v, tuple) else v for k, v in c.items()},
            "featcache": [round(float(a), 4) for a in ours], "reference": [round(float(a), 4) for a in ref],
            "featcache_trainer": sorted({path for _, path in runs}),
            "featcache_collapsed": sum(abs(a - majority) < COLLAPSE_TOL for a in ours),
            "reference_collapsed": sum(abs(a - majority) < COLLAPSE_TOL for a in ref)}
        if not args.json:
            r = out["configs"][i]
            print(f"config {i} {r['config']}: featcache collapsed {r['featcache_collapsed']}/{args.seeds} "
                  f"{r['featcache']}; reference {r['reference_collapsed']}/{args.seeds} {r['reference']}",
                  flush=True)
    if args.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
