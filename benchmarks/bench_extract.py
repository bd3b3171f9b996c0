"""Extraction benchmark: pipeline efficiency, cache-hit cost, streaming memory, large originals.

Measured in one process per backbone (the memory check uses fresh subprocesses):

* ``pipeline_efficiency[backbone]`` = end-to-end ``extract`` images/s (whole call: backbone build,
  hashing, decode, forward, cache writes) / pure forward images/s of the same backbone on
  already-decoded uint8 batches (same process, same batch size). The forward rate is measured
  before and after the extraction and averaged, so a noisy neighbour hurts both sides alike.
* ``cache_hit_fraction`` = wall time of a second, fully cached extract / the first (vgg16 when it
  is benchmarked, else the first backbone).
* ``memory_ratio`` = peak RSS of extract on the whole dataset / on a 500-image subset, each in a
  fresh subprocess (streaming means it should stay near 1). ``--memory-backbones`` measures it for
  several backbones (default mobilenet-0.75); ``memory_ratio`` is then the worst of them and
  ``memory_by_backbone`` holds each. vgg16 is the strong test: its 25,088-d rows for 5,232 images are
  ~525 MB of float32, which an accumulating extract would add to the peak.
* ``originals``: decode-only images/s of the large originals (JPEG draft-mode downscaling) next to
  the 224-px copies, and end-to-end extract images/s on the originals.

    python benchmarks/bench_extract.py [--quick] [--json] [--data DIR] [--backbones vgg16,inceptionv3]
                                       [--repeats N | --repeats NAME=N,...] [--no-memory]
                                       [--memory-backbones mobilenet-0.75,vgg16] [--no-timing]

``--repeats N`` times each extract N times (forward, extract, forward, ..., forward) and reports the
median efficiency with every run's value: one run on a shared VM moves by a few percent.
``--repeats mobilenet-0.75=5`` repeats only the backbones named (the others run once): the short extracts
(mobilenet's takes ~30 s) move most, while five vgg16 extracts would add over an hour.

``--quick`` (CI smoke test, ~1 min): 64 images (sampled from ../shared when present, else generated)
and mobilenet-0.75 with random weights. The full run takes ~25 minutes on a 2-core CPU (vgg16 alone
~17). Real ImageNet weights are used for mobilenet-0.75 when ../shared/weights has them (through a
private KERAS_HOME); the other backbones run with ``--weights none`` (same speed, no download).
"""
from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
DEFAULT_DATA = SHARED / "data" / "kermany224" / "train"
ORIGINALS = SHARED / "data" / "originals-sample"
FULL_BACKBONES = ("mobilenet-0.75", "inceptionv3", "vgg16")
MEMORY_BACKBONES = ("mobilenet-0.75",)
MEMORY_SUBSET = 500


def _private_keras_home() -> bool:
    """Expose ../shared/weights to keras.applications offline (must run before Keras is imported)."""
    weights = sorted((SHARED / "weights").glob("*.h5")) if (SHARED / "weights").is_dir() else []
    if not weights:
        return False
    home = os.environ.get("KERAS_HOME")
    if home and all((Path(home) / "models" / w.name).is_file() for w in weights):
        return True
    if "keras" in sys.modules:
        return False
    home = tempfile.mkdtemp(prefix="featcache-keras-")
    atexit.register(shutil.rmtree, home, True)  # a copy of the weights per run (even --help) was left behind
    (Path(home) / "models").mkdir()
    for w in weights:
        shutil.copy(w, Path(home) / "models" / w.name)
    os.environ["KERAS_HOME"] = home
    return True


HAVE_IMAGENET_MOBILENET = _private_keras_home()


def _weights_for(backbone: str, quick: bool) -> str:
    return "imagenet" if backbone == "mobilenet-0.75" and HAVE_IMAGENET_MOBILENET and not quick else "none"


