"""`featcache run` (extract + fit + report in one go) and `featcache demo` (the same on the bundled data)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import typer
from featcache.cli.fit_cmd import RETRAIN_HELP, VIEW_HELP, layers_option, typed_command
from featcache.cli.native_log import import_backend_quietly
from featcache.cli.report_cmd import make_callback, print_outputs, progress_display
from featcache.cli.text import shown
from rich.console import Console
from rich.markup import escape

from featcache.runs import resumed_epoch

console = Console()


def _summary(result) -> None:
    """Short account of what each stage did, then where the report is."""
    from featcache.datasets import unusable_first

    for note in getattr(result, "notes", []):
        console.print(f"[bold]note[/] {escape(note)}", highlight=False, soft_wrap=True)
    for ex in result.extracts:
        console.print(
            f"[bold]extract[/] {escape(ex.cache_path.name)}: {ex.rows_computed} rows computed, "
            f"{ex.rows_reused} reused, {len(ex.skipped)} file(s) skipped",
            highlight=False,
            soft_wrap=True,  # one line per stage, whatever the terminal's width (log greps find it)
        )
        for rel, reason in unusable_first(ex.skipped)[:3]:  # the first bad files, .DS_Store & co. last
            console.print(f"  skipped {shown(rel)}: {shown(reason)}", highlight=False)
        for note in ex.notes:
            console.print(f"[bold]note[/] {escape(note)}", highlight=False, soft_wrap=True)
    for fr in result.fits:
        for note in fr.notes:
            console.print(f"[bold]note[/] {escape(note)}", highlight=False, soft_wrap=True)
        resumed = sum(1 for run in fr.runs if resumed_epoch(run))
        console.print(
            f"[bold]fit[/] sweep {escape(fr.sweep_id)}: {len(fr.runs)} run(s) trained, "
            f"{len(fr.skipped)} already done" + (f", {resumed} resumed from a checkpoint" if resumed else "")
            + (f", {len(fr.left_out)} undecodable image(s) left out" if fr.left_out else ""),
            highlight=False,
            soft_wrap=True,
        )
    leaders = getattr(result.report, "leaders", None) or []
    if leaders and all(r.get("test_accuracy") is None for r in leaders):  # say why the test column is blank
        from featcache.cli.fit_cmd import NO_TEST_LINE

        console.print(NO_TEST_LINE, soft_wrap=True, highlight=False)
    print_outputs(result.report, console)


@contextlib.contextmanager
def _extract_counts() -> Iterator[None]:
    """On Ctrl-C or SIGTERM during the extract stage, the counts `featcache extract` gives (images kept in
    the cache, images the same command has left to compute), on stderr before the CLI's "interrupted"
    line. Why: an interrupted `run` or `demo` said only "finished work is saved", so its user could not
    tell whether 10 or 990 images were kept, where an interrupted `extract` said so. Entered before the
    progress display, so the line comes after the bar is gone."""
    from featcache.cli.extract_cmd import say_extract_stopped

    try:
        yield
    except KeyboardInterrupt as exc:
        say_extract_stopped(Console(stderr=True, highlight=False), exc)
        raise


def pipeline_dict(result) -> dict:  # noqa: ANN001 - featcache.pipeline.PipelineResult
    """Every stage's outcome as JSON-able data, in the shapes `extract --json` and `fit --json` print."""
    from featcache.cli.extract_cmd import result_dict
    from featcache.cli.fit_cmd import fit_dict
    from featcache.cli.report_cmd import report_dict

    return {
        "notes": list(result.notes),
        "extracts": [result_dict(ex) for ex in result.extracts],
        "fits": [fit_dict(fr) for fr in result.fits],
        "report": None if result.report is None else report_dict(result.report),
    }


def _split(text: str | None, flag: str = "--head") -> list[str]:
    """A comma-separated option; not given (a preset's) is empty, an empty item is refused."""
    from featcache.grids import parse_names

    return parse_names(text, flag) if text else []


def _backend_for(heads: list[str]) -> tuple[Callable[[], None], Callable[[], None] | None]:
    """(before_build, before_train) for run_pipeline: the backend is imported before extract builds a
    backbone and, when a head trains on it (mlp; no --head means a preset, which has one), with TensorFlow
    before that head trains. Why: a run on cached features, or a rerun whose runs are all done, imports
    no TensorFlow (a demo rerun took 23-33 s for it); and a typo is refused before the 18-s import."""
    if not heads or "mlp" in heads:
        return import_backend_quietly, lambda: import_backend_quietly(tensorflow_too=True)
    return import_backend_quietly, None


