"""`featcache extract`: run a frozen backbone over a dataset into the HDF5 feature cache.

Thin layer: featcache.extract does the work; this module parses flags, shows a rich progress bar
(images/s, ETA) on stderr and a summary. Strings from the data (file names, reasons) go through
:func:`featcache.cli.text.shown` before rich renders them.
"""
from __future__ import annotations

import json
from pathlib import Path

import typer
from featcache.cli.native_log import import_backend_quietly
from featcache.cli.text import print_table, shown
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from featcache.errors import DataError

MAX_SKIPPED_SHOWN = 20
# One string per paragraph: typer's rich help keeps line breaks, so paragraphs are not wrapped by hand.
HELP = (
    "Extract frozen-CNN features of every image into a resumable HDF5 cache.\n\n"
    "Rows already in the cache are reused, duplicate files are computed once, and an interrupted run "
    "resumes where it stopped. Files that cannot be decoded are skipped and listed with their reason "
    "(exit 0; --strict makes that exit non-zero after the good images are cached).\n\n"
    "Example: featcache extract --data data/chest_xray --backbone vgg16   (the folders `featcache data "
    "download kermany --dest data/chest_xray` makes)"
)
_PHASE_LABELS = {"backbone": "building backbone", "hash": "hashing files", "copy": "copying rows",
                 "extract": "extracting"}


class _RateColumn(ProgressColumn):
    """images/s from rich's own moving speed estimate."""

    def render(self, task) -> Text:  # noqa: ANN001 - rich's Task
        speed = task.finished_speed or task.speed
        return Text(f"{speed:6.1f} img/s" if speed else "     -- img/s", style="cyan")


class _ProgressView:
    """Turns library ProgressEvents into one rich task per phase."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.tasks: dict[str, int] = {}

    def __call__(self, event) -> None:  # noqa: ANN001 - featcache.progress.ProgressEvent
        label = _PHASE_LABELS.get(event.phase, event.phase)
        if event.phase not in self.tasks:
            self.tasks[event.phase] = self.progress.add_task(label, total=event.total)
        self.progress.update(self.tasks[event.phase], completed=event.done, total=event.total)


def result_dict(result) -> dict:  # noqa: ANN001 - featcache.extract.ExtractResult
    """An extract's summary as JSON-able data (`extract --json`, and `run --json` per backbone)."""
    from featcache.datasets import skip_entries  # here: the CLI's start-up imports stay small

    path = Path(result.cache_path)
    return {
        "cache_path": str(path),
        "cache_bytes": path.stat().st_size if path.exists() else None,
        "n_files": result.n_files,
        "n_unique": result.n_unique,
        "rows_computed": result.rows_computed,
        "rows_reused": result.rows_reused,
        "rows_copied": result.rows_copied,
        "duplicates": result.duplicates,
        "skipped": skip_entries(result.skipped),
        "skipped_while_listing": getattr(result, "n_left_out", 0),  # run --json tests pass partial fakes
        "seconds": round(result.seconds, 3),
        "images_per_s": round(result.images_per_s, 2),
        "feature_dim": result.feature_dim,
        "timings": {k: round(v, 3) for k, v in result.timings.items()},
        "notes": list(result.notes),
    }


def _skipped_text(n_skipped: int, n_left_out: int) -> str:
    """The skipped count split by kind. Why: "files" counts image files only, so a skip count that also
    held .DS_Store or notes.txt did not add up (96 files, 10 skipped, 91 rows computed)."""
    bad = n_skipped - n_left_out
    parts = ([f"{bad} of the image files could not be read or decoded"] if bad else []) + (
        [f"{n_left_out} other entr{'y' if n_left_out == 1 else 'ies'} left out while listing the folders"]
        if n_left_out else [])
    return f"{n_skipped} ({'; '.join(parts)})" if parts else "0"


