"""Stage 2: train heads on cached features with an honest validation protocol and store each run.

The protocol, and why:
- Labels, splits and patients come from the dataset at fit time (the cache holds only features keyed
  by image sha256), so one cache serves binary, 3-class or any other labelling.
- The official test split is NEVER passed to model selection: its features are not even in the
  matrices the search sees. Selection uses patient-grouped stratified K-fold CV (logreg/svm/knn) or a
  patient-grouped hold-out fraction (mlp). The decision threshold is chosen on validation predictions
  (out-of-fold for CV heads). Test metrics are computed once per run, after every choice is made.
- Every choice and the exact index arrays (train / val / test / folds) are stored in the run, with
  their digests, so anyone can check that the test split was not touched.
- MLP grids store one run per config as soon as it finishes and skip configs whose config hash has a
  done run: a sweep killed half-way resumes with only the unfinished configs.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from featcache.cache import refuse_damaged_features, settings_in_name
from featcache.datasets import skip_entries
from featcache.errors import CacheError, ConfigError, DataError
from featcache.faults import crash_point
from featcache.grids import (
    expand,
    get_preset,
    larger_max_iter,
    load_grid_file,
    parse_grid_args,
    parse_names,
    to_jsonable,
)
from featcache.heads.base import normalize_class_weight
from featcache.heads.mlp_fused import PRECISIONS, TRAINERS, resolve_precision, resolve_trainer
from featcache.metrics import bootstrap_ci, choose_threshold, classification_metrics, predict_labels
from featcache.progress import ProgressFn, emit
from featcache.runs import (
    RETIRED_DIR,
    Run,
    RunWriter,
    canonical_json,
    checkpoint_dir,
    clean_stale,
    config_hash,
    done_hashes,
    done_with_other_versions,
    environment,
    format_value,
    keras_backend,
    library_versions,
    remove_sweep_checkpoints,
    retire_runs,
    sweep_lock,
    this_process,
)
from featcache.splits import grouped_holdout, grouped_kfold, index_digest

BALANCE_MODES = ("none", "undersample", "undersample-subtypes", "oversample")
AUGMENT_VIEWS = ("orig", "hflip", "rot+20")  # --balance oversample draws from these (less the training views)
TTA_VIEWS = ("hflip",)  # what --tta averages with orig when --tta-views does not say
METRICS = ("accuracy", "auc", "macro_f1")
POOL_SPLITS = (None, "train", "val")  # everything but the official test split


@dataclass
class FitOptions:
    """Everything `featcache fit` can set besides data, backbones and head (defaults = the CLI's)."""

    task: str | None = None  # None: the preset's task, else "binary"
    grid_args: Sequence[str] = ()  # raw ``KEY=V1,V2`` strings, typed with the head schema
    grid_file: Path | None = None
    grid: dict | list | None = None  # an already-typed grid (library callers)
    preset: str | None = None
    layers: tuple[int, ...] | None = None  # mlp shortcut for --grid layers=...
    cv_folds: int = 5
    val_fraction: float = 0.2
    test_fraction: float | None = None  # data without a test split: hold out this share of patients as test
    refit: bool | None = None  # None: on for CV heads, off for mlp
    metric: str = "accuracy"
    balance: str | None = None  # None: the preset's, else "none"
    train_views: Sequence[str] = ("orig",)
    tta: bool = False
    tta_views: Sequence[str] | str | None = None  # None: TTA_VIEWS; what --tta averages with orig
    aug_views: Sequence[str] | str | None = None  # None: AUGMENT_VIEWS less orig and the training views
    threshold: str = "youden"  # "youden" | "sensitivity:0.95"
    seed: int = 0
    tags: Sequence[str] = ()
    retrain: bool = False  # train the configs found already done again; their old runs go to RETIRED_DIR
    runs_dir: Path = Path("runs")
    cache_dir: Path = Path("cache")
    pooling: str | None = None
    image_size: int | None = None
    weights: str | None = None  # pick the cache extracted with these weights: imagenet | none | FILE
    dtype: str | None = None  # pick the cache stored in this dtype (float32 | float16)
    resize: str | None = None  # pick the cache made with this resize mode (squash | pad | crop)
    cache_files: dict[str, Path] | None = None  # backbone -> its cache file (run/demo: what they extracted)
    manifest: Path | None = None
    n_boot: int = 1000
    mlp_precision: str = "auto"  # matmul precision of fused mlp grid training: auto | float32 | bfloat16
    mlp_trainer: str = "auto"  # fused mlp grid trainer: auto (Keras' backend) | tf | jax
    command: list[str] | None = None  # argv recorded in run.json (default: sys.argv)


@dataclass
class FitResult:
    """Runs written by this call, runs skipped because already done, and the sweep id."""

    sweep_id: str
    runs: list[Run] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # run ids of configs already done
    retired: list[str] = field(default_factory=list)  # run ids moved to RETIRED_DIR by --retrain
    n_configs: int = 0
    selection: str = ""  # "cv" (one run per search) or "holdout" (one run per config)
    caches: dict[str, Path] = field(default_factory=dict)  # backbone (as given) -> the cache file read
    left_out: list[tuple[str, str]] = field(default_factory=list)  # (relpath, reason): undecodable images
    cleaned: list[str] = field(default_factory=list)  # stale (killed) run folders removed
    notes: list[str] = field(default_factory=list)  # things the numbers depend on that a user should know


# --------------------------------------------------------------------------------------------- data


@dataclass
class _Features:
    """Per-view feature matrices aligned with dataset records (fusion = concatenation across caches)."""

    views: dict[str, tuple[np.ndarray, np.ndarray]]  # view -> (available [n] bool, X [n, D])

    @property
    def dim(self) -> int:
        """Feature width (all views of all backbones, concatenated)."""
        return int(next(iter(self.views.values()))[1].shape[1])

    def rows(self, rec_idx: np.ndarray, views: np.ndarray | Sequence[str]) -> np.ndarray:
        """Feature rows for (record, view) pairs."""
        rec_idx = np.asarray(rec_idx, dtype=np.int64)
        views = np.asarray(views)
        dim = next(iter(self.views.values()))[1].shape[1]
        out = np.empty((len(rec_idx), dim), dtype=np.float32)
        for v in np.unique(views):
            sel = views == v
            out[sel] = self.views[str(v)][1][rec_idx[sel]]
        return out

    def has(self, view: str, rec_idx: np.ndarray) -> np.ndarray:
        if view not in self.views:
            return np.zeros(len(rec_idx), dtype=bool)
        return self.views[view][0][np.asarray(rec_idx, dtype=np.int64)]


def _find_key(d: Any, key: str) -> Any:
    """First value of ``key`` anywhere in a nested dict (cache configs nest the backbone description)."""
    if isinstance(d, dict):
        if key in d:
            return d[key]
        for v in d.values():
            found = _find_key(v, key)
            if found is not None:
                return found
    return None


_TWIN_SAMPLE = 256  # images of the data hashed to look for a cache of the same images elsewhere


def _twin_config(paths: Sequence[Path], data_root: Path, manifest: Path | None) -> dict | None:
    """The config (plus ``_file``) of the first of ``paths`` that opens as a cache and holds a row of an
    image of ``data_root``; None when none does.

    Why: fit said such a cache "holds its features" for any cache of the same settings, even one of a folder
    sharing no image with this one, and sent the user to an extract that copies nothing. Rows are keyed by
    the image's sha256, so one common key is evidence. This runs only on the way to an error, so it hashes
    at most ``_TWIN_SAMPLE`` images spread over the data, stopping at the first one found: a moved or
    copied folder matches at once, and hashing a whole large folder delayed the message by minutes. A twin
    missed this way costs nothing: the extract command the message gives copies a twin's rows itself.
    A damaged cache of another folder must not hide the hint behind its own error.
    """
    from featcache.cache import CacheError, CacheReader
    from featcache.datasets import discover
    from featcache.hashing import sha256_many

    held: list[tuple[dict, set[str]]] = []
    for path in paths:
        try:
            with CacheReader(path) as reader:
                held.append(({**reader.config, "_file": path.name}, {key for key, _ in reader.index()}))
        except CacheError:
            continue
    if not held:
        return None
    try:
        records = discover(data_root, manifest).records
    except (ConfigError, DataError, OSError):
        return None
    step = max(1, len(records) // _TWIN_SAMPLE)
    for _, digest in sha256_many(r.path for r in records[::step]):
        for config, keys in held:
            if digest in keys:
                return config
    return None


def _extract_cmd(data: Path, backbone: str, opts: FitOptions, views: Sequence[str] | None = None,
                 like: dict | None = None) -> str:
    """The extract command that writes what fit lacks; ``like``: the config of the cache it should add
    rows to (its weights, pooling, size...: fit's own flags may not say them, and a command with other
    settings would write another cache, or fail to download ImageNet weights for a --weights none one)."""
    from featcache.backbones import is_saved_model

    def pick(key: str, given: Any) -> Any:
        found = _find_key(like, key) if like else None
        return found if found not in (None, "") else given

    # a manifest's folder is no dataset (extract refuses it): --data names the CSV
    parts = ["featcache extract", f"--data {_q(opts.manifest or data)}", f"--backbone {_q(backbone)}"]
    if is_saved_model(backbone):
        parts.append(f"--layer {_q(pick('layer', None) or 'NAME')}")
    for flag, key, value in (("--weights", "weights", opts.weights), ("--dtype", "dtype", opts.dtype),
                             ("--resize", "resize", opts.resize)):
        if key == "weights" and pick(key, None) in ("file", "saved"):  # the cache's word, not a flag value
            if value or pick(key, None) == "file":  # the weights file itself; a saved model needs no flag
                parts.append(f"--weights {_q(value or 'PATH')}")
            continue
        value = pick(key, value)
        if value:
            parts.append(f"{flag} {_q(value)}")
    pooling, size = pick("pooling", opts.pooling), pick("image_size", opts.image_size)
    if pooling:
        parts.append(f"--pooling {pooling}")
    if size:
        parts.append(f"--image-size {size}")
    if views:
        parts.append(f"--views {','.join(views)}")
    parts.append(f"--cache-dir {_q(opts.cache_dir)}")
    return " ".join(parts)


def _q(p: Any) -> str:
    import shlex

    return shlex.quote(os.fsdecode(p))


_SELECTORS = {  # cache attribute -> the fit flag that picks it
    "weights": "--weights", "weights_file_sha256": "--weights", "dtype": "--dtype", "resize": "--resize",
    "pooling": "--pooling", "image_size": "--image-size",
}


def _cache_wanted(backbone: str, opts: FitOptions) -> tuple[str, dict[str, Any]]:
    """(the backbone name caches record, the attribute values fit's selectors ask of the cache).

    A saved model is recorded as ``saved-<stem>``; when its file is at hand, its SHA-256 picks the cache
    of exactly that model (two models may share a stem). ``--weights FILE`` is matched by the file's hash;
    a saved model given one too is then matched by both (``model_file_sha256``, as extract keys it).
    """
    from featcache.backbones import BACKBONE_NAMES, get_spec, is_saved_model, saved_name
    from featcache.hashing import sha256_file

    want: dict[str, Any] = {"pooling": opts.pooling, "image_size": opts.image_size, "dtype": opts.dtype,
                            "resize": opts.resize}
    if is_saved_model(backbone):
        name = saved_name(backbone)
        model = Path(backbone).expanduser()
        if model.is_file():
            want["weights_file_sha256"] = sha256_file(model)
    else:  # a registry name in any spelling; other names only match caches written under them (tests)
        name = get_spec(backbone).name if backbone.lower() in BACKBONE_NAMES else backbone
    if opts.weights:
        weights = opts.weights.strip()
        if weights.lower() in ("imagenet", "none"):
            want["weights"] = weights.lower()
        elif Path(weights).expanduser().is_file():
            if "weights_file_sha256" in want:  # a saved model with its own weights file: keyed by both
                want["model_file_sha256"] = want["weights_file_sha256"]
            want["weights_file_sha256"] = sha256_file(Path(weights).expanduser())
        else:
            raise ConfigError(f"--weights '{weights}' is neither imagenet, none nor an existing file.")
    return name, {k: v for k, v in want.items() if v is not None}


def _ambiguous(backbone: str, found: Sequence[Path], opts: FitOptions) -> CacheError:
    """The error for several caches of one backbone: which settings differ, and how to pick one."""
    from featcache.cache import CacheReader

    configs = []
    for p in found:
        with CacheReader(Path(p)) as r:
            configs.append(r.config)
    keys = sorted({k for c in configs for k in c} - {"dataset_root"})
    differ = [k for k in keys if len({repr(c.get(k)) for c in configs}) > 1]
    if not differ:  # copies of one extraction (a merge --out under another name, a copied file)
        return CacheError(
            f"{len(found)} feature caches of backbone '{backbone}' in {opts.cache_dir} hold the same "
            f"settings: {', '.join(Path(p).name for p in found)}; they are copies of one extraction, so keep "
            "one and move or delete the others.")
    shown = [k for k in differ if k not in ("weights_digest", "feature_dim")] or differ
    listed = "; ".join(f"{Path(p).name} ({', '.join(f'{k} {c.get(k)}' for k in shown[:3])})"
                       for p, c in zip(found, configs, strict=True))
    flags = sorted({_SELECTORS[k] for k in differ if k in _SELECTORS})
    how = (f"choose one with {' / '.join(flags)}" if flags
           else "move the ones you do not want out of it (or extract into separate --cache-dir folders)")
    return CacheError(
        f"{len(found)} feature caches of backbone '{backbone}' in {opts.cache_dir} differ in "
        f"{', '.join(shown)}: {listed}; {how}."
    )


def _shard_files(data_root: Path, backbone: str, opts: FitOptions) -> list[Path]:
    """The shard files of ``backbone`` (and fit's selectors) in the cache folder."""
    from featcache.cache import find_caches, parse_cache_name

    name, settings = _cache_wanted(backbone, opts)
    found = find_caches(Path(opts.cache_dir), dataset_root=data_root, backbone=name, include_shards=True,
                        **settings)
    return [p for p in found if (parse_cache_name(p) or {}).get("shard")]


def _pick_cache(data_root: Path, backbone: str, opts: FitOptions) -> Path:
    """The one cache file of ``backbone`` for this dataset and fit's selectors.

    CacheError with the extract command if there is none, and with the settings that differ if there are
    several: picking one silently could train on another weights' (even random) features.
    """
    from featcache.backbones import get_spec, is_saved_model
    from featcache.cache import cut_short, find_caches, parse_cache_name, unreadable_caches

    given = (opts.cache_files or {}).get(backbone)
    if given is not None:
        return Path(given)
    name, settings = _cache_wanted(backbone, opts)
    try:  # one scan; shard files only matter for the error below
        matching = find_caches(Path(opts.cache_dir), dataset_root=data_root, backbone=name,
                               include_shards=True, **settings)
    except FileNotFoundError:
        matching = []
    shards = [p for p in matching if (parse_cache_name(p) or {}).get("shard")]
    found = [p for p in matching if p not in shards]
    if not found:
        if shards:  # a sharded extraction that was never merged
            listed = " ".join(_q(p) for p in shards)
            raise CacheError(
                f"the features of backbone '{backbone}' are in {len(shards)} shard file(s) in "
                f"{opts.cache_dir}; merge them first: `featcache cache merge {listed}`."
            )
        broken = unreadable_caches(Path(opts.cache_dir), dataset_root=data_root, backbone=name)
        if broken and broken[0][1] is not None:  # HDF5, but not a cache this featcache reads: its reason
            raise broken[0][1]
        if broken:
            like = settings_in_name(Path(broken[0][0]))
            unsaid = ("" if opts.weights and opts.dtype and opts.resize else
                      " (with the --weights, --dtype and --resize it was made with: a file name does not "
                      "say them)")
            cut = cut_short(Path(broken[0][0]))  # a copy cut mid-way: copying it again in full loses nothing
            why = (f": {cut}; copy it again in full from where it came, or delete it and run " if cut
                   else " (truncated or corrupt); delete it or move it away, then run ")
            raise CacheError(
                f"the feature cache {broken[0][0]} for backbone '{backbone}' is not a readable HDF5 file"
                f"{why}`{_extract_cmd(data_root, backbone, opts, like=like)}` again{unsaid}."
            )
        if not is_saved_model(backbone):
            get_spec(backbone)  # an unknown name: the valid ones, not an extract command that fails too
        others = find_caches(Path(opts.cache_dir), backbone=name, **settings)
        like = _twin_config(others, data_root, opts.manifest)  # the same images in a moved or copied
        if like is not None:  # folder: extract with its settings copies its rows
            raise CacheError(
                f"no feature cache for backbone '{backbone}' of {data_root} in {opts.cache_dir}, but "
                f"{like['_file']} holds its features for {like.get('dataset_root')}; if these are the same "
                f"images (moved or copied), `{_extract_cmd(data_root, backbone, opts, like=like)}` copies "
                "its rows instead of running the backbone (other images are extracted)."
            )
        raise CacheError(
            f"no feature cache for backbone '{backbone}' of {data_root} in {opts.cache_dir}; "
            f"run `{_extract_cmd(data_root, backbone, opts)}` first."
        )
    if len(found) > 1:
        found = _without_superseded(found)
    if len(found) > 1:
        raise _ambiguous(backbone, found, opts)
    return Path(found[0])


def _without_superseded(found: Sequence[Path]) -> list[Path]:
    """``found`` less each pad/crop cache made before boxes came from the full size (no ``resize_box``)
    that a cache of the same settings made after it replaces. Why: re-extracting with pad or crop starts
    a new file beside the old one, and fit then refused to choose between them with no flag to pick one;
    the new file is what this featcache computes."""
    from featcache.cache import CacheReader

    configs = []
    for p in found:
        with CacheReader(Path(p)) as r:
            configs.append(dict(r.config))
    newer = [{k: v for k, v in c.items() if k != "resize_box"} for c in configs if "resize_box" in c]
    return [p for p, c in zip(found, configs, strict=True)
            if "resize_box" in c or c.get("resize") == "squash" or c not in newer]


def _load_features(
    data_root: Path,
    backbones: list[str],
    keys: list[str],
    needed: dict[str, np.ndarray],
    optional_views: set[str],
    opts: FitOptions,
) -> tuple[_Features, list[dict]]:
    """Read the views each record needs from every backbone's cache and concatenate them.

    ``needed[view]`` marks records that must have that view (missing -> CacheError naming the count and
    the extract command); ``optional_views`` are read where present (TTA, oversampling).
    """
    from featcache.cache import CacheReader

    n = len(keys)
    karr = np.asarray(keys)
    parts: dict[str, list[np.ndarray]] = {}
    avail: dict[str, np.ndarray] = {}
    caches = []
    for name in backbones:
        path = _pick_cache(data_root, name, opts)
        with CacheReader(path) as reader:
            cfg = reader.config
            caches.append(
                {
                    "name": name,
                    "path": str(Path(path).resolve()),
                    "file": Path(path).name,
                    "config_hash": reader.config_hash,
                    "n_rows": int(reader.n_rows),
                    "feature_dim": int(reader.feature_dim),
                    "weights_digest": _find_key(cfg, "weights_digest"),
                    "views": list(reader.views),
                    "config": cfg,
                    "extracted_with": reader.versions,
                    "extraction_sessions": reader.sessions,  # rows of another backend or batch size
                }
            )
            digest = hashlib.sha256()
            for view in sorted(set(needed) | optional_views):
                ok = np.asarray(reader.has(keys, view), dtype=bool)
                must = needed.get(view)
                if must is not None and not ok[must].all():
                    missing = int(np.sum(must & ~ok))
                    vs = sorted(set(needed) | {"orig"}, key=lambda v: (v != "orig", v))
                    cmd = _extract_cmd(data_root, name, opts, vs if view != "orig" else None, like=cfg)
                    shards = _shard_files(data_root, name, opts)
                    merge = (f" (or, if it was merged from the shard files beside it and the merge was cut "
                             f"short, rerun `featcache cache merge {' '.join(_q(p) for p in shards)}`)"
                             if shards else "")
                    raise CacheError(
                        f"{missing} of {int(must.sum())} images have no '{view}' features in cache "
                        f"{path.name}; run `{cmd}` to add them{merge}."
                    )
                avail[view] = ok if view not in avail else (avail[view] & ok)
                X = np.zeros((n, reader.feature_dim), dtype=np.float32)
                if ok.any():
                    uniq, inv = np.unique(karr[ok], return_inverse=True)
                    X[ok] = np.asarray(reader.get(list(uniq), view), dtype=np.float32)[inv]
                refuse_damaged_features(X, path, view)
                digest.update(view.encode() + b"\0")
                digest.update(memoryview(X).cast("B"))
                parts.setdefault(view, []).append(X)
        # the values this fit trains on: the same settings extracted under another backend or oneDNN setting
        # differ in the last digits, and an MLP's results with them
        caches[-1]["features_digest"] = digest.hexdigest()
    views = {v: (avail[v], np.concatenate(parts[v], axis=1)) for v in parts if avail[v].any()}
    return _Features(views), caches


MAX_SEED = 2**31 - 1
"""Largest --seed: numpy and Keras take seeds below 2**32, and runs derive more seeds by adding offsets."""


def check_options(opts: FitOptions, preset: Any = None) -> tuple[str, str]:
    """(task, balance) after refusing option values fit cannot use; no file is read.

    Why separate: `run` calls it before the extraction, so a misspelt --task or --balance, or
    --cv-folds 1, fails at once instead of after the backbone has run over every image.
    """
    from featcache.datasets import TASKS

    check_seed(opts.seed)
    check_tags(opts.tags)
    task = opts.task or (preset.task if preset and preset.task else "binary")
    if task not in TASKS:
        raise ConfigError(f"unknown task '{task}'; choose one of: {', '.join(TASKS)}.")
    balance = opts.balance or (preset.options.get("balance") if preset else None) or "none"
    if balance not in BALANCE_MODES:
        raise ConfigError(f"--balance must be one of {', '.join(BALANCE_MODES)}, got '{balance}'.")
    if opts.cv_folds < 2:
        raise ConfigError(f"--cv-folds must be at least 2, got {opts.cv_folds}.")
    if not 0.0 < opts.val_fraction < 1.0:  # the hold-out's own check came after `run`'s extraction
        raise ConfigError(f"--val-fraction must be between 0 and 1 (exclusive), got {opts.val_fraction}.")
    if opts.test_fraction is not None and not 0.0 < opts.test_fraction < 1.0:
        raise ConfigError(f"--test-fraction must be between 0 and 1 (exclusive), got {opts.test_fraction}.")
    if opts.metric not in METRICS:
        raise ConfigError(f"--metric must be one of {', '.join(METRICS)}, got '{opts.metric}'.")
    if opts.mlp_precision not in PRECISIONS:
        raise ConfigError(f"--mlp-precision must be one of {', '.join(PRECISIONS)}, "
                          f"got '{opts.mlp_precision}'.")
    if opts.mlp_trainer not in TRAINERS:
        raise ConfigError(f"--mlp-trainer must be one of {', '.join(TRAINERS)}, got '{opts.mlp_trainer}'.")
    chosen_views(opts, balance)  # a misspelt or misplaced --tta-views / --aug-views: before any extraction
    return task, balance


def chosen_views(opts: FitOptions, balance: str) -> tuple[list[str], list[str]]:
    """(the views --tta averages with orig, the views --balance oversample draws from), sorted; [] unused.

    Why from the options and never from the cache: both were every view the cache held, so a view someone
    extracted into the same cache for another experiment changed what the same command averaged or drew
    from, and its numbers. Sorted: the order they are named in must not change the oversampling draw.
    """
    def named(flag: str, spec: Sequence[str] | str) -> list[str]:  # the flag in front of a bad name's error
        try:
            return sorted(_views(spec, flag)[1:])
        except ConfigError as exc:
            raise ConfigError(f"{flag}: {exc}") from None

    train = ["orig", *named("--train-views", opts.train_views)]  # "invalid view 'flip'" named no flag
    if opts.tta_views is not None and not opts.tta:
        raise ConfigError("--tta-views says which views --tta averages, and --tta is not given; add --tta, "
                          "or drop --tta-views.")
    if opts.aug_views is not None and balance != "oversample":
        raise ConfigError(f"--aug-views says which views --balance oversample draws from, and --balance is "
                          f"{balance}; add --balance oversample, or drop --aug-views.")
    tta: list[str] = []
    if opts.tta:
        tta = named("--tta-views", opts.tta_views) if opts.tta_views is not None else sorted(TTA_VIEWS)
        if not tta:  # it would average one view: the same numbers, labelled TTA
            raise ConfigError("--tta-views needs a view besides orig (orig is always averaged), e.g. "
                              "--tta-views hflip.")
    aug: list[str] = []
    if balance == "oversample":
        if opts.aug_views is not None:
            aug = named("--aug-views", opts.aug_views)
            copies = [v for v in aug if v in train]
            if copies:
                raise ConfigError(f"--aug-views names {', '.join(copies)}, which --train-views already "
                                  "trains on: oversampling from it would add exact copies; name other views.")
        else:
            aug = sorted(v for v in AUGMENT_VIEWS if v != "orig" and v not in train)
        if not aug:
            raise ConfigError("--balance oversample needs augmentation views besides orig and the training "
                              "views; name them with --aug-views (e.g. --aug-views rot+10,rot-10).")
    return tta, aug


def check_seed(seed: int) -> None:
    """ConfigError for a seed the random generators would reject mid-run (negative or too large)."""
    if not 0 <= int(seed) <= MAX_SEED:
        raise ConfigError(f"--seed must be between 0 and {MAX_SEED}, got {seed}.")


def check_tags(tags: Sequence[str]) -> None:
    """ConfigError for an empty tag: it would be recorded, shown as nothing, and matched by no --tag."""
    if any(not str(t).strip() for t in tags):
        raise ConfigError("--tag needs a name (an empty tag was given).")


def _undecodable(root: Path, backbones: Sequence[str], opts: FitOptions, records: Sequence[Any],
                 keys: Sequence[str]) -> dict[int, str]:
    """{record index: reason} of the images some cache lacks because they cannot be decoded.

    Only images missing from a cache are decoded (at 32 px: the check, not the pixels, matters); one that
    decodes is simply not extracted yet, and ``_load_features`` asks for the extract command.
    """
    from featcache.cache import CacheReader
    from featcache.images import ImageDecodeError, decode_image

    missing: set[int] = set()
    for name in backbones:
        with CacheReader(_pick_cache(root, name, opts)) as reader:
            has = np.asarray(reader.has(list(keys), "orig"), dtype=bool)
        missing |= set(np.flatnonzero(~has).tolist())
    out: dict[int, str] = {}
    for i in sorted(missing):
        try:
            decode_image(Path(records[i].path).read_bytes(), 32)
        except ImageDecodeError as exc:
            out[i] = exc.reason
    return out


def _hash_records(records: Sequence[Any], progress: ProgressFn | None) -> list[str]:
    from featcache.hashing import sha256_many

    keys: list[str] = []
    total = len(records)
    emit(progress, "hash", 0, total, "hashing image files")
    for i, (path, digest) in enumerate(sha256_many([r.path for r in records]), 1):
        if isinstance(digest, OSError):
            raise DataError(
                f"cannot read {os.fsdecode(path)} ({digest.strerror}); fix its permissions or remove it."
            )
        keys.append(digest)
        if i % 256 == 0 or i == total:
            emit(progress, "hash", i, total)
    return keys


def _data_digest(keys: Sequence[str], records: Sequence[Any], y: np.ndarray, split: np.ndarray,
                 groups: np.ndarray) -> str:
    """A digest of what the runs learn and are tested on: each image's bytes, path, label, split, patient.

    Why it is part of every run's config hash: the dataset root alone stays the same when a dataset changes
    in place (images added, moved to another class or split, another manifest in the same folder), and a
    rerun must then train anew instead of finding the runs of the old contents "already done".
    """
    import hashlib

    h = hashlib.sha256()
    for key, rec, label, part, group in zip(keys, records, y, split, groups, strict=True):
        h.update(f"{key}\t{rec.relpath}\t{int(label)}\t{part}\t{group}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()[:16]


def _images_digest(keys: Sequence[str], records: Sequence[Any]) -> str:
    """A digest of the images as the folder (or manifest) labels them, without the task's class numbers.

    Why beside :func:`_data_digest`: that one changes with the task (binary and 3-class runs of one folder
    number their labels differently), so a report comparing by it would call one folder two datasets. This
    one changes when an image, its path, folder label, subtype, split or patient changes, and not otherwise.
    """
    import hashlib

    h = hashlib.sha256()
    for key, rec in zip(keys, records, strict=True):
        line = f"{key}\t{rec.relpath}\t{rec.label}\t{rec.subtype or ''}\t{rec.split or ''}\t{rec.group}\n"
        h.update(line.encode("utf-8", "surrogateescape"))
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------- configs


def _parse_threshold(spec: str) -> tuple[str, float | None]:
    s = spec.strip().lower()
    if s == "youden":
        return "youden", None
    if s.startswith("sensitivity:"):
        try:
            target = float(s.split(":", 1)[1])
        except ValueError:
            target = -1.0
        if 0.0 < target <= 1.0:
            return "sensitivity", target
    raise ConfigError(f"--threshold must be 'youden' or 'sensitivity:T' with 0 < T <= 1, got '{spec}'.")


def _threshold_key(method: str, target: float | None) -> str:
    """--threshold as run ids key it: one spelling per rule. Why: keyed as typed, ``sensitivity:0.90`` or
    ``Youden`` trained the config of a ``sensitivity:0.9`` or ``youden`` run again under a new id, to the
    same numbers, a duplicate in the report. The spellings the help shows (youden, sensitivity:0.95) keep
    the ids they had."""
    if method == "youden" or target is None:
        return "youden"
    return f"sensitivity:{int(target) if float(target).is_integer() else repr(float(target))}"


def _base_grid(head_obj: Any, opts: FitOptions, preset: Any, n_classes: int | None = None) -> list[dict]:
    """Sub-grids (dicts of value lists) before --grid / --layers overrides. ``n_classes``: the task's
    classes where known (None: 3 for --task 3class, else 2), which pick the head's multi-class defaults."""
    schema = head_obj.schema
    if opts.grid is not None:
        return [opts.grid] if isinstance(opts.grid, dict) else list(opts.grid)
    if opts.grid_file is not None:
        return load_grid_file(opts.grid_file, schema)
    if preset is not None:
        return [{k: [v] for k, v in cfg.items()} for cfg in preset.configs]
    if n_classes is None:  # no preset here
        n_classes = 3 if opts.task == "3class" else 2
    extra = getattr(head_obj, "multiclass_defaults", {}) if n_classes > 2 else {}
    return [{**head_obj.default_grid, **extra}]


def _check_cache_choice(opts: FitOptions) -> None:
    """The flags that pick among a backbone's caches, checked as extract checks them: a value no cache
    can have ended in "no feature cache ... run `featcache extract ... --pooling mean`", a command that
    itself fails."""
    from featcache.backbones import POOLINGS
    from featcache.cache import DTYPES
    from featcache.images import RESIZE_MODES

    for flag, value, allowed in (("--pooling", opts.pooling, POOLINGS), ("--dtype", opts.dtype, DTYPES),
                                 ("--resize", opts.resize, RESIZE_MODES)):
        if value is not None and value not in allowed:
            raise ConfigError(f"{flag} must be one of {', '.join(allowed)}, got '{value}'.")
    if opts.image_size is not None and opts.image_size < 1:
        raise ConfigError(f"--image-size must be a positive number of pixels, got {opts.image_size}.")


def build_configs(head_obj: Any, opts: FitOptions, preset: Any = None,
                  n_classes: int | None = None) -> list[dict]:
    """The expanded list of configs: base grid (preset / file / head default) with --grid and --layers
    replacing the values of the keys they name. ``n_classes``: the task's classes once the data is read
    (``--task folders`` has as many as class folders); None before that."""
    schema = head_obj.schema
    overrides = parse_grid_args(list(opts.grid_args), schema) if opts.grid_args else {}
    if opts.layers is not None:
        if "layers" not in schema:
            raise ConfigError(f"--layers applies to the mlp head only, not '{head_obj.name}'.")
        if "layers" in overrides:  # one of them would be dropped without a word
            raise ConfigError("--layers and --grid layers=... both set the hidden layers; give one of them "
                              "(--grid layers=1024-512,256 for several).")
        overrides["layers"] = [tuple(opts.layers)]
    grids = [{**g, **overrides} for g in _base_grid(head_obj, opts, preset, n_classes)]
    empty = sorted({k for g in grids for k, v in g.items() if isinstance(v, list | tuple) and not v})
    if empty and not any(all(not isinstance(v, list | tuple) or v for v in g.values()) for g in grids):
        from_file = opts.grid_file is not None and opts.grid is None
        where = f" in --grid-file {opts.grid_file}" if from_file else ""
        verb = "has" if len(empty) == 1 else "have"
        raise ConfigError(f"the grid expands to no configuration: {', '.join(empty)} {verb} no "
                          f"values{where}; give at least one value per key.")
    configs = expand(grids)
    canonical = getattr(head_obj, "canonical", None)
    if canonical is not None:  # settings a config ignores (a linear svm's gamma) would train it twice
        configs = list({json.dumps(to_jsonable(canonical(c)), sort_keys=True): canonical(c)
                        for c in configs}.values())
    if not configs:
        raise ConfigError("the grid expands to no configuration; give at least one value per key.")
    return configs


# ----------------------------------------------------------------------------------------- balance


def _balance_rows(
    rec: np.ndarray,
    view: np.ndarray,
    y: np.ndarray,
    mode: str,
    rng: np.random.Generator,
    extra: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    strata: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Training rows (record, view, label) after undersampling / oversampling.

    undersample: every class cut to the smallest class. undersample-subtypes: every stratum (``strata``,
    the Kermany subtype normal/bacteria/virus of each row) cut to the smallest, whatever the task: paper
    000 balanced the three label types and trained its binary head on those sets (NORMAL:PNEUMONIA 1:2,
    bacteria = virus), which class-level undersampling (1:1, bacteria:virus about 2:1) does not give.
    oversample: minority classes topped up with cached augmentation views of their own images (``extra``
    candidates), never with exact copies; they stop when the candidates run out.
    """
    if mode == "none":
        return rec, view, y
    classes, counts = np.unique(y, return_counts=True)
    if mode in ("undersample", "undersample-subtypes"):
        by = strata if mode == "undersample-subtypes" else y
        if by is None:
            raise ValueError("undersample-subtypes needs each row's subtype (strata)")
        kinds, sizes = np.unique(by, return_counts=True)
        keep = np.concatenate(
            [np.sort(rng.choice(np.flatnonzero(by == c), sizes.min(), replace=False)) for c in kinds]
        )
        keep.sort()
        return rec[keep], view[keep], y[keep]
    target = counts.max()
    add = []
    if extra is not None:
        erec, eview, ey = extra
        for c, n in zip(classes, counts, strict=True):
            cand = np.flatnonzero(ey == c)
            if n < target and len(cand):
                add.append(np.sort(rng.permutation(cand)[: target - n]))
    if not add:
        return rec, view, y
    sel = np.concatenate(add)
    erec, eview, ey = extra  # type: ignore[misc]
    return (
        np.concatenate([rec, erec[sel]]),
        np.concatenate([view, eview[sel]]),
        np.concatenate([y, ey[sel]]),
    )


# ----------------------------------------------------------------------------------------- the fit


class _Ctx:
    """State shared by the CV and MLP paths of one `fit` call."""

    def __init__(self, **kw: Any) -> None:
        self.__dict__.update(kw)

    # rows of the selection-training pool -------------------------------------------------------
    def train_rows(
        self, rec_idx: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(record, view, y) training rows for these record indices: train views, then balance.

        Undersampling cuts images before their views are added: paper 000 cut each class to the smallest
        in images and then augmented those, so every kept image brings all its views and a dropped one
        none (cutting image x view rows would keep some views of many images instead). With one view
        this picks the same rows as cutting rows does.
        """
        balance = self.balance
        if balance in ("undersample", "undersample-subtypes"):
            has_any = np.zeros(len(rec_idx), dtype=bool)
            for v in self.train_views:
                has_any |= self.feats.has(v, rec_idx)
            rec_idx = rec_idx[has_any]
            strata = self.subtypes[rec_idx] if balance == "undersample-subtypes" else None
            rec_idx = _balance_rows(rec_idx, rec_idx, self.y[rec_idx], balance, rng, None, strata)[0]
            balance = "none"
        recs, views = [], []
        for v in self.train_views:
            ok = self.feats.has(v, rec_idx)
            recs.append(rec_idx[ok])
            views.append(np.full(int(ok.sum()), v, dtype=object))
        rec = np.concatenate(recs)
        view = np.concatenate(views).astype(str)
        y = self.y[rec]
        extra = None
        if self.balance == "oversample":
            er, ev = [], []
            for v in self.aug_views:
                ok = self.feats.has(v, rec_idx)
                er.append(rec_idx[ok])
                ev.append(np.full(int(ok.sum()), v, dtype=object))
            if er:
                erc = np.concatenate(er)
                extra = (erc, np.concatenate(ev).astype(str), self.y[erc])
        return _balance_rows(rec, view, y, balance, rng, extra)

    def feature_reference(self) -> Any:
        """The pool's :class:`featcache.typicality.FeatureReference` (orig view; None with too few images),
        built once per fit call: every run of a sweep shares the pool, so they share it."""
        if "_reference" not in self.__dict__:
            from featcache.typicality import build_reference

            pool = self.pool[self.feats.has("orig", self.pool)]
            self._reference = build_reference(lambda i: self.feats.rows(pool[i], ["orig"] * len(i)),
                                              self.groups[pool], seed=self.opts.seed)
        return self._reference

    def proba(self, model: Any, rec_idx: np.ndarray) -> np.ndarray:
        """Class probabilities of these records; with TTA the mean over every cached view present."""
        rec_idx = np.asarray(rec_idx, dtype=np.int64)
        total = np.asarray(
            model.predict_proba(self.feats.rows(rec_idx, ["orig"] * len(rec_idx))), dtype=np.float64
        )
        if not self.tta or len(rec_idx) == 0:
            return total
        count = np.ones(len(rec_idx))
        for v in self.tta_views:
            ok = self.feats.has(v, rec_idx)
            if ok.any():
                total[ok] += model.predict_proba(self.feats.rows(rec_idx[ok], [v] * int(ok.sum())))
                count[ok] += 1
        return total / count[:, None]


def fit(
    data: str | Path,
    backbones: str | Sequence[str],
    head: str | None,
    options: FitOptions | None = None,
    progress: ProgressFn | None = None,
    before_train: Callable[[], None] | None = None,
) -> FitResult:
    """Join cached features with labels/splits/patients, select, evaluate on test once, store runs.

    ``before_train``: called once before the first config is trained, never when every run is already
    done. Why: the CLI imports Keras and TensorFlow there (5-30 s) for an mlp head, and a rerun that only
    finds its runs done needs neither.
    """
    from featcache.datasets import SUBTYPES, discover, task_labels
    from featcache.heads import get_head

    opts = options or FitOptions()
    if head and "," in head:  # `run` takes a list; a sweep here is one head's grid
        raise ConfigError(
            f"fit trains one head per call, got --head {head}; run fit once per head, or use "
            f"`featcache run --head {head}` (extract, fit and report in one command)."
        )
    preset = get_preset(opts.preset) if opts.preset else None
    if preset is not None:
        if head and head != preset.head:
            raise ConfigError(
                f"preset '{preset.name}' uses the {preset.head} head, not '{head}'; drop --head."
            )
        head = preset.head
        opts.balance = opts.balance or preset.options.get("balance")
        opts.pooling = opts.pooling or preset.options.get("pooling")
        opts.image_size = opts.image_size or preset.options.get("image_size")
        if not backbones:
            backbones = [preset.options["backbone"]]
    if not head:
        raise ConfigError("choose a head with --head (logreg, mlp, svm or knn) or a --preset.")
    task, balance = check_options(opts, preset)
    _check_cache_choice(opts)
    if Path(opts.runs_dir).exists() and not Path(opts.runs_dir).is_dir():  # else a lock-path OS error
        raise ConfigError(f"--runs-dir {opts.runs_dir} is a file, not a folder; choose a folder for the "
                          "runs.")
    if Path(opts.cache_dir).exists() and not Path(opts.cache_dir).is_dir():  # else "run extract --cache-dir"
        raise ConfigError(f"--cache-dir {opts.cache_dir} is a file, not a folder; point --cache-dir at the "
                          "folder `featcache extract` wrote its caches into.")
    thr_method, thr_target = _parse_threshold(opts.threshold)
    names = (parse_names(backbones, "--backbone") if isinstance(backbones, str) and backbones.strip()
             else [b.strip() for b in backbones if b.strip()])
    if not names:
        raise ConfigError("choose at least one backbone with --backbone (e.g. vgg16 or vgg16,inceptionv3).")
    if len(set(names)) != len(names):
        raise ConfigError(f"--backbone lists a backbone twice ({','.join(names)}); name each once.")
    given_train_views = _views(opts.train_views)
    # sorted like --tta-views and --aug-views (orig first): 'orig,rot+20,hflip' and 'orig,hflip,rot+20' were
    # two runs with two ids and other numbers (training rows in another order), and the README says the
    # order views are named in does not matter
    train_views = ["orig", *sorted(given_train_views[1:])]
    tta_views, aug_views = chosen_views(opts, balance)
    head_obj = get_head(head)
    configs = build_configs(head_obj, opts, preset)

    dataset = discover(data, opts.manifest)
    records = dataset.records
    # `--data labels.csv` reads the CSV as the manifest of its folder: the commands fit's errors give (and the
    # twin-cache hint, which reads the images again) need the CSV, since the folder alone is not a dataset.
    # The sweep id keeps what was given, so runs made before keep their ids.
    given_manifest, opts = opts.manifest, replace(opts, manifest=opts.manifest or dataset.manifest)
    _, task_classes = task_labels(records, task)  # a task the dataset cannot have fails before reading files
    if len(task_classes) > 2:  # --task folders of 3+ class folders: the multi-class default grid, as 3class
        configs = build_configs(head_obj, opts, preset, len(task_classes))
    _check_class_weights(configs, task_classes)
    # each backbone's cache file, looked up once (the lookup opens every file in the cache folder and hashes
    # a saved model's file), before the images are hashed, so a missing cache is reported at once
    opts = replace(opts, cache_files={name: _pick_cache(dataset.root, name, opts) for name in names})
    keys = _hash_records(records, progress)
    # images that extract skipped because they cannot be decoded have no features: leave them out, as
    # extract did, instead of asking for an extract that skips them again
    undecodable = _undecodable(dataset.root, names, opts, records, keys)
    if undecodable:
        keep = [i for i in range(len(records)) if i not in undecodable]
        records, keys = [records[i] for i in keep], [keys[i] for i in keep]
    y, classes = task_labels(records, task)
    if len(classes) < 2:
        raise DataError(f"{dataset.root} holds images of one class only ({', '.join(classes) or 'none'}); "
                        "a classifier needs at least two.")
    split = np.array([r.split if r.split is not None else "" for r in records], dtype=object)
    pool = np.flatnonzero(np.isin(split, ["", "train", "val"]))
    test = np.flatnonzero(split == "test")
    if len(pool) == 0:
        raise DataError(f"{dataset.root} has no training images (only a test split); add a train split.")
    absent = [c for k, c in enumerate(classes) if k not in set(np.unique(y[pool]).tolist())]
    if absent:
        raise DataError(
            f"the training images of {dataset.root} have no image of {', '.join(absent)} (classes: "
            f"{', '.join(classes)}); every class needs training images."
        )
    groups, merged = merge_identical_groups([r.group for r in records], keys)
    if opts.test_fraction is not None:
        split, pool, test = _held_out_test(dataset.root, records, y, groups, split, pool, test,
                                           opts.test_fraction)
    if balance == "undersample-subtypes":
        lacking = [records[i].relpath for i in pool if records[i].subtype not in SUBTYPES]
        if lacking:
            raise DataError(
                "--balance undersample-subtypes balances the Kermany subtypes (normal, bacteria, virus), "
                f"which come from Kermany file names; {len(lacking)} training image(s) have none, e.g. "
                f"'{lacking[0]}'. Use --balance undersample to balance the task's classes instead.")

    # which views must / may be read
    needed = {"orig": np.ones(len(records), dtype=bool)}
    in_pool = np.zeros(len(records), dtype=bool)
    in_pool[pool] = True
    for v in train_views:
        if v != "orig":
            needed[v] = in_pool
    optional = (set(tta_views) | set(aug_views)) - set(needed)
    feats, caches = _load_features(dataset.root, names, keys, needed, optional, opts)
    _refuse_missing_views(dataset.root, names, opts, feats, caches, tta_views, aug_views)
    view_notes = _old_view_rule_notes(opts, caches, train_views, tta_views, aug_views)
    if given_train_views != train_views:  # runs fit before the sort trained on rows in the order named
        view_notes.append(f"--train-views are taken in sorted order ({','.join(train_views)}); runs fit with "
                          f"--train-views {','.join(given_train_views)} before featcache sorted them trained "
                          "on rows in the order named and are not reused.")
    if tta_views:  # every image it predicts needs every view: else its average would be of fewer views
        scored = np.flatnonzero(in_pool | (np.asarray(split, dtype=object) == "test"))  # than predict's
        lacking = {v: int((~feats.has(v, scored)).sum()) for v in tta_views}
        lacking = {v: n for v, n in lacking.items() if n}
        if lacking:
            v, n = next(iter(lacking.items()))
            raise ConfigError(
                f"--tta averages over the views {', '.join(tta_views)}, and {n} of the {len(scored)} images "
                f"it scores lack view {v} in the cache (extracted for some splits only?); run "
                f"`{_extract_cmd(dataset.root, names[0], opts, ('orig', *tta_views), caches[0]['config'])}` "
                "for every split first, or drop --tta."
            )

    selection = head_obj.selection
    refit = opts.refit if opts.refit is not None else (selection == "cv")
    common = {
        "head": head_obj.name,
        "task": task,
        "classes": classes,
        "backbones": [c["config_hash"] or c["file"] for c in caches],
        "features": [c["features_digest"] for c in caches],
        "dataset_root": os.fsdecode(dataset.root),
        "selection": selection,
        "cv_folds": opts.cv_folds if selection == "cv" else None,
        "val_fraction": opts.val_fraction if selection != "cv" else None,
        "seed": opts.seed,
        "refit": refit,
        "balance": balance,
        "train_views": list(train_views),
        "tta": opts.tta,
        # a head of more than two classes labels by the most probable class, so --threshold is unused (and
        # noted): keyed as given, it trained the same config again under a new id, a duplicate that tied in
        # the report; the default keeps the ids runs fitted without it have
        "threshold": _threshold_key(thr_method, thr_target) if len(classes) == 2 else FitOptions.threshold,
        "metric": opts.metric,
        **({} if opts.test_fraction is None else {"test_fraction": opts.test_fraction}),  # old ids unchanged
        "manifest": os.fsdecode(given_manifest or ""),
        "data": _data_digest(keys, records, y, split, groups),
    }
    # the views TTA averages and oversampling draws from were every view the cache held: the features digest
    # (of every view read) then said which. A key only where the old rule, every view read less orig (and,
    # for oversampling, the training views), gives other views: runs that rule made keep their ids
    read = sorted(set(needed) | optional)
    if tta_views and tta_views != [v for v in read if v != "orig"]:
        common["tta_views"] = tta_views
    if aug_views and aug_views != [v for v in read if v != "orig" and v not in train_views]:
        common["aug_views"] = aug_views
    if selection != "cv":
        from featcache.splits import holdout_rule_change

        folds = holdout_rule_change(opts.val_fraction)
        if folds is not None:  # this fraction's split changed (dc3d3fc): not the old runs' hold-out
            common["holdout_folds"] = folds
    if opts.n_boot != FitOptions.n_boot:  # the intervals' resamples: another count, other recorded CIs (a
        common["n_boot"] = opts.n_boot  # demo's 500 is not the 1000 a fit asks for); 1000 keeps old ids
    if balance.startswith("undersample") and len(train_views) > 1:  # images are cut before their views
        common["balance_rule"] = "images, then views"  # are added now: not the old runs' training rows
    if thr_method == "sensitivity" and len(classes) == 2:  # eb55e7c: the highest threshold reaching T,
        common["threshold_rule"] = "highest reaching T"  # which runs fitted before may have missed
    if head_obj.name == "svm" and any(normalize_class_weight(c.get("class_weight")) is not None
                                      for c in configs):
        # class weights reach the Platt sigmoid of the stored model now; before, it undid them at 0.5
        common["svm_class_weight"] = "calibrated"
    if head_obj.name == "knn":  # the search caps k per fold and scores ties as the report labels them
        common["knn_search"] = "per-fold cap, report labels"
    if head_obj.name == "mlp":  # fused grids compute in this precision: a different one is a different run
        trainer = resolve_trainer(opts.mlp_trainer)
        common["mlp_precision"] = resolve_precision(opts.mlp_precision, trainer)
        if trainer != "tf":  # the JAX trainer draws other dropout masks (TensorFlow runs keep their ids)
            common["mlp_trainer"] = trainer
        from featcache.heads.mlp_checkpoint import checkpoint_seconds

        checkpoint_seconds()  # a bad $FEATCACHE_MLP_CHECKPOINT_SECONDS: refused now, not mid-grid
        # Keras' own rule, not an import: a rerun with every run done imported TensorFlow (5-30 s) for nothing
        backend = keras_backend()
        if backend != "tensorflow":  # Keras draws other initial weights on another backend
            common["keras_backend"] = backend
            # model.fit on Keras-JAX took the loss from a clipped probability until it fitted the logits
            common["keras_loss"] = "logits"
        elif "TF_ENABLE_ONEDNN_OPTS" in os.environ:  # oneDNN off or on changes TensorFlow's training numbers
            common["tf_onednn_opts"] = os.environ["TF_ENABLE_ONEDNN_OPTS"]
    sweep_id = config_hash({"common": common, "configs": [to_jsonable(c) for c in configs]})[:12]
    counts: dict[str, dict[str, int]] = {}
    for i in range(len(records)):
        s = split[i] or "all"
        counts.setdefault(s, {}).setdefault(classes[y[i]], 0)
        counts[s][classes[y[i]]] += 1
    ctx = _Ctx(
        before_train=before_train,
        opts=opts,
        head_obj=head_obj,
        task=task,
        classes=classes,
        records=records,
        subtypes=np.array([r.subtype for r in records], dtype=object),  # undersample-subtypes' strata
        keys=keys,
        y=y,
        groups=groups,
        pool=pool,
        test=test,
        feats=feats,
        caches=caches,
        train_views=train_views,
        aug_views=aug_views,
        tta=opts.tta,
        tta_views=tta_views,
        balance=balance,
        refit=refit,
        thr=(thr_method, thr_target),
        common=common,
        sweep_id=sweep_id,
        progress=progress,
        preset=preset,
        environment=environment(),  # once per fit: it starts git processes, and is the same for every run
        dataset_info={
            "root": os.fsdecode(dataset.root),
            "layout": dataset.layout,
            "manifest": os.fsdecode(dataset.manifest) if dataset.manifest else None,  # the report re-reads it
            "digest": common["data"],  # images, labels, splits, patients: two versions of a folder differ
            "images_digest": _images_digest(keys, records),  # the same for every task on one folder version
            "counts": counts,
            **({} if opts.test_fraction is None else {"test_fraction": opts.test_fraction,
                                                     "test_split_seed": TEST_SPLIT_SEED}),
            "n_images": len(records),
            "n_patients": int(len(np.unique(groups))),
            # a record whose group is its file stem had no patient id (not in the name, no manifest column):
            # grouping and the patient bootstrap then group by file stem (mostly one image per group)
            "patient_ids": int(sum(r.has_patient_id for r in records)),
            "left_out": skip_entries((dataset.records[i].relpath, why) for i, why in undecodable.items()),
        },
        backbone_info=[
            {
                "name": c["name"],
                "pooling": _find_key(c["config"], "pooling"),
                "image_size": _find_key(c["config"], "image_size"),
                "weights": _find_key(c["config"], "weights"),
                "feature_dim": c["feature_dim"],
            }
            for c in caches
        ],
    )
    result = FitResult(sweep_id=sweep_id, n_configs=len(configs), selection=selection,
                       caches={c["name"]: Path(c["path"]) for c in caches},
                       left_out=[(dataset.records[i].relpath, why) for i, why in undecodable.items()],
                       notes=(_preset_task_notes(opts, preset, task)
                              + _unused_option_notes(opts, head_obj, len(classes), configs)
                              + _binary_label_notes(records, task) + _leak_notes(records, pool, test, keys)
                              + _test_gap_notes(classes, y, test)
                              + merged))
    # the config hashes of the runs this sweep writes: claimed under the lock, then looked up among done runs
    if selection == "cv":
        hashes = [_cv_hash(common, configs)]
    elif head_obj.name == "mlp":
        from featcache.heads.mlp import fused_sigmoid, unpartnered, watches_holdout

        planned = {i for i, c in enumerate(configs) if refit and watches_holdout(c)}
        hashes = _holdout_hashes(common, configs, unpartnered(configs), planned, fused_sigmoid(configs))
    else:
        hashes = _holdout_hashes(common, configs)
    with sweep_lock(opts.runs_dir, sweep_id, hashes):  # a sweep or config trained twice at once: refused
        if opts.retrain:  # under the lock: no other fit of these configs reads or writes them now
            result.retired = retire_runs(opts.runs_dir, set(hashes))
            result.notes += _retired_notes(opts.runs_dir, result.retired)
        try:
            if selection == "cv":
                _fit_cv(ctx, configs, result, hashes[0])
            else:
                _fit_holdout(ctx, configs, result, hashes)
        except DataError as exc:
            if opts.test_fraction is None:
                raise
            raise DataError(f"{exc} {_test_fraction_advice(opts.test_fraction, groups, pool, test)}") from exc
    result.notes += view_notes
    result.notes += _unusual_test_notes(ctx)
    result.notes += _untagged_notes(opts.runs_dir, result.skipped, opts.tags)
    result.notes += done_with_other_versions(opts.runs_dir, result.skipped)  # kept: say when versions moved
    return result


def _retired_notes(runs_dir: Path, retired: list[str]) -> list[str]:
    """Where --retrain put the runs it replaces: kept, out of every listing, for a comparison or undo."""
    if not retired:
        return []
    return [f"--retrain: {len(retired)} finished run(s) of these configs ({retired[0]}"
            f"{f' and {len(retired) - 1} more' if len(retired) > 1 else ''}) were moved to "
            f"{Path(runs_dir) / RETIRED_DIR} (kept, but no longer listed or reported) and are trained again; "
            "move a folder back to restore it."]


def _untagged_notes(runs_dir: Path, skipped: list[str], tags: Sequence[str]) -> list[str]:
    """Say that --tag did not reach runs found already done (a tag is given when a run is trained, and a
    finished run's record is not rewritten): `report --tag` would not find them, with no word why."""
    if not tags or not skipped:
        return []
    from featcache.runs import load_run

    wanted = set(tags)
    untagged = [rid for rid in skipped if not wanted <= set(load_run(runs_dir, rid).info.get("tags") or [])]
    if not untagged:
        return []
    return [f"--tag {', '.join(tags)} was not added to {len(untagged)} run(s) found already done (e.g. "
            f"{untagged[0]}): tags are given when a run is trained; select those runs by id, or fit into "
            "another --runs-dir to train tagged ones."]


def _preset_task_notes(opts: FitOptions, preset: Any, task: str) -> list[str]:
    """Say which of a paper's tasks this sweep ran when --task was not given, or that the paper did not run
    the one given. Why: mao2018's paper reports binary and 3-class; without --task the preset runs binary,
    and a reader comparing with the paper's 3-class table would not know the other needs --task 3class."""
    if preset is None:
        return []
    tasks = list(preset.options.get("tasks") or ([preset.task] if preset.task else []))
    if opts.task and tasks and opts.task not in tasks:
        return [f"preset {preset.name}: the paper ran {' and '.join(tasks)}, not {opts.task}; the preset's "
                "grid and balancing are applied to it all the same."]
    others = [t for t in tasks if t != task]
    if opts.task or not others:
        return []
    return [f"preset {preset.name}: the paper ran {' and '.join(tasks)}; this sweep is {task} (the preset's "
            f"default); add --task {others[0]} for the other."]


TEST_SPLIT_SEED = 0  # --test-fraction's draw: one test split per folder whatever --seed, so seeds compare


def refuse_test_fraction_with_test_split(root: Path, n_test: int) -> None:
    """ConfigError where --test-fraction meets data with a test split of its own (``n_test`` images): fit
    and `run`'s pre-check (before the extraction) say it in one sentence."""
    if n_test:
        raise ConfigError(f"{os.fsdecode(root)} has a test split of its own ({n_test} images); "
                          "--test-fraction holds one out only of data without one: drop it.")


def _held_out_test(root: Path, records: Sequence[Any], y: np.ndarray, groups: np.ndarray, split: np.ndarray,
                   pool: np.ndarray, test: np.ndarray, fraction: float
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(split, pool, test) with a patient-grouped, stratified ``fraction`` of the training images moved to
    test, for data without a test split (`--test-fraction`).

    Why: on a folder without a test split every number was a validation estimate, with no interval and no
    paired comparison, and the only way to a test split was a hand-made manifest (a researcher's audit on
    the Kermany training split). Stratified by Kermany subtype where every image has one (as
    benchmarks/bench_accuracy.py's split), else by class; whole patients (groups merged over identical
    files) move; drawn with a fixed seed, so runs of any --seed share the split.
    """
    from featcache.datasets import SUBTYPES
    from featcache.splits import grouped_holdout

    refuse_test_fraction_with_test_split(root, len(test))
    sub = [records[i].subtype for i in pool]
    strata = sub if all(s in SUBTYPES for s in sub) else [str(v) for v in y[pool]]
    tr, te = grouped_holdout(strata, groups[pool], fraction=fraction, seed=TEST_SPLIT_SEED)
    split = split.copy()
    split[pool[te]] = "test"
    return split, np.sort(pool[tr]), np.sort(pool[te])


def _unusual_test_notes(ctx: _Ctx) -> list[str]:
    """A note when test images lie beyond the training images' feature reference (what predict marks
    unusual): a stray file, or, where many do, a test split unlike the training images (another scanner
    or hospital), whose metrics measure that too. On the Kermany training split (mobilenet-0.75,
    --test-fraction 0.2) 3 of its 1,046 test images did (up to 1.06 times a limit): a few are ordinary, so
    the note gives the share. Only when this call wrote a run (the reference is built then, once)."""
    ref = ctx.__dict__.get("_reference")
    if ref is None or not len(ctx.test):
        return []
    test = ctx.test[ctx.feats.has("orig", ctx.test)]
    scores = ref.scores(ctx.feats.rows(test, ["orig"] * len(test)))
    n = int(np.sum(scores > 1.0))
    if not n:
        return []
    worst = int(np.argmax(scores))
    example = f"{ctx.records[test[worst]].relpath}, {scores[worst]:.2f} times"
    return [f"{n} of the {len(test)} test images ({n / len(test):.1%}) lie beyond the limits of the training "
            f"images' features (e.g. {example}; `predict` would mark them unusual): look at them; where many "
            "do, the test split differs from the training images, and its metrics measure that too."]


def _test_fraction_advice(fraction: float, groups: np.ndarray, pool: np.ndarray, test: np.ndarray) -> str:
    """The sentence added to a split's "too few patients for training" error under --test-fraction.

    Why: `--test-fraction 0.99` left 2 patients to train on, and the error said "add data or lower
    --cv-folds" (or named a class as having 1 patient) about a folder of hundreds: the held-out share, the
    cause, went unsaid.
    """
    n_test, n_pool = len(np.unique(groups[test])), len(np.unique(groups[pool]))
    return (f"--test-fraction {fraction} moved {n_test} of the {n_test + n_pool} patients to the test split, "
            f"leaving {n_pool} for training and validation; a smaller --test-fraction leaves more.")


def _unused_option_notes(opts: FitOptions, head_obj: Any, n_classes: int = 2,
                         configs: Sequence[dict] = ()) -> list[str]:
    """A note for each option given a non-default value that this head (or task) does not use: accepted
    without a word, it looked as if it had shaped the runs.

    ``configs``: the sweep's grid; --mlp-precision and --mlp-trainer shape only configs trained fused, and
    a grid with none (one config, SGD, a decay schedule, no two sharing a batch size) trains each with
    ``model.fit`` in float32 whatever they say. Unnoted, `--mlp-precision float32` on one config trained it
    again under a new run id, to the same numbers, as if bfloat16 had been turned off.
    """
    defaults = FitOptions()
    unused = []
    if n_classes > 2 and _parse_threshold(opts.threshold) != _parse_threshold(defaults.threshold):
        unused.append(f"--threshold (a {n_classes}-class head labels each image by its most probable class)")
    if head_obj.selection == "cv" and opts.val_fraction != defaults.val_fraction:
        unused.append(f"--val-fraction ({head_obj.name} is validated by {opts.cv_folds}-fold CV)")
    if head_obj.selection != "cv" and opts.cv_folds != defaults.cv_folds:
        unused.append(f"--cv-folds ({head_obj.name} is validated on a hold-out)")
    # the options that shape only fused mlp grid training, where given
    fused_flags = [flag for flag, value, default in (
        ("--mlp-precision", opts.mlp_precision, defaults.mlp_precision),
        ("--mlp-trainer", opts.mlp_trainer, defaults.mlp_trainer)) if value != default]
    if head_obj.name != "mlp":
        unused += [f"{flag} (mlp only)" for flag in fused_flags]
    notes = [f"not used by the {head_obj.name} head: {u}." for u in unused]
    if head_obj.name == "mlp" and fused_flags and configs:
        from featcache.heads.mlp import fused_configs

        if not fused_configs(list(configs)):
            trainer, auto = resolve_trainer(opts.mlp_trainer), resolve_trainer(defaults.mlp_trainer)
            # the resolved values go into the run ids (see _fit's common): where they differ from the
            # default's, runs made without the flag are not found "already done"
            new_ids = (trainer != auto or resolve_precision(opts.mlp_precision, trainer)
                       != resolve_precision(defaults.mlp_precision, auto))
            notes.append(f"{' and '.join(fused_flags)} change{'' if len(fused_flags) > 1 else 's'} nothing "
                         "these configs train: "
                         f"{'they apply' if len(fused_flags) > 1 else 'it applies'} to fused grid training "
                         "(Adam configs with a constant learning rate that share a batch size), and none of "
                         "these trains fused, so each trains alone with model.fit in float32"
                         + ("; the value is in their run ids, so runs made without it train again, to the "
                            "same numbers." if new_ids else "."))
    if head_obj.selection != "cv" and opts.metric != defaults.metric:  # no choice inside fit to make
        notes.append(f"--metric {opts.metric}: every {head_obj.name} config is a run of its own, so the "
                     "metric changes nothing they train; it orders fit's table and `featcache report` ranks "
                     "the runs by it (it is in a run's id: runs made with another --metric train again).")
    return notes


def _binary_label_notes(records: Sequence[Any], task: str) -> list[str]:
    """A note naming the labels the binary task counts as PNEUMONIA besides PNEUMONIA itself.

    Why: binary is NORMAL against anything else (so bacteria/virus labels work), which also turned a
    manifest's typo "NROMAL" into a pneumonia image without a word.
    """
    if task != "binary":
        return []
    from featcache.datasets import SUBTYPES

    counts: dict[str, int] = {}
    expected = {"NORMAL", "PNEUMONIA", *(s.upper() for s in SUBTYPES)}  # bacteria/virus labels are meant
    for r in records:
        if r.label.upper() not in expected:
            counts[r.label] = counts.get(r.label, 0) + 1
    if not counts:
        return []
    listed = ", ".join(f"'{label}' ({n} image(s))" for label, n in sorted(counts.items()))
    return [f"task binary counts every label but NORMAL as PNEUMONIA, here also {listed}; if one is a "
            "misspelt NORMAL, correct it (or use --task folders to keep every label a class)."]


def merge_identical_groups(groups: Sequence[str], keys: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """Groups with the images that share a byte-identical file (the same key) joined into one, named by
    its first group in sorted order; plus a note when any were joined.

    Why: patient ids come from file names, so one image saved under two patients' names (or, without
    ids, under two file stems) gave two groups, and CV could train on one copy and validate on the other,
    the same feature vector (the demo with one image copied under another patient's name: split across
    a fold's sides in 28 of 50 seeds). The Kermany training split's 24 sets of identical files each stay
    within one patient, so its groups do not change.
    """
    parent = {g: g for g in groups}

    def find(g: str) -> str:
        while parent[g] != g:
            parent[g] = parent[parent[g]]
            g = parent[g]
        return g

    first: dict[str, str] = {}
    for g, k in zip(groups, keys, strict=True):
        a, b = sorted((find(g), find(first.setdefault(k, g))))
        parent[b] = a
    joined = np.array([find(g) for g in groups], dtype=object)
    members: dict[str, set[str]] = {}
    for g in set(groups):
        members.setdefault(find(g), set()).add(g)
    sets = [sorted(m) for m in members.values() if len(m) > 1]
    if not sets:
        return joined, []
    example = min(sets)
    return joined, [f"{sum(len(m) for m in sets)} patient groups share byte-identical images and were "
                    f"joined into {len(sets)} group(s) (e.g. {', '.join(example)}), so no copy of an image "
                    "validates its twin."]


def _test_gap_notes(classes: Sequence[str], y: np.ndarray, test: np.ndarray) -> list[str]:
    """A note when the test split lacks a class: its AUC (and that class's recall) came back blank, and its
    accuracy a perfect-looking 1 with an interval, without a word, while a validation hold-out that lacks a
    class is named. The split is the data's, so fit keeps it."""
    if not len(test):
        return []
    missing = _missing_classes(classes, y[test])
    if not missing:
        return []
    held = ", ".join(f"{c}: {int(np.sum(y[test] == k))}" for k, c in enumerate(classes) if c not in missing)
    absent = ", ".join(missing)
    return [f"the test split has no image of {absent} (its {len(test)} images: {held}), so test AUC and "
            f"the recall of {absent} are undefined (left blank), macro F1 counts its F1 as 0, and test "
            "accuracy does not test it; add test images of every class."]


def _leak_notes(records: Sequence[Any], pool: np.ndarray, test: np.ndarray,
                keys: Sequence[str] = ()) -> list[str]:
    """A note when patients (real ids only) have images both in the training pool and in the test split,
    and when an image of the test split is byte-identical to a training image: the split is the data's,
    so fit keeps it, but test numbers then reward remembering a child (or an image)."""
    def ids(idx: np.ndarray) -> set[str]:
        return {records[i].group for i in idx if records[i].has_patient_id}

    notes = []
    both = sorted(ids(pool) & ids(test))
    if both:
        notes.append(f"{len(both)} patient(s) have images in both the training and the test split (e.g. "
                     f"{', '.join(both[:3])}): test numbers may be optimistic; `featcache data inspect` "
                     "lists them, and moving each patient's images to one side fixes it.")
    if len(keys):
        in_pool = {keys[i] for i in pool}
        copies = sorted(records[i].relpath for i in test if keys[i] in in_pool)
        if copies:
            notes.append(f"{len(copies)} test image(s) are byte-identical to a training image (e.g. "
                         f"{copies[0]}): the model has seen them; test numbers may be optimistic. "
                         "`featcache data inspect` lists duplicates.")
    return notes


def _views(spec: Sequence[str] | str, flag: str = "--views") -> list[str]:
    """Canonical view names (through images.parse_views when available); 'orig' always first."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    try:
        from featcache.images import parse_views

        names = [v.name for v in parse_views(items, flag)]
    except ImportError:  # pragma: no cover - images module not present
        names = [s.strip() for s in items if s.strip()]
    out = ["orig"] + [v for v in dict.fromkeys(names) if v != "orig"]
    return out


def _old_view_rule_notes(opts: FitOptions, caches: list[dict], train_views: list[str], tta_views: list[str],
                         aug_views: list[str]) -> list[str]:
    """A note where a default --tta-views / --aug-views differs from the views featcache used before it had
    these options (every view the caches held): the same command then trained new runs, and the old ones
    are reused only by naming their views."""
    held = sorted(set.intersection(*(set(c["views"]) for c in caches)) - {"orig"}) if caches else []
    notes = []
    for flag, option, chosen, given, old in (
            ("--tta", "--tta-views", tta_views, opts.tta_views, held),
            ("--balance oversample", "--aug-views", aug_views, opts.aug_views,
             [v for v in held if v not in train_views])):
        if chosen and given is None and old and old != chosen:  # no old view: the old rule refused
            notes.append(f"{flag} used {', '.join(chosen)} ({option}'s default). Before {option} existed it "
                         f"used every view the cache holds, here {', '.join(old)}: to reuse runs made that "
                         f"way, pass {option} {','.join(old)}.")
    return notes


def _refuse_missing_views(root: Path, names: list[str], opts: FitOptions, feats: _Features,
                          caches: list[dict], tta_views: list[str], aug_views: list[str]) -> None:
    """ConfigError naming the first --tta / oversampling view no image has, with the extract that adds it.

    Why not skip it: the numbers would then be of fewer views than the command (and run.json) names.
    """
    for flag, views in (("--tta averages orig with", tta_views),
                        ("--balance oversample draws from", aug_views)):
        for view in views:
            if view in feats.views:
                continue
            k = next((i for i, c in enumerate(caches) if view not in c["views"]), 0)
            cmd = _extract_cmd(root, names[k], opts, ("orig", *views), caches[k]["config"])
            choose = "--tta-views" if flag.startswith("--tta") else "--aug-views"
            raise ConfigError(
                f"{flag} {', '.join(views)}, and cache {caches[k]['file']} has no '{view}' "
                f"features for these images; run `{cmd}` to add them, or name cached views with {choose}."
            )


def _scoring(metric: str, n_classes: int) -> str:
    """scikit-learn scoring name for --metric."""
    if metric == "auc":
        return "roc_auc" if n_classes == 2 else "roc_auc_ovr"
    return {"accuracy": "accuracy", "macro_f1": "f1_macro"}[metric]


def _threshold_info(ctx: _Ctx, y_val: np.ndarray, p_val: np.ndarray) -> dict:
    """Youden and chosen thresholds from validation predictions (binary); None for multi-class."""
    method, target = ctx.thr
    if len(ctx.classes) != 2:
        return {"method": None, "youden": None, "chosen": None, "default": None}
    youden = choose_threshold(y_val, p_val[:, 1], "youden")
    chosen = youden if method == "youden" else choose_threshold(y_val, p_val[:, 1], "sensitivity", target)
    return {
        "method": method,
        "target_sensitivity": target,
        "youden": youden,
        "chosen": chosen,
        "default": 0.5,
        "chosen_on": "validation (out-of-fold)" if ctx.head_obj.selection == "cv" else "validation hold-out",
    }


def _evaluate(ctx: _Ctx, y_true: np.ndarray, proba: np.ndarray, thr: float | None, ci: bool,
              groups: list[str] | None = None) -> dict:
    m = classification_metrics(y_true, proba, ctx.classes)
    if thr is not None:
        m["at_threshold"] = classification_metrics(y_true, proba, ctx.classes, thr)
    if ci and len(y_true):
        kw = {"n_boot": ctx.opts.n_boot, "seed": ctx.opts.seed, "groups": groups}
        m["ci"] = bootstrap_ci(y_true, proba, ctx.classes, None, **kw)
        m["ci"]["resampled"] = _resampled_unit(ctx, groups)
        if thr is not None:  # the same resamples: it must say so too, or a reader takes it for patients
            m["at_threshold"]["ci"] = bootstrap_ci(y_true, proba, ctx.classes, thr, **kw)
            m["at_threshold"]["ci"]["resampled"] = m["ci"]["resampled"]
    return m


def _resampled_unit(ctx: _Ctx, groups: list[str] | None) -> str:
    """What the test bootstrap resampled: patients only where every test image has a patient id;
    otherwise groups by file name (the fallback), which must not be called patients."""
    if groups is None:
        return "images"
    missing = sum(not ctx.records[i].has_patient_id for i in ctx.test)
    if not missing:
        return "patients"
    if missing == len(ctx.test):
        return "file-name groups"
    return f"patients and file-name groups ({missing} image(s) without a patient id)"


def _check_class_weights(configs: Sequence[dict], classes: Sequence[str]) -> None:
    """ConfigError when per-class weights do not name every class of the task exactly.

    Why: the estimators give an unnamed class weight 1 without a word, so laban2021's binary 3:1 run as
    3class weighted normal 3x against bacteria and virus at 1, which no paper did.
    """
    for cfg in configs:
        cw = cfg.get("class_weight")
        if not isinstance(cw, dict):
            continue
        keys = sorted(int(k) for k in cw)
        if keys != list(range(len(classes))):
            example = ":".join(["1"] * len(classes))
            raise ConfigError(
                f"class_weight {format_value(cw)} gives weights for classes {', '.join(map(str, keys))}, but "
                f"task has {len(classes)} classes ({', '.join(classes)}, numbered from 0); give one weight "
                f"per class, e.g. class_weight={example}, or class_weight=balanced."
            )


def _resolved(head_obj: Any, params: Any, seed: int, model: Any = None) -> dict | None:
    """The head's full parameters for this config and seed (defaults included), or None if it cannot say.
    Where the fitted scikit-learn model holds another value, its value: knn caps n_neighbors at the
    training rows, and the record should say what ran (``--grid n_neighbors=500`` on 80 images ran 80)."""
    if not isinstance(params, dict) or not hasattr(head_obj, "resolved"):
        return None
    try:
        out = head_obj.resolved(params, seed=seed)
        est = getattr(model, "estimator", None)
        final = est.steps[-1][1] if hasattr(est, "steps") else est
        if final is not None and hasattr(final, "get_params"):
            fitted = final.get_params(deep=False)
            out = {k: fitted.get(k, v) if type(fitted.get(k, v)) is type(v) else v for k, v in out.items()}
        return to_jsonable(out)
    except Exception:  # noqa: BLE001 - a record, never a reason to lose a trained run
        return None


def _store_run(
    ctx: _Ctx,
    *,
    params: Any,
    chash: str,
    model: Any,
    selection: dict,
    val_idx: np.ndarray,
    p_val: np.ndarray,
    indices: dict[str, np.ndarray],
    extra_metrics: dict,
    train_fit: tuple[np.ndarray, np.ndarray] | None,
    trainer: dict | None = None,
    grid: dict | None = None,
) -> Run:
    """Write one complete run: status "running" first, then files, then status "done" last.

    ``grid`` (hold-out heads): the config's place in the whole grid, which its seed, minibatch stream and
    dropout key come from, so a reader can rerun it from the record alone.
    """
    y_val = ctx.y[val_idx]
    thr = _threshold_info(ctx, y_val, p_val)
    info = {
        "sweep_id": ctx.sweep_id,
        "head": ctx.head_obj.name,
        "task": ctx.task,
        "classes": ctx.classes,
        "backbones": ctx.backbone_info,
        "params": to_jsonable(params) if isinstance(params, dict) else params,
        "hyperparameters": _resolved(ctx.head_obj, params, ctx.opts.seed, model),
        "config_hash": chash,
        "seed": ctx.opts.seed,
        "metric": ctx.opts.metric,
        "selection": selection,
        "balance": ctx.balance,
        "train_views": ctx.train_views,
        "tta": ctx.tta,
        "tta_views": ctx.tta_views,
        "aug_views": ctx.aug_views if ctx.balance == "oversample" else [],
        "dataset": ctx.dataset_info,
        "caches": [{k: v for k, v in c.items()} for c in ctx.caches],
        "versions": library_versions(),
        "environment": ctx.environment,
        "command": list(ctx.opts.command or sys.argv),
        "tags": list(ctx.opts.tags),
        "preset": ctx.preset.name if ctx.preset else None,
        "threshold": thr,
    }
    if trainer is not None:  # how a dense head was trained (fused/bf16 or model.fit/float32)
        info["trainer"] = trainer
    if grid is not None:
        info["grid"] = grid
    writer = RunWriter(ctx.opts.runs_dir, info)
    try:
        return _write_run(ctx, writer, model, thr, y_val, p_val, val_idx, indices, extra_metrics, train_fit)
    except BaseException:  # Ctrl-C, SIGTERM, a full disk: no half-written run folder is left behind
        writer.discard()
        raise


def _write_run(ctx: _Ctx, writer: RunWriter, model: Any, thr: dict, y_val: np.ndarray, p_val: np.ndarray,
               val_idx: np.ndarray, indices: dict, extra_metrics: dict, train_fit: Any) -> Run:
    """Metrics, predictions, indices and model into the run folder, then run.json "done"."""
    crash_point("fit.run_started")
    chosen = thr["chosen"]
    metrics: dict = {
        "val": _evaluate(ctx, y_val, p_val, chosen, ci=False),
        "test": None,
        "cv_results": None,
        "history": None,
        "train": None,
        **extra_metrics,
    }
    if train_fit is not None:
        Xr, yr = train_fit
        ptr = np.asarray(model.predict_proba(Xr), dtype=np.float64)
        tm = classification_metrics(yr, ptr, ctx.classes)
        metrics["train"] = {k: tm[k] for k in ("n", "accuracy", "macro_f1", "log_loss", "auc")}
    _write_preds(writer, ctx, "val", val_idx, p_val, chosen)
    if len(ctx.test):  # the one and only look at the test split, after every choice above
        p_test = ctx.proba(model, ctx.test)
        metrics["test"] = _evaluate(ctx, ctx.y[ctx.test], p_test, chosen, ci=True,
                                    groups=[str(g) for g in ctx.groups[ctx.test]])
        _write_preds(writer, ctx, "test", ctx.test, p_test, chosen)
    writer.write_metrics(metrics)
    writer.write_indices(test=ctx.test, pool=ctx.pool, **indices)
    writer.write_seen_keys([ctx.keys[i] for i in ctx.pool], [ctx.keys[i] for i in ctx.test])
    writer.write_feature_reference(ctx.feature_reference())
    writer.save_head(model)
    crash_point("fit.before_run_done")
    run = writer.finish()
    crash_point("fit.after_run_saved")
    return run


def _write_preds(
    writer: RunWriter, ctx: _Ctx, name: str, idx: np.ndarray, proba: np.ndarray, thr: float | None
) -> None:
    writer.write_predictions(
        name,
        [ctx.records[i].relpath for i in idx],
        [ctx.keys[i] for i in idx],
        ctx.y[idx],
        proba,
        predict_labels(proba, thr),
        ctx.classes,
        groups=[str(g) for g in ctx.groups[idx]],
    )


def _selection_record(
    ctx: _Ctx, method: str, train_idx: np.ndarray, val_idx: np.ndarray, **extra: Any
) -> dict:
    return {
        "method": method,
        "group_by": _grouped_by(ctx),
        "stratified": True,
        "seed": ctx.opts.seed,
        "refit": ctx.refit,
        "metric": ctx.opts.metric,
        "n_train_images": int(len(train_idx)),
        "n_val_images": int(len(val_idx)),
        "n_test_images": int(len(ctx.test)),
        "train_indices_digest": index_digest(train_idx),
        "val_indices_digest": index_digest(val_idx),
        "test_indices_digest": index_digest(ctx.test),
        "test_used_for_selection": False,
        **extra,
    }


def _grouped_by(ctx: _Ctx) -> str:
    """What the folds and the hold-out kept together, as the records have it: "patient" only where every
    image has a patient id (an image without one is grouped by its file name, which is not a patient)."""
    with_ids = sum(r.has_patient_id for r in ctx.records)
    if with_ids == len(ctx.records):
        return "patient"
    return "file name" if with_ids == 0 else "patient, else file name"


def _cv_hash(common: dict, configs: list[dict]) -> str:
    """The config hash of a CV search's one run: the whole grid is its config."""
    return config_hash({**common, "configs": [to_jsonable(c) for c in configs]})


def _holdout_hashes(common: dict, configs: list[dict], alone: set[int] = frozenset(),
                    planned: set[int] = frozenset(), logit_loss: set[int] = frozenset()) -> list[str]:
    """The config hash of each hold-out run: one per grid point, with the grid points before it.

    Why the preceding points are part of it: a config's seed is the sweep's seed plus its position, and a
    fused batch-size group draws the minibatch stream of its first member and gives each member the dropout
    key of its position. So the same config placed elsewhere in another grid gives other numbers, and must
    not be found "already done" there. Points after it change none of these but one: a dense-head config
    that no other config shares its batch size with trains alone (``model.fit``), and fused once a later
    one does, with other numbers. Those (``alone``, see ``mlp.unpartnered``) are marked in their hash, so a
    grid extended at its end finds its earlier points done, with the numbers the longer grid gives them,
    except a config that the extension gives its first partner, which trains again, fused.
    ``planned``: refit configs whose refit follows ``mlp.refit_plan`` (they watch the hold-out); before
    it their refit early-stopped on its own training rows, another saved model under the same hash.
    ``logit_loss``: fused sigmoid-output configs (``mlp.fused_sigmoid``), whose loss is taken from the logit
    now; before, a clipped probability could freeze a saturated member: other numbers under the same hash.
    """
    grid = [to_jsonable(c) for c in configs]
    marks = [{**({"alone": True} if i in alone else {}), **({"refit_plan": 1} if i in planned else {}),
              **({"sigmoid_loss": "logits"} if i in logit_loss else {})}
             for i in range(len(grid))]
    return [config_hash({**common, "params": c, "preceding": grid[:i], **marks[i]})
            for i, c in enumerate(grid)]


def _split_gaps(ctx: _Ctx, sides: list[np.ndarray]) -> list[tuple[int, list[str]]]:
    """(side index, classes with no image there) for each side (pool positions) that lacks a class."""
    gaps = [(i, _missing_classes(ctx.classes, ctx.y[ctx.pool[pos]])) for i, pos in enumerate(sides)]
    return [(i, missing) for i, missing in gaps if missing]


def _missing_classes(classes: Sequence[str], labels: np.ndarray) -> list[str]:
    """The classes (in task order) of which ``labels`` (class indices) hold no image."""
    present = set(np.unique(labels).tolist())
    return [c for k, c in enumerate(classes) if k not in present]


def _class_sizes(ctx: _Ctx, name: str) -> str:
    """'1 image from 1 patient': how much training data a class has (why a split cannot cover it)."""
    k = ctx.classes.index(name)
    rows = ctx.pool[ctx.y[ctx.pool] == k]
    n_pat = len(np.unique(ctx.groups[rows]))
    return f"{len(rows)} image{'s' if len(rows) != 1 else ''} from {n_pat} patient{'s' if n_pat != 1 else ''}"


def _check_training_sides(ctx: _Ctx, train_sides: list[np.ndarray], where: str) -> None:
    """Stop before training when a split's training side lacks a class: the head would learn fewer
    classes than the task has (logreg/knn then fail with a shape error deep inside, a binary logreg with
    "needs samples of at least 2 classes", which reads as a fault of the grid)."""
    gaps = _split_gaps(ctx, train_sides)
    if not gaps:
        return
    side, missing = gaps[0]
    name = missing[0]
    place = f"fold {side + 1} of the {len(train_sides)}-fold cross-validation" if where == "cv" else where
    raise DataError(
        f"class {name} has {_class_sizes(ctx, name)} for training, and a patient's images stay on one side "
        f"of the split, so {place} trains without it; every training side needs a patient of every class "
        f"(2 patients at the least, and a patient-grouped split may still put both on one side): add "
        f"images of {name}{', lower --cv-folds' if where == 'cv' else ''}, or leave the class out."
    )


def _check_training_patients(ctx: _Ctx, train_sides: list[np.ndarray]) -> None:
    """Stop before the search when a head needs more patients of a class per fit than a fold's training
    side has (svm's patient-grouped calibration: 2); it failed after the whole search, naming no class."""
    need = getattr(ctx.head_obj, "min_training_patients", 1)
    if need <= 1:
        return
    for i, pos in enumerate(train_sides):
        rows = ctx.pool[pos]
        for k, name in enumerate(ctx.classes):
            n_pat = len(np.unique(ctx.groups[rows[ctx.y[rows] == k]]))
            if n_pat < need:
                raise DataError(
                    f"the {ctx.head_obj.name} head needs {need} patients of every class in each fit's "
                    f"training rows (its probability calibration is patient-grouped), and fold {i + 1} of "
                    f"the {len(train_sides)}-fold cross-validation trains on {n_pat} patient(s) of {name} "
                    f"({_class_sizes(ctx, name)} in all): lower --cv-folds, add images of {name} from more "
                    "patients, or use the logreg or knn head.")


def _damaged_notes(damaged: list[tuple[str, str]]) -> list[str]:
    """Say which finished runs of this sweep's configs are trained again, and why (their files changed)."""
    if not damaged:
        return []
    run_id, why = damaged[0]
    more = f" and {len(damaged) - 1} more" if len(damaged) > 1 else ""
    return [f"{len(damaged)} finished run(s) of these configs are damaged ({run_id}: {why}{more}) and are "
            "trained again; the report leaves the damaged ones out (delete their folders when done)."]


def _fit_cv(ctx: _Ctx, configs: list[dict], result: FitResult, chash: str) -> None:
    """One run for the whole search (its config hash ``chash``): grouped K-fold CV, out-of-fold threshold,
    refit, test once."""
    opts = ctx.opts
    damaged: list[tuple[str, str]] = []
    done = done_hashes(opts.runs_dir, {chash}, damaged)
    result.notes += _damaged_notes(damaged)
    result.cleaned = clean_stale(opts.runs_dir, {chash})
    if chash in done:
        result.skipped.append(done[chash])
        emit(ctx.progress, "fit", 1, 1, f"already done: {done[chash]}")
        return
    if ctx.before_train is not None:
        ctx.before_train()
    pool = ctx.pool
    folds_pos = grouped_kfold(ctx.y[pool], ctx.groups[pool], n_splits=opts.cv_folds, seed=opts.seed)
    _check_training_sides(ctx, [tr for tr, _ in folds_pos], "cv")
    _check_training_patients(ctx, [tr for tr, _ in folds_pos])
    gaps = _split_gaps(ctx, [va for _, va in folds_pos]) if opts.metric == "auc" else []
    if gaps:  # an AUC without both classes is NaN: every config's mean would be NaN
        side, missing = gaps[0]
        raise DataError(
            f"fold {side + 1} of the {len(folds_pos)}-fold cross-validation has no validation image of "
            f"{', '.join(missing)} (a patient's images stay on one side; "
            f"{'; '.join(f'{c}: {_class_sizes(ctx, c)}' for c in missing)}), so its AUC is undefined "
            "and --metric auc cannot rank the configs: lower --cv-folds, add images from more patients, "
            "or select by --metric accuracy.")
    rng = np.random.default_rng(opts.seed)
    # one row matrix for the search; folds index into it (training rows: train views + balance)
    all_rec, all_view, all_y, fold_rows = [], [], [], []
    offset = 0
    for tr_pos, va_pos in folds_pos:
        r, v, yy = ctx.train_rows(pool[tr_pos], rng)
        va = pool[va_pos]
        all_rec += [r, va]
        all_view += [v, np.full(len(va), "orig")]
        all_y += [yy, ctx.y[va]]
        fold_rows.append(
            (np.arange(offset, offset + len(r)), np.arange(offset + len(r), offset + len(r) + len(va)))
        )
        offset += len(r) + len(va)
    rec_rows = np.concatenate(all_rec)
    X = ctx.feats.rows(rec_rows, np.concatenate(all_view))
    yrows = np.concatenate(all_y)
    emit(
        ctx.progress,
        "fit",
        0,
        1,
        f"{ctx.head_obj.name}: searching {len(configs)} configs x {opts.cv_folds} folds",
    )
    search = ctx.head_obj.search(
        X,
        yrows,
        fold_rows,
        configs,
        scoring=_scoring(opts.metric, len(ctx.classes)),
        seed=opts.seed,
        progress=ctx.progress,
    )
    best = (
        dict(configs[search.best_index])
        if 0 <= search.best_index < len(configs)
        else dict(search.best_params)
    )
    same = _same_models(ctx.head_obj, configs, [len(tr) for tr, _ in fold_rows])
    # out-of-fold predictions of the chosen config: the validation predictions (threshold, val metrics)
    oof = np.zeros((len(pool), len(ctx.classes)))
    fold_models = []
    for (tr_rows, _), (_, va_pos) in zip(fold_rows, folds_pos, strict=True):
        m = ctx.head_obj.fit(X[tr_rows], yrows[tr_rows], best, seed=opts.seed,
                             groups=ctx.groups[rec_rows[tr_rows]])
        fold_models.append(m)
        oof[va_pos] = ctx.proba(m, pool[va_pos])
    if ctx.refit:
        r, v, yy = ctx.train_rows(pool, np.random.default_rng(opts.seed + 1))
        Xf = ctx.feats.rows(r, v)
        model = ctx.head_obj.fit(Xf, yy, best, seed=opts.seed, groups=ctx.groups[r])
        train_fit = (Xf, yy)
        final_train = np.unique(r)
    else:  # the first fold's model stands as the final head (trained on (K-1)/K of the pool)
        model = fold_models[0]
        tr_rows = fold_rows[0][0]
        train_fit = (X[tr_rows], yrows[tr_rows])
        final_train = np.unique(rec_rows[tr_rows])
    indices = {"train": final_train, "val": pool}
    for i, (tr_pos, va_pos) in enumerate(folds_pos):
        indices[f"fold{i}_train"] = pool[tr_pos]
        indices[f"fold{i}_val"] = pool[va_pos]
    selection = _selection_record(
        ctx,
        "grouped_kfold",
        final_train,
        pool,
        folds=opts.cv_folds,
        best_index=int(search.best_index),
        best_score=float(search.best_score),
        scoring=_scoring(opts.metric, len(ctx.classes)),
        n_configs=len(configs),
        validation="out-of-fold predictions of the chosen config",
        fold_digests=[[index_digest(pool[t]), index_digest(pool[v])] for t, v in folds_pos],
        # logreg, svm: how many of the search's fits stopped at max_iter (each warned as scikit-learn's would)
        **({} if search.n_unconverged is None else {"cv_unconverged_fits": search.n_unconverged}),
        # knn: configs whose k every fold capped to the same value (0-based grid indices)
        **({"cv_same_models": same} if same else {}),
    )
    run = _store_run(
        ctx,
        params=best,
        chash=chash,
        model=model,
        selection=selection,
        val_idx=pool,
        p_val=oof,
        indices=indices,
        extra_metrics={
            "cv_results": search.cv_results,
            "cv_best_score": float(search.best_score),
            "grid": [to_jsonable(c) for c in configs],
        },
        train_fit=train_fit,
    )
    result.runs.append(run)
    if search.n_unconverged:  # scikit-learn's warning is one line for them all, easy to miss under a bar
        total = len(configs) * len(folds_pos)
        result.notes.append(
            f"{search.n_unconverged} of the search's {total} fits stopped before converging (at max_iter"
            f"{', or rarely a failed line search' if ctx.head_obj.name == 'logreg' else ''}; run {run.id}, "
            "recorded as cv_unconverged_fits); their CV "
            "scores, and the choice among them, are of unconverged models: a larger max_iter (e.g. --grid "
            f"max_iter={larger_max_iter(configs)}) lets them converge.")
    if same:
        result.notes.append(_same_models_note(configs, same, [len(tr) for tr, _ in fold_rows], run.id))
    emit(ctx.progress, "fit", 1, 1, f"{run.id} done")


def _same_models(head: Any, configs: list[dict], n_train: Sequence[int]) -> list[list[int]]:
    """Groups (of 2 or more, by grid index) of configs that ran as one model in every fold: the parameters
    each fold's fit really used (``fold_params``: knn caps k at a fold's training rows) are equal.

    Why: ``--grid n_neighbors=50,100`` on folds of 40 training rows fits k=40 twice; the two configs tie
    by construction, and the search's "first of the tie" looked like a choice between two models."""
    groups: dict[str, list[int]] = {}
    for i, config in enumerate(configs):
        used = [head.fold_params(config, n) for n in n_train]
        groups.setdefault(canonical_json(used), []).append(i)
    return [g for g in groups.values() if len(g) > 1]


def _same_models_note(configs: list[dict], same: list[list[int]], n_train: Sequence[int], run_id: str) -> str:
    """fit's note on configs that ran as one model in every fold (``_same_models``), naming them by the
    parameters that tell them apart."""
    def named(group: list[int]) -> str:
        keys = sorted({k for i in group for k in configs[i]
                       if any(configs[i].get(k) != configs[j].get(k) for j in group)})
        texts = [", ".join(f"{k}={format_value(configs[i].get(k))}" for k in keys) or str(configs[i])
                 for i in group]
        return " and ".join(texts)

    return (f"{'; '.join(named(g) for g in same)} ran as the same model in every CV fold (run {run_id}): "
            f"k is capped at a fold's training rows ({min(n_train)}–{max(n_train)} here), so their CV "
            "scores are equal by construction: a tie of one model with itself, not between models (recorded "
            "as cv_same_models); n_neighbors values below the folds' training rows tell models apart.")


def _check_head_memory(configs: list[dict], n_in: int, n_classes: int) -> None:
    """ConfigError for a dense head whose weights and optimizer state cannot fit in memory (a typo such as
    ``--layers 100000000``), before TensorFlow fails deep inside with a traceback or the OS kills the fit."""
    from featcache.resources import available_memory

    available = available_memory()
    for p in configs:
        sizes = [n_in, *[int(u) for u in p.get("layers", (1024, 512))], n_classes]
        n_params = sum((a + 1) * b for a, b in zip(sizes, sizes[1:], strict=False))
        need = 16 * n_params  # float32 weights, gradient and two Adam moments
        if need > available:
            raise ConfigError(
                f"a dense head with layers {','.join(map(str, sizes[1:-1]))} on {n_in}-d features has "
                f"{n_params:,} parameters: {need / 2**30:.1f} GiB of weights and optimizer state, more than "
                f"the {available / 2**30:.1f} GiB of memory available; use smaller --layers."
            )


def _fit_holdout(ctx: _Ctx, configs: list[dict], result: FitResult, hashes: list[str]) -> None:
    """One run per config (``hashes``: their config hashes) on a grouped hold-out; resumable (configs with
    a done run are skipped)."""
    opts = ctx.opts
    pool = ctx.pool
    result.cleaned = clean_stale(opts.runs_dir, set(hashes))
    damaged: list[tuple[str, str]] = []
    done = done_hashes(opts.runs_dir, hashes, damaged)
    result.notes += _damaged_notes(damaged)
    todo = [i for i, h in enumerate(hashes) if h not in done]
    result.skipped = [done[h] for h in hashes if h in done]
    total = len(configs)
    emit(
        ctx.progress,
        "fit",
        total - len(todo),
        total,
        f"{len(result.skipped)} config(s) already done" if result.skipped else "training",
    )
    if not todo:
        return
    if ctx.before_train is not None:
        ctx.before_train()
    if ctx.head_obj.name == "mlp":
        _check_head_memory([configs[i] for i in todo], ctx.feats.dim, len(ctx.classes))
    tr_pos, va_pos = grouped_holdout(
        ctx.y[pool], ctx.groups[pool], fraction=opts.val_fraction, seed=opts.seed
    )
    _check_training_sides(ctx, [tr_pos], "the training side of the validation hold-out")
    for _, missing in _split_gaps(ctx, [va_pos]):
        result.notes.append(
            f"the validation hold-out has no image of {', '.join(missing)} (a patient's images stay on one "
            f"side; {'; '.join(f'{c}: {_class_sizes(ctx, c)}' for c in missing)}), so its validation recall "
            "is undefined (left blank) and validation accuracy does not test it; add images from more "
            "patients for a fair selection."
        )
    tr_idx, va_idx = pool[tr_pos], pool[va_pos]
    r, v, yy = ctx.train_rows(tr_idx, np.random.default_rng(opts.seed))
    Xtr = ctx.feats.rows(r, v)
    Xva = ctx.feats.rows(va_idx, ["orig"] * len(va_idx))
    yva = ctx.y[va_idx]
    selection = _selection_record(
        ctx,
        "grouped_holdout",
        np.unique(r),
        va_idx,
        fraction=opts.val_fraction,
        achieved_fraction=round(len(va_idx) / len(pool), 4),
        n_train_rows=int(len(r)),
    )
    indices = {"train": np.unique(r), "val": va_idx}
    finished = [0]

    def on_result(ci: int, model: Any, history: dict) -> None:
        final, sel, kept, train_fit = model, selection, indices, (Xtr, yy)
        if ctx.refit:  # retrain the chosen config on all pool images, for the hold-out model's epochs
            from featcache.heads.mlp import refit_plan

            params, rates, plan = refit_plan(configs[ci], history)
            rr, vv, yr = ctx.train_rows(pool, np.random.default_rng(opts.seed + 1))
            Xrr = ctx.feats.rows(rr, vv)
            final, _ = ctx.head_obj.train(Xrr, yr, Xva, yva, params, seed=opts.seed, lr_per_epoch=rates)
            # the saved model's own rows: its images (indices.npz "refit_train"), its train metrics and the
            # seed it trained with (the run's --seed, not the grid position's); a fit audit found the record
            # described the hold-out model's training rows only
            images = np.unique(rr)
            sel = {**selection, "refit_train_indices_digest": index_digest(images), "refit_plan": plan,
                   "refit_n_train_images": int(len(images)), "refit_seed": opts.seed}
            kept, train_fit = {**indices, "refit_train": images}, (Xrr, yr)
        p_val = ctx.proba(model, va_idx)
        run = _store_run(
            ctx,
            params=configs[ci],
            chash=hashes[ci],
            model=final,
            selection=sel,
            val_idx=va_idx,
            p_val=p_val,
            indices=kept,
            extra_metrics={"history": _jsonable_history(history)},
            train_fit=train_fit,
            trainer={"selection": dict(model.trainer), "saved_model": dict(final.trainer)},
            grid={"index": ci, "size": len(configs), "configs": [to_jsonable(c) for c in configs]},
        )
        result.runs.append(run)
        finished[0] += 1
        emit(ctx.progress, "fit", total - len(todo) + finished[0], total, f"{run.id} done")

    # The whole grid goes in, with its finished configs skipped (not the unfinished ones alone): each config's
    # seed, fused chunk, minibatch stream and dropout keys are those of the uninterrupted grid, so a resumed
    # grid gives the numbers the uninterrupted one would have. Fused chunks save epoch checkpoints in a hidden
    # folder (run listings skip it), so an interrupted chunk resumes at its last one; each file goes with its
    # chunk.
    checkpoints = checkpoint_dir(opts.runs_dir, ctx.sweep_id)
    ctx.head_obj.train_many(
        Xtr, yy, Xva, yva, configs, seed=opts.seed, progress=ctx.progress, on_result=on_result,
        precision=opts.mlp_precision, trainer=opts.mlp_trainer, skip=set(range(total)) - set(todo),
        checkpoint_dir=checkpoints,
        checkpoint_about={"sweep_id": ctx.sweep_id, "command": list(ctx.opts.command or sys.argv),
                          "configs": total, "owner": this_process()},
    )
    remove_sweep_checkpoints(opts.runs_dir, ctx.sweep_id)
    unsaved = [r.id for r in result.runs if ((r.info.get("trainer") or {}).get("selection") or {}).get(
        "checkpoint_failed")]
    if unsaved:  # training went on: the runs are whole, but a Ctrl-C would have restarted their chunks
        result.notes.append(f"epoch checkpoints could not be written for {len(unsaved)} config(s) (e.g. "
                            f"{unsaved[0]}; a full disk?), so they trained on without them: an interruption "
                            f"would have restarted them; free space under {checkpoints.parent}.")


def _jsonable_history(history: dict | None) -> dict | None:
    if not history:
        return None
    return {k: [float(x) for x in v] for k, v in history.items() if isinstance(v, (list, tuple, np.ndarray))}
