"""`featcache runs ls`: list finished runs (id, backbone, head, task, params, val and test metric).

Only runs whose run.json says "done" are listed: a run killed half-way is never shown as a result.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

runs_app = typer.Typer(
    no_args_is_help=True,
    help="List the runs stored by `featcache fit`.\n\nExample: featcache runs ls --runs-dir runs",
)


@runs_app.command("ls")
def ls_cmd(
    runs_dir: Path = typer.Option(Path("runs"), "--runs-dir", help="Where runs are stored."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list instead of a table."),
) -> None:
    """List finished runs with their validation and test metric.

    Example: featcache runs ls --runs-dir runs --json
    """
    from featcache.cli.fit_cmd import fmt, params_text, summary

    from featcache.runs import list_runs

    rows = [summary(r) for r in list_runs(runs_dir)]
    if as_json:
        typer.echo(json.dumps(rows, indent=2, default=str))
        return
    console = Console()
    if not rows:
        console.print(f"No finished runs in {escape(str(runs_dir))}; `featcache fit` creates them.")
        return
    table = Table(title=f"runs in {escape(str(runs_dir))}")
    for col in ("id", "backbone", "head", "task", "params", "metric", "val", "test"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(
            escape(r["id"]),
            escape(str(r["backbone"])),
            escape(str(r["head"])),
            escape(str(r["task"])),
            escape(params_text(r["params"])),
            escape(str(r["metric"])),
            fmt(r["val"]),
            fmt(r["test"]),
        )
    console.print(table)


def register(app: typer.Typer) -> None:
    """Add `featcache runs ...` to the root app."""
    app.add_typer(runs_app, name="runs")
