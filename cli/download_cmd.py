"""`featcache data download kermany`: fetch the official dataset with a progress bar, safely.

Thin by design: flags -> :func:`featcache.download.download_kermany` -> rich output. The `data`
sub-app belongs to cli/data_cmd.py, which calls :func:`register_download`; :func:`register` is a
no-op so the root loader (cli/app.py) may import this module like any other.
"""
from __future__ import annotations

from pathlib import Path

import typer
from featcache.cli.text import print_table
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from featcache.progress import ProgressEvent

console = Console()
err_console = Console(stderr=True)

_KERMANY_HELP = (
    "Download the Kermany et al. (2018) pediatric chest X-rays into DEST/{train,test}/{NORMAL,PNEUMONIA}/."
    "\n\n"
    "Sources: [bold]mendeley[/] (ChestXRay2017.zip from Mendeley Data, doi:10.17632/rscbjbr9sj.2, "
    "CC BY 4.0) or [bold]tfrecord[/] (the copy TensorFlow's pneumonia tutorial reads from "
    "download.tensorflow.org)."
    "\n\n"
    "Downloads are kept in DEST/.downloads and resume after an interruption (rerun the same command). "
    "Each file is checked against a SHA-256: the one given with --sha256, else the one recorded by an "
    "earlier run (no publisher checksum is known to featcache, so the first run computes and records it). "
    "Archive entries with absolute paths, '..', links or device files are refused, and so are zip bombs."
    "\n\n"
    "Examples:\n\n"
    "    featcache data download kermany --dest data/chest_xray\n\n"
    "    featcache data download kermany --dest data/chest_xray --source tfrecord"
)


class _Bars:
    """Turns ProgressEvents into rich bars: bytes for download/hash, counts for extract/convert."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.tasks: dict[tuple[str, str], TaskID] = {}

    def __call__(self, event: ProgressEvent) -> None:
        key = (event.phase, event.message)
        if key not in self.tasks:
            label = {"download": "downloading", "hash": "checking", "extract": "extracting",
                     "convert": "converting"}.get(event.phase, event.phase)
            self.tasks[key] = self.progress.add_task(f"{label} {escape(event.message)}", total=event.total)
        self.progress.update(self.tasks[key], completed=event.done, total=event.total)


def _files_table(result) -> Table:
    table = Table(title="files", show_lines=False)
    table.add_column("file")
    table.add_column("bytes", justify="right")
    table.add_column("sha256", overflow="fold")
    table.add_column("check")
    for f in result.files:
        check = "[green]verified[/]" if f.verified else "[yellow]recorded (no published checksum)[/]"
        how = " (cached)" if f.reused else (" (resumed)" if f.resumed else "")
        table.add_row(escape(f.name) + how, f"{f.size:,}", f.sha256, check)
    return table


def _counts_table(counts: dict[str, dict[str, int]]) -> Table:
    table = Table(title="images")
    table.add_column("split")
    for label in ("NORMAL", "PNEUMONIA"):
        table.add_column(label, justify="right")
    table.add_column("total", justify="right")
    for split in sorted(counts):
        row = counts[split]
        table.add_row(escape(split), *(f"{row.get(lbl, 0):,}" for lbl in ("NORMAL", "PNEUMONIA")),
                      f"{sum(row.values()):,}")
    return table


def kermany(
    dest: Path = typer.Option(..., "--dest", help="Folder that receives train/, test/ "
                              "(and val/ if shipped)."),
    source: str = typer.Option("mendeley", "--source", help="mendeley | tfrecord"),
    url: str | None = typer.Option(None, "--url", help="Download from this http(s) address instead "
                                   "(archive URL, or the base folder of the TFRecord files)."),
    sha256: list[str] | None = typer.Option(None, "--sha256", help="Expected SHA-256 (hex); for several "
                                            "files repeat as NAME=HEX. A mismatch stops before extraction."),
    force: bool = typer.Option(False, "--force", help="Replace the train/ test/ val/ an earlier featcache "
                               "download put in DEST (folders it did not install are never replaced; a "
                               "verified cached download is reused)."),
    timeout: float = typer.Option(60.0, "--timeout", min=1.0, help="Seconds of network silence before "
                                  "giving up (rerun to resume)."),
    image_key: str | None = typer.Option(None, "--tfrecord-image-key", help="tf.train.Example feature with "
                                         "the encoded image (only for Example-format TFRecords; default "
                                         "image)."),
    label_key: str | None = typer.Option(None, "--tfrecord-label-key", help="Example feature with the "
                                         "label (int index NORMAL=0, PNEUMONIA=1, or the name; default "
                                         "label)."),
    filename_key: str | None = typer.Option(None, "--tfrecord-filename-key",
                                            help="Example feature with the original file name (default "
                                            "filename)."),
) -> None:
    from featcache.download import TFRecordFeatures, download_kermany
    from featcache.errors import ConfigError

    keys = {"--tfrecord-image-key": image_key, "--tfrecord-label-key": label_key,
            "--tfrecord-filename-key": filename_key}
    given = [flag for flag, value in keys.items() if value is not None]
    if given and source != "tfrecord":  # it was ignored without a word, then the download went ahead
        raise ConfigError(f"{given[0]} names a feature of the TFRecord files, and --source is {source}; "
                          f"add --source tfrecord, or drop {given[0]}.")

    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
               TimeRemainingColumn())
    # Bars only on a terminal: in logs and CI they would be noise (errors and tables still print).
    quiet = not err_console.is_interactive
    with Progress(*columns, console=err_console, transient=True, disable=quiet) as bars:
        result = download_kermany(
            dest, source=source, url=url, sha256=sha256 or None, force=force, timeout=timeout,
            tfrecord_features=TFRecordFeatures(image=image_key or "image", label=label_key or "label",
                                               filename=filename_key or "filename"),
            progress=_Bars(bars),
        )
    where = escape(str(result.dest))
    if result.already_present:
        console.print(f"{where} already holds the Kermany layout from source {escape(result.source)}; "
                      "nothing to do (use --force to lay it out again).")
        print_table(console, _counts_table(result.counts))
        return
    print_table(console, _files_table(result))
    print_table(console, _counts_table(result.counts))
    for f in result.files:
        if not f.verified:
            console.print(f"[yellow]note:[/] no published SHA-256 for {escape(f.name)}; computed "
                          f"{f.sha256} and recorded it in {escape(str(f.record_path))}. Later runs check the "
                          f"cached file and any new download against it; pin it with --sha256 {f.sha256}.",
                          highlight=False)
    console.print(f"[bold green]done:[/] {result.n_images:,} images in {where} "
                  f"(downloads kept in {escape(str(result.dest / '.downloads'))}).", highlight=False)


def register_download(data_app: typer.Typer) -> None:
    """Add `download kermany` under the `data` sub-app (called by cli/data_cmd.py)."""
    download_app = typer.Typer(
        no_args_is_help=True,
        help="Download public datasets in the layout featcache reads.\n\n"
             "Example:\n\n    featcache data download kermany --dest data/chest_xray",
    )
    download_app.command("kermany", help=_KERMANY_HELP)(kermany)
    data_app.add_typer(download_app, name="download")


def register(app: typer.Typer) -> None:
    """No-op: the command lives under `featcache data` and is added by cli/data_cmd.py."""
