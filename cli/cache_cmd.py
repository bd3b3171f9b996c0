"""`featcache cache ls | info | verify | merge`: look into, check and combine feature caches.

Thin layer: every decision lives in featcache.cache; this module parses flags and renders with rich.
Values from files (paths, dataset roots, view names) go through rich.markup.escape before printing.
"""
from __future__ import annotations

import json
from pathlib import Path

import typer
from featcache.cli.text import print_table
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from featcache import cache as fc

cache_app = typer.Typer(
    no_args_is_help=True,
    help="List, inspect, verify and merge HDF5 feature caches.\n\n"
    "Example: featcache cache ls --cache-dir ./cache",
)


def _mb(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:.1f}"


def _echo_json(obj: object) -> None:
    """Plain JSON on stdout (no rich wrapping or markup) so scripts can parse it."""
    typer.echo(json.dumps(obj, indent=2, sort_keys=True, default=str))


def _weights(config: object) -> str:
    """A cache's weights in a word or two: "ImageNet", "random" (--weights none), or a file by its SHA-256.

    Why: `featcache demo` and `featcache demo --weights none` in one folder left two rows of the same
    backbone, pooling and size in `cache ls`, the random one told apart only by `cache info`."""
    cfg = config if isinstance(config, dict) else {}
    weights = cfg.get("weights")
    digest = str(cfg.get("weights_file_sha256") or "")[:8]
    if weights == "imagenet":
        return "ImageNet"
    if weights == "none":
        return "random"
    if weights in ("file", "saved") and digest:
        return f"{'saved model' if weights == 'saved' else 'file'} {digest}"
    return str(weights) if weights else "?"


def _gone(folder: Path) -> bool:
    """Whether a cache's dataset folder is known to be gone (a folder that cannot be checked is not)."""
    try:
        return not folder.exists()
    except OSError:
        return False


