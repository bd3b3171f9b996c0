"""Apply a stored run to new images: same backbone settings, same head, the run's chosen threshold.

Why it works this way:
- The backbone configuration comes from the cache config recorded in the run (not from flags), so
  the features of a new image are computed exactly as the training features were; the rebuilt
  backbone's weights digest must match the recorded one or the prediction is refused.
- An image whose sha256 is already in the run's cache reuses the cached row (no backbone needed).
- The head is loaded only after its files' recorded SHA-256 match (runs.load_head).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from featcache.errors import DataError, NetworkError, NothingClassifiedError, RunError, nearest_existing
from featcache.hashing import sha256_bytes
from featcache.metrics import predict_labels
from featcache.progress import ProgressFn, emit
from featcache.runs import SEEN_KEYS, Run, changed_records, edited_run_json, load_head, load_run

PREDICT_CHUNK = 64
"""Images read, decoded and classified together: bounds memory (full-size originals are megabytes each)
and is the backbone's compiled batch size."""


def read_image_list(list_file: str | Path) -> list[str]:
    """The image paths a list file names, one per line (blank lines left out); a relative path is taken
    from the list file's folder, as a ``--data`` manifest's paths are.

    A CSV whose header names a ``path`` column (a ``--data`` manifest: ``path,label[,split][,group]``)
    gives that column's paths, its other columns ignored; a ``.csv`` or ``.tsv`` file whose first line
    holds several values but no ``path`` column is refused, naming the formats read.

    Why: a clinician's set of new X-rays comes as a list, and predict took only paths on the command line:
    the list itself was "cannot decode: not an image", and ``xargs`` over a long list runs predict several
    times, each run's --csv replacing the last one's rows. Why the CSV: given a manifest (the README
    likens the list's paths to a manifest's), its header and every ``image.jpeg,NORMAL`` line were read as
    paths of missing files, and predict ended with "none of the 41 path(s) ... could be classified (e.g.
    path,label: does not exist)". ``DataError`` for a list that cannot be read.
    """
    path = Path(list_file)
    try:
        text = path.read_bytes().decode("utf-8-sig", "surrogateescape")
    except OSError as exc:
        raise DataError(f"--images-from {path} cannot be read ({exc.strerror or exc}).") from exc
    if "\0" in text:  # an image given by mistake: its bytes are no list of paths
        raise DataError(f"--images-from {path} is not a text file with one image path per line.")
    lines = [line.strip("\r") for line in text.split("\n") if line.strip()]
    header = _csv_header(lines[0]) if lines else []
    if "path" in header:
        lines = _manifest_paths(path)
    elif path.suffix.lower() in (".csv", ".tsv") and (len(header) > 1 or any(c in lines[0] for c in ";\t")):
        raise DataError(
            f"--images-from {path} is a table whose header names no path column (its first line: "
            f"{lines[0][:80]!r}); name the image column path in a comma-separated header, as a --data "
            "manifest's (path,label[,split][,group]), or give a text file with one image path per line.")
    return [line if os.path.isabs(line) else os.fsdecode(path.parent / line) for line in lines]


def _csv_header(line: str) -> list[str]:
    """The lower-cased, stripped cells of a list file's first line read as CSV ([] when it is no CSV)."""
    import csv

    try:
        return [cell.strip().lower() for cell in next(csv.reader([line]), [])]
    except csv.Error:
        return []


def _manifest_paths(path: Path) -> list[str]:
    """The ``path`` column of a CSV list, read as ``--data`` reads a manifest (quoted commas kept,
    rows of empty cells left out); DataError for a row with an empty path."""
    from featcache.datasets import _read_manifest_rows

    paths = []
    for line, row in _read_manifest_rows(path)[1]:
        if not row.get("path"):
            raise DataError(f"--images-from {path} line {line} has an empty path; fill it in or drop the "
                            "row.")
        paths.append(row["path"])
    return paths


def expand_images(images: Sequence[str | Path]) -> list[tuple[str, str | None]]:
    """The image paths to classify, each with the reason it is left out (None: to classify).

    Files are kept as given (a JPEG without an extension named on purpose is classified); a folder is
    replaced by the image files below it, found as discovery finds a dataset's: symlinked sub-folders are
    followed (loops refused) and every other file is listed with its reason ("not an image file
    extension"), so nothing in the folder vanishes without a word; hidden entries (.DS_Store) are left
    out quietly. Why folders: "classify this folder of new X-rays" is the common case, and a shell glob
    over thousands of files can exceed the argument limit. A missing path is kept, reported as skipped.
    """
    from featcache.datasets import scan_images

    out: list[tuple[str, str | None]] = []
    for img in images:
        p = Path(os.fsdecode(img))
        if not p.is_dir():
            out.append((os.fsdecode(p), None))
            continue
        found, left_out = scan_images(p)
        if not found:
            out.append((os.fsdecode(p), "a folder with no image files"))
        out += [(os.fsdecode(f), None) for f in found]
        out += [(os.path.join(os.fsdecode(p), rel.rstrip("/")), why) for rel, why in left_out
                if not why.startswith("hidden")]
    # one row per file: a path given twice (a.jpeg ./a.jpeg), or a file given by name inside a folder given
    # too, was classified twice, or classified and also listed as skipped ("not an image file extension")
    given = {os.path.normpath(os.fsdecode(img)) for img in images if not Path(os.fsdecode(img)).is_dir()}
    seen: set[str] = set()
    kept: list[tuple[str, str | None]] = []
    for path, why in out:
        norm = os.path.normpath(path)
        if norm in seen or (why is not None and norm in given and why.startswith("not an image")):
            continue
        seen.add(norm)
        kept.append((path, why))
    return kept


