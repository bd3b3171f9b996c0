"""One entry point for every featcache benchmark: extraction, logistic-regression grid, dense-head grid.

    python benchmarks/run.py [--quick] [--json] [--data DIR] [--only extract,logreg,mlp]
                             [--extract-repeats N | NAME=N,...] [--logreg-repeats N] [--save FILE]

Each benchmark module exposes ``run(quick) -> dict`` (bench_extract also takes ``data``, and it and
bench_logreg take ``repeats``: the median of N timings, for the ratios near their target); modules
that are missing (e.g. deleted) are reported as such. With ``--json`` one JSON object is
printed with the ratios under the keys that name them (``pipeline_efficiency`` per backbone,
``cache_hit_fraction``, ``memory_ratio``, ``logreg_speedup``, ``mlp_grid_speedup``), each module's
raw results under its own key, the machine description and the wall time of each benchmark.
``--quick`` is the CI smoke mode (small inputs; numbers are not meaningful). ``--save FILE`` writes
the same object to FILE after each benchmark (``"complete": false`` until the last), so a full run
cut short (with ``--mlp-epoch-scale 0.1`` about 40-60 minutes on a 2-core VM; the full-epoch dense
grid takes hours) keeps the benchmarks that finished.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
import traceback
from collections.abc import Callable
from functools import cache
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHES = ("extract", "logreg", "mlp")
# ratio key -> (benchmark, target, "higher" or "lower" is better)
TARGETS = {
    "pipeline_efficiency": ("extract", 0.90, "higher"),
    "cache_hit_fraction": ("extract", 0.03, "lower"),
    "memory_ratio": ("extract", 1.15, "lower"),
    "logreg_speedup": ("logreg", 20.0, "higher"),
    "mlp_grid_speedup": ("mlp", 3.0, "higher"),
}


@cache
def _load(name: str):
    """Import benchmarks/bench_<name>.py by path (benchmarks/ is not a package); None if absent.

    Cached: ``main`` loads bench_extract for its ``--extract-repeats`` parser, ``run_all`` runs it.
    """
    path = HERE / f"bench_{name}.py"
    if not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def run_all(quick: bool, data: Path | None, only: list[str], mlp_epoch_scale: float = 1.0,
            mlp_noise_configs: int = 3, mlp_extra_seeds: int = 0,
            extract_repeats: int | dict[str, int] = 1, logreg_repeats: int = 1,
            on_progress: Callable[[dict], None] | None = None, mlp_seed_study: int = 0) -> dict:
    """Run the selected benchmarks in this process, one after the other; collect ratios and raw data.

    ``on_progress`` gets the result so far (``"complete": False``) after each benchmark: an hour-long
    run that is killed then still leaves what it measured.
    """
    out: dict = {"quick": quick, "complete": False, "benchmarks": {}, "wall_seconds": {}, "missing": [],
                 "failed": {}}
    if quick:  # the ratios sit at the top level either way: a reader of the JSON alone must be told
        out["quick_note"] = ("--quick: a smoke test on tiny inputs, where fixed costs dominate; its ratios "
                             "show that everything runs and are not results (the targets are for the full "
                             "run)")
    # bench_extract first: it sets a private KERAS_HOME with ../shared/weights before Keras is imported.
    for name in only:
        module = _load(name)
        if module is None:
            out["missing"].append(f"bench_{name}.py")
            continue
        t0 = time.perf_counter()
        try:
            if name == "extract":
                res = module.run(quick=quick, data=data, repeats=extract_repeats)
            elif name == "mlp":
                res = module.run(quick=quick, epoch_scale=mlp_epoch_scale, noise_configs=mlp_noise_configs,
                                 extra_seeds=mlp_extra_seeds, seed_study=mlp_seed_study)
            else:
                res = module.run(quick=quick, repeats=logreg_repeats)
        except Exception as exc:  # noqa: BLE001 - one broken benchmark must not hide the others
            out["failed"][name] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc(file=sys.stderr)
        else:
            out["wall_seconds"][name] = round(time.perf_counter() - t0, 1)
            out["benchmarks"][name] = res
            _collect_ratios(out)
        if on_progress is not None:
            on_progress(out)
    out["complete"] = True
    return out


def _collect_ratios(out: dict) -> None:
    """Copy the machine description and each measured ratio to the top level, under its key."""
    ext = out["benchmarks"].get("extract", {})
    if "machine" in ext:
        out["machine"] = ext["machine"]
    elif "machine" not in out and _load("extract") is not None:  # --only logreg,mlp named no machine at all
        out["machine"] = _load("extract").machine()
    for key, (bench, _target, _better) in TARGETS.items():
        res = out["benchmarks"].get(bench, {})
        if key in res:
            out[key] = res[key]
    for bench, agree_key in AGREES.values():
        res = out["benchmarks"].get(bench, {})
        if agree_key in res:
            out[agree_key] = res[agree_key]


def save_json(out: dict, path: Path) -> None:
    """Write ``out`` to ``path`` through a temporary file and a rename, so a kill never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(out, indent=2, default=str) + "\n")
    tmp.replace(path)


