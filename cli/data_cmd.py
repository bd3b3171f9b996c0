"""`featcache data ...`: look at a dataset before spending hours extracting it.

Thin by design: flags -> :func:`featcache.datasets.discover` / :func:`featcache.datasets.inspect`
-> rich tables (or JSON). The `download` sub-command lives in cli/download_cmd.py and is attached
to this sub-app when that module exists.
"""
from __future__ import annotations

import json
from pathlib import Path

import typer
from featcache.cli.text import print_table, shown
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeRemainingColumn
from rich.table import Table

from featcache.progress import ProgressEvent

console = Console()
err_console = Console(stderr=True)

data_app = typer.Typer(
    no_args_is_help=True,
    rich_markup_mode="rich",
    help="Inspect (and download) datasets.\n\nExample:\n\n    featcache data inspect data/chest_xray",
)

_MAX_ROWS = 30  # long lists (duplicates, skipped files) are cut in tables; --json has everything

_INSPECT_HELP = (
    "Show what featcache sees in DIR: images per split x class x subtype, patients, byte-identical "
    "duplicates, patients present in more than one split (a leak), and files skipped with their reason."
    "\n\n"
    "DIR may be a Kermany tree (train/test\\[/val] with NORMAL/PNEUMONIA), any \\[split/]CLASS/ folder "
    "tree, or a CSV manifest (path,label\\[,split]\\[,group])."
    "\n\n"
    "Examples:\n\n"
    "    featcache data inspect data/chest_xray\n\n"
    "    featcache data inspect data/xrays --manifest data/xrays/labels.csv --json > inspect.json"
)


class _PassBars:
    """Progress events of the hashing and decoding passes -> one rich bar each on stderr."""

    _TITLES = {"hash": "hashing files", "decode": "decoding files"}

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.tasks: dict[str, TaskID] = {}

    def __call__(self, event: ProgressEvent) -> None:
        if event.phase not in self.tasks:
            title = self._TITLES.get(event.phase, event.phase)
            self.tasks[event.phase] = self.progress.add_task(title, total=event.total)
        self.progress.update(self.tasks[event.phase], completed=event.done, total=event.total)


def _summary_table(info: dict) -> Table:
    table = Table(title="dataset", show_header=False)
    table.add_column("what")
    table.add_column("value", overflow="fold")
    table.add_row("root", shown(info["root"]))
    table.add_row("layout", info["layout"])
    table.add_row("images", f"{info['n_images']:,} ({info['n_unique']:,} unique)")
    no_id = info.get("n_without_patient_id", 0)
    table.add_row("patients", f"{info['n_patients']:,}" + (
        f" ([yellow]{no_id:,} image(s) without a patient id[/], each counted as one here; fit groups them by "
        f"file stem: {info['stem_groups']:,} group(s))" if no_id else ""))
    table.add_row("duplicate groups", f"{len(info['duplicates']):,}")
    # fit trains on train and val together and tests on test once: only an overlap with test leaks
    leak = len(info["cross_split_patients"])
    leak_test = sum("test" in splits for splits in info["cross_split_patients"].values())
    table.add_row("patients in several splits", _overlap(leak, leak_test))
    xdups = info.get("cross_split_duplicates", [])
    xdup_test = info.get("cross_split_duplicates_with_test", len(xdups))
    table.add_row("duplicates across splits", _overlap(len(xdups), xdup_test))
    clash = len(info.get("conflicting_duplicates", []))
    table.add_row("duplicates with different labels", f"[red]{clash:,}[/]" if clash else "0")
    for twins in info.get("case_twin_labels") or []:  # a manifest's NORMAL and Normal
        spelled = ", ".join(shown(t) for t in twins)
        table.add_row("labels differing only in case",
                      f"[yellow]{spelled}[/]: one class to --task binary and 3class, refused by --task "
                      "folders")
    counts = info.get("counts") or {}
    pool = {s: labels for s, labels in counts.items() if s != "test"}  # what fit trains and selects on
    kinds = (  # (key, what a split's counts hold, the row's words, its hint, who needs what is missing)
        ("splits_lacking_classes", lambda labels: set(labels), "lacks", "an empty or missing class folder?",
         "fit"),
        ("splits_lacking_subtypes", lambda labels: {sub for subs in labels.values() for sub in subs},
         "lacks subtype", "no file named as one", "--task 3class"))
    for key, members, words, hint, who in kinds:
        for split, missing in (info.get(key) or {}).items():
            held = all(any(m in members(labels) for s, labels in pool.items() if s != split) for m in missing)
            names = ", ".join(shown(m) for m in missing)
            table.add_row(f"{shown(split)} split {words}",
                          f"[yellow]{names}[/] ({hint}): {_lacking_why(split, missing, held, who)}")
    table.add_row("skipped files", f"{len(info['skipped']):,}" + (
        "" if info.get("decode_checked", True) else " (files not decoded: --no-decode)"))
    return table