def _input_size(cache: dict) -> int:
    """The backbone input size (px) a run cache was extracted at."""
    from featcache.backbones import get_spec

    cfg = cache.get("config") or {}
    if cfg.get("image_size"):
        return int(cfg["image_size"])
    try:
        return int(get_spec(str(cfg.get("backbone", cache.get("name")))).input_size)
    except Exception:  # noqa: BLE001 - a saved-model backbone has no registry entry: the common size
        return 224


def _read_image(path: str) -> tuple[str, bytes, str] | str:
    """(path, bytes, sha256), or the reason the file cannot be used."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        return "broken symlink" if p.is_symlink() else "does not exist"  # as extract words it
    except IsADirectoryError:
        return "a folder with no image files"
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"
    return path, data, sha256_bytes(data)


def _missing_imagenet(config: Any) -> str:
    """The sentence for ImageNet weights that are neither in the Keras cache nor downloadable, in
    predict's terms: it must use the weights the run was trained on, so no other --weights is offered."""
    from featcache.backbones import get_spec, imagenet_weights_file, keras_models_dir

    cfg = config.resolved()
    name = imagenet_weights_file(cfg.name, int(cfg.image_size or get_spec(cfg.name).input_size))
    return (f"new images need the run's backbone, {cfg.name} with ImageNet weights, and they could not be "
            f"downloaded (no network?); put {name} in {keras_models_dir()} (the Keras cache, set by "
            "$KERAS_HOME): predict uses the weights the run was trained on. Images already in the run's "
            "cache need no backbone")


def _backbone_config(cache: dict, backbone_files: Sequence[str | Path] = ()) -> Any:
    """BackboneConfig rebuilt from a cache config recorded in run.json.

    Why ``backbone_files``: a weights file or saved model is recorded by its SHA-256, not its path (the
    same file anywhere gives the same features), so the user hands the file back and we match it by hash.
    When none matches, the message says why for each file given (a path that does not exist, a file of
    another digest): "pass that file" alone read as if no file had been given.
    """
    from featcache.backbones import BackboneConfig
    from featcache.hashing import sha256_file

    _refuse_missing(backbone_files)  # a mistyped path is a usage error whatever the run needs
    cfg = cache.get("config") or {}
    weights = cfg.get("weights", "imagenet")
    # hashed only where a file is needed (a run of several caches gets every cache's files here)
    digests = ({str(f): sha256_file(Path(f)) for f in backbone_files} if weights in ("file", "saved")
               else {})
    if weights == "file" and cfg.get("model_file_sha256"):  # a saved model given its own weights file
        by_hash = {digest: path for path, digest in digests.items()}
        model, wfile = by_hash.get(cfg["model_file_sha256"]), by_hash.get(cfg.get("weights_file_sha256"))
        if model and wfile:
            return BackboneConfig(model, weights=wfile, layer=cfg.get("layer"), pooling=cfg.get("pooling"),
                                  image_size=cfg.get("image_size"))
        raise RunError(
            f"run uses the saved model '{cfg.get('backbone')}' (sha256 "
            f"{str(cfg['model_file_sha256'])[:12]}...) with a weights file (sha256 "
            f"{str(cfg.get('weights_file_sha256'))[:12]}...), and these images are not in its cache; pass "
            "both files, each with --backbone-file PATH" + _given_digests(digests, {
                "saved model": cfg["model_file_sha256"], "weights file": cfg.get("weights_file_sha256")}))
    if weights in ("file", "saved"):
        want = cfg.get("weights_file_sha256")
        for f, digest in digests.items():
            if want and digest == want:
                if weights == "saved":
                    return BackboneConfig(f, weights="imagenet", layer=cfg.get("layer"),
                                          pooling=cfg.get("pooling"), image_size=cfg.get("image_size"))
                return BackboneConfig(cfg.get("backbone"), weights=f, pooling=cfg.get("pooling"),
                                      image_size=cfg.get("image_size"))
        what = "saved model" if weights == "saved" else "weights file"
        raise RunError(
            f"run uses backbone '{cfg.get('backbone')}' built from a {what} (sha256 {str(want)[:12]}...) and "
            f"these images are not in its cache; pass that file with --backbone-file PATH"
            + _given_digests(digests, {what: want}))
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