def _time_text(info: dict) -> str:
    """Total time, and the rate of the rows computed once the backbone was built. Why: rows over the whole
    run, backbone build and hashing included, read 10.5 rows/s for a run the bar showed at 58 img/s, and
    0.0 rows/s for a cache that already held everything."""
    seconds, rows = info["seconds"], info["rows_computed"]
    if not rows:
        return f"{seconds:.1f} s (nothing to compute)"
    build = info["timings"].get("build", 0.0)
    stream = info["timings"].get("stream", 0.0)
    rate = f"{rows / stream:.1f} rows/s" if stream > 0 else "-- rows/s"
    return f"{seconds:.1f} s ({build:.1f} s building the backbone; rows computed at {rate})"


def _render_summary(console: Console, result) -> None:  # noqa: ANN001 - ExtractResult
    info = result_dict(result)
    table = Table(title="extract summary", show_header=False)
    table.add_column("what")
    table.add_column("value", overflow="fold")
    size = info["cache_bytes"]
    rows = [
        ("cache file", shown(info["cache_path"])),
        ("cache size", f"{size / 2**20:.1f} MB" if size is not None else "-"),
        ("feature dim", str(info["feature_dim"])),
        ("image files", str(info["n_files"])),
        ("unique images", str(info["n_unique"])),
        ("duplicate files (computed once)", str(info["duplicates"])),
        ("rows computed", str(info["rows_computed"])),
        ("rows reused from cache", str(info["rows_reused"]) + (
            f" ({info['rows_copied']} copied from another cache)" if info.get("rows_copied") else "")),
        ("files skipped", _skipped_text(len(info["skipped"]), info["skipped_while_listing"])),
        ("time", _time_text(info)),
    ]
    for what, value in rows:
        table.add_row(what, value)
    print_table(console, table)
    skipped = result.skipped
    if skipped:
        from featcache.datasets import unusable_first

        st = Table(title=f"skipped files ({len(skipped)})")
        st.add_column("file", overflow="fold")
        st.add_column("reason", overflow="fold")
        for rel, reason in unusable_first(skipped)[:MAX_SKIPPED_SHOWN]:  # .DS_Store & co. last
            st.add_row(shown(rel), shown(reason))
        print_table(console, st)
        if len(skipped) > MAX_SKIPPED_SHOWN:
            console.print(f"... and {len(skipped) - MAX_SKIPPED_SHOWN} more (use --json for the full list)")
    for note in getattr(result, "notes", []):
        console.print(Text.assemble(("note ", "bold"), shown(note)), soft_wrap=True)


