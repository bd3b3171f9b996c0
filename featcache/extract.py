"""Stage 1: stream a dataset through a frozen backbone into the HDF5 feature cache.

Pipeline (memory stays flat, decoding overlaps inference)::

    records -> sha256 of every file (thread pool, overlapped with building the backbone)
            -> unique keys (duplicate files computed once) -> optional shard filter
            -> drop (key, view) rows the cache already holds
            -> decode + resize + views in `workers` threads -> bounded queue of ready uint8 batches
            -> backbone forward (main thread; fixed batch shape)
            -> CacheWriter.append per batch (writer thread: a chunk's fsyncs overlap the next forward)

The decode threads run ahead of the forward pass by at most ``_PREFETCH_BATCHES`` batches (plus
the images in flight), so RSS does not grow with the number of images. Pillow and hashlib release
the GIL, so on a 2-core machine decoding costs the forward pass only the CPU it really uses.

Files that cannot be read or decoded are listed in ``skipped`` with their reason and every good
image is still cached; ``strict=True`` turns any skipped file into a DataError *after* the good rows
are saved. Crash points (``featcache.faults``) mark the dangerous moments for the kill -9 tests.

Bit-for-bit resume: CPU kernels round a row slightly differently (~1e-7 relative) depending on its
position in the batch. Rows are computed in one deterministic order and every chunk is one batch, so
a run resumed after a crash (which keeps whole chunks) puts every remaining row at the same batch
position as an uninterrupted run with the same --batch-size would: the features are identical. Every
pass is padded to --batch-size (``Backbone.fix_batch_size``), so a later extract that adds fewer rows
than one batch does not compile a smaller batch, whose kernels round differently.
"""
from __future__ import annotations

import contextlib
import json
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from featcache.backbones import Backbone, BackboneConfig, build_backbone
from featcache.datasets import Dataset, ImageRecord, is_hidden_skip, split_folder
from featcache.errors import ConfigError, DataError
from featcache.faults import crash_point
from featcache.hashing import sha256_bytes, sha256_many
from featcache.progress import ProgressFn, emit

DTYPES = ("float32", "float16")
_PREFETCH_BATCHES = 3        # ready batches waiting for the forward pass (bounded: flat memory)
_HASH_WORKERS = 4            # hashing is mostly I/O on a cold page cache
# uint8 input buffers of one batch alive at once: the ready ones, the one being filled, the decoded images
# waiting for it (up to a batch), the one in the forward pass
_BATCHES_IN_FLIGHT = _PREFETCH_BATCHES + 3
# bytes per pixel channel of a batch: each uint8 buffer, and the float32 copy the compiled forward pass makes
_BYTES_PER_CHANNEL = _BATCHES_IN_FLIGHT * 1 + 4


@dataclass
class ExtractOptions:
    """How to extract; see ARCHITECTURE.md. Everything that changes features is in the cache config."""

    batch_size: int = 32
    views: Sequence[str] = ("orig",)
    resize: str = "squash"
    dtype: str = "float32"
    strict: bool = False
    shard: tuple[int, int] | None = None
    splits: Sequence[str] | None = None
    workers: int = 2
    wait: float | None = None


@dataclass
class ExtractResult:
    """What one extract call did (rows computed vs reused, files skipped with reasons, speed)."""

    cache_path: Path
    n_files: int
    n_unique: int
    rows_computed: int
    rows_reused: int
    duplicates: int
    skipped: list[tuple[str, str]]
    seconds: float
    images_per_s: float
    feature_dim: int
    timings: dict[str, float] = field(default_factory=dict)   # phase -> seconds (build, hash, stream)
    notes: list[str] = field(default_factory=list)            # what the user should know (mixed rows)
    rows_copied: int = 0  # of rows_reused: copied from a cache of the same settings for another folder
    # of skipped: entries discovery left out (hidden, other extensions, broken links), which are not among
    # n_files; the rest of skipped are image files that could not be read or decoded
    n_left_out: int = 0


@dataclass
class ExtractStopped:
    """What an interrupted extract left in its cache file; attached to the KeyboardInterrupt (or the CLI's
    SIGTERM, a subclass) as ``extract_stopped`` once the rows in flight are on disk.

    Why: Ctrl-C printed only "finished work is saved; run the same command to resume", so a user could not
    tell whether 10 or 990 of 1,000 images were kept, or how much a resume had left to compute.
    """

    cache_path: Path
    rows_wanted: int    # (image, view) rows this extract was asked for (unique images x views)
    rows_reused: int    # of them, in the cache before this run computed any
    rows_computed: int  # of them, computed by this run and on disk
    n_views: int

    def sentence(self) -> str:
        """One line with the counts, in images when one view was asked for."""
        unit = "images" if self.n_views == 1 else "rows (image x view)"
        held = self.rows_reused + self.rows_computed
        return (f"{held:,} of the {self.rows_wanted:,} {unit} this extract wants are in "
                f"{self.cache_path.name} ({self.rows_computed:,} computed before the interruption, "
                f"{self.rows_reused:,} there before); the same command computes the remaining "
                f"{self.rows_wanted - held:,}.")


@dataclass
class _Item:
    """One unique image to compute: its key, the records that share its bytes, and missing views."""

    key: str
    records: list[ImageRecord]
    views: list[Any]           # images.View objects still missing from the cache


@dataclass
class _Batch:
    keys: list[str]
    views: list[str]
    paths: list[str]
    pixels: np.ndarray         # uint8 [batch_size, S, S, 3]; only the first len(keys) rows are real


_DONE = object()


def parse_shard(text: str) -> tuple[int, int]:
    """Parse ``I/N`` (0 <= I < N) into a tuple; a malformed value is a one-sentence ConfigError."""
    try:
        i_text, n_text = text.split("/")
        shard = (int(i_text), int(n_text))
    except ValueError:
        raise ConfigError(f"bad --shard '{text}'; write it as I/N with 0 <= I < N, e.g. 0/4") from None
    return _check_shard(shard, text)