def _check_backbone_files(run: Run, backbone_files: Sequence[str | Path]) -> None:
    """ConfigError, before any image is read, for a --backbone-file that does not exist or that the run
    cannot use (none of its backbones came from a file). Why up front: checked only where an image missed
    the cache, a mistyped path passed without a word whenever every image was cached, and a file given to
    an ImageNet run was ignored silently."""
    from featcache.errors import ConfigError

    if not backbone_files:
        return
    _refuse_missing(backbone_files)
    kinds = {str(((c.get("config") or {}) if isinstance(c, dict) else {}).get("weights", "imagenet"))
             for c in run.info.get("caches") or []}
    if not kinds & {"file", "saved"}:
        raise ConfigError(f"run '{run.id}' builds its backbone by name ({', '.join(sorted(kinds))} weights), "
                          "not from a file: --backbone-file is not used; leave it out.")


def _refuse_missing(backbone_files: Sequence[str | Path]) -> None:
    """ConfigError naming the first --backbone-file that is not a file (as --weights PATH at extract)."""
    from featcache.errors import ConfigError

    missing = [str(f) for f in backbone_files if not Path(f).is_file()]
    if missing:
        raise ConfigError(f"--backbone-file {missing[0]} does not exist (or is not a file).")


def _given_digests(digests: dict[str, str], wanted: dict[str, object]) -> str:
    """The end of the no-match sentence: "." when no file was given, else what each given file is: the
    run's saved model or weights file, or a file whose digest (first 12 hex digits, as the run's are named
    before) is not the run's."""
    if not digests:
        return "."
    parts = []
    for path, digest in digests.items():
        role = next((name for name, want in wanted.items() if want == digest), None)
        parts.append(f"{path} is the run's {role}" if role
                     else f"{path} has sha256 {digest[:12]}..., not the run's")
    return f" (given: {'; '.join(parts)})."