@cache_app.command("ls")
def ls_cmd(
    cache_dir: Path = typer.Option(Path("cache"), "--cache-dir", help="Folder holding the cache files."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list instead of a table."),
) -> None:
    """List the cache files in a folder with their settings and row counts.

    Example: featcache cache ls --cache-dir ./cache --json
    """
    if not cache_dir.exists() and cache_dir != Path("cache"):  # a mistyped path is not an empty folder
        from featcache.errors import ConfigError

        raise ConfigError(f"--cache-dir {cache_dir} does not exist.")
    if cache_dir.exists() and not cache_dir.is_dir():  # "no cache files in it" would send to extract, which
        from featcache.errors import ConfigError  # refuses a file as --cache-dir

        raise ConfigError(f"--cache-dir {cache_dir} is a file, not a folder.")
    entries = []
    for path in sorted(cache_dir.glob("*.h5")) if cache_dir.is_dir() else []:
        try:
            entries.append(fc.info(path))
        except fc.CacheError as exc:
            entries.append({"path": str(path), "file": path.name, "size_bytes": path.stat().st_size,
                            "error": str(exc)})
    if as_json:
        _echo_json(entries)
        return
    console = Console()
    if not entries:
        console.print(f"No cache files in {escape(str(cache_dir))}; `featcache extract` creates them.")
        return
    table = Table(title=f"caches in {escape(str(cache_dir))}")
    numeric = ("size", "dim", "rows", "MB")
    widest = max(len(e["file"]) for e in entries)
    for col in ("file", "backbone", "weights", "pooling", "size", "dim", "rows", "views", "dtype", "MB"):
        table.add_column(col, overflow="fold", justify="right" if col in numeric else "left",
                         min_width=widest if col == "file" and console.width >= widest + 86 else None)
    for e in entries:
        if "error" in e:
            table.add_row(escape(e["file"]), "[red]unreadable[/]", *[""] * 7, _mb(e["size_bytes"]))
            continue
        rows = str(e["n_rows"]) + ("" if e["clean"] else " [yellow](not closed)[/]")
        table.add_row(escape(e["file"]), escape(str(e["backbone"])), escape(_weights(e.get("config"))),
                      escape(str(e["pooling"])),
                      escape(str(e["image_size"])), str(e["feature_dim"]), rows,
                      escape(",".join(e["views"])), escape(str(e["dtype"])), _mb(e["size_bytes"]))
    print_table(console, table)
    unreadable = [e for e in entries if "error" in e]
    if unreadable:  # why, as --json says: "unreadable" alone did not tell a cut copy from another HDF5 file
        console.print(f"[red]{len(unreadable)} file(s) unreadable[/]:", highlight=False)
        for e in unreadable:
            console.print(f"  - {escape(e['error'])}", soft_wrap=True, highlight=False)
    open_ = [e for e in entries if "error" not in e and not e["clean"]]
    if open_:  # an interrupted extract looked like a finished one of fewer images
        console.print(f"[yellow]{len(open_)} file(s) not closed cleanly[/]: an extract is writing them or "
                      "was interrupted; the same extract command finishes them (see `cache info FILE`).",
                      soft_wrap=True, highlight=False)
    gone = [e for e in entries if e.get("dataset_root") and not e.get("shard")  # shards are not copied from
            and _gone(Path(str(e["dataset_root"])))]
    for e in gone:  # a moved or deleted dataset: say so, since the file name shows only its last folder
        console.print(f"[dim]{escape(e['file'])} was made for {escape(str(e['dataset_root']))}, which no "
                      "longer exists: extract copies its rows when the same images turn up in another "
                      "folder; delete it when they will not.[/]", soft_wrap=True, highlight=False)


@cache_app.command("info")
def info_cmd(
    file: Path = typer.Argument(..., help="A cache file (.h5)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Show a cache file's settings, library versions, rows per view and size.

    Example: featcache cache info cache/train__mobilenet-0.75-avg-224__0123456789ab.h5
    """
    data = fc.info(file)
    if as_json:
        _echo_json(data)
        return
    table = Table(title=escape(data["file"]), show_header=False)
    table.add_column("setting", style="bold")
    table.add_column("value", overflow="fold")
    for key, value in data["config"].items():
        table.add_row(escape(key), escape(str(value)))
    views = ", ".join(f"{v}: {n}" for v, n in data["views"].items()) or "-"
    summary = {
        "config hash": data["config_hash"], "rows": f"{data['n_rows']} ({data['n_images']} images)",
        "views": views, "features": f"{data['feature_dim']}-d {data['dtype']}",
        "size": f"{_mb(data['size_bytes'])} MB", "created": data["created"],
        "closed cleanly": "yes" if data["clean"]
        else f"no ({data['capacity'] - data['n_rows']} incomplete rows)",
        "versions": ", ".join(f"{k} {v}" for k, v in sorted(data["versions"].items())),
    }
    if data["shard"]:
        summary["shard"] = f"{data['shard'][0]} of {data['shard'][1]}"
    if data.get("paths_cut"):
        summary["paths cut"] = (f"{data['paths_cut']} row(s) hold a path longer than {fc.PATH_BYTES:,} "
                                "bytes, stored cut and ending with '…' (the features are whole)")
    if data["sessions"]:
        summary["rows added"] = "; ".join(_session_lines(data["sessions"], data["n_rows"]))
    for key, value in summary.items():
        table.add_row(key, escape(str(value)))
    print_table(Console(), table)


def _session_lines(sessions: list[dict], n_rows: int) -> list[str]:
    """'rows 0-119: tensorflow backend, batch 32 (2026-12-05T21:00:00+00:00)' for each recorded session."""
    from featcache.extract import NUMERIC_LIBRARIES

    def libs(s: dict) -> str:
        v = s.get("versions") or {}
        return ", ".join(f"{lib} {v[lib]}" for lib in NUMERIC_LIBRARIES if v.get(lib))

    differ = len({libs(s) for s in sessions}) > 1  # versions per line only where they changed
    out = []
    for i, s in enumerate(sessions):
        lo = int(s.get("first_row", 0))
        hi = int(sessions[i + 1].get("first_row", n_rows)) if i + 1 < len(sessions) else n_rows
        how = [f"{(s.get('versions') or {}).get('backend', '?')} backend"]
        if "batch_size" in s:
            how.append(f"batch {s['batch_size']}")
        if differ and libs(s):
            how.append(libs(s))
        merged = s.get("merged_from")
        if isinstance(merged, list) and merged:  # files merged before per-shard sessions: one for all
            how.append(f"merged from {len(merged)} shard(s)")
        elif merged:
            how.append(f"merged from {merged}")
        if s.get("copied_from"):
            how.append(f"copied from {s['copied_from']} (made for {s.get('source_dataset_root', '?')})")
        when = s.get("started", "?")
        if s.get("extracted"):  # merged or copied: when the rows were computed, then when they came here
            when = f"extracted {s['extracted']}, {'merged' if merged else 'copied'} {when}"
        rows = f"rows {lo}-{hi - 1}" if hi > lo else f"no rows yet (from row {lo})"  # killed before any
        out.append(f"{rows}: {', '.join(how)} ({when})")
    return out


@cache_app.command("verify")
def verify_cmd(
    file: Path = typer.Argument(..., help="A cache file (.h5)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Check a cache file end to end: readable, settings untouched, every row's digest; exit 1 on problems
    (2 for a file that does not exist).

    Example: featcache cache verify cache/train__vgg16-flatten-224__0123456789ab.h5 --json
    """
    if as_json:
        result = fc.verify(file)
        _echo_json(result)
    else:
        result = _verify_with_bar(file)
        console = Console()
        for warning in result["warnings"]:
            console.print(f"[yellow]warning:[/] {escape(warning)}")
        if result["ok"]:
            console.print(f"[green]OK[/] {escape(str(file))}: {result['n_rows']} rows, every digest matches.")
        else:
            console.print(f"[bold red]{len(result['problems'])} problem(s)[/] in {escape(str(file))}:")
            for problem in result["problems"]:
                console.print(f"  - {escape(problem)}")
    if not result["ok"]:
        raise typer.Exit(1)


def _verify_with_bar(file: Path) -> dict:
    from rich.progress import Progress

    console = Console(stderr=True)
    with Progress(transient=True, console=console, disable=not console.is_interactive) as bar:
        task = bar.add_task("verifying", total=None)
        return fc.verify(file, progress=lambda ev: bar.update(task, completed=ev.done, total=ev.total))


@cache_app.command("merge")
def merge_cmd(
    shards: list[Path] = typer.Argument(..., help="Shard files written by `featcache extract --shard I/N`."),
    out: Path | None = typer.Option(
        None, "--out", help="Merged .h5 file, or a folder for the canonical name (created when the name does "
        "not end in .h5; default: the shards' folder)."
    ),
    wait: float | None = typer.Option(None, "--wait", min=0,
                                      help="Seconds to wait while another process writes (default: "
                                      "do not wait; exit 3 at once)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Combine shard files of one extraction into one cache file (one row per image and view).

    Example: featcache cache merge cache/*.shard-*-of-2.h5
    """
    result = fc.merge(shards, out, wait=wait)
    if as_json:
        _echo_json(result)
        return
    console = Console()
    console.print(f"merged {result['n_shards']} shard(s) into {escape(result['out'])}: "
                  f"{result['n_rows']} rows ({result['rows_added']} added, "
                  f"{result['duplicates']} duplicates skipped)")
    if result["missing_shards"]:
        missing = ", ".join(map(str, result["missing_shards"]))
        console.print(f"[yellow]warning:[/] shards {missing} were not given; the merged cache is incomplete")
    for shard in result.get("unfinished_shards") or []:
        name = fc.parse_cache_name(Path(shard["shard"]))
        # a whole cache given to merge is finished by its extract without --shard (which would make a shard)
        what, extract = (("shard", f"`featcache extract ... --shard {name['shard'][0]}/{name['shard'][1]}`")
                         if name and name["shard"] else ("cache file", "`featcache extract` (no --shard)"))
        console.print(f"[yellow]warning:[/] {what} {escape(shard['shard'])} was not closed cleanly (its "
                      f"extract was interrupted): only its {shard['n_rows']} finished rows were merged, so "
                      f"the merged cache may be incomplete; rerun that {what}'s {extract} command to finish "
                      "it, then merge again", soft_wrap=True, highlight=False)
    if result.get("mixed_shard_counts"):
        counts = " and ".join(map(str, result["mixed_shard_counts"]))
        console.print(f"[yellow]warning:[/] the shards come from splits into {counts} parts, which do not "
                      "add up to one extraction; the merged cache may be incomplete (an extract with the "
                      "same settings fills in what is missing)")


def register(app: typer.Typer) -> None:
    """Attach `featcache cache ...` to the root app."""
    app.add_typer(cache_app, name="cache")