def _lacking_why(split: str, missing: list[str], held: bool, who: str) -> str:
    """What a split lacking a class means to fit. ``held``: another training-side split has every missing
    class (fit pools train and val); where only the test split has one, fit cannot learn it at all."""
    which = "that class" if len(missing) == 1 else "those classes"
    if split == "test":
        return f"{who} cannot compute test AUC or the recall of {which}"
    if held:
        return "fit pools train and val, so the pool still has it"
    return f"only the test split has {which}, so {who} cannot learn {'it' if len(missing) == 1 else 'them'}"


def _overlap(n: int, with_test: int) -> str:
    """A count of cross-split overlaps, red only for those with the test split: train and val are one
    training pool for fit, so their overlap leaks nothing."""
    if not n:
        return "0"
    if not with_test:
        return f"{n:,} (train/val only: fit pools those, no leak)"
    return f"[red]{n:,}[/] ({with_test:,} with test)"


def _counts_table(info: dict) -> Table:
    table = Table(title="images per split x class x subtype")
    for col, justify in (("split", "left"), ("class", "left"), ("subtype", "left"), ("images", "right")):
        table.add_column(col, justify=justify)
    for split, labels in info["counts"].items():
        for label, subtypes in labels.items():
            for subtype, n in subtypes.items():
                table.add_row(shown(split), shown(label), shown(subtype), f"{n:,}")
    table.add_section()
    for split, n in info["patients_per_split"].items():
        table.add_row(shown(split), "[dim]patients[/]", "", f"{n:,}")
    return table


def _list_table(title: str, columns: tuple[str, str], rows: list[tuple[str, str]], total: int) -> Table:
    more = f" (first {_MAX_ROWS} of {total:,}; use --json for all)" if total > len(rows) else ""
    table = Table(title=title + more)
    table.add_column(columns[0], overflow="fold")
    table.add_column(columns[1], overflow="fold")
    for a, b in rows:
        table.add_row(a, b)
    return table


def _render(info: dict) -> None:
    print_table(console, _summary_table(info))
    print_table(console, _counts_table(info))
    dups = info["duplicates"]
    if dups:
        rows = [(str(i + 1), "\n".join(shown(p) for p in g)) for i, g in enumerate(dups[:_MAX_ROWS])]
        print_table(console, _list_table("byte-identical duplicates", ("group", "files"), rows, len(dups)))
    clashes = info.get("conflicting_duplicates", [])
    if clashes:
        rows = [(str(i + 1), "\n".join(shown(p) for p in g)) for i, g in enumerate(clashes[:_MAX_ROWS])]
        title = "byte-identical images with different labels"
        print_table(console, _list_table(title, ("group", "files"), rows, len(clashes)))
    leaks = list(info["cross_split_patients"].items())
    if leaks:
        rows = [(shown(p), ", ".join(shown(s) for s in splits)) for p, splits in leaks[:_MAX_ROWS]]
        title = "patients in more than one split"
        print_table(console, _list_table(title, ("patient", "splits"), rows, len(leaks)))
    skipped = info["skipped"]
    if skipped:
        rows = [(shown(s["path"]), shown(s["reason"])) for s in skipped[:_MAX_ROWS]]
        print_table(console, _list_table("skipped files", ("file", "reason"), rows, len(skipped)))


@data_app.command("inspect", help=_INSPECT_HELP)
def inspect_cmd(
    data: Path = typer.Argument(..., metavar="DIR", help="Dataset folder (or a .csv manifest)."),
    manifest: Path | None = typer.Option(
        None, "--manifest", metavar="CSV",
        help="CSV with header path,label\\[,split]\\[,group]; paths relative to the CSV's folder."),
    as_json: bool = typer.Option(False, "--json", help="Print the full result as JSON on stdout."),
    decode: bool = typer.Option(
        True, "--decode/--no-decode",
        help="Decode every unique file once (small) and list those extract would skip (truncated, not an "
             "image) as skipped rather than counting them; --no-decode only hashes (faster on many large "
             "originals)."),
) -> None:
    from featcache.datasets import discover, inspect

    dataset = discover(data, manifest)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=err_console, transient=True,
                  disable=as_json or not err_console.is_interactive) as progress:
        info = inspect(dataset, progress=_PassBars(progress), decode=decode)
    if as_json:
        typer.echo(json.dumps(info, indent=2))
    else:
        _render(info)


def register(app: typer.Typer) -> None:
    """Attach `featcache data` (and `data download` when cli/download_cmd.py exists)."""
    try:
        from featcache.cli import download_cmd
    except ModuleNotFoundError as exc:
        if exc.name != "featcache.cli.download_cmd":
            raise
    else:
        download_cmd.register_download(data_app)
    app.add_typer(data_app, name="data")