class _Extractor:
    """Features of one run cache for given images: cached rows first, the backbone for the rest."""

    def __init__(self, cache: dict, backbone_files: Sequence[str | Path] = (), batch_size: int = 1,
                 before_backend: Callable[[], None] | None = None) -> None:
        self.cache = cache
        self.before_backend = before_backend
        self.batch_size = batch_size
        self.backbone_files = list(backbone_files)
        self.backbone: Any = None
        self.reader_index: dict | None = None
        self._reader: Any = None
        # why no cached row can be reused (None: the cache is there): said, since every image then costs
        # a forward pass, and a damaged or replaced cache is worth knowing about
        self.note: str | None = None
        self.input_note: str | None = None  # the backbone built here reads images otherwise than the run's
        self.damaged: list[str] = []  # keys of cached rows that failed their digest (computed here instead)
        config = cache.get("config") if isinstance(cache.get("config"), dict) else {}
        # images decoded here get the pad/crop box of the full size; a run's cache made before had the box
        # of a JPEG's downscaled size (up to a pixel apart): new images can differ from its training rows
        self.box_note: str | None = (
            f"the run's cache was made with --resize {config['resize']} before its boxes came from the full "
            "image size: images decoded here (not found in the cache) get boxes up to a pixel apart from "
            "its training images' for large JPEGs; re-extract and fit again for the same geometry"
            if config.get("resize") in ("pad", "crop") and "resize_box" not in config else None)
        path = Path(cache.get("path", ""))
        if not path.is_file():
            self.note = f"the run's cache {path} is gone"
            return
        from featcache.cache import CacheReader
        from featcache.errors import CacheError

        try:
            reader = CacheReader(path)
        except CacheError:
            self.note = (f"the run's cache {path} cannot be read (truncated, corrupt or not a featcache "
                         "cache; `featcache cache verify` says which)")
            return
        if reader.config_hash == cache.get("config_hash"):
            self._reader = reader
        else:
            reader.close()
            self.note = f"the run's cache {path} now holds another extraction (config hash differs)"

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()

    def _build(self) -> Any:
        if self.backbone is None:
            if self.before_backend is not None:
                self.before_backend()
            from featcache.backbones import build_backbone

            config = _backbone_config(self.cache, self.backbone_files)
            try:
                bb = build_backbone(config)
            except NetworkError as exc:  # extract's advice (--weights none or PATH) is no option here
                raise NetworkError(_missing_imagenet(config)) from exc
            bb.fix_batch_size(self.batch_size)
            want = self.cache.get("weights_digest")
            if want and bb.weights_digest != want:
                raise RunError(
                    f"the backbone '{self.cache.get('name')}' built here has other weights than the run's "
                    "cache (weights digest differs); predict with the weights the run was trained on."
                )
            config = self.cache.get("config") if isinstance(self.cache.get("config"), dict) else {}
            if bb.describe().get("input_channels") == "luma" and config and "input_channels" not in config:
                self.input_note = (  # a 1-channel saved model took the red channel before: grey is the same
                    f"the run's backbone '{self.cache.get('name')}' takes 1-channel input and now gets each "
                    "image's luma, where its training features took the red channel: the same for grey "
                    "X-rays, not for colour images")
            self.backbone = bb
        return self.backbone

    def features(
        self, items: list[tuple[str, bytes, str]], view: str
    ) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
        """[n, D] features, a bool mask of rows that came from the cache, and {index: reason} of the
        images that could not be decoded (their rows are left at zero)."""
        keys = [k for _, _, k in items]
        dim = int(self.cache.get("feature_dim") or 0)
        from_cache = (
            np.asarray(self._reader.has(keys, view), dtype=bool)
            if self._reader is not None
            else np.zeros(len(keys), dtype=bool)
        )
        out = np.zeros((len(keys), dim), dtype=np.float32)
        if from_cache.any():
            from featcache.cache import refuse_damaged_features
            from featcache.errors import DamagedRowsError

            def cached() -> np.ndarray:
                wanted = [k for k, c in zip(keys, from_cache, strict=True) if c]
                return np.asarray(self._reader.get(wanted, view), np.float32)

            try:
                cached_rows = cached()
            except DamagedRowsError:  # rows changed since written: through the backbone, as when the
                bad_rows = {k for k, _ in self._reader.damaged(  # cache is gone, for those images only
                    [(k, view) for k, c in zip(keys, from_cache, strict=True) if c])}
                self.damaged += sorted(bad_rows - set(self.damaged))
                from_cache &= np.array([k not in bad_rows for k in keys], dtype=bool)
                cached_rows = cached() if from_cache.any() else np.zeros((0, dim), np.float32)
            refuse_damaged_features(cached_rows, self._reader.path, view)  # a NaN would become P = NaN
            out[from_cache] = cached_rows
        bad: dict[int, str] = {}
        todo = np.flatnonzero(~from_cache)
        if len(todo):
            from featcache.images import ImageDecodeError, decode_image, parse_views

            cfg = self.cache.get("config") or {}
            # decoded before the backbone is built: a stray notes.txt or truncated JPEG beside cached images
            # imported TensorFlow and built the backbone (5 s more) only to be skipped. A cache config
            # without image_size (an older cache's) takes the backbone's input size, so builds first.
            bb = None if cfg.get("image_size") else self._build()
            size = int(cfg.get("image_size") or bb.input_size)
            resize = str(cfg.get("resize", "squash"))
            the_view = parse_views([view])[0]
            batch, rows = [], []
            for i in todo:
                try:
                    batch.append(the_view.apply(decode_image(items[i][1], (size, size), resize)))
                    rows.append(i)
                except ImageDecodeError as exc:
                    bad[int(i)] = f"cannot decode: {exc.reason}"
            if batch:
                out[rows] = self._build()(np.stack(batch))
        return out, from_cache, bad


def _predict_chunk(
    items: list[tuple[str, bytes, str]], extractors: list[_Extractor], views: list[str], model: Any,
    reference: Any = None,
) -> tuple[list[int], np.ndarray, np.ndarray, dict[int, str], np.ndarray | None]:
    """Averaged probabilities of one chunk: (indices used, proba, from-cache mask, {index: reason}, the
    orig view's :meth:`~featcache.typicality.FeatureReference.scores` or None without a reference)."""
    bad: dict[int, str] = {}
    scores: np.ndarray | None = None
    good = list(range(len(items)))
    total: np.ndarray | None = None
    cached = np.ones(len(items), dtype=bool)
    for view in views:
        sub = [items[i] for i in good]
        parts = [ex.features(sub, view) for ex in extractors]
        new_bad = {good[j]: why for p in parts for j, why in p[2].items()}
        if new_bad and view != views[0]:  # the first view decoded every image already
            raise DataError(f"image {items[min(new_bad)][0]} decoded once but not for view {view}.")
        keep = [j for j in range(len(sub)) if good[j] not in new_bad]
        X = np.concatenate([p[0][keep] for p in parts], axis=1)
        for p in parts:  # "from the cache" only when every view of every backbone was there
            cached[good] &= p[1]
        if view == views[0]:
            bad.update(new_bad)
            good = [good[j] for j in keep]
            if reference is not None and good:
                with contextlib.suppress(ValueError):  # another width than the run's: no typicality
                    scores = reference.scores(X)
        if good:
            proba = np.asarray(model.predict_proba(X), dtype=np.float64)
            total = proba if total is None else total + proba
    if total is None:
        return [], np.zeros((0, 0)), cached[:0], bad, None
    return good, total / len(views), cached[good], bad, scores