# A speed target counts only with its correctness condition (requirements 4 and 5): the key that says it.
AGREES = {"logreg_speedup": ("logreg", "logreg_agrees"), "mlp_grid_speedup": ("mlp", "mlp_grid_agrees")}


def _verdict(value: float, target: float, better: str, agrees: bool | None = None) -> str:
    ok = value >= target if better == "higher" else value <= target
    if agrees is False:  # fast, but not the same answers: the requirement is not met
        return ("speed ok, " if ok else "MISSED, ") + "answers differ (see the JSON)"
    return "ok" if ok else "MISSED"


def print_table(out: dict) -> None:
    m = out.get("machine")
    if m:
        ident = (f" (family {m['family']}, model {m['model']}; cache {m.get('cache_size')}; "
                 f"{' '.join(m.get('flags') or []) or 'no avx2'})" if m.get("family") is not None else "")
        print(f"machine: {m['cpu']}{ident}, {m['cores']} cores, {m['memory_gb']} GB; {m['platform']}")
    quick = out.get("quick", False)
    if quick:  # tiny inputs: fixed costs dominate, so the targets (set for the full sizes) do not apply
        print("--quick: a smoke test on tiny inputs. The ratios show that everything runs; the targets are "
              "for the full run (without --quick), so no verdict is given here.")
    print(f"{'ratio':28} {'value':>10} {'target':>10}  verdict")
    for key, (_bench, target, better) in TARGETS.items():
        if key not in out:
            print(f"{key:28} {'-':>10} {target:>10}  not measured")
            continue
        value = out[key]
        items = value.items() if isinstance(value, dict) else [("", value)]
        for sub, v in items:
            label = f"{key}[{sub}]" if sub else key
            cmp = ">=" if better == "higher" else "<="
            bench, agree_key = AGREES.get(key, ("", ""))
            agrees = out["benchmarks"].get(bench, {}).get(agree_key) if agree_key else None
            verdict = "(smoke test)" if quick else _verdict(v, target, better, agrees)
            print(f"{label:28} {v:>10} {cmp + str(target):>10}  {verdict}")
    _print_measured(out["benchmarks"])
    for name, secs in out["wall_seconds"].items():
        print(f"  bench_{name}: {secs} s")
    for miss in out["missing"]:
        print(f"  {miss}: not present, skipped")
    for name, err in out["failed"].items():
        print(f"  bench_{name}: FAILED ({err})")