# The instruction-set features the ratios depend on: bf16 matmuls (the dense grid), vector width (both grids)
_CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def cpu_identity(cpuinfo: str = "/proc/cpuinfo") -> dict:
    """The CPU's model name, family/model/stepping, /proc/cpuinfo's "cache size" (L2 or L3, by vendor)
    and the ``_CPU_FLAGS`` it has.

    Why: the results tables are split by CPU generation (Zen 2/3/4, Xeon with AMX), but a VM's model name
    is often only "AMD EPYC": family 23 is Zen 2, 25 with model < 16 Zen 3, 25 with model 16+ Zen 4, and the
    bf16/AVX-512 flags decide which dense-grid path runs. Empty values where /proc/cpuinfo is absent."""
    info: dict = {"cpu": platform.processor() or "", "family": None, "model": None, "stepping": None,
                  "cache_size": None, "flags": []}
    try:
        text = Path(cpuinfo).read_text(encoding="ascii", errors="replace")
    except OSError:
        return info
    fields: dict[str, str] = {}
    for line in text.split("\n\n", 1)[0].splitlines():  # the first processor's block
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    info["cpu"] = fields.get("model name") or info["cpu"]
    for key, name in (("cpu family", "family"), ("model", "model"), ("stepping", "stepping")):
        with contextlib.suppress(ValueError):
            info[name] = int(fields.get(key, ""))
    info["cache_size"] = fields.get("cache size")
    flags = set(fields.get("flags", "").split())
    info["flags"] = [f for f in _CPU_FLAGS if f in flags]
    return info