def predict(
    images: Sequence[str | Path],
    run_id: str,
    runs_dir: str | Path = "runs",
    progress: ProgressFn | None = None,
    backbone_files: Sequence[str | Path] = (),
    before_backend: Callable[[], None] | None = None,
) -> dict:
    """Class probabilities and labels of ``images`` (files, or folders of image files) with run ``run_id``.

    Returns {"run": id, "classes", "threshold", "task", "predictions": [{"image", "key",
    "probabilities", "label", "from_cache", "seen", "unusual", "unusual_score"}], "skipped": [{"path",
    "reason"}], "notes": [str]}
    (notes: a run cache that is gone, unreadable or replaced, so nothing came from it; images the run was
    trained on; random weights; unusual images). ``seen``: "training", "test" or "new" (:func:`_seen_as`).
    ``unusual``: whether the image's features lie beyond the run's training images' (``unusual_score`` above
    1, :mod:`featcache.typicality`); None for a run without a feature reference (fitted before featcache
    wrote one, or on fewer than 200 images). A missing,
    unreadable or undecodable image is skipped with its reason and the others are still classified (as extract
    does); NothingClassifiedError (a DataError carrying this result) when no image at all can be used.
    RunError for an unknown run or a tampered model file. Images go through in chunks of PREDICT_CHUNK, so
    memory does not grow with their number.
    ``backbone_files``: the weights file / saved model of a run whose backbone came from a file (matched
    by SHA-256); only needed for images that are not already in the run's caches.
    ``before_backend``: called once, just before Keras is first needed (an mlp head, or an image that is
    in none of the run's caches). Why: importing TensorFlow takes 3-7 s and prints native start-up
    lines; the CLI imports it there with those lines filtered, and not at all when a logreg, svm or knn
    run classifies cached images (the call took 7 s, nearly all of it the import).
    """
    run: Run = load_run(runs_dir, run_id)
    before_backend = _once(before_backend)
    if str(run.info.get("head", "")).strip().lower() == "mlp" and before_backend is not None:
        before_backend()
    model = load_head(run)  # sha256 of every model file checked first
    edited = edited_run_json(run.info, run.metrics())  # the threshold it labels with is run.json's
    if edited:
        raise RunError(f"run '{run.id}' cannot be used: {edited[0]}; fit it again (the same fit command "
                       "plus --retrain).")
    _check_backbone_files(run, backbone_files)
    listed = expand_images(images)
    paths = [path for path, _ in listed]
    if not paths:
        raise DataError("give at least one image to predict (files, folders, or --images-from LIST).")
    classes = list(run.info.get("classes") or [])
    views = ["orig"] + (list(run.info.get("tta_views") or []) if run.info.get("tta") else [])
    # The backbone's compiled batch: a chunk, or all images when fewer (one new image is not padded to 64).
    batch = min(PREDICT_CHUNK, len(paths))
    extractors = [_Extractor(c, backbone_files, batch, before_backend) for c in run.info.get("caches", [])]
    if not extractors:
        raise RunError(f"run '{run.id}' records no feature caches; fit it again.")
    thr = (run.info.get("threshold") or {}).get("chosen") if len(classes) == 2 else None
    seen = run.seen_keys()
    reference = run.feature_reference()
    preds: list[dict] = []
    skipped: list[tuple[int, dict]] = []  # (position in paths, entry): listed in the order given
    from featcache.images import UPSCALE_LIMIT, pixel_size

    tiny: dict[str, tuple[int, int]] = {}  # image -> (width, height) of those under `smallest` px a side
    multi: dict[str, int] = {}  # image -> its number of frames, for those holding more than one
    # upscaled more than UPSCALE_LIMIT times to the (largest) backbone input: little left to classify
    smallest = max(_input_size(ex.cache) for ex in extractors) / UPSCALE_LIMIT
    try:
        for start in range(0, len(paths), PREDICT_CHUNK):
            emit(progress, "predict", start, len(paths), "classifying images")
            items: list[tuple[str, bytes, str]] = []
            where: list[int] = []
            for pos, (path, why) in enumerate(listed[start:start + PREDICT_CHUNK], start):
                got = why or _read_image(path)
                if isinstance(got, str):
                    skipped.append((pos, {"path": path, "reason": got}))
                else:
                    items.append(got)
                    where.append(pos)
                    dims = pixel_size(got[1])
                    if dims is not None and min(dims[:2]) < smallest:
                        tiny[got[0]] = dims[:2]
                    if dims is not None and dims[2] > 1:
                        multi[got[0]] = dims[2]
            if not items:
                continue
            good, proba, cached, bad, scores = _predict_chunk(items, extractors, views, model, reference)
            skipped += [(where[i], {"path": items[i][0], "reason": why}) for i, why in bad.items()]
            labels = predict_labels(proba, thr) if good else []
            preds += [
                {
                    "image": items[i][0],
                    "key": items[i][2],
                    "probabilities": {c: float(proba[r, j]) for j, c in enumerate(classes)},
                    "label": classes[int(labels[r])],
                    "from_cache": bool(cached[r]),
                    "seen": _seen_as(items[i][2], seen),
                    "unusual": None if scores is None else bool(scores[r] > 1.0),
                    "unusual_score": None if scores is None else round(float(scores[r]), 4),
                }
                for r, i in enumerate(good)
            ]
        emit(progress, "predict", len(paths), len(paths))
        # read while the caches are open, and only when some image is "new" (a cache's paths are megabytes)
        any_new = seen is not None and any(p["seen"] == "new" for p in preds)
        own_names = _own_names(extractors, seen) if any_new else {}
    finally:
        for ex in extractors:
            ex.close()
    skipped_list = [entry for _, entry in sorted(skipped, key=lambda t: t[0])]
    notes = [f"{ex.note}: its images went through the backbone again (same settings, same features)"
             for ex in extractors if ex.note and any(not p["from_cache"] for p in preds)]
    notes += [ex.input_note for ex in extractors if ex.input_note]
    notes += [ex.box_note for ex in extractors if ex.box_note and any(not p["from_cache"] for p in preds)]
    notes += [f"{len(ex.damaged)} cached row(s) of {ex.cache.get('path')} changed after they were written "
              "(their digests do not match): those images went through the backbone again; rerun the same "
              "`featcache extract` to repair the cache" for ex in extractors if ex.damaged]
    small = [p["image"] for p in preds if p["image"] in tiny]
    if small:  # a 5x5 image got P(PNEUMONIA) 0.74 and a label like any X-ray
        w, h = tiny[small[0]]
        notes.append(f"{len(small)} image(s) smaller than {smallest:g} px on a side were upscaled more "
                     f"than {UPSCALE_LIMIT} times to the backbone's input (e.g. {small[0]}, {w}x{h}): their "
                     "labels carry little information.")
    frames = [p["image"] for p in preds if p["image"] in multi]
    if frames:
        notes.append(f"{len(frames)} image(s) hold several frames (an animated GIF or a multi-page TIFF; "
                     f"e.g. {frames[0]}, {multi[frames[0]]} frames): each was classified from its first "
                     "frame only; save the frame to classify as an image of its own.")
    notes += _seen_notes(run, preds, seen)
    namesakes = [(p["image"], own_names[_name_stem(p["image"])]) for p in preds
                 if p["seen"] == "new" and _name_stem(p["image"]) in own_names]
    if namesakes:  # the 42 full-size Kermany originals of its training images: all "new"
        img, own = namesakes[0]
        notes.append(
            f"{len(namesakes)} image(s) marked seen=new have the file name of one of the run's own training "
            f"or test images (e.g. {img} and {own} in its cache): a full-size, resized or re-saved copy "
            "of an X-ray has other bytes, so predict cannot tell it is the same image; if these are such "
            "copies, their labels are no estimate of accuracy on new images.")
    unusual = [p for p in preds if p["unusual"]]
    if unusual:
        worst = max(unusual, key=lambda p: p["unusual_score"])
        notes.append(
            f"{len(unusual)} image(s) are unlike the images the run was trained on (e.g. {worst['image']}: "
            f"{worst['unusual_score']:.2f} times the limit its held-out training images set; column "
            "unusual=yes): their labels are not to be trusted. Check that they are chest X-rays like the "
            "run's own (not blank, noise, a photo or a turned film)."
        )
    result = {
        "run": run.id,
        "classes": classes,
        "threshold": thr,
        "task": run.info.get("task"),
        "predictions": preds,
        "skipped": skipped_list,
        "notes": notes,
    }
    if not preds:
        first = skipped_list[0]
        raise NothingClassifiedError(
            f"none of the {len(paths)} path(s) given or found could be classified (e.g. {first['path']}: "
            f"{first['reason']}); pass readable image files or folders of them.", result)
    return result


