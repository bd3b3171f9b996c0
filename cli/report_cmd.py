"""`featcache report`: turn a runs folder into report.html / report.md / leaderboard.csv / .json."""

from __future__ import annotations

from pathlib import Path

import typer
from featcache.cli.text import print_table
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from featcache.errors import ConfigError
from featcache.progress import ProgressEvent

console = Console()

METRIC_HELP = (
    "Validation metric that ranks runs: accuracy, balanced_accuracy, macro_f1, auc, average_precision "
    "(binary), sensitivity, specificity, loss or brier (the last two: lower is better)."
)


def progress_display(console: Console) -> Progress:
    """One rich progress bar that follows whatever phase the library reports."""
    return Progress(
        TextColumn("[bold]{task.fields[phase]:<8}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        TextColumn("{task.description}"),
        console=console,
        transient=True,
        # Off where it cannot animate (pipes, CI logs, TERM=dumb): there rich would only print an empty line.
        disable=not console.is_interactive,
    )


def make_callback(bar: Progress):
    """Map ProgressEvents onto one task per phase (messages escaped: they may hold file names)."""
    if bar.disable:  # no animation here (a log, a pipe): dated plain lines instead of nothing
        from featcache.cli.text import LogLines

        return LogLines(Console(stderr=True))  # stderr: stdout keeps the tables and JSON
    tasks: dict[str, int] = {}

    def callback(ev: ProgressEvent) -> None:
        if ev.phase not in tasks:
            tasks[ev.phase] = bar.add_task(escape(ev.message), total=ev.total, phase=ev.phase)
        bar.update(tasks[ev.phase], completed=ev.done, total=ev.total, description=escape(ev.message[:70]))

    return callback


def _leaders_table(result) -> Table | None:
    """The best runs in a few columns, so the terminal answers "which won, and by how much" at once.

    Columns that are the same on every row (backbone, task) are left out, and configs without the settings
    all shown runs of a head share, as in the report's overview plot."""
    from featcache.report.build import is_tied
    from featcache.report.plots import overview_labels

    rows = getattr(result, "leaders", None) or []
    if not rows:
        return None
    metric = result.metric
    grouped = any(r.get("group") for r in rows)  # --group-by: the best run of each group

    def shown_column(k: str) -> bool:
        if grouped and all(str(r.get(k)) == r.get("group") for r in rows):
            return False  # the group column says it already
        return k == "head" or len({str(r.get(k)) for r in rows}) > 1

    varying = [*(["group"] if grouped else []), *(k for k in ("backbone", "head", "task") if shown_column(k))]
    what = "best run of each group" if grouped else "best runs"
    tested = _tested(rows, metric)  # untested, print_outputs says why there is no interval
    # balanced accuracy, average precision and Brier get no bootstrap interval (not in CI_METRICS): a
    # "[95% CI]" header above bare scores promised one the cells did not have
    ci = " [95% CI]" if any(_interval(r, metric) for r in rows) else ""
    # the tie note is printed after the table (print_outputs, _tie_note): as its caption it wrapped at the
    # narrow table's width, mid-sentence
    table = Table(title=f"{what} by validation {metric}", title_justify="left", box=None, pad_edge=False)
    # grouped, every row is its group's #1 (ranks count within groups): a rank column would say nothing
    for name in (*([] if grouped else ["#"]), *varying, "config", f"val {metric}",
                 *([f"test {metric}{ci}"] if tested else [])):
        table.add_column(name, justify="right" if name == "#" or metric in name else "left", overflow="fold")

    def num(value) -> str:
        return "—" if value is None else f"{value:.3f}"

    for r, config in zip(rows, overview_labels(rows), strict=True):
        used = r.get("ranked_by") or metric  # a 3-class group asked for average_precision: ranked by auc
        named = "" if used == metric else f" ({used})"
        test = num(r.get(f"test_{used}"))
        interval = _interval(r, metric)
        if interval:
            test += f" [{interval[0]:.3f}–{interval[1]:.3f}]"
        # "2=" as in the report: tied runs read 1, 2, 3, 4 here while report.md said 1, 2=, 3=, 4
        rank = f"{r['rank']}{'=' if is_tied(r) else ''}"
        table.add_row(*([] if grouped else [rank]), *(escape(str(r.get(k))) for k in varying),
                      escape(config or "(defaults)"), num(r.get(f"val_{used}")) + named,
                      *([test + (named if test != "—" else "")] if tested else []))
    return table


def _interval(row: dict, metric: str) -> tuple[float, float] | None:
    """A leader's 95% interval of its test score in the metric that ranks it, or None where it has none
    (no test split, or a metric bootstrapped for no interval)."""
    used = row.get("ranked_by") or metric
    lo, hi = row.get(f"test_{used}_lo"), row.get(f"test_{used}_hi")
    if row.get(f"test_{used}") is None or lo is None or hi is None:
        return None
    return lo, hi


def _tie_note(result) -> str | None:  # noqa: ANN001 - featcache.report.ReportResult
    """The sentence explaining a leaders table's '=' ranks, or None when no rank shown is tied."""
    from featcache.report.build import is_tied

    rows = getattr(result, "leaders", None) or []
    if any(r.get("group") for r in rows) or not any(is_tied(r) for r in rows):
        return None  # grouped, the table has no rank column to mark
    return f"'=' after a rank: the same validation {result.metric} as another run"


def _tested(rows: list[dict], metric: str) -> bool:
    """Whether any of the leaders has a test score of the metric that ranks it.

    Why: with none, the table's "test ... [95% CI]" column was all "—", and nothing said why the
    validation scores beside it had no interval."""
    return any(r.get(f"test_{r.get('ranked_by') or metric}") is not None for r in rows)


def print_outputs(result, console: Console) -> None:
    """The best runs, then where the report is: what the user needs after the command."""
    from featcache.report.build import NO_VALIDATION_CI

    table = _leaders_table(result)
    if table is not None:
        print_table(console, table)
        tie = _tie_note(result)
        if tie:  # soft_wrap: as the table's caption it was broken at the table's width
            console.print(tie, soft_wrap=True, highlight=False, markup=False)
        if not _tested(getattr(result, "leaders", None) or [], result.metric):
            console.print(f"No test split: {NO_VALIDATION_CI}.", soft_wrap=True, highlight=False)
    random = getattr(result, "random_weights", None) or []
    if random:
        # "mobilenet-0.75 features come from random weights" read as every mobilenet-0.75 run's, with
        # ImageNet runs of it ranked beside: it names the runs (marked so in the table and report)
        console.print(f"[yellow]Random weights: the runs on randomly initialised {escape(', '.join(random))} "
                      "weights (--weights none), not ImageNet, test the pipeline only: their accuracy says "
                      "nothing about the method.[/]")
    by_task = getattr(result, "best_by_task", None) or {}
    # under --group-by task each group is one task: "ranked together ... (--group-by task ranks them apart)"
    # contradicted the flag just given, and the report itself has no such note then
    if by_task and getattr(result, "group_by", None) != "task":
        console.print(f"[yellow]Mixed tasks: runs of {escape(', '.join(by_task))} are ranked together, and "
                      "their scores are not comparable; the report gives each task's best (--group-by task "
                      "ranks them apart).[/]", soft_wrap=True, highlight=False)
    mixed = getattr(result, "mixed_datasets", None) or []
    if mixed:  # the demo's runs beside a user's own read as one ranking: the report warns, so does this
        console.print(f"[yellow]Mixed datasets: runs of {len(mixed)} datasets are ranked together "
                      f"({escape('; '.join(mixed))}); they were tested on different images, so their "
                      "scores are not comparable (--group-by dataset ranks them apart; --id or --tag selects "
                      "one).[/]",
                      soft_wrap=True, highlight=False)
    if by_task:  # one "best" across binary and 3-class runs: the report says there is none
        best = "best per task " + ", ".join(f"{escape(t)} [bold]{escape(i)}[/]" for t, i in by_task.items())
    else:
        best = f"best [bold]{escape(str(result.best_run_id))}[/]"
    runs = f"{result.n_runs} run{'' if result.n_runs == 1 else 's'}"  # "1 runs" read as a slip
    console.print(f"[green]Report written[/] ({runs}; {best}):", soft_wrap=True)
    console.print(f"  HTML      {escape(str(result.html.resolve()))}", soft_wrap=True, highlight=False)
    console.print(f"  Markdown  {escape(str(result.markdown.resolve()))}", soft_wrap=True, highlight=False)
    console.print(
        f"  CSV/JSON  {escape(str(result.csv.resolve()))}, {escape(result.json.name)}",
        soft_wrap=True,
        highlight=False,
    )
    if result.skipped:
        console.print(
            f"[yellow]{len(result.skipped)} run folder(s) left out (unfinished, damaged or unreadable; the "
            "report says why).[/]"
        )


def report_dict(rep) -> dict:  # noqa: ANN001 - featcache.report.ReportResult
    """A report's outcome as JSON-able data (`report --json`, and the "report" of `run --json`): its files,
    the best run (per task where the runs are of several), and the leaders the terminal table shows."""
    def leader(r: dict) -> dict:
        used = r.get("ranked_by") or rep.metric
        lo, hi = r.get(f"test_{used}_lo"), r.get(f"test_{used}_hi")
        return {"rank": r.get("rank"), "group": r.get("group"), "run_id": r.get("run_id"),
                "backbone": r.get("backbone"), "head": r.get("head"), "task": r.get("task"),
                "config": r.get("config"), "metric": used, "val": r.get(f"val_{used}"),
                "test": r.get(f"test_{used}"),
                "test_ci": [lo, hi] if lo is not None and hi is not None else None}

    return {
        "html": str(rep.html.resolve()), "markdown": str(rep.markdown.resolve()),
        "csv": str(rep.csv.resolve()), "json": str(rep.json.resolve()), "n_runs": rep.n_runs,
        "best_run_id": rep.best_run_id, "best_by_task": rep.best_by_task, "metric": rep.metric,
        "random_weights": list(rep.random_weights), "mixed_datasets": list(rep.mixed_datasets),
        "leaders": [leader(r) for r in rep.leaders],
        "left_out": [{"run": rid, "reason": why} for rid, why in rep.skipped]}


def parse_heatmap(value: str | None) -> tuple[str, str] | None:
    from featcache.grids import parse_names

    if value is None:
        return None
    parts = parse_names(value, "--heatmap")
    if len(parts) != 2 or parts[0] == parts[1]:
        raise ConfigError(
            "--heatmap takes two different parameter names separated by a comma, e.g. "
            "--heatmap lr,batch_size."
        )
    return parts[0], parts[1]


def register(app: typer.Typer) -> None:
    """Add the `report` command to the root app."""

    @app.command(epilog="Example: featcache report --runs-dir runs --out reports --group-by head --top 5")
    def report(
        runs_dir: Path = typer.Option(
            Path("runs"), "--runs-dir", help="Runs folder written by `featcache fit`."
        ),
        out: Path = typer.Option(
            Path("reports"), "--out", help="Folder for report.html, report.md and leaderboards."
        ),
        group_by: str | None = typer.Option(
            None, "--group-by", help="Group the leaderboard: backbone, head, task or dataset."
        ),
        top: int | None = typer.Option(
            None, "--top", help="Keep the best N runs (per group with --group-by)."
        ),
        tag: list[str] = typer.Option([], "--tag", help="Only runs carrying this tag (repeatable)."),
        run_id: list[str] = typer.Option(
            [],
            "--id",
            help="Only runs whose id matches this glob or substring (repeatable), e.g. --id '*-mlp-*'.",
        ),
        metric: str | None = typer.Option(
            None, "--metric", show_default=False,
            help=METRIC_HELP + " Default: the metric the runs were selected by (`fit --metric`) when they "
            "all agree, else accuracy."),
        heatmap: str | None = typer.Option(
            None,
            "--heatmap",
            help="Two hyperparameters for the grid heatmap, "
            "e.g. lr,batch_size (default: the two whose heatmap spreads the scores most).",
        ),
        detail: int = typer.Option(
            3, "--detail", min=0,
            help="How many top runs (of each group with --group-by) get per-class metrics, confusion "
            "matrices, ROC and curves.",
        ),
        inspect: bool = typer.Option(
            True,
            "--inspect/--no-inspect",
            help="Re-audit the dataset folder (patients, duplicates) when it still exists.",
        ),
        title: str = typer.Option("featcache report", "--title", help="Title of the report."),
        figures: str | None = typer.Option(
            None, "--figures",
            help="Also write every figure as vector files for papers in report_files/: svg, pdf or svg,pdf "
            "(PNGs are always written; the HTML embeds those).",
        ),
        as_json: bool = typer.Option(
            False, "--json", help="Print the report's files, best run(s) and leaders as JSON (no tables)."),
    ) -> None:
        """Write a self-contained HTML report, a Markdown version and CSV/JSON leaderboards of finished runs.

        Runs are ranked by a validation metric; test metrics (with 95% bootstrap CIs) are shown next to them.
        """
        from featcache.report import ReportOptions, build_report
        from featcache.report.build import parse_figure_formats

        options = ReportOptions(
            metric=metric,
            group_by=group_by,
            top=top,
            tags=tag,
            ids=run_id,
            heatmap=parse_heatmap(heatmap),
            detail=detail,
            inspect_data=inspect,
            title=title,
            figure_formats=parse_figure_formats(figures),
        )
        with progress_display(Console(stderr=True) if as_json else console) as bar:
            result = build_report(runs_dir, out, options, progress=make_callback(bar))
        if as_json:
            import json

            typer.echo(json.dumps(report_dict(result), indent=2, default=str))
        else:
            print_outputs(result, console)
