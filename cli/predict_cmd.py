"""`featcache predict IMAGE... --run RUN_ID`: class probabilities and labels from a stored run.

Thin layer over featcache.predict; image paths and labels are escaped before rich prints them.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import typer
from featcache.cli.extract_cmd import MAX_SKIPPED_SHOWN
from featcache.cli.native_log import import_backend_quietly
from featcache.cli.text import print_table, shown
from rich.console import Console
from rich.markup import escape
from rich.table import Table


def register(app: typer.Typer) -> None:
    """Add `featcache predict` to the root app."""

    @app.command("predict")
    def predict_cmd(
        images: list[Path] = typer.Argument(  # not readable=True: an unreadable file is skipped, not fatal
            None, readable=False, show_default=False,
            help="Image files, or folders of them, to classify."),
        run: str = typer.Option(..., "--run", help="Run id (see `featcache runs ls`)."),
        runs_dir: Path = typer.Option(Path("runs"), "--runs-dir", help="Where runs are stored."),
        as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
        csv_out: Path | None = typer.Option(
            None, "--csv", help="Also write the predictions to this CSV file (image, label, features, "
            "p_<class>..., skipped: each skipped image is a row with its reason; missing folders are made); "
            "the terminal then shows only a summary. `-` prints "
            "the CSV on stdout (the summary goes to stderr)."),
        backbone_file: list[Path] = typer.Option(
            [], "--backbone-file",
            help="Weights file or saved model the run's backbone was built from (matched by SHA-256).",
        ),
        strict: bool = typer.Option(
            False, "--strict", help="Exit 2 if any image is skipped (the others are still classified)."
        ),
        force: bool = typer.Option(
            False, "--force", help="Replace an existing --csv file (without it, one is refused before any "
            "image is classified, so an earlier prediction file is not lost)."),
        images_from: list[Path] = typer.Option(
            [], "--images-from", help="Text file naming images (or folders) to classify, one path per line "
            "(blank lines left out; a relative path is taken from the file's folder), or a CSV whose header "
            "names a path column (a --data manifest: its path column is read); repeatable, and with IMAGES "
            "too."),
    ) -> None:
        """Classify images with a trained run (its backbone settings, head and chosen threshold).

        Example: featcache predict xray1.jpeg new_xrays/ --run 20250101-120000-logreg-0123abcd --csv out.csv

        Images that cannot be read or decoded are skipped and listed with their reason.
        """
        from featcache.cli.report_cmd import make_callback, progress_display

        from featcache.errors import NothingClassifiedError
        from featcache.predict import check_csv_target, predict, read_image_list

        images = [*(images or []), *(Path(p) for f in images_from for p in read_image_list(f))]

        to_stdout = csv_out is not None and str(csv_out) == "-"
        if to_stdout and as_json:
            raise typer.BadParameter("--csv - and --json would both print on stdout; choose one.",
                                     param_hint="--csv")
        if csv_out is not None and not to_stdout:
            check_csv_target(csv_out, replace=force)  # before the forward passes, not after them
        failed: NothingClassifiedError | None = None
        with progress_display(Console(stderr=True)) as bar:  # a folder of thousands of images takes a while

            def quiet_backend() -> None:  # only when Keras is needed (an mlp head, or an uncached image)
                bar.stop()  # its refreshes would land in the captured native log
                import_backend_quietly()
                bar.start()

            try:
                out = predict(images, run, runs_dir, backbone_files=backbone_file,
                              progress=make_callback(bar), before_backend=quiet_backend)
            except NothingClassifiedError as exc:  # --csv is still written: its rows are the skipped images
                if csv_out is None and not as_json:  # (and --json printed: its skipped list says why)
                    raise
                out, failed = exc.result, exc
        if to_stdout:
            from featcache.predict import predictions_csv_text

            typer.echo(predictions_csv_text(out), nl=False)
        elif csv_out is not None:
            from featcache.predict import write_predictions_csv

            written = write_predictions_csv(out, csv_out)
        if failed is not None:  # an error all the same (exit 2), the CSV or JSON there for a script to read
            n = len(out["skipped"])
            if as_json:  # as extract --json --strict: the result, skipped list included, then the error
                typer.echo(json.dumps(out, indent=2))
            _print_skipped(out)
            if csv_out is None:
                raise NothingClassifiedError(f"{failed} The JSON printed above lists the {n} skipped "
                                             "path(s), each with its reason", out) from failed
            where = "printed above" if to_stdout else f"written to {written}"
            raise NothingClassifiedError(f"{failed} The CSV of the {n} skipped path(s), each with its reason "
                                         f"in column skipped, is {where}", out) from failed
        if as_json:
            typer.echo(json.dumps(out, indent=2))
        elif csv_out is not None:
            counts = Counter(p["label"] for p in out["predictions"])
            where = "printed above" if to_stdout else f"written to {escape(str(written))}"
            if out["skipped"]:  # they are rows of the CSV too (column skipped), not only the list below
                where += (f" with the {len(out['skipped'])} skipped image(s) as rows of their own "
                          "(column skipped)")
            Console(stderr=to_stdout).print(
                f"{len(out['predictions'])} image(s) classified ("
                + ", ".join(f"{shown(c)} {counts[c]}" for c in out["classes"]) + f") by {_rule_text(out)}; "
                + where, highlight=False, soft_wrap=True)
            _print_skipped(out)
        else:
            _print_table(out)
        if strict and out["skipped"]:
            raise typer.Exit(2)  # as extract --strict: the status of a user error


def _rule_text(out: dict) -> str:
    """How the labels were decided: "threshold 0.374 on P(PNEUMONIA)" (the run's chosen one), or the most
    probable class. Why in the CSV summary too: a label against a lower probability read as an error."""
    from featcache.runs import threshold_text

    thr = out["threshold"]
    if thr is None:
        return "the most probable class"
    return f"threshold {threshold_text(thr)} on P({shown(out['classes'][1])})"


def _print_table(out: dict) -> None:
    """Predictions as a table, then the skipped images with their reasons (on stderr)."""
    title = f"run {escape(out['run'])} (labels by {_rule_text(out)})"
    table = Table(title=title)
    table.add_column("image", overflow="fold")
    for c in out["classes"]:
        table.add_column(f"P({shown(c)})", justify="right")
    table.add_column("label")
    table.add_column("features")
    with_seen = any(p.get("seen") for p in out["predictions"])
    if with_seen:
        table.add_column("seen")
    with_unusual = any(p.get("unusual") for p in out["predictions"])  # a column only when it says something
    if with_unusual:
        table.add_column("unusual")
    for p in out["predictions"]:
        table.add_row(
            shown(p["image"]),
            *[f"{p['probabilities'][c]:.4f}" for c in out["classes"]],
            f"[bold]{shown(p['label'])}[/]",
            "cache" if p["from_cache"] else "backbone",
            *([("[yellow]training[/]" if p["seen"] == "training" else str(p["seen"]))] if with_seen else []),
            *([("[yellow]yes[/]" if p.get("unusual") else "no")] if with_unusual else []),
        )
    print_table(Console(), table)
    _print_skipped(out)


def _print_skipped(out: dict) -> None:
    """The notes, then the skipped images with their reasons, on stderr."""
    for note in out.get("notes") or []:
        Console(stderr=True).print(f"[bold]note[/] {escape(note)}", highlight=False, soft_wrap=True)
    skipped = out["skipped"]
    if skipped:
        err = Console(stderr=True)
        err.print(f"[yellow]{len(skipped)} image(s) skipped:[/]")
        for s in skipped[:MAX_SKIPPED_SHOWN]:
            err.print(f"  {shown(s['path'])}: {shown(s['reason'])}", highlight=False, soft_wrap=True)
        if len(skipped) > MAX_SKIPPED_SHOWN:
            err.print(f"  ... and {len(skipped) - MAX_SKIPPED_SHOWN} more (use --json for the full list)")