def _name_stem(path: str) -> str:
    """A file's name without folder, extension or case: how a copy exported elsewhere keeps its name
    (IM-0115-0001.jpeg full-size beside IM-0115-0001.jpeg at 224 px, or saved as .PNG)."""
    return Path(path).stem.casefold()


def _own_names(extractors: Sequence[_Extractor], seen: dict[str, set[str]]) -> dict[str, str]:
    """{name stem: cache path} of the run's training and test images, from the caches that can be read
    (none when they are gone).

    Why: ``seen`` matches content keys, so a full-size original or a re-saved copy of a training image
    read "new", and its label passed for a held-out one; the file name is what such a copy keeps."""
    own = seen["training"] | seen["test"]
    names: dict[str, str] = {}
    for ex in extractors:
        if ex._reader is None:
            continue
        for key, path in ex._reader.key_paths().items():
            if key in own:
                names.setdefault(_name_stem(path), path)
    return names


def _seen_as(key: str, seen: dict[str, set[str]] | None) -> str | None:
    """"training" (an image the run was fitted or selected on), "test" (one of its test images), "new", or
    None when the run did not record them (fitted by an older featcache)."""
    if seen is None:
        return None
    return "training" if key in seen["training"] else "test" if key in seen["test"] else "new"


def _seen_notes(run: Run, preds: Sequence[dict], seen: dict[str, set[str]] | None) -> list[str]:
    """What a reader of the labels must know about the run and the images: labels of the run's own
    training images are no held-out estimate (a 72-image check gave 0.986 where the out-of-fold accuracy
    was 0.944), and a random-weight run's labels mean nothing."""
    notes = [f"the run's {problem}: `runs ls` and the report leave it out, as its recorded numbers cannot be "
             "trusted; its model files are intact (their SHA-256 matches), so these labels are its model's"
             for problem in changed_records(run.path, run.info)]
    trained = [p["image"] for p in preds if p["seen"] == "training"]
    if trained:
        notes.append(f"{len(trained)} image(s) are among the run's own training images (it was fitted or "
                     f"selected on them; e.g. {trained[0]}; column seen=training): their labels are no "
                     "estimate of accuracy on new images (the run's held-out numbers are in `featcache runs "
                     f"show {run.id}`).")
    if seen is None and preds:
        why = ("its seen_keys.npz cannot be read" if (run.path / SEEN_KEYS).exists() else
               "the run was fitted before featcache recorded which images it saw (seen_keys.npz)")
        notes.append(f"{why}: predict cannot say whether these images were among its training images.")
    if any(isinstance(b, dict) and b.get("weights") == "none" for b in run.info.get("backbones") or []):
        notes.append("the run's features come from randomly initialised weights (--weights none), not "
                     "ImageNet: its labels test the pipeline and say nothing about the images.")
    return notes


