"""Apply a stored run to new images: same backbone settings, same head, the run's chosen threshold.

Why it works this way:
- The backbone configuration comes from the cache config recorded in the run (not from flags), so
  the features of a new image are computed exactly as the training features were; the rebuilt
  backbone's weights digest must match the recorded one or the prediction is refused.
- An image whose sha256 is already in the run's cache reuses the cached row (no backbone needed).
- The head is loaded only after its files' recorded SHA-256 match (runs.load_head).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from featcache.errors import DataError, RunError
from featcache.hashing import sha256_bytes
from featcache.metrics import predict_labels
from featcache.progress import ProgressFn, emit
from featcache.runs import Run, load_head, load_run


def _read_images(images: Sequence[str | Path]) -> list[tuple[str, bytes, str]]:
    """(path, bytes, sha256) of each image; DataError for a missing or unreadable file."""
    out = []
    for img in images:
        p = Path(os.fsdecode(img))
        try:
            data = p.read_bytes()
        except FileNotFoundError:
            raise DataError(f"image {os.fsdecode(p)} does not exist; check the path.") from None
        except IsADirectoryError:
            raise DataError(f"{os.fsdecode(p)} is a folder, not an image; pass image files.") from None
        except OSError as exc:
            raise DataError(
                f"cannot read image {os.fsdecode(p)} ({exc.strerror}); check its permissions."
            ) from None
        out.append((os.fsdecode(p), data, sha256_bytes(data)))
    return out


def _backbone_config(cache: dict, backbone_files: Sequence[str | Path] = ()) -> Any:
    """BackboneConfig rebuilt from a cache config recorded in run.json.

    Why ``backbone_files``: a weights file or saved model is recorded by its SHA-256, not its path (the
    same file anywhere gives the same features), so the user hands the file back and we match it by hash.
    """
    from featcache.backbones import BackboneConfig
    from featcache.hashing import sha256_file

    cfg = cache.get("config") or {}
    weights = cfg.get("weights", "imagenet")
    if weights in ("file", "saved"):
        want = cfg.get("weights_file_sha256")
        for f in backbone_files:
            if want and Path(f).is_file() and sha256_file(Path(f)) == want:
                if weights == "saved":
                    return BackboneConfig(str(f), weights="imagenet", layer=cfg.get("layer"),
                                          pooling=cfg.get("pooling"), image_size=cfg.get("image_size"))
                return BackboneConfig(cfg.get("backbone"), weights=str(f), pooling=cfg.get("pooling"),
                                      image_size=cfg.get("image_size"))
        what = "saved model" if weights == "saved" else "weights file"
        raise RunError(
            f"run uses backbone '{cfg.get('backbone')}' built from a {what} (sha256 {str(want)[:12]}...) and "
            f"these images are not in its cache; pass that file with --backbone-file PATH."
        )
    fields = {f.name for f in dataclasses.fields(BackboneConfig)}
    kw = {
        "name": cfg.get("backbone", cache.get("name")),
        "weights": weights,
        "pooling": cfg.get("pooling"),
        "image_size": cfg.get("image_size"),
    }
    if "seed" in cfg and "seed" in fields:
        kw["seed"] = int(cfg["seed"])
    return BackboneConfig(**{k: v for k, v in kw.items() if k in fields})


class _Extractor:
    """Features of one run cache for given images: cached rows first, the backbone for the rest."""

    def __init__(self, cache: dict, backbone_files: Sequence[str | Path] = ()) -> None:
        self.cache = cache
        self.backbone_files = list(backbone_files)
        self.backbone: Any = None
        self.reader_index: dict | None = None
        self._reader: Any = None
        path = Path(cache.get("path", ""))
        if path.is_file():
            from featcache.cache import CacheReader
            from featcache.errors import CacheError

            try:
                reader = CacheReader(path)
            except CacheError:
                reader = None
            if reader is not None and reader.config_hash == cache.get("config_hash"):
                self._reader = reader
            elif reader is not None:
                reader.close()

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()

    def _build(self) -> Any:
        if self.backbone is None:
            from featcache.backbones import build_backbone

            bb = build_backbone(_backbone_config(self.cache, self.backbone_files))
            want = self.cache.get("weights_digest")
            if want and bb.weights_digest != want:
                raise RunError(
                    f"the backbone '{self.cache.get('name')}' built here has other weights than the run's "
                    "cache (weights digest differs); predict with the weights the run was trained on."
                )
            self.backbone = bb
        return self.backbone

    def features(self, items: list[tuple[str, bytes, str]], view: str) -> tuple[np.ndarray, np.ndarray]:
        """[n, D] features and a bool mask of rows that came from the cache."""
        keys = [k for _, _, k in items]
        dim = int(self.cache.get("feature_dim") or 0)
        from_cache = (
            np.asarray(self._reader.has(keys, view), dtype=bool)
            if self._reader is not None
            else np.zeros(len(keys), dtype=bool)
        )
        out = np.zeros((len(keys), dim), dtype=np.float32)
        if from_cache.any():
            out[from_cache] = self._reader.get([k for k, c in zip(keys, from_cache, strict=True) if c], view)
        todo = np.flatnonzero(~from_cache)
        if len(todo):
            from featcache.images import ImageDecodeError, decode_image, parse_views

            bb = self._build()
            cfg = self.cache.get("config") or {}
            size = int(cfg.get("image_size") or bb.input_size)
            resize = str(cfg.get("resize", "squash"))
            the_view = parse_views([view])[0]
            batch = []
            for i in todo:
                path, data, _ = items[i]
                try:
                    batch.append(the_view.apply(decode_image(data, (size, size), resize)))
                except ImageDecodeError as exc:
                    raise DataError(
                        f"cannot decode image {path} ({exc.reason}); pass a readable image file."
                    ) from None
            out[todo] = bb(np.stack(batch))
        return out, from_cache


def predict(
    images: Sequence[str | Path],
    run_id: str,
    runs_dir: str | Path = "runs",
    progress: ProgressFn | None = None,
    backbone_files: Sequence[str | Path] = (),
) -> dict:
    """Class probabilities and labels of ``images`` with run ``run_id``.

    Returns {"run": id, "classes", "threshold", "predictions": [{"image", "key", "probabilities",
    "label", "from_cache"}]}. RunError for an unknown run or a tampered model file.
    ``backbone_files``: the weights file / saved model of a run whose backbone came from a file (matched
    by SHA-256); only needed for images that are not already in the run's caches.
    """
    run: Run = load_run(runs_dir, run_id)
    model = load_head(run)  # sha256 of every model file checked first
    if not images:
        raise DataError("give at least one image to predict.")
    items = _read_images(images)
    classes = list(run.info.get("classes") or [])
    views = ["orig"] + (list(run.info.get("tta_views") or []) if run.info.get("tta") else [])
    extractors = [_Extractor(c, backbone_files) for c in run.info.get("caches", [])]
    if not extractors:
        raise RunError(f"run '{run.id}' records no feature caches; fit it again.")
    try:
        total = np.zeros((len(items), len(classes)))
        cached = np.ones(len(items), dtype=bool)
        for i, view in enumerate(views):
            emit(progress, "predict", i, len(views), f"view {view}")
            parts = [ex.features(items, view) for ex in extractors]
            X = np.concatenate([p[0] for p in parts], axis=1)
            if view == "orig":
                for p in parts:
                    cached &= p[1]
            total += np.asarray(model.predict_proba(X), dtype=np.float64)
        emit(progress, "predict", len(views), len(views))
    finally:
        for ex in extractors:
            ex.close()
    proba = total / len(views)
    thr = (run.info.get("threshold") or {}).get("chosen") if len(classes) == 2 else None
    labels = predict_labels(proba, thr)
    preds = [
        {
            "image": path,
            "key": key,
            "probabilities": {c: float(proba[i, j]) for j, c in enumerate(classes)},
            "label": classes[int(labels[i])],
            "from_cache": bool(cached[i]),
        }
        for i, (path, _, key) in enumerate(items)
    ]
    return {
        "run": run.id,
        "classes": classes,
        "threshold": thr,
        "task": run.info.get("task"),
        "predictions": preds,
    }