def extract_cmd(
    data: Path = typer.Option(
        ..., "--data", help="Dataset folder (Kermany layout, class folders) or a CSV manifest."),
    backbone: str = typer.Option(
        ..., "--backbone", help="Registry name (vgg16, inceptionv3, resnet50, densenet121, densenet201, "
        "xception, mobilenet, mobilenet-0.75) or a saved .keras model."),
    weights: str = typer.Option(
        "imagenet", "--weights",
        help="imagenet (Keras download cache), none (random, seeded) or the path of a weights .h5 file."),
    pooling: str | None = typer.Option(
        None, "--pooling", help="avg, max or flatten (default: the backbone's)."),
    image_size: int | None = typer.Option(
        None, "--image-size", help="Input size in pixels (default: the backbone's; at least its minimum)."),
    resize: str = typer.Option(
        "squash", "--resize", help="squash (aspect not kept, as most of the papers), pad or crop."),
    views: str = typer.Option(
        "orig", "--views", help="Comma-separated views (fit needs orig): orig, hflip, vflip, rot+D, "
        "bright+F, contrast+F, shiftx+F, shifty+F, zoomZ; e.g. orig,hflip,rot+20,bright+0.2."),
    batch_size: int = typer.Option(32, "--batch-size", help="Images per forward pass (and per cache chunk)."),
    dtype: str = typer.Option("float32", "--dtype", help="float32 or float16 (half the features' size)."),
    cache_dir: Path = typer.Option(Path("cache"), "--cache-dir", help="Folder for the cache files."),
    shard: str | None = typer.Option(
        None, "--shard", help="I/N: compute only shard I of N, I from 0 (0/2 and 1/2; merge later)."),
    splits: str | None = typer.Option(
        None, "--splits", help="Comma-separated splits to extract, e.g. train,test (default: all)."),
    layer: str | None = typer.Option(None, "--layer", help="For a saved-model backbone: the feature layer."),
    workers: int = typer.Option(2, "--workers", help="Decode threads running ahead of the forward pass."),
    strict: bool = typer.Option(
        False, "--strict", help="Exit 2 if any file is skipped (the good ones are still cached); hidden "
        "entries such as .DS_Store are listed but not counted."),
    wait: float | None = typer.Option(
        None, "--wait", min=0, help="Seconds to wait if another process writes the same cache file "
        "(default: do not wait; exit 3 at once)."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON on stdout."),
) -> None:
    """Extract frozen-CNN features of every image into a resumable HDF5 cache (help text: HELP)."""
    from featcache.backbones import BackboneConfig
    from featcache.datasets import discover
    from featcache.extract import ExtractOptions, check_options, extract, parse_shard
    from featcache.grids import parse_names

    config = BackboneConfig(backbone, weights=weights, pooling=pooling, image_size=image_size, layer=layer)
    config.resolved()  # bad backbone/pooling/size: one sentence before any slow work
    options = ExtractOptions(
        batch_size=batch_size, views=parse_names(views, "--views"), resize=resize, dtype=dtype, strict=strict,
        shard=parse_shard(shard) if shard else None,
        splits=parse_names(splits, "--splits") if splits is not None else None,
        workers=workers, wait=wait,
    )
    check_options(options)  # bad --views/--resize/--dtype: fail before discovery and the progress display
    dataset = discover(data)
    err_console = Console(stderr=True)
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               _RateColumn(), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
    # a log (nohup, a batch job, `> log 2>&1`) cannot animate a bar: rich drew nothing there until the end,
    # so a 5-minute extract looked hung; it gets dated lines instead, as fit, run and report do
    interactive = err_console.is_interactive
    with Progress(*columns, console=err_console, transient=False,
                  disable=as_json or not interactive) as progress:
        from featcache.cli.text import LogLines

        view = _ProgressView(progress) if interactive or as_json else LogLines(err_console)
        try:
            # the backend is imported only for a build: a fully cached extract needs neither (seconds)
            result = extract(dataset, config, cache_dir, options, progress=view,
                             before_build=import_backend_quietly)
        except BaseException as exc:
            say_extract_stopped(err_console, exc)  # the CLI's "interrupted: ..." line follows
            partial = getattr(exc, "result", None)   # --strict: show what was saved and skipped, then fail
            if isinstance(exc, DataError) and partial is not None:
                if as_json:  # scripts get the result, skip list included, then the error and exit 2
                    typer.echo(json.dumps(result_dict(partial), indent=2))
                else:
                    _render_summary(err_console, partial)
            raise  # in a pipe no bar was drawn (dated lines instead), so the error comes alone
    if as_json:
        typer.echo(json.dumps(result_dict(result), indent=2))
        return
    _render_summary(Console(), result)


def say_extract_stopped(console: Console, exc: BaseException) -> None:
    """For Ctrl-C or SIGTERM while an extract computed rows (``featcache.extract.ExtractStopped``): how many
    images its cache keeps and how many the same command has left to compute; nothing for other errors.
    `extract`, `run` and `demo` share it, so an interrupted run tells what an interrupted extract tells."""
    stopped = getattr(exc, "extract_stopped", None)
    if isinstance(exc, KeyboardInterrupt) and stopped is not None:
        console.print(Text.assemble(("extract stopped: ", "bold"), stopped.sentence()), soft_wrap=True)


def register(app: typer.Typer) -> None:
    """Add `featcache extract` to the root app."""
    app.command("extract", help=HELP)(extract_cmd)