def _check_shard(shard: tuple[int, int], text: str | None = None) -> tuple[int, int]:
    i, n = shard
    if n < 1 or not 0 <= i < n:
        raise ConfigError(f"bad --shard '{text or f'{i}/{n}'}'; write it as I/N with 0 <= I < N, e.g. 0/4")
    return shard


def in_shard(key: str, shard: tuple[int, int] | None) -> bool:
    """Keys are spread over shards by their sha256 value, so shards never overlap and merge cleanly."""
    return shard is None or int(key, 16) % shard[1] == shard[0]


def check_options(options: ExtractOptions) -> list[Any]:
    """Check options before any expensive work; returns the parsed views."""
    from featcache.images import RESIZE_MODES, parse_views

    if options.batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {options.batch_size}")
    if options.workers < 1:
        raise ConfigError(f"--workers (decode workers) must be at least 1, got {options.workers}")
    if options.resize not in RESIZE_MODES:
        raise ConfigError(f"--resize: unknown mode '{options.resize}'; choose one of: "
                          f"{', '.join(RESIZE_MODES)}")
    if options.dtype not in DTYPES:
        raise ConfigError(f"--dtype: unknown dtype '{options.dtype}'; choose one of: {', '.join(DTYPES)}")
    if options.shard is not None:
        _check_shard(tuple(options.shard))
    views = parse_views(list(options.views) if not isinstance(options.views, str) else options.views)
    if not views:
        raise ConfigError("no views given; use --views orig (or a list such as orig,hflip)")
    return views


def _selected_skips(dataset: Dataset, splits: Sequence[str] | None) -> list[tuple[str, str]]:
    """Discovery's refused files, minus those that live under a split folder that was not selected."""
    if splits is None:
        return list(dataset.skipped)
    wanted = {split_folder(s) or s.lower() for s in splits}
    out = []
    for rel, reason in dataset.skipped:
        top = split_folder(rel.split("/", 1)[0])
        if top is None or top in wanted:
            out.append((rel, reason))
    return out


def _holds_orig(path: Path, keys: Sequence[str]) -> bool:
    """Whether the cache has the orig row of every image: a --views hflip that only adds a view to such a
    cache needs no note saying orig is missing."""
    from featcache import cache as fcache

    try:
        with fcache.CacheReader(path) as reader:
            return bool(np.all(reader.has(list(keys), "orig")))
    except (fcache.CacheError, OSError):
        return False


def _hash_records(records: list[ImageRecord], state: dict) -> None:
    """Background thread body: hash every file, recording results and a live counter."""
    results: list[str | OSError] = []
    for _path, digest in sha256_many([r.path for r in records], workers=_HASH_WORKERS):
        results.append(digest)
        state["done"] = len(results)
    state["results"] = results


def _build_and_hash(records: list[ImageRecord], config: BackboneConfig, progress: ProgressFn | None,
                    build: Callable[[], None] | None) -> tuple[Backbone | None, list[str | OSError],
                                                               dict[str, float]]:
    """Build the backbone in this thread while the files are hashed in another (both take seconds);
    ``build`` is called first (see ``extract``'s ``before_build``); None only hashes (no backbone)."""
    state: dict = {"done": 0}
    t0 = time.perf_counter()
    worker = threading.Thread(target=_hash_records, args=(records, state), name="featcache-hash", daemon=True)
    worker.start()
    backbone = None
    try:
        if build is not None:
            backbone = _build(config, progress, build)
    finally:
        t_build = time.perf_counter() - t0
        while worker.is_alive():
            emit(progress, "hash", state["done"], len(records))
            worker.join(0.1)
    if "results" not in state:
        raise RuntimeError("hashing thread failed")
    emit(progress, "hash", len(records), len(records))
    return backbone, state["results"], {"build": t_build, "build_and_hash": time.perf_counter() - t0}


def _build(config: BackboneConfig, progress: ProgressFn | None, before: Callable[[], None]) -> Backbone:
    before()
    emit(progress, "backbone", 0, None, f"building {config.name}")
    backbone = build_backbone(config)
    emit(progress, "backbone", 1, 1, f"built {config.name}")
    return backbone


@dataclass
class _Described:
    """A cache file's settings known without building the backbone (see ``_described_before``)."""

    config: dict
    path: Path
    feature_dim: int
    input_size: int
    notes: list[str]


def _build_environment() -> dict:
    """What decides what a build gives (random weights, how a file is loaded): featcache's build rules and
    the Keras, backend and numpy versions. A value this process cannot tell (a backend whose version is not
    recorded, such as torch) is None, and None matches nothing (``_described_before``)."""
    from featcache import cache as fcache
    from featcache.runs import keras_backend

    now = fcache._versions()
    backend = keras_backend()  # Keras' own rule (keras.json included) without importing it
    return {"build_rules": now.get("build_rules"), "keras": now.get("keras"), "backend": backend,
            backend: now.get(backend), "numpy": now.get("numpy")}