def _print_measured(benchmarks: dict) -> None:
    """What each ratio divides, in its units: the table above gives only the quotients, and a reader of
    the text output (no --json) must see the seconds and sizes behind them, as the JSON has them."""
    ext = benchmarks.get("extract")
    if ext:
        for name, r in ext["backbones"].items():
            print(f"  {name}: forward {r['forward_images_per_s']} img/s, extract {r['extract_images_per_s']} "
                  f"img/s ({r['images']} images), first run {r['extract_seconds']} s, second (cached) run "
                  f"{r['second_run_seconds']} s, cache {r['cache_file_mb']} MB")
        for name, m in ext.get("memory_by_backbone", {}).items():
            print(f"  memory, {name}: peak RSS {m['full']['peak_rss_mb']} MB on {m['full']['rows']} images / "
                  f"{m['small']['peak_rss_mb']} MB on {m['small']['rows']}, each a fresh process")
        if "originals" in ext:
            o = ext["originals"]
            print(f"  decode img/s: originals {o['decode_images_per_s_originals']}, 224-px "
                  f"{o['decode_images_per_s_224']}")
    lr = benchmarks.get("logreg", {})
    if "t_sklearn_s" in lr:
        print(f"  logreg: GridSearchCV {lr['t_sklearn_s']} s / featcache {lr['t_featcache_s']} s "
              f"(median of {lr['featcache_repeats']}); {lr['n']} x {lr['d']} {lr['source']}, "
              f"{lr['grid_size']} candidates x {lr['folds']} folds + refit; same parameters: "
              f"{lr['same_params']}, largest CV score difference {lr['max_cv_score_diff']:.4g}")
    mlp = benchmarks.get("mlp", {})
    if "t_reference_s" in mlp:
        ag, epochs = mlp["agreement"], mlp["epochs"]
        print(f"  mlp: one model.fit per config {mlp['t_reference_s']} s / fused featcache "
              f"{mlp['t_featcache_s']} s; {mlp['n_configs']} configs of {min(epochs)}-{max(epochs)} epochs, "
              f"{'/'.join(mlp['precision'])}; {ag['configs_agreeing']} of {ag['configs']} configs within "
              f"{ag['tolerance']} of a reference run")
        for i, v in sorted(ag.get("seed_study", {}).items(), key=lambda kv: int(kv[0])):
            print(f"    config {i} over seeds: featcache collapsed {v['featcache_collapsed']} of "
                  f"{len(v['featcache'])}, reference {v['reference_collapsed']} of {len(v['reference'])} "
                  f"(Fisher p {v['fisher_p']}); {'agrees' if v['agrees'] else 'differs'}")
        if ag.get("seed_study_seeds"):
            print(f"  mlp: {ag['configs_agreeing_over_seeds']} of {ag['configs']} configs agree with the "
                  f"seed study ({ag['seed_study_seeds']} more seeds per side)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="CI smoke mode: small inputs, a few minutes")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--data", type=Path, help="dataset for the extraction benchmark "
                    "(default ../shared/data/kermany224/train)")
    ap.add_argument("--only", default=",".join(BENCHES), help="comma-separated subset of: extract,logreg,mlp")
    ap.add_argument("--mlp-epoch-scale", type=float, default=1.0,
                    help="shorten the dense-head grid's epochs by this factor (recorded in the JSON)")
    ap.add_argument("--mlp-noise-configs", type=int, default=3,
                    help="dense-head configs whose reference is re-trained with another seed (33 = all)")
    ap.add_argument("--mlp-extra-seeds", type=int, default=0,
                    help="up to N more reference seeds where featcache matches no reference run yet")
    ap.add_argument("--mlp-seed-study", type=int, default=0,
                    help="configs still within no reference run: N more seeds per side, judged over seeds "
                         "(bench_mlp.seed_study_verdict); after the timed part")
    ap.add_argument("--extract-repeats", default="1",
                    help="time each extract N times, or NAME=N,... for the backbones named (e.g. "
                         "mobilenet-0.75=5); pipeline_efficiency is the median (vgg16: ~12 min each)")
    ap.add_argument("--logreg-repeats", type=int, default=1,
                    help="time featcache's logreg search N times; logreg_speedup uses the median")
    ap.add_argument("--save", type=Path, metavar="FILE",
                    help="also write the JSON object to FILE after each benchmark (complete: false until "
                         "the last), so a run cut short keeps what finished")
    args = ap.parse_args(argv)
    if args.logreg_repeats < 1:
        ap.error("--logreg-repeats must be at least 1")
    extract_module = _load("extract")  # its parser; a missing module is reported by run_all
    if extract_module is not None:
        try:
            args.extract_repeats = extract_module.parse_repeats(args.extract_repeats)
        except ValueError as exc:
            ap.error(f"--extract-repeats: {exc}")
    only = [b.strip() for b in args.only.split(",") if b.strip()]
    unknown = [b for b in only if b not in BENCHES]
    if unknown:
        ap.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHES)}")
    if {"extract", "mlp"} & set(only):  # the benchmarks that import TensorFlow: its start-up lines filtered
        from quiet_start import quiet_backend_start

        quiet_backend_start()
    if args.save is not None and not args.save.parent.is_dir():
        ap.error(f"--save: folder {args.save.parent} does not exist")
    save = None if args.save is None else (lambda partial: save_json(partial, args.save))
    out = run_all(args.quick, args.data, only, args.mlp_epoch_scale, args.mlp_noise_configs,
                  args.mlp_extra_seeds, args.extract_repeats, args.logreg_repeats, on_progress=save,
                  mlp_seed_study=args.mlp_seed_study)
    if save is not None:
        save(out)
    if args.json:
        print(json.dumps(out, indent=2, default=str))
    else:
        print_table(out)
    return 1 if out["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