def _once(fn: Callable[[], None] | None) -> Callable[[], None] | None:
    """``fn`` wrapped to run at most once (several caches, and an mlp head, may each ask for Keras)."""
    if fn is None:
        return None
    done: list[bool] = []

    def call() -> None:
        if not done:
            done.append(True)
            fn()

    return call


def _csv_destination(path: Path) -> tuple[Path, bool]:
    """(the file --csv writes, whether it is written in place) for ``path``.

    In place, appending: a device or named pipe (a link to one included), and a link under /dev or /proc
    (/dev/stdout, /dev/fd/63 of a process substitution: a descriptor, whatever it leads to). Why: the file
    written beside the path and renamed over it replaced /dev/null itself with a regular file (as root);
    /dev/stdout resolved to /proc/self/fd/1 and then to "pipe:[N]", which does not exist, so the write
    failed after every forward pass; and resolved to a log file the shell appends to (`>> log`), the rename
    wiped the log. A symbolic
    link to a regular file: that file is replaced whole, the link kept. ``DataError`` for a link that loops.
    """
    if path.is_symlink() and str(path).startswith(("/dev/", "/proc/")):
        return path, True
    if path.is_symlink():
        real = Path(os.path.realpath(path))
        if real.is_symlink():  # realpath leaves a loop unresolved (Path.resolve raised a bare RuntimeError)
            raise DataError(f"--csv {path} is a symbolic link that loops; give a file name.")
        path = real
    return path, path.exists() and not path.is_file()


def check_csv_target(path: str | Path, replace: bool = True) -> Path:
    """DataError for a --csv path that cannot become a file (a folder, or a folder under a regular file),
    checked before any image is classified: found afterwards, it cost the whole forward pass.

    ``replace=False`` (the CLI without --force): DataError for a file already there too. Why: --csv
    replaced an earlier prediction file without a word, so a rerun on the next batch of X-rays under the
    same name lost the first batch's labels. A device or pipe (written into) is never refused.
    """
    from featcache.datasets import IMAGE_EXTENSIONS

    path = Path(path)
    if path.is_dir():
        raise DataError(f"--csv {path} is a folder; give a file name such as {path / 'predictions.csv'}.")
    target, in_place = _csv_destination(path)
    if in_place:
        return path
    if target.suffix.lower() in IMAGE_EXTENSIONS:  # `--csv a.jpeg` replaced the X-ray a.jpeg with the table
        raise DataError(f"--csv {path} is named like an image (writing the table there could replace an "
                        f"X-ray); give a .csv name such as {path.with_suffix('.csv')}.")
    if target.suffix.lower() in (".h5", ".hdf5", ".keras", ".npz"):  # a feature cache or a saved model
        raise DataError(f"--csv {path} is named like a feature cache or model file; give a .csv name such "
                        f"as {path.with_suffix('.csv')}.")
    if (target.parent / "run.json").is_file() or (target.parent.name == "model"
                                                  and (target.parent.parent / "run.json").is_file()):
        # `--csv runs/<id>/run.json` replaced the run's record: the run was then "damaged"
        raise DataError(f"--csv {path} is inside the run folder {target.parent}; writing there could "
                        "replace the run's own files. Give a path outside it.")
    if not replace and target.exists():  # a symbolic link: the file it names
        raise DataError(f"--csv {path} already exists (an earlier prediction file?); add --force to replace "
                        "it, or give another name.")
    parent = nearest_existing(path.parent)
    if not parent.is_dir():
        raise DataError(f"--csv {path} cannot be written: {parent} is a file, not a folder.")
    _probe_writable(path, target)
    return path