def _described_before(backbone: BackboneConfig, cache_dir: Path, root: Path, options: ExtractOptions,
                      shard: tuple[int, int] | None) -> _Described | None:
    """This extract's cache file and settings, taken from a cache of this dataset folder that a build of
    the same backbone wrote under the same library versions; None when none did (or two disagree).

    Why: a fully cached extract built the model (seconds; TensorFlow; the weights file) only to learn its
    weights digest and feature size. Every other setting follows from the options and the files they name
    (``describe_unbuilt``), and those two are a function of them under given build rules
    (``backbones.BUILD_RULES``) and Keras, backend and numpy versions, which each cache file records for
    every part of its rows. The path is then the one a build
    gives, so nothing changes but the time; whenever a row is missing the model is built as before.
    """
    from featcache import cache as fcache
    from featcache.backbones import describe_unbuilt, is_saved_model, saved_name

    if not Path(cache_dir).is_dir():
        return None
    cfg = backbone.resolved()
    label = saved_name(cfg.name) if is_saved_model(cfg.name) else cfg.name
    setups = [(config, versions) for config, versions in fcache.recorded_setups(Path(cache_dir), root)
              if config.get("backbone") == label and config.get("pooling") == cfg.pooling]
    unbuilt = describe_unbuilt(cfg) if setups else None  # hashes the weights file: only when it may pay
    if unbuilt is None:
        return None
    env = _build_environment()
    if any(value is None for value in env.values()):
        return None
    found = set()
    for config, versions in setups:
        described = {k: v for k, v in config.items() if k not in ("dataset_root", "resize", "dtype")}
        learnt = {k: v for k, v in described.items() if k not in unbuilt.known}
        if ({k: described.get(k) for k in unbuilt.known} != unbuilt.known
                or not {"weights_digest", "feature_dim"} <= set(learnt) <= unbuilt.from_build
                or not any(all(v.get(k) == want for k, want in env.items()) for v in versions)):
            continue
        found.add(fcache.canonical_json(learnt))
    if len(found) != 1:
        return None
    described = {**unbuilt.known, **json.loads(found.pop())}
    config = fcache.cache_config(root, described, options.resize, options.dtype)
    path = fcache.cache_path(Path(cache_dir), config, shard)
    return _Described(config, path, int(described["feature_dim"]), int(described["image_size"]),
                      list(unbuilt.notes))


def _lock_before_build(held: contextlib.ExitStack, path: Path, wait: float | None) -> None:
    """Hold the writer lock of ``path`` (the file ``_described_before`` named) in ``held`` from now on.

    Why: a second extract of a file another process writes was told so only by its CacheWriter, after
    the build (up to a minute, and the TensorFlow import) it had no use for. Held, not just tried: an
    extract starting during this one's build is refused early too. Without a lock file here (a
    read-only shared cache) it goes on unlocked: the writer meets that OSError where extract handles it.
    """
    from featcache import cache as fcache

    with contextlib.suppress(OSError):
        held.enter_context(fcache.writer_lock(path, wait))


def _lock_unknown_file(held: contextlib.ExitStack, backbone: BackboneConfig, cache_dir: Path, root: Path,
                       options: ExtractOptions, shard: tuple[int, int] | None) -> bool:
    """Hold in ``held``, before the build, a lock named after every option that decides this extract's
    cache file, for when ``_described_before`` cannot name that file (a new cache, or one written under
    other library versions); True when it had to wait for another process (``--wait``).

    Why: the file's name needs the weights digest and feature size, which only the build gives, so a second
    extract of the same data and settings started while the first built its model (the TensorFlow import,
    seconds to a minute) built the model too and met the file's lock only then, to exit 3 ~25 s later. The
    same options name the same file, so it is refused (or waits) now, before any of that. Options that name
    the same file in other spellings get two locks: the file's own lock still refuses the second writer, as
    before. No lock file can be made (a read-only folder): it goes on unlocked, as before; the writer or the
    read-only path says what it must.
    """
    from filelock import FileLock, Timeout

    from featcache import cache as fcache
    from featcache.errors import CacheLockedError

    cfg = backbone.resolved()
    weights = cfg.weights if cfg.weights in ("imagenet", "none") else str(Path(cfg.weights).resolve())
    key = {"dataset_root": str(Path(root).resolve()), "backbone": cfg.name, "weights": weights,
           "pooling": cfg.pooling, "image_size": cfg.image_size, "layer": cfg.layer, "seed": cfg.seed,
           "resize": options.resize, "dtype": options.dtype, "shard": list(shard) if shard else None}
    # named as cache files are (the data folder, backbone, pooling, size and a hash of these options)
    lock_path = fcache.cache_path(Path(cache_dir), key).with_suffix(".extract.lock")
    try:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        os.close(os.open(lock_path, os.O_CREAT | os.O_RDWR, 0o644))
    except OSError:
        return False
    lock = FileLock(str(lock_path))
    waited = False
    try:
        lock.acquire(timeout=0)
    except Timeout:
        waited = True
        try:
            if not options.wait:
                raise
            lock.acquire(timeout=options.wait)
        except Timeout:
            how = (f"it was still held after --wait {options.wait:g}; wait longer" if options.wait
                   else "wait for it to finish or pass --wait SECONDS")
            raise CacheLockedError(
                f"another featcache process is extracting {root} with the same settings into {cache_dir} "
                f"(it holds {lock_path.name}); {how}.") from None
    held.callback(lock.release)
    return waited


def _reused(present: set | dict, keys: list[str], views: list[Any]) -> list[tuple[str, str]]:
    """The (key, view) rows this extract wants that ``present`` holds."""
    return [(k, v.name) for k in keys for v in views if (k, v.name) in present]


def _complete_unbuilt(described: _Described, keys: list[str], views: list[Any],
                      todo: Callable[[Any], list[_Item]], resize: str,
                      skipped: list[tuple[str, str]]) -> int | None:
    """The rows reused when ``described.path`` holds every row this extract wants (those it lacks because
    their image cannot be decoded go to ``skipped``, as a build would find), all intact, and was closed
    cleanly; else None (the backbone is built and a writer takes over, as before)."""
    from featcache import cache as fcache

    if not described.path.is_file():
        return None
    try:
        with fcache.CacheReader(described.path) as reader:
            if reader.config != described.config or reader.feature_dim != described.feature_dim:
                return None
            index = reader.index()
            items = todo(index)
            # a row to compute, a file for a writer to tidy, or a damaged row: build (the digest check last:
            # it reads every row)
            undecodable = _undecodable(items, described.input_size, resize) if reader.clean else None
            if undecodable is None or reader.damaged(_reused(index, keys, views)):
                return None
    except (fcache.CacheError, OSError):
        return None  # the writer says what is wrong with it (an unreadable chunk included)
    skipped.extend(undecodable)
    return len(keys) * len(views) - sum(len(it.views) for it in items)


