"""One-command pipeline (extract → fit → report) and the bundled demo.

The stages stay separate library calls (each resumable on its own); this module only chains them,
forwards one progress callback, and tells the report what a reader must know about the data
(e.g. that the demo's test split is not the official one).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from featcache.errors import ConfigError, DataError, NetworkError, WeightsDownloadError
from featcache.faults import crash_point
from featcache.progress import ProgressFn, emit

DEMO_BACKBONE = "mobilenet-0.75"
DEMO_HEADS = ("logreg", "mlp", "svm", "knn")
# Small grids keep the demo at a couple of minutes on 2 CPU cores while still showing a grid view.
DEMO_GRIDS: dict[str, dict[str, list]] = {
    "logreg": {"C": [0.001, 0.01, 0.1, 1.0], "class_weight": [None, "balanced"]},
    "svm": {"kernel": ["linear", "rbf"], "C": [0.1, 1.0]},
    "knn": {"n_neighbors": [3, 7], "weights": ["uniform", "distance"]},
    "mlp": {"layers": [(128,)], "lr": [1e-3, 1e-4], "batch_size": [16], "epochs": [40]},
}


def demo_root() -> Path:
    """The bundled sample (Kermany layout: train/ and test/), located as package data.

    The images sit in ``demo/kermany/`` so that ``demo/ATTRIBUTION.md`` is not part of the dataset.
    """
    root = Path(str(resources.files("featcache") / "data" / "demo" / "kermany"))
    if not (root / "train").is_dir():
        raise DataError(f"the bundled demo sample is missing from {root}; reinstall featcache.")
    return root


@dataclass
class PipelineResult:
    """What each stage produced; ``report.html`` is the path to show the user."""

    extracts: list[Any] = field(default_factory=list)  # featcache.extract.ExtractResult per backbone
    fits: list[Any] = field(default_factory=list)  # featcache.fit.FitResult per head
    report: Any = None  # featcache.report.ReportResult
    notes: list[str] = field(default_factory=list)  # settings the user did not type but that were applied


def split_grid_args(items: Sequence[str], heads: Sequence[str]) -> dict[str, list[str]]:
    """Route ``--grid`` items to heads: ``HEAD:KEY=V`` targets one head, ``KEY=V`` every head that has KEY."""
    from featcache.heads import HEAD_NAMES, get_head

    routed: dict[str, list[str]] = {h: [] for h in heads}
    for item in items:
        target, sep, rest = item.partition(":")
        if sep and target in routed and "=" in rest:
            routed[target].append(rest)
            continue
        if sep and target in HEAD_NAMES and "=" in rest:  # a head's grid, and that head is not run
            raise ConfigError(f"--grid {item} is for the {target} head, and --head is {','.join(heads)}; add "
                              f"{target} to --head, or drop that --grid.")
        key = item.split("=", 1)[0].strip()
        takers = [h for h in heads if key in get_head(h).schema]
        if not takers:
            raise ConfigError(
                f"grid key '{key}' belongs to none of the heads {', '.join(heads)}; "
                "check the spelling or prefix it with the head, e.g. mlp:lr=0.001."
            )
        for h in takers:
            routed[h].append(item)
    return routed


def _apply_preset(
    fopts: Any, preset: Any, backbones: list[str], heads: list[str]
) -> tuple[list[str], list[str], str | None, int | None]:
    """(backbones, heads, pooling, image size) for the extraction, with a ``--preset``'s defaults.

    Why here and not only in fit: the extraction comes first, and fit then reads the file it is handed.
    A preset's pooling and image size (laban2021's 25,088-d flatten, say) must reach the extraction, or
    the fit would train the paper's head on other features without a word.
    """
    pooling, image_size = fopts.pooling, fopts.image_size
    if preset is None:
        return backbones, heads, pooling, image_size
    wrong = [h for h in heads if h != preset.head]
    if wrong:
        raise ConfigError(
            f"preset '{preset.name}' uses the {preset.head} head, not '{wrong[0]}'; drop --head."
        )
    return (backbones or [preset.options["backbone"]], heads or [preset.head],
            pooling or preset.options.get("pooling"), image_size or preset.options.get("image_size"))


def _preset_notes(
    preset: Any, backbones: list[str], pooling: str | None, image_size: int | None
) -> list[str]:
    """Say when a preset's pooling and image size reach a backbone the paper did not use.

    Why: ``--preset mao2018 --backbone mobilenet-0.75`` extracts at mao2018's 300 px, which is right for
    the paper's InceptionV3 but a choice the user did not see; the cache name alone shows it.
    """
    own = preset.options.get("backbone")
    others = [b for b in backbones if b != own]
    if not others or (pooling is None and image_size is None):
        return []
    how = ", ".join(x for x in (f"{pooling} pooling" if pooling else "",
                                f"{image_size} px" if image_size else "") if x)
    return [f"preset {preset.name}: {', '.join(others)} extracted with the preset's {how} (the paper used "
            f"{own}); for other settings run extract and fit separately."]


def _with_needed_views(xopts: Any, fopts: Any, preset: Any) -> Any:
    """Extraction options that also write the views the fit will read besides --views.

    Why: ``--balance oversample`` (vazquez2021's preset sets it), ``--tta`` and ``--train-views`` train or
    test on cached augmented views; extracting only the originals made the fit refuse after the extraction
    had run. The views are the ones the fit names (``--tta-views``, ``--aug-views`` or their defaults).
    """
    from dataclasses import replace

    from featcache.fit import _views as canonical_views
    from featcache.fit import chosen_views

    balance = fopts.balance or (preset.options.get("balance") if preset is not None else None) or "none"
    tta_views, aug_views = chosen_views(fopts, balance)
    views = list(xopts.views)
    # --train-views: those views are training rows, so they must be in the cache too
    wanted = [*canonical_views(fopts.train_views or ("orig",)), *tta_views, *aug_views]
    views += [v for v in dict.fromkeys(wanted) if v not in views]
    return replace(xopts, views=tuple(views)) if views != list(xopts.views) else xopts


def _head_options(fopts: Any, heads: Sequence[str], routed: dict[str, list[str]],
                  head_grids: dict[str, Any] | None) -> dict[str, Any]:
    """Each head's fit options: its share of --grid, its grid file, and --layers for the heads that have
    layers (`run --head logreg,mlp --layers 16` means the mlp's layers, not an error for logreg)."""
    from dataclasses import replace

    from featcache.heads import get_head

    if fopts.grid_file is not None and len(heads) > 1:  # its keys are one head's: which one is ambiguous
        raise ConfigError(f"--grid-file holds one head's grid, and --head is {','.join(heads)}; run one head "
                          "per grid file, or give the grids as --grid HEAD:KEY=V1,V2.")
    with_layers = [h for h in heads if "layers" in get_head(h).schema]
    if fopts.layers is not None and not with_layers:
        raise ConfigError(f"--layers applies to the mlp head only, and --head is {','.join(heads)}; add mlp "
                          "to --head, or drop --layers.")
    # an option meant for some of the heads is not "unused" by the others (fit notes unused ones): each
    # head gets the default of what it does not use, unless no head of the run uses it
    uses = {"val_fraction": lambda h: get_head(h).selection != "cv",
            "cv_folds": lambda h: get_head(h).selection == "cv",
            "mlp_precision": lambda h: h == "mlp", "mlp_trainer": lambda h: h == "mlp"}
    defaults = type(fopts)()
    out = {}
    for head in heads:
        grid = (head_grids or {}).get(head)
        own = {k: getattr(defaults, k) for k, used in uses.items()
               if not used(head) and any(map(used, heads))}
        out[head] = replace(fopts, grid_args=routed[head], grid=grid if grid is not None else fopts.grid,
                            layers=fopts.layers if head in with_layers else None, **own)
    return out


def _check_cv_folds(dataset: Any, task: str, fopts: Any) -> None:
    """Refuse a --cv-folds the training images cannot have (fewer patients, or a largest class with fewer
    images, than folds) before the extraction: the fit's splitter said so only after it. A necessary
    condition only: images found undecodable, or merged patients, can only make the fit's pool smaller,
    so whatever passes here is still checked there; a task the data cannot have is left to the fit. Under
    --test-fraction the folds are checked on what the held-out test split leaves (they were checked on
    all the training images, and 20 folds of 72 patients passed here, then failed in the fit on 15)."""
    from featcache.datasets import task_labels
    from featcache.fit import POOL_SPLITS
    from featcache.splits import grouped_kfold

    records = [r for r in dataset.records if r.split in POOL_SPLITS]
    if not records:
        return
    try:
        y, _ = task_labels(records, task)
    except DataError:
        return
    groups = [r.group for r in records]
    if fopts.test_fraction is None:
        grouped_kfold(y, groups, n_splits=fopts.cv_folds, seed=fopts.seed)
        return
    # the folds come from what the held-out test split leaves: drawn by the fit's own function (groups
    # not yet merged over identical files, as the fit merges them after hashing: a refusal here is the
    # fit's unless such duplicates change the draw)
    import numpy as np

    from featcache.fit import _held_out_test, _test_fraction_advice

    groups_arr, everything = np.array(groups, dtype=object), np.arange(len(records))
    _, pool, test = _held_out_test(dataset.root, records, y, groups_arr, np.full(len(records), "", object),
                                   everything, np.array([], dtype=int), fopts.test_fraction)
    try:
        grouped_kfold(y[pool], groups_arr[pool], n_splits=fopts.cv_folds, seed=fopts.seed)
    except DataError as exc:
        advice = _test_fraction_advice(fopts.test_fraction, groups_arr, pool, test)
        raise DataError(f"{exc} {advice}") from exc


def _check_test_fraction(dataset: Any, fopts: Any) -> None:
    """Refuse --test-fraction on data with a test split of its own before the extraction: the fit said so
    only after it (31 s on the 96-image demo; hours on a large set)."""
    from featcache.fit import refuse_test_fraction_with_test_split

    if fopts.test_fraction is not None:
        refuse_test_fraction_with_test_split(dataset.root, sum(r.split == "test" for r in dataset.records))


def run_pipeline(
    data: str | Path,
    backbones: Sequence[str],
    heads: Sequence[str],
    *,
    weights: str = "imagenet",
    layer: str | None = None,
    cache_dir: Path = Path("cache"),
    runs_dir: Path = Path("runs"),
    reports_dir: Path = Path("reports"),
    extract_options: Any = None,
    fit_options: Any = None,
    grid_args: Sequence[str] = (),
    head_grids: dict[str, dict] | None = None,
    report_options: Any = None,
    separate: bool = False,
    progress: ProgressFn | None = None,
    before_build: Callable[[], None] | None = None,
    after_checks: Callable[[], None] | None = None,
    before_train: Callable[[], None] | None = None,
) -> PipelineResult:
    """Extract features for every backbone, fit every head on them, then write the report.

    Several backbones are fused (one fit on their concatenated features, as ``fit --backbone a,b``);
    ``separate`` fits each backbone's features on their own instead, so the report compares them side by
    side.

    Each stage reuses finished work (cached rows, done runs), so rerunning after a crash or with one
    more head only computes what is new. The report covers the runs of this call's sweeps.
    ``before_build`` is extract's: called before a backbone is built, never when every row is cached.
    ``after_checks``: called once every option, the dataset and the grids have been checked, before the
    first stage.
    ``before_train``: fit's for the mlp head (the one that trains on the Keras backend), called before it
    trains, never when every run is already done (the CLI
    imports TensorFlow there for an mlp head: a rerun with every run done imports none, and a typo is
    refused in a second, not 18).
    """
    from dataclasses import replace

    from featcache.backbones import BackboneConfig, is_saved_model
    from featcache.datasets import discover
    from featcache.extract import ExtractOptions, extract
    from featcache.fit import FitOptions, build_configs, check_options, fit
    from featcache.grids import get_preset
    from featcache.heads import get_head
    from featcache.report import ReportOptions, build_report

    fopts = fit_options or FitOptions()
    preset = get_preset(fopts.preset) if fopts.preset else None  # resolved once: extraction and fit
    backbones, heads, pooling, image_size = _apply_preset(fopts, preset, list(backbones), list(heads))
    if not backbones:
        raise ConfigError("choose at least one backbone with --backbone (e.g. mobilenet-0.75).")
    if not heads:
        raise ConfigError("choose at least one head with --head (e.g. logreg,mlp).")
    if separate and len(backbones) < 2:
        raise ConfigError("--separate compares several backbones; give two or more with --backbone "
                          "(e.g. mobilenet-0.75,vgg16).")
    if layer and not any(is_saved_model(b) for b in backbones):  # else it would be ignored
        raise ConfigError(f"--layer only applies to a saved-model backbone (a .keras file), not to "
                          f"{', '.join(backbones)}.")
    if Path(reports_dir).exists() and not Path(reports_dir).is_dir():  # now, not after the extraction
        raise ConfigError(f"--out {reports_dir} is a file, not a folder; choose a folder for the report "
                          "files.")
    result = PipelineResult()
    if preset is not None:
        result.notes += _preset_notes(preset, backbones, pooling, image_size)
    dataset = discover(data, getattr(fit_options, "manifest", None))
    routed = split_grid_args(grid_args, heads)
    task, _ = check_options(fopts, preset)  # before the extraction, not an hour later in the fit
    head_opts = _head_options(fopts, heads, routed, head_grids)
    for head, hopts in head_opts.items():  # a grid a head refuses fails now, not after the extraction
        build_configs(get_head(head), hopts, preset)
    _check_test_fraction(dataset, fopts)
    if any(get_head(h).selection == "cv" for h in heads):
        _check_cv_folds(dataset, task, fopts)
    xopts = _with_needed_views(extract_options or ExtractOptions(), fopts, preset)
    if after_checks is not None:
        after_checks()
    steps = len(backbones) + len(heads) * (len(backbones) if separate else 1) + 1
    for i, name in enumerate(backbones):
        emit(progress, "pipeline", i, steps, f"extracting {name}")
        # seed 0, as extract and predict use: --seed is the fit's (splits, training); a --weights none
        # backbone drawn with it made another cache that predict could not rebuild
        bb = BackboneConfig(name=name, weights=weights, seed=0,  # layer: saved models only
                            layer=layer if is_saved_model(name) else None, pooling=pooling,
                            image_size=image_size)
        result.extracts.append(extract(dataset, bb, cache_dir, xopts, progress, before_build=before_build))
        crash_point("pipeline.after_extract")
    # the fits read exactly these files: the cache folder may hold other settings of the same backbone
    # (another --weights, say), and those must not be picked instead
    cache_files = {name: ex.cache_path for name, ex in zip(backbones, result.extracts, strict=True)}
    inputs = [[name] for name in backbones] if separate else [list(backbones)]  # fused: one input
    fits = [(head, names) for head in heads for names in inputs]
    for j, (head, names) in enumerate(fits):
        emit(progress, "pipeline", len(backbones) + j, steps, f"fitting {head} on {'+'.join(names)}")
        opts = replace(
            head_opts[head],
            runs_dir=Path(runs_dir),
            cache_dir=Path(cache_dir),
            cache_files={name: cache_files[name] for name in names},
            manifest=dataset.manifest,  # --data manifest.csv: the fit reads the same images, not the folder
            command=list(fopts.command or ["featcache", *sys.argv[1:]]),
        )
        keras_head = get_head(head).name == "mlp"
        result.fits.append(fit(dataset.root, names, head, opts, progress,
                               before_train=before_train if keras_head else None))
        crash_point("pipeline.after_fit")
    emit(progress, "pipeline", steps - 1, steps, "writing report")
    ids = [run.id for fr in result.fits for run in fr.runs] + [
        rid for fr in result.fits for rid in fr.skipped
    ]
    ropts = report_options or ReportOptions()
    if ropts.run_ids is None:
        ropts = replace(ropts, run_ids=ids)
    result.report = build_report(runs_dir, reports_dir, ropts, progress)
    emit(progress, "pipeline", 1, 1, "done")
    return result


def run_demo(
    workdir: str | Path = ".",
    *,
    weights: str = "imagenet",
    out: Path | None = None,
    heads: Sequence[str] = DEMO_HEADS,
    wait: float | None = None,
    progress: ProgressFn | None = None,
    command: Sequence[str] | None = None,
    before_build: Callable[[], None] | None = None,
    after_checks: Callable[[], None] | None = None,
    before_train: Callable[[], None] | None = None,
) -> PipelineResult:
    """The whole pipeline on the bundled sample with mobilenet-0.75 (writes cache/, runs/, reports/).

    ``wait``: seconds to wait for another process that holds the cache file's writer lock (two demos
    started in the same folder), as ``run --wait``. ``command``: the command line run.json records (the
    CLI's, as typed; default: this process's).
    """
    from featcache.extract import ExtractOptions
    from featcache.fit import FitOptions
    from featcache.report import ReportOptions

    if weights not in ("imagenet", "none"):
        raise ConfigError(f"the demo runs with --weights imagenet or none, not '{weights}'.")
    work = Path(workdir)
    if work.exists() and not work.is_dir():
        raise ConfigError(f"--workdir {work} is a file, not a folder; choose a folder for cache/, runs/ and "
                          "reports/.")
    tag = f"demo-{weights}"
    fopts = FitOptions(task="binary", tags=(tag,), cv_folds=3, seed=0, n_boot=500,
                       command=list(command) if command else None)
    ropts = ReportOptions(
        title="featcache demo: pneumonia in pediatric chest X-rays",
        tags=(tag,),
    )
    try:
        return run_pipeline(
            demo_root(),
            [DEMO_BACKBONE],
            heads,
            weights=weights,
            cache_dir=work / "cache",
            runs_dir=work / "runs",
            reports_dir=out or work / "reports",
            fit_options=fopts,
            head_grids={h: DEMO_GRIDS[h] for h in heads if h in DEMO_GRIDS},
            report_options=ropts,
            extract_options=ExtractOptions(wait=wait),
            progress=progress,
            before_build=before_build,
            after_checks=after_checks,
            before_train=before_train,
        )
    except WeightsDownloadError as exc:
        # the library's way out names --weights PATH, which the demo refuses: a new user offline tried it
        raise NetworkError(f"{exc.finding}; {exc.place}, or run `featcache demo --weights none` (random, "
                           "seeded weights: the pipeline runs, its accuracy means nothing)") from exc
