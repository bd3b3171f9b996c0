"""A cache writer run as a child process by tests/test_cache.py, so tests can SIGKILL it mid-write.

It writes deterministic rows (row content depends only on the image index and view, never on chunking
or on what a previous, killed run managed to write), so a resumed run must end with exactly the rows of
an uninterrupted one. Kill points come from featcache.faults (``FEATCACHE_CRASH_AT=cache.after_data_flush:2``)
plus ``child.between_chunks`` here. Exit status 3 = CacheLockedError, 4 = another CacheError (message
on stderr).

    python tests/cache_writer_child.py FILE --root DIR --images 40 --chunk 8 --dim 16 [--views orig,hflip]
                                       [--dtype float16] [--sleep 0.02] [--wait 5]
                                       [--max-file-bytes N]
"""
from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

import numpy as np

from featcache.cache import CacheWriter, cache_config
from featcache.errors import CacheError, CacheLockedError
from featcache.faults import crash_point


def make_config(root: Path, dim: int, dtype: str = "float32", pooling: str = "avg") -> dict:
    """A config like extract builds, for a fake backbone (no TensorFlow needed)."""
    backbone = {"name": "testnet", "weights": "none", "weights_digest": "none", "pooling": pooling,
                "image_size": 32, "preprocess": "unit", "feature_dim": dim, "seed": 0}
    return cache_config(root, backbone, "squash", dtype)


def make_rows(n_images: int, dim: int, views: tuple[str, ...] = ("orig",), start: int = 0) -> dict:
    """Rows for images start..start+n_images-1 × views, in a fixed order; features seeded per row."""
    keys, vws, paths, feats = [], [], [], []
    for i in range(start, start + n_images):
        key = hashlib.sha256(f"image-{i}".encode()).hexdigest()
        for v_i, view in enumerate(views):
            keys.append(key)
            vws.append(view)
            paths.append(f"train/{'NORMAL' if i % 2 else 'PNEUMONIA'}/img_{i}.jpeg")
            feats.append(np.random.default_rng([i, v_i, 7]).standard_normal(dim).astype(np.float32))
    return {"keys": keys, "views": vws, "paths": paths,
            "features": np.stack(feats) if feats else np.zeros((0, dim), np.float32)}


def write_all(path: Path, root: Path, n_images: int, chunk: int, dim: int, views: tuple[str, ...] = ("orig",),
              dtype: str = "float32", sleep: float = 0.0, wait: float | None = None, start: int = 0,
              on_ready=None) -> int:
    """What extract does: skip present rows, reserve once, append in chunks, close. Returns rows written."""
    rows = make_rows(n_images, dim, views, start)
    written = 0
    with CacheWriter(path, make_config(root, dim, dtype), dim, wait=wait) as writer:
        present = writer.present()
        todo = [j for j, kv in enumerate(zip(rows["keys"], rows["views"], strict=True)) if kv not in present]
        writer.reserve(len(todo))
        if on_ready:
            on_ready()
        for lo in range(0, len(todo), chunk):
            idx = todo[lo:lo + chunk]
            written += writer.append([rows["keys"][j] for j in idx], [rows["views"][j] for j in idx],
                                     [rows["paths"][j] for j in idx], rows["features"][idx])
            crash_point("child.between_chunks")
            if sleep:
                time.sleep(sleep)
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("path", type=Path)
    ap.add_argument("--root", type=Path, required=True)
    ap.add_argument("--images", type=int, default=40)
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--chunk", type=int, default=8)
    ap.add_argument("--dim", type=int, default=16)
    ap.add_argument("--views", default="orig")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--sleep", type=float, default=0.0)
    ap.add_argument("--wait", type=float, default=None)
    ap.add_argument("--max-file-bytes", type=int, default=None,
                    help="RLIMIT_FSIZE: the kernel refuses writes past it (EFBIG), as a full disk does")
    args = ap.parse_args(argv)
    if args.max_file_bytes is not None:
        import resource
        import signal

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a refused write, not a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, (args.max_file_bytes, args.max_file_bytes))
    try:
        views = tuple(args.views.split(","))
        written = write_all(args.path, args.root, args.images, args.chunk, args.dim, views,
                            args.dtype, args.sleep, args.wait, args.start,
                            on_ready=lambda: print("ready", flush=True))
    except CacheLockedError as exc:
        print(exc, file=sys.stderr, flush=True)
        return 3
    except CacheError as exc:  # e.g. the file system refused a write
        print(exc, file=sys.stderr, flush=True)
        return 4
    print(f"done {written}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