def _group_by_key(records: list[ImageRecord], digests: list[str | OSError],
                  skipped: list[tuple[str, str]]) -> dict[str, list[ImageRecord]]:
    """Unique keys in first-seen (relpath) order; unreadable files go to ``skipped``."""
    groups: dict[str, list[ImageRecord]] = {}
    for rec, digest in zip(records, digests, strict=True):
        if isinstance(digest, OSError):
            skipped.append((rec.relpath, f"unreadable: {digest.strerror or type(digest).__name__}"))
            continue
        groups.setdefault(digest, []).append(rec)
    return groups


def _complete_read_only(path: Path, exc: OSError, todo: Callable[[Any], list[_Item]], *, size: int,
                        resize: str, skipped: list[tuple[str, str]], keys: list[str],
                        views: list[Any]) -> list[_Item]:
    """The missing rows' items when none of them can be computed (undecodable images); else raise ``exc``.

    Why: a cache shared read-only (a group's folder, a read-only mount) has nothing to lock when nothing is
    missing. Rows missing because their image cannot be decoded are listed as skipped, as a writable
    extract would list them.
    """
    from featcache import cache as fcache

    if not path.is_file():
        _refuse_unwritable(path, exc, None)
    with fcache.CacheReader(path) as reader:
        present = reader.index()
        for kv in reader.damaged(_reused(present, keys, views)):  # to compute again: it must be written
            del present[kv]
        items = todo(present)
    undecodable = _undecodable(items, size, resize)  # what a writable extract would find
    if undecodable is None:  # a row that could be computed is missing: the cache must be written to
        _refuse_unwritable(path, exc, sum(len(it.views) for it in items))
    skipped.extend(undecodable)
    return items


def _refuse_unwritable(path: Path, exc: OSError, missing: int | None) -> NoReturn:
    """Raise the error of a cache that must be written: where its lock file cannot be made or opened (a
    read-only folder or mount, another user's folder), a CacheWriteError naming the folder to make writable
    and the other way out; ``exc`` itself otherwise. ``missing``: the rows this extract must add (None: the
    file does not exist yet).

    Why: the CLI printed the operating system's refusal of ``<cache>.lock``, a file the user never made,
    after the backbone's build; what they must change is the folder."""
    import errno

    from featcache.errors import CacheWriteError, os_reason

    lock = Path(os.fsdecode(exc.filename)) if exc.filename is not None else None
    if (lock is None or lock.name != path.name + ".lock"
            or exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS)):
        raise exc
    need = (f"{path.name} does not exist yet and must be created there" if missing is None
            else f"{missing:,} row(s) of this extract are not in {path.name}, and those that can be "
            "computed must be written to it")
    raise CacheWriteError(
        f"the cache folder {path.parent} is not writable ({os_reason(exc)}, for the lock file {lock.name}): "
        f"{need}; make the folder and its files writable for you, or pass --cache-dir with a writable "
        "folder" + ("" if missing is None else f" (copy {path.name} there first to reuse its rows)")) from exc


def _undecodable(items: list[_Item], size: int, resize: str) -> list[tuple[str, str]] | None:
    """The skip entries (path, reason) of ``items`` when none of them can be decoded, so that there is
    nothing to compute; None as soon as one can (it must go through the backbone)."""
    out = []
    for item in items:
        reason = _decode_item(item, size, resize)
        if not isinstance(reason, str):
            return None
        out.extend((rec.relpath, reason) for rec in item.records)
    return out


def extract(dataset: Dataset, backbone: BackboneConfig, cache_dir: Path, options: ExtractOptions,
            progress: ProgressFn | None = None,
            before_build: Callable[[], None] | None = None) -> ExtractResult:
    """Compute every missing (image, view) row of ``dataset`` into its cache file and return a summary.

    ``before_build`` is called once before the backbone is built, and not at all when the cache holds every
    row: the CLI imports the Keras backend there (with its native start-up log filtered), which a cache hit
    then does not wait for.
    """
    before_build = before_build or (lambda: None)
    t0 = time.perf_counter()
    views = check_options(options)
    if Path(cache_dir).exists() and not Path(cache_dir).is_dir():  # else "File exists" from mkdir, later
        raise ConfigError(f"--cache-dir {cache_dir} is a file, not a folder; choose a folder for the caches.")
    records = dataset.select(options.splits)
    skipped = _selected_skips(dataset, options.splits)
    n_left_out = len(skipped)
    shard = tuple(options.shard) if options.shard is not None else None
    with contextlib.ExitStack() as held:
        # a cache this backbone's build wrote before tells its file and settings: build only if rows are
        # missing; without one, the file is known only after the build, so these options' lock comes first
        described = _described_before(backbone, Path(cache_dir), dataset.root, options, shard)
        if described is None and _lock_unknown_file(held, backbone, Path(cache_dir), dataset.root, options,
                                                    shard):
            # waited for another extract of these settings (--wait): the file it wrote may now hold every row
            described = _described_before(backbone, Path(cache_dir), dataset.root, options, shard)
        bb, digests, timings = _build_and_hash(records, backbone, progress,
                                               build=before_build if described is None else None)
        groups = _group_by_key(records, digests, skipped)
        duplicates = sum(len(recs) - 1 for recs in groups.values())
        keys = [k for k in groups if in_shard(k, options.shard)]

        def todo(present: set | dict) -> list[_Item]:
            items = []
            for key in keys:
                missing = [v for v in views if (key, v.name) not in present]
                if missing:
                    items.append(_Item(key, groups[key], missing))
            return items

        rows_computed = rows_copied = 0
        t_stream = time.perf_counter()
        hit = None
        if described is not None:
            hit = _complete_unbuilt(described, keys, views, todo, options.resize, skipped)
            if hit is None:  # rows to compute (or a file to tidy): lock the file, then build
                _lock_before_build(held, described.path, options.wait)
                t_build = time.perf_counter()
                bb = _build(backbone, progress, before_build)
                timings["build"] = time.perf_counter() - t_build
                t_stream = time.perf_counter()
        if hit is not None:
            path, feature_dim, rows_reused = described.path, described.feature_dim, hit
            notes = list(described.notes)  # what a build would have said of itself
        else:
            feature_dim = bb.feature_dim
            path, rows_computed, rows_reused, rows_copied, notes = _extract_built(
                bb, dataset, Path(cache_dir), options, shard, keys, groups, views, todo, skipped, progress)
    timings["stream"] = time.perf_counter() - t_stream
    seconds = time.perf_counter() - t0
    result = ExtractResult(
        cache_path=path, n_files=len(records), n_unique=len(keys), rows_computed=rows_computed,
        rows_reused=rows_reused, duplicates=duplicates, skipped=skipped, seconds=seconds,
        images_per_s=rows_computed / seconds if seconds > 0 else 0.0, feature_dim=feature_dim,
        timings=timings, notes=notes, rows_copied=rows_copied, n_left_out=n_left_out,
    )
    if all(v.name != "orig" for v in views) and not _holds_orig(path, keys):  # then every fit failed
        result.notes.append(f"--views {','.join(v.name for v in views)} has no orig: fit trains, selects and "
                            "tests on orig features (the other views only add to them), and this cache "
                            "lacks orig rows: extract orig too (--views orig,...).")
    # hidden entries (.DS_Store, ._x.jpeg, .ipynb_checkpoints/) are listed but are no lost images: a
    # macOS-made copy of a dataset otherwise failed every --strict run, naming .DS_Store as its first file
    unusable = [(rel, reason) for rel, reason in skipped if not is_hidden_skip(reason)]
    if options.strict and unusable:
        rel, reason = unusable[0]
        err = DataError(
            f"{len(unusable)} file(s) could not be used (first: {rel}: {reason}); the good images are cached "
            "in " + path.name + ", so fix or remove those files, or run without --strict"
        )
        err.result = result  # type: ignore[attr-defined]  # lets the CLI still list what was skipped
        raise err
    return result