def _probe_writable(path: Path, target: Path) -> None:
    """DataError when the folder ``target`` goes into (or the nearest existing folder above it, which
    would hold the missing ones) refuses a new entry: a folder without write permission, a read-only file
    system. Tried by making an entry and removing it at once, as the write itself will.

    Why: the CSV is written after every image is classified; a read-only folder failed only then, with
    "the operating system refused a file operation" and none of the labels shown (2 minutes of forward
    passes for 1,000 new images here, all lost)."""
    import tempfile

    folder = nearest_existing(target.parent)
    try:
        if folder == target.parent:  # the temporary file beside the target, as write_predictions_csv
            fd, probe = tempfile.mkstemp(prefix=f".{target.name}.probe-", dir=folder)
            os.close(fd)
            os.unlink(probe)
        else:  # the missing folders would be made here
            os.rmdir(tempfile.mkdtemp(prefix=".featcache-probe-", dir=folder))
    except OSError as exc:
        raise DataError(f"--csv {path} cannot be written: {folder} refuses new files "
                        f"({exc.strerror or exc}); give a path in a folder you can write to.") from exc


def predictions_csv_text(out: dict) -> str:
    """predict's result as CSV text: image, label, features (cache or backbone), one p_<class> per class,
    the threshold the label applied to P(class 1) (empty with more than two classes: the most probable
    class), seen (training, test or new; empty for a run that did not record it) and unusual (yes when the
    image is unlike the run's training images, :mod:`featcache.typicality`; empty without a reference),
    then skipped: empty for a classified image. Each skipped image follows the classified ones as a row of
    its own: its path in image, its reason in skipped, every other cell empty.

    Why skipped images are rows: listed on stderr only, they were missing from the table, so a user who
    joined it to their list of images lost them without a word; an empty label is not read as a prediction.

    Why the threshold in every row: P(NORMAL) 0.595 labelled PNEUMONIA (chosen threshold 0.374) read as an
    error in a spreadsheet that did not say which threshold made the label.

    Why a table: the terminal table folds long paths over several lines (grep for a file name failed),
    and a spreadsheet is where a clinician's list of images gets read. A path a spreadsheet would run as
    a formula (starting with =, +, - or @) gets a leading quote, as in leaderboard.csv.
    """
    import csv
    import io

    from featcache.report.leaderboard import csv_cell
    from featcache.runs import _utf8

    classes = list(out["classes"])
    buf = io.StringIO(newline="")
    writer = csv.writer(buf)
    thr = "" if out.get("threshold") is None else repr(float(out["threshold"]))
    writer.writerow(["image", "label", "features", *(f"p_{c}" for c in classes), "threshold", "seen",
                     "unusual", "skipped"])
    for p in out["predictions"]:  # a name that is no UTF-8 written escaped (caf\xe9), as fit's CSVs
        writer.writerow([csv_cell(_utf8(p["image"])), csv_cell(p["label"]),
                         "cache" if p["from_cache"] else "backbone",
                         *(repr(float(p["probabilities"][c])) for c in classes), thr, p.get("seen") or "",
                         {True: "yes", False: "no"}.get(p.get("unusual"), ""), ""])
    for s in out.get("skipped") or []:
        writer.writerow([csv_cell(_utf8(s["path"])), "", "", *("" for _ in classes), "", "", "",
                         csv_cell(_utf8(s["reason"]))])
    return buf.getvalue()


def write_predictions_csv(out: dict, path: str | Path) -> Path:
    """:func:`predictions_csv_text` into ``path`` (missing folders are made), whole or not at all.

    A symbolic link's file is replaced, the link kept; a device, named pipe or descriptor (``/dev/null``,
    ``/dev/stdout``, a fifo a script reads) is written into (:func:`_csv_destination`).
    """
    given = check_csv_target(path)
    path, in_place = _csv_destination(given)
    if in_place:  # a device, pipe or descriptor: written into, appending (see _csv_destination)
        with open(given, "a", encoding="utf-8", newline="") as fh:
            fh.write(predictions_csv_text(out))
        return given
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:  # a file cut short by an error never replaces a good one
        with open(tmp, "w", encoding="utf-8", newline="") as fh:
            fh.write(predictions_csv_text(out))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