def machine() -> dict:
    """What the numbers were measured on."""
    ident = cpu_identity()
    cpu = ident.pop("cpu")
    mem_gb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_gb = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    versions = {"python": platform.python_version()}
    for mod in ("numpy", "tensorflow", "keras", "h5py", "PIL"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - a missing library is just not reported
            continue
    return {"platform": platform.platform(), "cpu": cpu, **ident, "cores": os.cpu_count(),
            "memory_gb": mem_gb, "versions": versions}


def _image_files(root: Path) -> list[Path]:
    from featcache.datasets import discover

    return [r.path for r in discover(root).records]


def _subset(src: Path, n: int, dest: Path) -> Path:
    """A dataset of ``n`` evenly spaced images of ``src`` (symlinks, same class folders)."""
    files = _image_files(src)
    step = max(1, len(files) // n)
    for f in files[::step][:n]:
        rel = f.relative_to(src)
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(f, dest / rel)
    return dest


def _synthetic(dest: Path, n: int, size: int = 224) -> Path:
    """Kermany-like JPEGs when ../shared is absent (user clones, CI without data)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        cls = "NORMAL" if i % 2 == 0 else "PNEUMONIA"
        name = f"IM-{i:04d}-0001.jpeg" if cls == "NORMAL" else f"person{i}_bacteria_{i}.jpeg"
        arr = rng.normal(120, 40, (size, size)).clip(0, 255).astype(np.uint8)
        (dest / cls).mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).convert("RGB").save(dest / cls / name, quality=90)
    return dest


def _decoded_batches(files: list[Path], size: int, batch: int, n_batches: int):
    import numpy as np

    from featcache.images import decode_image

    need = batch * n_batches
    picked = (files * (need // max(1, len(files)) + 1))[:need]
    arr = np.stack([decode_image(f.read_bytes(), size) for f in picked])
    return [arr[i * batch:(i + 1) * batch] for i in range(n_batches)]


def forward_rate(bb, batches, min_seconds: float) -> float:
    """Pure forward images/s on already-decoded uint8 batches (after one warm-up call).

    Cycles over the batches for at least ``min_seconds`` (and at least one pass): a short
    measurement on a shared 2-core machine varies by 10% from one minute to the next."""
    bb(batches[0])
    t0 = time.perf_counter()
    n = 0
    while True:
        for b in batches:
            bb(b)
            n += len(b)
        if time.perf_counter() - t0 >= min_seconds:
            return n / (time.perf_counter() - t0)


def bench_backbone(name: str, data: Path, quick: bool, batch_size: int, workers: int,
                   repeats: int = 1) -> dict:
    """End-to-end extract vs pure forward, then a fully cached second run, for one backbone.

    With ``repeats`` > 1 the extract is timed that many times (each into a fresh cache), every one
    between two forward-rate measurements (shared by neighbours: forward, extract, forward, extract,
    ..., forward), and ``pipeline_efficiency`` is the median of the per-extract ratios. On a shared VM
    one run moves by a few percent; the median and the list say how much.
    """
    from featcache.backbones import BackboneConfig, build_backbone
    from featcache.datasets import discover
    from featcache.extract import ExtractOptions, extract

    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    cfg = BackboneConfig(name, weights=_weights_for(name, quick))
    files = _image_files(data)
    min_seconds = 2.0 if quick else 20.0
    opts = ExtractOptions(batch_size=batch_size, workers=workers)

    bb = build_backbone(cfg)
    batches = _decoded_batches(files, bb.input_size, batch_size, 3 if quick else 8)
    fwd = [forward_rate(bb, batches, min_seconds)]
    firsts, walls = [], []
    for r in range(repeats):
        del bb  # one model at a time: the extract builds its own
        with tempfile.TemporaryDirectory(prefix="featcache-bench-") as tmp:
            t0 = time.perf_counter()  # end to end: listing the folder is part of what a user waits for
            firsts.append(extract(discover(data), cfg, Path(tmp), opts))
            walls.append(time.perf_counter() - t0)
            if r == 0:
                t0 = time.perf_counter()
                second = extract(discover(data), cfg, Path(tmp), opts)
                second_wall = time.perf_counter() - t0
                size = firsts[0].cache_path.stat().st_size
        bb = build_backbone(cfg)
        fwd.append(forward_rate(bb, batches, min_seconds))
    e2e = [f.rows_computed / wall for f, wall in zip(firsts, walls, strict=True)]
    effs = [e / ((fwd[i] + fwd[i + 1]) / 2) for i, e in enumerate(e2e)]
    first = firsts[0]
    stream = first.rows_computed / first.timings["stream"]
    out = {
        "backbone": name, "weights": cfg.weights, "image_size": bb.input_size, "feature_dim": bb.feature_dim,
        "batch_size": batch_size, "workers": workers, "images": first.rows_computed,
        "forward_images_per_s": round(float(np.mean(fwd)), 2),
        "forward_images_per_s_before_after": [round(fwd[0], 2), round(fwd[-1], 2)],
        "extract_images_per_s": round(float(np.median(e2e)), 2),
        "extract_stream_images_per_s": round(stream, 2),
        "extract_seconds": round(walls[0], 2), "extract_timings": first.timings,
        "pipeline_efficiency": round(float(np.median(effs)), 3),
        "second_run_seconds": round(second_wall, 3), "second_run_rows_computed": second.rows_computed,
        "cache_hit_fraction": round(second_wall / walls[0], 4),  # both timed from outside, listing included
        "cache_file_bytes": size, "cache_file_mb": round(size / 2**20, 1),
    }
    if repeats > 1:
        out.update(repeats=repeats, forward_images_per_s_runs=[round(v, 2) for v in fwd],
                   extract_images_per_s_runs=[round(v, 2) for v in e2e],
                   pipeline_efficiency_runs=[round(v, 3) for v in effs])
    return out


def _memory_child(data: str, cache_dir: str, backbone: str, weights: str, batch_size: int) -> None:
    """Subprocess body: one extract, then print peak RSS (MiB) as JSON."""
    import resource

    from featcache.backbones import BackboneConfig
    from featcache.datasets import discover
    from featcache.extract import ExtractOptions, extract

    res = extract(discover(data), BackboneConfig(backbone, weights=weights), Path(cache_dir),
                  ExtractOptions(batch_size=batch_size))
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_rss_mb": round(peak_kib / 1024, 1), "rows": res.rows_computed,
                      "seconds": round(res.seconds, 2)}))


def _peak_rss(data: Path, backbone: str, weights: str, batch_size: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="featcache-mem-") as tmp:
        cmd = [sys.executable, __file__, "--_memory-child", str(data), tmp, backbone, weights,
               str(batch_size)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=dict(os.environ))
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_memory(data: Path, n_small: int, backbone: str, weights: str, batch_size: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="featcache-sub-") as tmp:
        small = _subset(data, n_small, Path(tmp) / "subset")
        few = _peak_rss(small, backbone, weights, batch_size)
    full = _peak_rss(data, backbone, weights, batch_size)
    return {"backbone": backbone, "small": few, "full": full,
            "memory_ratio": round(full["peak_rss_mb"] / few["peak_rss_mb"], 3)}


def bench_originals(small_data: Path, batch_size: int, quick: bool) -> dict:
    """Decode speed of the full-size originals (draft mode) beside the 224-px files, and their extract."""
    from featcache.backbones import BackboneConfig
    from featcache.datasets import discover
    from featcache.extract import ExtractOptions, extract
    from featcache.images import decode_image

    def decode_rate(files: list[Path]) -> float:
        blobs = [f.read_bytes() for f in files]
        t0 = time.perf_counter()
        for b in blobs:
            decode_image(b, 224)
        return len(blobs) / (time.perf_counter() - t0)

    originals = _image_files(ORIGINALS)
    smalls = _image_files(small_data)[: len(originals)]
    out = {"n_originals": len(originals),
           "originals_mb": round(sum(f.stat().st_size for f in originals) / 2**20, 1),
           "decode_images_per_s_originals": round(decode_rate(originals), 1),
           "decode_images_per_s_224": round(decode_rate(smalls), 1)}
    cfg = BackboneConfig("mobilenet-0.75", weights=_weights_for("mobilenet-0.75", quick))
    with tempfile.TemporaryDirectory(prefix="featcache-orig-") as tmp:
        r = extract(discover(ORIGINALS), cfg, Path(tmp), ExtractOptions(batch_size=batch_size))
    out["extract_stream_images_per_s_originals"] = round(r.rows_computed / r.timings["stream"], 2)
    out["extract_images_per_s_originals"] = round(r.images_per_s, 2)
    return out


def parse_repeats(text: str) -> int | dict[str, int]:
    """``"3"`` (every backbone) or ``"mobilenet-0.75=5,inceptionv3=2"`` (those named; the others once)."""
    try:
        if "=" not in text:
            value: int | dict[str, int] = int(text)
            counts = [value]
        else:
            value = {}
            for part in text.split(","):
                name, _, count = part.partition("=")
                value[name.strip()] = int(count)
            counts = list(value.values())
    except ValueError:
        raise ValueError(f"bad repeats '{text}'; write N or NAME=N[,NAME=N...], "
                         "e.g. mobilenet-0.75=5") from None
    if min(counts) < 1:
        raise ValueError(f"repeats must be at least 1, got '{text}'")
    return value


def run(quick: bool = False, data: Path | None = None, backbones: list[str] | None = None,
        batch_size: int = 32, workers: int = 2, memory: bool = True,
        repeats: int | dict[str, int] = 1, memory_backbones: list[str] | None = None,
        timing: bool = True) -> dict:
    """Run the extraction benchmarks and return one JSON-serialisable dict (ratios + raw timings).

    ``repeats``: extracts per backbone, for all (an int) or per name (a dict; names left out run once).
    ``memory_backbones``: the backbones whose peak RSS is compared (default mobilenet-0.75); with more
    than one, ``memory_ratio`` is the worst. ``timing=False`` skips the efficiency and cache-hit timings
    (a memory-only run: ``--no-timing``).
    """
    tmp = Path(tempfile.mkdtemp(prefix="featcache-benchdata-"))
    try:
        source = Path(data) if data else DEFAULT_DATA
        if quick:
            n = 64
            data = _subset(source, n, tmp / "quick") if source.is_dir() else _synthetic(tmp / "quick", n)
            backbones = backbones or ["mobilenet-0.75"]
        else:
            if not source.is_dir():
                raise SystemExit(f"data folder {source} not found; pass --data DIR or use --quick")
            data = source
            backbones = backbones or list(FULL_BACKBONES)
        result: dict = {"quick": quick, "data": str(data if not quick else source), "machine": machine(),
                        "backbones": {}}
        stray = sorted(set(repeats) - set(backbones)) if isinstance(repeats, dict) else []
        if stray:
            raise ValueError(f"repeats name backbone(s) not benchmarked here: {', '.join(stray)} "
                             f"(running {', '.join(backbones)})")
        if not timing and not memory:
            raise ValueError("--no-timing with --no-memory leaves nothing to measure")
        for name in backbones if timing else []:
            n_rep = repeats.get(name, 1) if isinstance(repeats, dict) else repeats
            result["backbones"][name] = bench_backbone(name, data, quick, batch_size, workers, n_rep)
        per = result["backbones"]
        if per:
            result["pipeline_efficiency"] = {k: v["pipeline_efficiency"] for k, v in per.items()}
            hit_on = "vgg16" if "vgg16" in per else backbones[0]
            result["cache_hit_fraction"] = per[hit_on]["cache_hit_fraction"]
            result["cache_hit_backbone"] = hit_on
            result["cache_file_mb"] = {k: v["cache_file_mb"] for k, v in per.items()}
        if memory:
            n_small = 16 if quick else MEMORY_SUBSET
            by_backbone = {name: bench_memory(data, n_small, name, _weights_for(name, quick), batch_size)
                           for name in (memory_backbones or list(MEMORY_BACKBONES))}
            worst = max(by_backbone, key=lambda name: by_backbone[name]["memory_ratio"])
            result["memory"] = by_backbone[worst]
            result["memory_by_backbone"] = by_backbone
            result["memory_ratio"] = by_backbone[worst]["memory_ratio"]
        if timing and ORIGINALS.is_dir():
            result["originals"] = bench_originals(data, batch_size, quick)
        return result
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _print_table(res: dict) -> None:
    print(f"machine: {res['machine']['cpu']}, {res['machine']['cores']} cores")
    if res["backbones"]:
        _print_timings(res)
    for name, m in res.get("memory_by_backbone", {}).items():
        print(f"memory_ratio {name}: {m['memory_ratio']} (peak RSS {m['full']['peak_rss_mb']} MB on "
              f"{m['full']['rows']} images vs {m['small']['peak_rss_mb']} MB on {m['small']['rows']})")
    if len(res.get("memory_by_backbone", {})) > 1:
        print(f"memory_ratio (the worst): {res['memory_ratio']} ({res['memory']['backbone']})")
    if "originals" in res:
        o = res["originals"]
        print(f"decode img/s: originals {o['decode_images_per_s_originals']} vs 224-px "
              f"{o['decode_images_per_s_224']}; extract originals "
              f"{o['extract_images_per_s_originals']} img/s")


def _print_timings(res: dict) -> None:
    head = ("fwd img/s", "e2e img/s", "efficiency", "2nd run s")
    print(f"{'backbone':16} " + " ".join(f"{h:>10}" for h in head) + f" {'MB':>8}")
    for name, r in res["backbones"].items():
        print(f"{name:16} {r['forward_images_per_s']:10.1f} {r['extract_images_per_s']:10.1f} "
              f"{r['pipeline_efficiency']:10.3f} {r['second_run_seconds']:10.2f} {r['cache_file_mb']:8.1f}")
        if "pipeline_efficiency_runs" in r:
            print(f"{'':16} efficiency of each of {r['repeats']} extracts (the median above): "
                  + ", ".join(f"{v:.3f}" for v in r["pipeline_efficiency_runs"]))
    print(f"cache_hit_fraction ({res['cache_hit_backbone']}): {res['cache_hit_fraction']}")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--_memory-child"]:
        _memory_child(argv[1], argv[2], argv[3], argv[4], int(argv[5]))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="64 images, mobilenet-0.75 random weights (~1 min)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--data", type=Path, help=f"dataset folder (default {DEFAULT_DATA})")
    ap.add_argument("--backbones", help=f"comma-separated (default {','.join(FULL_BACKBONES)})")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2, help="decode threads")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-RSS subprocesses")
    ap.add_argument("--memory-backbones", default=",".join(MEMORY_BACKBONES),
                    help="comma-separated backbones for the peak-RSS check; memory_ratio is the worst "
                         "(vgg16 is the strong test: ~525 MB of rows on 5,232 images)")
    ap.add_argument("--no-timing", action="store_true",
                    help="skip the efficiency and cache-hit timings (a memory-only run)")
    ap.add_argument("--repeats", default="1",
                    help="time each extract N times, or NAME=N,... for the backbones named; "
                         "pipeline_efficiency is the median (default 1)")
    args = ap.parse_args(argv)
    from quiet_start import quiet_backend_start

    quiet_backend_start()  # TensorFlow's C++ start-up lines filtered as in the CLI
    try:
        args.repeats = parse_repeats(args.repeats)
    except ValueError as exc:
        ap.error(str(exc))
    res = run(args.quick, args.data, args.backbones.split(",") if args.backbones else None,
              batch_size=args.batch_size, workers=args.workers, memory=not args.no_memory,
              repeats=args.repeats, memory_backbones=args.memory_backbones.split(","),
              timing=not args.no_timing)
    if args.json:
        print(json.dumps(res, indent=2, default=str))
    else:
        _print_table(res)


if __name__ == "__main__":
    main()