def check_batch_memory(batch_size: int, size: int, available: float | None = None) -> None:
    """Refuse a --batch-size whose input buffers cannot fit in the memory available now.

    Why: every forward pass is padded to --batch-size (see the module docstring), so the buffers are that
    size whatever the number of images: --batch-size 100000 on 4 images had the process killed by the
    kernel, 2000000 raised numpy's allocation error as a traceback. The estimate counts the uint8 batches
    alive at once (``_BATCHES_IN_FLIGHT``) and the float32 copy the compiled forward pass makes of one; it
    leaves the network's own activations out, so a batch it passes may still be too large for a big
    backbone, while one it refuses would not fit.
    """
    from featcache.resources import available_memory

    per_image = size * size * 3 * _BYTES_PER_CHANNEL
    free = available_memory() if available is None else available
    if batch_size * per_image <= free:
        return
    largest = int(free // per_image)
    # an upper bound only: naming it as "the largest that would" sent a user to --batch-size 15244, which
    # needs about 140 GB once the network's activations (9.3 MB per image measured for mobilenet-0.75 at
    # 224 px: 1.17 GB peak at batch 32, 3.25 GB at 256) come on top of the buffers
    fits = (f"the buffers alone leave room for --batch-size {largest} at most, and the network's working "
            "memory comes on top (about 9 MB per 224-px image for mobilenet-0.75, more for larger "
            "backbones), so stay well below it (the default is 32)" if largest >= 1
            else "not even --batch-size 1 would; free memory first")
    need = batch_size * per_image / 1e9
    raise ConfigError(f"--batch-size {batch_size} needs about {need:,.1f} GB for its input buffers "
                      f"({_BATCHES_IN_FLIGHT} uint8 batches of {size}x{size}x3 in flight and the forward "
                      "pass's float32 copy of one) but "
                      f"{free / 1e9:,.1f} GB is available; {fits}.")


def _extract_built(bb: Backbone, dataset: Dataset, cache_dir: Path, options: ExtractOptions,
                   shard: tuple[int, int] | None, keys: list[str], groups: dict[str, list[ImageRecord]],
                   views: list[Any], todo: Callable[[Any], list[_Item]], skipped: list[tuple[str, str]],
                   progress: ProgressFn | None) -> tuple[Path, int, int, int, list[str]]:
    """Copy, check and compute the rows with a built backbone; returns (cache path, rows computed, rows
    reused, rows copied, notes)."""
    from featcache import cache as fcache

    config = fcache.cache_config(dataset.root, bb.describe(), options.resize, options.dtype)
    path = fcache.cache_path(cache_dir, config, shard)  # a shard gets "<name>.shard-i-of-n.h5"
    if not path.exists():  # a new cache: refused before its file is made (an existing one: only with work)
        check_batch_memory(options.batch_size, bb.input_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows_computed = 0
    notes: list[str] = list(bb.notes)  # how the backbone was built (ImageNet weights of another size)
    rows_copied, copy_notes = _copy_from_twins(path, config, bb.feature_dim, keys, groups, views, options,
                                               progress)
    notes += copy_notes
    try:
        writer_cm = fcache.CacheWriter(path, config, bb.feature_dim, wait=options.wait,
                                       session={"batch_size": options.batch_size})
    except OSError as exc:  # e.g. a shared cache in a read-only folder: fine if nothing is left to compute
        undecodable = _complete_read_only(path, exc, todo, size=bb.input_size, resize=options.resize,
                                          skipped=skipped, keys=keys, views=views)
        rows_reused = len(keys) * len(views) - sum(len(it.views) for it in undecodable)
    else:
        with writer_cm as writer:
            if writer.cleared_rows:
                notes.append(f"{writer.cleared_rows} row(s) of {path.name} were marked valid behind row "
                             f"{writer.n_valid}, which was not (a damaged valid flag): they are not trusted, "
                             "and those of these images were computed again")
            damaged = writer.damaged(_reused(writer.present(), keys, views))
            if damaged:  # a reused row must be the one written: compute changed ones again, in their place
                writer.redo(damaged)
                notes.append(f"{len(damaged)} row(s) of {path.name} failed their integrity check (changed "
                             "after they were written) and were computed again")
            items = todo(writer.present())
            rows_total = sum(len(it.views) for it in items)
            rows_reused = len(keys) * len(views) - rows_total
            if rows_total:
                # only with rows to compute: a rerun on a complete cache has no batch to hold
                check_batch_memory(options.batch_size, bb.input_size)
                mixed = _mixed_rows_notes(writer, path)  # before reserve records this session
                writer.reserve(rows_total - len(damaged))
                # every forward pass at --batch-size, padded: a resume with fewer missing rows than one
                # batch compiled a smaller one, whose float rounding differed (4e-6) from a fresh extract
                bb.fix_batch_size(options.batch_size)
                stopped = ExtractStopped(path, len(keys) * len(views), rows_reused, 0, len(views))
                odd: list[tuple[str, int, int, int]] = []
                rows_computed = _stream(items, bb, writer, options, skipped, rows_total, progress, stopped,
                                        odd)
                notes += _input_notes(odd, bb.input_size)
                if rows_computed:  # not when every image left failed to decode: no row came from it
                    notes += mixed
            if writer.paths_cut:  # paths are information only, but a cut one must not pass for a real one
                notes.append(f"{writer.paths_cut} row(s) added to {path.name} have a path longer than "
                             f"{fcache.PATH_BYTES:,} bytes: its paths column holds them cut, ending with "
                             "'…' (the features are whole; `featcache cache info` counts them)")
    return path, rows_computed, rows_reused, rows_copied, notes


COPY_BLOCK = 1024  # rows per read/append while copying from a twin cache


def _copy_from_twins(path: Path, config: dict, feature_dim: int, keys: list[str],
                     groups: dict[str, list[ImageRecord]], views: list[Any], options: ExtractOptions,
                     progress: ProgressFn | None) -> tuple[int, list[str]]:
    """Copy the rows ``path`` lacks from caches of the same settings made for another dataset folder (or
    for this one, under another file name).

    Why: a cache's identity includes the dataset's absolute path, so a moved or copied folder (or the
    cache folder carried from the GPU machine that extracted it to the laptop that fits) got a new cache
    and every image went through the backbone again, although rows are keyed by the image's bytes.
    Rows are copied, not shared, so each file stays one (dataset root, settings) as runs record it. Each
    of the source's sessions is recorded again for the rows copied from it (versions, backend, batch
    size, plus ``copied_from``), as `cache merge` records its shards. A twin that cannot be read, or
    whose rows fail their digest check, is passed over with a note (the rows copied before stay):
    another folder's damaged file must not stop this one. Not when extracting a shard (each is a part of
    one folder); a plain extract takes the rows of shard files of its settings (what `cache merge` does).
    Returns (rows copied, notes).
    """
    from featcache import cache as fcache

    if options.shard is not None:
        return 0, []
    copied, notes = 0, []
    for twin in fcache.find_twins(path.parent, config, own=path):
        done = _Copied()
        try:
            with fcache.CacheReader(twin) as reader:
                done.root = str(reader.config.get("dataset_root"))
                if reader.feature_dim == feature_dim:
                    _copy_from(reader, path, config, keys, groups, views, options, progress, done)
        except (fcache.CacheWriteError, fcache.CacheLockedError):
            raise  # this folder's own cache cannot be written: extract says so as it always did
        except (fcache.CacheError, OSError, TypeError, ValueError) as exc:  # a damaged source, whatever way
            notes.append(f"{twin.name}, a cache of the same settings for another folder, was passed over "
                         f"after {done.rows} row(s): {exc}")
        if done.damaged:
            # the finding alone: the error's advice ("run the same extract again") is for the twin's folder
            notes.append(f"{done.damaged} row(s) of {twin.name} failed their integrity check and were not "
                         f"copied (the backbone computes them): {done.why}.")
        if done.rows:
            copied += done.rows
            shard = (fcache.parse_cache_name(twin) or {}).get("shard")
            made_for = (f"a cache of the same settings made for {done.root} (moved or copied images are the "
                        "same bytes)" if done.root != str(config.get("dataset_root"))
                        else f"shard {shard[0]}/{shard[1]} of this cache (as `cache merge` would)" if shard
                        else "a copy of this cache under another name (a merge --out, say)")
            notes.append(f"{done.rows} row(s) copied from {twin.name}, {made_for}: no forward pass for them.")
    return copied, notes


@dataclass
class _Copied:
    """Rows copied from one twin so far (kept when a later block fails) and the folder it was made for."""

    rows: int = 0
    root: str = "?"
    damaged: int = 0  # rows that failed their digest check (computed by the backbone instead)
    why: str = ""


def _copy_from(reader: Any, path: Path, config: dict, keys: list[str], groups: dict[str, list[ImageRecord]],
               views: list[Any], options: ExtractOptions, progress: ProgressFn | None, done: _Copied) -> None:
    """Copy what ``path`` lacks from one twin, one writer session per source session, in the twin's row
    order (blocks of scattered rows read whole spans: quadratic in a file ordered otherwise)."""
    from featcache import cache as fcache

    index = reader.index()
    want = _wanted(keys, views, _present_rows(path), index)  # in the twin's row order
    if not want:
        return  # open no writer: a new file would record the twin's versions as its creator's
    starts, sessions = fcache.source_sessions(reader)
    label = f"copying rows from {reader.path.name}"
    cut = np.searchsorted(np.array([index[kv] for kv in want]), starts[1:])  # sorted rows: one slice each
    for session, part in zip(sessions, np.split(np.array(want, dtype=object), cut), strict=True):
        if not len(part):
            continue
        entry = {**session, "copied_from": reader.path.name,
                 "source_dataset_root": str(reader.config.get("dataset_root"))}
        with fcache.CacheWriter(path, config, reader.feature_dim, wait=options.wait,
                                versions=session.get("versions") or None, session=entry) as writer:
            present = writer.present()  # again, under the lock
            need = [(str(k), str(v)) for k, v in part if (k, v) not in present]
            reserved = False  # reserving records the session: not for a group whose every row is damaged
            for start in range(0, len(need), COPY_BLOCK):
                block, feats = _read_intact(reader, need[start:start + COPY_BLOCK], index, done)
                if block:
                    if not reserved:
                        writer.reserve(len(need) - start)
                        reserved = True
                    done.rows += writer.append([k for k, _ in block], [v for _, v in block],
                                               [groups[k][0].relpath for k, _ in block], feats)
                emit(progress, "copy", done.rows, len(want), label)


def _read_intact(reader: Any, block: list[tuple[str, str]], rows_of: dict, done: _Copied,
                 ) -> tuple[list[tuple[str, str]], np.ndarray | None]:
    """The block's rows whose digest holds: all in one read, or one by one when a row fails (a changed
    row is left to the backbone and counted; the others are as good as ever)."""
    from featcache.errors import DamagedRowsError

    rows = np.array([rows_of[kv] for kv in block], dtype=np.int64)
    try:
        return block, reader.read_rows(rows, labels={int(r): kv for r, kv in zip(rows, block, strict=True)})
    except DamagedRowsError:
        kept, parts = [], []
        for r, kv in zip(rows, block, strict=True):
            try:
                parts.append(reader.read_rows(np.array([r]), labels={int(r): kv}))
                kept.append(kv)
            except DamagedRowsError as exc:
                done.damaged += 1
                done.why = exc.finding
        return kept, (np.concatenate(parts) if parts else None)


def _wanted(keys: list[str], views: list[Any], present: set | dict, index: dict) -> list[tuple[str, str]]:
    """(key, view) pairs missing from ``present`` that ``index`` (a twin's) holds, in the twin's row order."""
    need = [(k, v.name) for v in views for k in keys if (k, v.name) not in present and (k, v.name) in index]
    return sorted(dict.fromkeys(need), key=index.__getitem__)


def _present_rows(path: Path) -> dict:
    """(key, view) -> row of the complete rows of ``path``; empty when it does not exist or cannot be read
    (the writer then decides, under its lock)."""
    from featcache import cache as fcache

    if not path.is_file():
        return {}
    try:
        with fcache.CacheReader(path) as reader:
            return reader.index()
    except fcache.CacheError:
        return {}


def _mixed_rows_notes(writer: Any, path: Path) -> list[str]:
    """A note when the rows a CacheWriter is about to add come from another Keras backend than its last rows.

    Why only a note: those features differ in the last digits (up to ~5e-5), not in meaning, and the file
    records from which row on (``cache info``); a user who wants one kind throughout uses another
    --cache-dir. Another batch size moves them less (~3e-6): it is recorded, not announced.
    """
    previous = (writer.previous_session() or {}).get("versions", {})
    current = writer.session_versions
    before, now = previous.get("backend"), current.get("backend")
    if before and before != now:
        return [f"{path.name} holds rows extracted with the {before} backend; the rows added now come from "
                f"{now}, whose features differ in the last digits. The file records which rows came from "
                "which (`featcache cache info`); use another --cache-dir to keep one backend per file."]
    # another Keras/TensorFlow/JAX build may pick other kernels, another Pillow decode differently
    changed = [f"{lib} {previous[lib]} -> {current.get(lib)}" for lib in NUMERIC_LIBRARIES
               if previous.get(lib) and current.get(lib) and previous[lib] != current[lib]]
    if not changed:
        return []
    return [f"{path.name} holds rows extracted with other library versions ({', '.join(changed)}); the rows "
            "added now may differ from them in the last digits. The file records which rows came from which "
            "(`featcache cache info`); use another --cache-dir to keep one set of versions per file."]


NUMERIC_LIBRARIES = ("keras", "tensorflow", "jax", "pillow", "numpy")
"""Libraries whose version can change the feature values a row gets (kernels, decoding)."""


def _decode_item(item: _Item, size: int,
                 resize: str) -> tuple[list[np.ndarray], tuple[int, int, int]] | str:
    """Decode worker: read, re-check the hash (the file may have changed), decode all missing views.

    Returns the views with the file's (width, height, frames), or the reason it cannot be used."""
    from featcache.images import ImageDecodeError, decode_views_sized

    crash_point("extract.decode")
    path = item.records[0].path
    try:
        data = path.read_bytes()
    except OSError as exc:
        return f"unreadable: {exc.strerror or type(exc).__name__}"
    if sha256_bytes(data) != item.key:
        return "file changed while featcache was reading it; run extract again"
    try:
        return decode_views_sized(data, (size, size), resize, item.views)
    except ImageDecodeError as exc:
        return exc.reason


def _input_notes(odd: list[tuple[str, int, int, int]], size: int) -> list[str]:
    """Notes on the images computed now that the backbone sees otherwise than their files hold them:
    smaller than its input on a side (upscaled; more than UPSCALE_LIMIT times, as predict notes them), or
    several frames (only the first is read). ``odd``: (path, width, height, frames) of such images.

    Why: predict said so of the images it classified, but extract cached an 8 x 8 thumbnail or a 1 x 200
    strip among the X-rays as a 224-px blur without a word, and fit then trained and tested on it.
    """
    from featcache.images import UPSCALE_LIMIT

    notes = []
    small = [o for o in odd if min(o[1], o[2]) < size]
    if small:
        far = [o for o in small if min(o[1], o[2]) * UPSCALE_LIMIT < size]
        rel, w, h, _ = (far or small)[0]
        how = (f", {len(far)} of them more than {UPSCALE_LIMIT} times (under {size / UPSCALE_LIMIT:g} px "
               "a side): their features carry little information" if far else "")
        notes.append(f"{len(small)} image(s) computed now are smaller than the backbone's {size}-px input "
                     f"on a side and were upscaled to it{how} (e.g. {rel}, {w}x{h}).")
    frames = [o for o in odd if o[3] > 1]
    if frames:
        rel, _, _, n = frames[0]
        notes.append(f"{len(frames)} image(s) hold several frames (an animated GIF or a multi-page TIFF; "
                     f"e.g. {rel}, {n} frames): only the first frame of each was extracted; save a frame as "
                     "an image of its own to use it.")
    return notes


class _Producer(threading.Thread):
    """Decodes items in a thread pool (in order) and packs them into fixed-shape uint8 batches."""

    def __init__(self, items: list[_Item], size: int, options: ExtractOptions,
                 skipped: list[tuple[str, str]], odd: list[tuple[str, int, int, int]]) -> None:
        super().__init__(name="featcache-decode", daemon=True)
        self.items = items
        self.size = size
        self.options = options
        self.skipped = skipped
        self.odd = odd  # (path, width, height, frames) of images smaller than the input or of several frames
        self.failed_rows = 0
        self.out: queue.Queue = queue.Queue(maxsize=_PREFETCH_BATCHES)
        self.stop = threading.Event()

    def _put(self, obj: object) -> bool:
        while not self.stop.is_set():
            try:
                self.out.put(obj, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _new_batch(self) -> _Batch:
        s, b = self.size, self.options.batch_size
        return _Batch([], [], [], np.empty((b, s, s, 3), np.uint8))

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # hand any failure to the consumer, which re-raises it
            self._put(exc)

    def _run(self) -> None:
        opts = self.options
        in_flight = max(opts.batch_size, 4 * opts.workers)
        pending: deque[tuple[_Item, Future]] = deque()
        batch = self._new_batch()
        it = iter(self.items)
        with ThreadPoolExecutor(max_workers=opts.workers, thread_name_prefix="featcache-decode") as pool:
            while not self.stop.is_set():
                while len(pending) < in_flight:
                    nxt = next(it, None)
                    if nxt is None:
                        break
                    pending.append((nxt, pool.submit(_decode_item, nxt, self.size, opts.resize)))
                if not pending:
                    break
                item, fut = pending.popleft()
                decoded = fut.result()
                if isinstance(decoded, str):
                    self.failed_rows += len(item.views)
                    self.skipped.extend((r.relpath, decoded) for r in item.records)
                    continue
                decoded, dims = decoded
                if min(dims[:2]) < self.size or dims[2] > 1:
                    self.odd.append((item.records[0].relpath, *dims))
                for view, pixels in zip(item.views, decoded, strict=True):
                    n = len(batch.keys)
                    batch.pixels[n] = pixels
                    batch.keys.append(item.key)
                    batch.views.append(view.name)
                    batch.paths.append(item.records[0].relpath)
                    if len(batch.keys) == opts.batch_size:
                        if not self._put(batch):
                            return
                        batch = self._new_batch()
            if self.stop.is_set():
                pool.shutdown(wait=True, cancel_futures=True)
                return
        if batch.keys:
            self._put(batch)
        self._put(_DONE)


class _ChunkWriter(threading.Thread):
    """Appends computed chunks in its own thread: the two fsyncs of one chunk (I/O wait, ~7 ms for a
    768-d batch here) overlap the next forward pass instead of adding to it."""

    def __init__(self, writer: Any) -> None:
        super().__init__(name="featcache-write", daemon=True)
        self.writer = writer
        self.inbox: queue.Queue = queue.Queue(maxsize=2)   # bounded: at most 2 chunks of features wait
        self.error: BaseException | None = None
        self.written = 0

    def run(self) -> None:
        while True:
            job = self.inbox.get()
            if job is None:
                return
            if self.error is not None:   # keep draining so the producer side never blocks
                continue
            try:
                keys, views, paths, feats = job
                self.writer.append(keys, views, paths, feats)
                crash_point("extract.between_chunks")
                self.written += len(keys)
            except BaseException as exc:  # re-raised in the main thread
                self.error = exc

    def submit(self, keys: list[str], views: list[str], paths: list[str], feats: np.ndarray) -> None:
        if self.error is not None:
            raise self.error
        self.inbox.put((keys, views, paths, feats))

    def finish(self) -> None:
        """Wait until every submitted chunk is on disk (the cache must not close under a write)."""
        self.inbox.put(None)
        self.join()


def _stream(items: list[_Item], bb: Backbone, writer: Any, options: ExtractOptions,
            skipped: list[tuple[str, str]], rows_total: int, progress: ProgressFn | None,
            stopped: ExtractStopped, odd: list[tuple[str, int, int, int]]) -> int:
    """Consume ready batches: forward pass, hand the chunk to the writer thread, report progress.

    Returns the number of rows written. An interruption (Ctrl-C, SIGTERM) carries ``stopped`` with the rows
    written before it, counted once the writer thread has finished. ``odd`` gets the decoded images smaller
    than the input or of several frames (``_Producer``)."""
    producer = _Producer(items, bb.input_size, options, skipped, odd)
    chunks = _ChunkWriter(writer)
    producer.start()
    chunks.start()
    done = 0
    emit(progress, "extract", 0, rows_total)
    try:
        while True:
            batch = producer.out.get()
            if batch is _DONE:
                break
            if isinstance(batch, BaseException):
                raise batch
            n = len(batch.keys)
            crash_point("extract.forward")
            feats = bb(batch.pixels[:n])
            chunks.submit(batch.keys, batch.views, batch.paths, feats)
            done += n
            emit(progress, "extract", done, rows_total - producer.failed_rows)
    except KeyboardInterrupt as exc:
        exc.extract_stopped = stopped  # type: ignore[attr-defined]  # its count is final after the finally
        raise
    finally:
        producer.stop.set()
        chunks.finish()
        producer.join(timeout=30)
        stopped.rows_computed = chunks.written
    if chunks.error is not None:
        raise chunks.error
    emit(progress, "extract", chunks.written, chunks.written)
    return chunks.written