def register(app: typer.Typer) -> None:
    """Add `run` and `demo` to the root app."""

    @app.command(
        "run",
        epilog="Example: featcache run --data chest_xray --backbone mobilenet-0.75 "
        "--head logreg,mlp --grid logreg:C=0.01,0.1,1 --grid mlp:lr=0.001,0.0001 --out reports",
    )
    def run_cmd(
        ctx: typer.Context,
        data: Path = typer.Option(
            ..., "--data", help="Dataset folder (Kermany layout, class folders) or CSV."
        ),
        backbone: str = typer.Option(
            "", "--backbone", help="Backbone name(s), comma-separated (default: the --preset's); several are "
            "fused into one feature vector, as in fit, unless --separate."
        ),
        separate: bool = typer.Option(
            False, "--separate", help="With several --backbone: fit each backbone's features on their own, "
            "so the report compares the backbones side by side (instead of one fused run)."
        ),
        head: str = typer.Option(
            "", "--head", help="Head(s), comma-separated: logreg, mlp, svm, knn (default: the --preset's)."
        ),
        weights: str = typer.Option(
            "imagenet", "--weights", help="imagenet | none | PATH to a weights file."
        ),
        layer: str | None = typer.Option(
            None, "--layer", help="Feature layer of a saved-model backbone (model.keras)."
        ),
        task: str | None = typer.Option(
            None, "--task", help="binary | 3class | folders (default: the --preset's, else binary)."
        ),
        grid: list[str] = typer.Option(
            [],
            "--grid",
            help="KEY=V1,V2 for every head that has KEY, or HEAD:KEY=V1,V2 for one head (repeatable).",
        ),
        layers: str | None = typer.Option(None, "--layers", help="mlp hidden layers, e.g. 1024,512 "
                                          "(default: the --preset's, else 1024,512)."),
        preset: str | None = typer.Option(
            None, "--preset", help="A paper's setup: its backbone, pooling, image size, task, head, grid "
            "and balance (README: Heads, grids and presets)."
        ),
        cv_folds: int = typer.Option(5, "--cv-folds", help="Patient-grouped CV folds (logreg, svm, knn)."),
        val_fraction: float = typer.Option(0.2, "--val-fraction", help="Grouped hold-out fraction (mlp)."),
        test_fraction: float = typer.Option(
            None, "--test-fraction", show_default=False,
            help="For data without a test split: hold out this share of the patients as the test split "
            "(patient-grouped, stratified, seed 0 whatever --seed): test numbers with CIs in the report."),
        refit: bool = typer.Option(
            None, "--refit/--no-refit",
            help="Refit the chosen config on all training data (default: on for CV heads, off for mlp)."),
        metric: str = typer.Option(
            "accuracy", "--metric", help="accuracy | auc | macro_f1: selection, and the report's ranking."),
        threshold: str = typer.Option(
            "youden", "--threshold", help="youden | sensitivity:T, 0 < T <= 1 (chosen on validation)."),
        train_views: str = typer.Option(
            "orig", "--train-views", help="Views used as training rows, comma-separated (extracted too)."),
        tta: bool = typer.Option(False, "--tta", help=VIEW_HELP["tta"]),
        tta_views: str | None = typer.Option(None, "--tta-views", help=VIEW_HELP["tta_views"]),
        aug_views: str | None = typer.Option(None, "--aug-views", help=VIEW_HELP["aug_views"]),
        mlp_precision: str = typer.Option(
            "auto", "--mlp-precision", help="auto | float32 | bfloat16 (fused mlp grids; see fit --help)."),
        mlp_trainer: str = typer.Option(
            "auto", "--mlp-trainer", help="auto | tf | jax (fused mlp grids; see fit --help)."),
        balance: str | None = typer.Option(
            None, "--balance", help="none | undersample | undersample-subtypes | oversample (default: the "
            "--preset's, else none)."),
        seed: int = typer.Option(0, "--seed", help="Seed of splits, resampling and training."),
        tag: list[str] = typer.Option([], "--tag", help="Tag the runs (repeatable)."),
        retrain: bool = typer.Option(False, "--retrain", help=RETRAIN_HELP),
        pooling: str | None = typer.Option(
            None, "--pooling", help="avg, max or flatten (default: the --preset's, else the backbone's)."),
        image_size: int | None = typer.Option(
            None, "--image-size", help="Input size in pixels (default: the --preset's, else the backbone's)."
        ),
        resize: str = typer.Option(
            "squash", "--resize", help="squash (aspect not kept, as most of the papers), pad or crop."),
        dtype: str = typer.Option("float32", "--dtype", help="Cached features: float32 or float16."),
        views: str = typer.Option(
            "orig", "--views", help="Views to extract, comma-separated (orig, hflip, rot+D, ...; see extract "
            "--help). The views --train-views, --tta-views and --aug-views name are extracted too."),
        grid_file: Path | None = typer.Option(  # brackets escaped: rich markup would swallow "[grid]"
            None, "--grid-file", help="TOML file with \\[grid] or \\[\\[grid]] tables of KEY = \\[values] "
            "(one --head only)."),
        batch_size: int = typer.Option(32, "--batch-size", help="Images per forward pass during extraction."),
        wait: float | None = typer.Option(
            None, "--wait", min=0, help="Seconds to wait if another process writes the same "
            "cache file (default: do not wait; exit 3 at once)."),
        cache_dir: Path = typer.Option(Path("cache"), "--cache-dir", help="Feature caches."),
        runs_dir: Path = typer.Option(Path("runs"), "--runs-dir", help="Run store."),
        out: Path = typer.Option(Path("reports"), "--out", help="Report folder."),
        as_json: bool = typer.Option(False, "--json", help="Print what each stage did as JSON (no tables)."),
    ) -> None:
        """Extract features, fit heads and write the report, in one command with one progress display.

        Every stage resumes: cached features and finished runs are reused when you run it again.
        """
        from featcache.extract import ExtractOptions
        from featcache.fit import FitOptions
        from featcache.pipeline import run_pipeline
        from featcache.report import ReportOptions

        fopts = FitOptions(
            task=task,
            preset=preset,
            cv_folds=cv_folds,
            val_fraction=val_fraction,
            test_fraction=test_fraction,
            refit=refit,
            metric=metric,
            threshold=threshold,
            train_views=train_views,
            tta=tta,
            tta_views=tta_views,
            aug_views=aug_views,
            mlp_precision=mlp_precision,
            mlp_trainer=mlp_trainer,
            balance=balance,
            seed=seed,
            tags=tuple(tag),
            retrain=retrain,
            layers=layers_option(layers),
            pooling=pooling,
            image_size=image_size,
            grid_file=grid_file,
            resize=resize,  # checked with the fit's options, before any extraction
            dtype=dtype,
            command=typed_command(ctx),  # run.json's command: this one, as typed
        )
        backbones, heads = _split(backbone, "--backbone"), _split(head)  # bad lists: before the backend
        before_build, before_train = _backend_for(heads)
        with _extract_counts(), progress_display(Console(stderr=True) if as_json else console) as bar:
            result = run_pipeline(
                data,
                backbones,
                heads,
                weights=weights,
                layer=layer,
                cache_dir=cache_dir,
                runs_dir=runs_dir,
                reports_dir=out,
                fit_options=fopts,
                grid_args=grid,
                extract_options=ExtractOptions(batch_size=batch_size, wait=wait, resize=resize, dtype=dtype,
                                               views=tuple(_split(views, "--views")) or ("orig",)),
                report_options=ReportOptions(metric=metric),  # ranked by what selected the configs
                separate=separate,
                progress=make_callback(bar),
                before_build=before_build,
                before_train=before_train,
            )
        if as_json:
            typer.echo(json.dumps(pipeline_dict(result), indent=2, default=str))
        else:
            _summary(result)

    @app.command(
        "demo",
        epilog="Example: featcache demo            (then open reports/report.html)\n\n"
        "Offline: featcache demo --weights none",
    )
    def demo_cmd(
        ctx: typer.Context,
        weights: str = typer.Option(
            "imagenet",
            "--weights",
            help="imagenet (Keras download cache) or none "
            "(random seeded weights: fast, offline, meaningless accuracy).",
        ),
        out: Path | None = typer.Option(None, "--out", help="Report folder (default WORKDIR/reports)."),
        workdir: Path = typer.Option(
            Path("."), "--workdir", help="Where cache/, runs/ and reports/ are written."
        ),
        head: str = typer.Option("logreg,mlp,svm,knn", "--head", help="Heads to train (comma-separated)."),
        wait: float | None = typer.Option(
            None, "--wait", min=0, help="Seconds to wait if another process writes the same "
            "cache file (default: do not wait; exit 3 at once)."),
        as_json: bool = typer.Option(False, "--json", help="Print what each stage did as JSON (no tables)."),
    ) -> None:
        """Run the whole pipeline on 96 bundled Kermany chest X-rays (mobilenet-0.75); print the report path.

        The sample's test split comes from the official training split (see its ATTRIBUTION.md).
        """
        from featcache.pipeline import run_demo

        heads = _split(head)
        before_build, before_train = _backend_for(heads)
        with _extract_counts(), progress_display(Console(stderr=True) if as_json else console) as bar:
            result = run_demo(workdir, weights=weights, out=out, heads=heads, wait=wait,
                              progress=make_callback(bar), command=typed_command(ctx),
                              before_build=before_build, before_train=before_train)
        if as_json:
            typer.echo(json.dumps(pipeline_dict(result), indent=2, default=str))
        else:
            _summary(result)
