"""`featcache fit`: train classifier heads on cached features and store one run per config/search.

Thin layer: the protocol lives in featcache.fit; this module parses flags, shows a progress bar over
configs and prints a results table (or JSON). Values from data (params, tags, ids) are escaped.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer
from featcache.cli.native_log import import_backend_quietly
from featcache.cli.text import print_table, shown
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from featcache.errors import ConfigError
from featcache.runs import format_value, params_string, resumed_epoch, threshold_text

RETRAIN_HELP = ("Train configs that already have a finished run again (after an upgrade, say); their old "
                "runs are moved to RUNS_DIR/.retrained, not deleted.")  # fit's and run's
VIEW_HELP = {  # fit's and run's: one wording for the views TTA and oversampling use
    "tta": "Average val/test probabilities of orig and the --tta-views.",
    "tta_views": "Views --tta averages with orig, comma-separated as extract --views spells them (default: "
    "hflip; needs --tta). Never taken from what the cache holds.",
    "aug_views": "Views --balance oversample draws from, comma-separated (default: hflip,rot+20 less the "
    "--train-views; needs oversample). Never taken from what the cache holds.",
}

EPILOG = (
    "Examples:\n\n"
    "featcache fit --data data/chest_xray --backbone mobilenet-0.75 --head logreg\n\n"
    "featcache fit --data data/chest_xray --backbone vgg16,inceptionv3 --head svm --grid C=0.1,1,10\n\n"
    "featcache fit --data data/chest_xray --backbone inceptionv3 --preset mao2018 --task 3class"
)


def layers_option(text: str | None) -> tuple[int, ...] | None:
    """`--layers` of fit and run, checked before any work starts (run would otherwise extract first)."""
    if text is None:
        return None
    from featcache.grids import parse_layers

    try:
        return parse_layers(text)
    except ValueError:
        raise ConfigError(f"--layers expects positive sizes like 1024,512, got '{text}'.") from None


def fmt(value: object) -> str:
    """A metric for tables: 4 decimals, "-" for none. Why fixed decimals: 4 significant digits dropped
    trailing zeros, so a column read "0.974" beside "0.9761" and "1" beside "0.9444"."""
    return format_value(value, float_format=".4f", none="-")


def params_text(params: dict) -> str:
    """A config for tables: ``class_weight=None`` as the report and ``--grid class_weight=none`` write it
    ("-" is what these tables show for a missing metric, and read as a parameter not recorded)."""
    return params_string(params, sep=" ", float_format=".4g")


def shared_params(rows: list[dict]) -> dict:
    """The params with one value on every row of several (a sweep's fixed settings: the table's title says
    them once, and its params column keeps what tells the rows apart)."""
    if len(rows) < 2:
        return {}
    first = rows[0]["params"]
    return {k: v for k, v in first.items()
            if all(k in r["params"] and params_text({k: r["params"][k]}) == params_text({k: v})
                   for r in rows)}


def _fixed_word(n_rows: int, selection: str) -> str:
    """How the title introduces the params it holds: a sweep's shared ones, a search's choice, a config."""
    return "all with " if n_rows > 1 else ("chosen " if selection == "cv" else "config ")


def best_first(rows: list[dict]) -> list[dict]:
    """Rows by validation score, best first (every selection metric is higher-is-better); rows without one
    last; ties keep training order."""
    return sorted(rows, key=lambda r: (r["val"] is None, -(r["val"] or 0.0)))


def summary(run) -> dict:  # noqa: ANN001 - featcache.runs.Run
    """One row of results: id, params, validation and test metrics at 0.5 and the chosen threshold."""
    m = run.metrics()
    val, test = m.get("val") or {}, m.get("test") or {}
    metric = run.info.get("metric", "accuracy")
    backbones = run.info.get("backbones", [])
    caches = run.info.get("caches") if isinstance(run.info.get("caches"), list) else []
    ds = run.info.get("dataset") if isinstance(run.info.get("dataset"), dict) else {}
    return {
        "id": run.id,
        "head": run.info.get("head"),
        "task": run.info.get("task"),
        "backbone": "+".join(b.get("name", "?") for b in backbones),
        # what tells apart runs whose backbone and params read the same (as the report's columns)
        "random_weights": any(b.get("weights") == "none" for b in backbones),
        # a manifest by its file, as the report names it: two manifests of one folder are two datasets
        "dataset": ds.get("manifest") or ds.get("root"),
        "features": "+".join(str(c.get("features_digest") or "?")[:12]
                             for c in caches if isinstance(c, dict)),
        "params": run.info.get("params", {}),
        "metric": metric,
        "val": val.get(metric),
        "test": test.get(metric) if test else None,
        "test_ci": (test.get("ci") or {}).get(metric) if test else None,
        "cv_best_score": m.get("cv_best_score"),
        "threshold": (run.info.get("threshold") or {}).get("chosen"),
        "test_at_threshold": ((test.get("at_threshold") or {}).get(metric)) if test else None,
        "has_test": bool(test),
        "path": str(run.path),
    }


def fit_dict(result) -> dict:  # noqa: ANN001 - featcache.fit.FitResult
    """A fit's outcome as JSON-able data (`fit --json`, and `run --json` per head)."""
    from featcache.datasets import skip_entries  # here: the CLI's start-up imports stay small

    return {
        "sweep_id": result.sweep_id,
        "n_configs": result.n_configs,
        "caches": {name: str(p) for name, p in result.caches.items()},
        "left_out": skip_entries(result.left_out),
        "runs": [summary(r) for r in result.runs],
        "skipped": result.skipped,
        "retired": result.retired,
        "cleaned": result.cleaned,
        "notes": result.notes,
    }


def register(app: typer.Typer) -> None:
    """Add `featcache fit` to the root app."""

    @app.command("fit", epilog=EPILOG)
    def fit_cmd(
        ctx: typer.Context,
        data: Path = typer.Option(
            ..., "--data", help="Dataset folder (Kermany layout, class folders) or CSV."
        ),
        backbone: str = typer.Option(None, "--backbone", help="Backbone name(s), comma-separated; several = "
                                     "feature fusion (default: the --preset's)."),
        head: str = typer.Option(None, "--head", help="logreg | mlp | svm | knn (default: the --preset's)."),
        layers: str = typer.Option(None, "--layers", help="mlp hidden layers, e.g. 1024,512 "
                                          "(default: the --preset's, else 1024,512)."),
        task: str = typer.Option(None, "--task", help="binary | 3class | folders (default: the --preset's "
                                 "task, else binary)."),
        grid: list[str] = typer.Option([], "--grid", help="KEY=V1,V2 (repeatable): replaces that key's "
                                       "values in the head's default grid (or the preset / grid file)."),
        grid_file: Path = typer.Option(  # brackets escaped: rich markup would swallow "[grid]"
            None, "--grid-file", help="TOML file with \\[grid] or \\[\\[grid]] tables of KEY = \\[values]."
        ),
        preset: str = typer.Option(
            None, "--preset", help="mao2018 | laban2021 | vazquez2021 | aucouturier2020: a paper's backbone, "
            "pooling, image size, task, head, grid and balance (README: Heads, grids and presets)."
        ),
        cv_folds: int = typer.Option(5, "--cv-folds", help="Grouped K-fold CV folds (logreg, svm, knn)."),
        val_fraction: float = typer.Option(0.2, "--val-fraction", help="Grouped hold-out fraction (mlp): one "
                                           "fold of the K-fold split whose 1/K is nearest (0.4 -> 33%)."),
        test_fraction: float = typer.Option(
            None, "--test-fraction", show_default=False,
            help="For data without a test split: hold out this share of the patients as the test split "
            "(patient-grouped, stratified, seed 0 whatever --seed): test numbers with CIs in the report."),
        refit: bool = typer.Option(
            None,
            "--refit/--no-refit",
            help="Refit the chosen config on all training data (default: on for CV heads, off for mlp).",
        ),
        metric: str = typer.Option("accuracy", "--metric", help="accuracy | auc | macro_f1 (selection)."),
        balance: str = typer.Option(
            None, "--balance", help="none | undersample | undersample-subtypes | oversample (default: the "
        "--preset's, else none)."),
        train_views: str = typer.Option("orig", "--train-views", help="Cached views used as training rows, "
                                        "comma-separated (orig is always one)."),
        tta: bool = typer.Option(False, "--tta", help=VIEW_HELP["tta"]),
        tta_views: str | None = typer.Option(None, "--tta-views", help=VIEW_HELP["tta_views"]),
        aug_views: str | None = typer.Option(None, "--aug-views", help=VIEW_HELP["aug_views"]),
        threshold: str = typer.Option(
            "youden", "--threshold", help="youden | sensitivity:T, 0 < T <= 1 (chosen on validation)."
        ),
        seed: int = typer.Option(0, "--seed", help="Seed of splits, resampling and training."),
        tag: list[str] = typer.Option([], "--tag", help="Tag the runs (repeatable)."),
        retrain: bool = typer.Option(False, "--retrain", help=RETRAIN_HELP),
        runs_dir: Path = typer.Option(Path("runs"), "--runs-dir", help="Where runs are stored."),
        cache_dir: Path = typer.Option(Path("cache"), "--cache-dir", help="Where feature caches are."),
        pooling: str = typer.Option(
            None, "--pooling", help="Pick the cache with this pooling (avg|max|flatten; default: the "
            "--preset's)."
        ),
        image_size: int = typer.Option(None, "--image-size", help="Pick the cache with this input size "
                                   "(default: the --preset's)."),
        weights: str = typer.Option(
            None, "--weights", help="Pick the cache extracted with these weights (imagenet|none|FILE)."
        ),
        dtype: str = typer.Option(
            None, "--dtype", help="Pick the cache stored in this dtype (float32|float16)."
        ),
        resize: str = typer.Option(
            None, "--resize", help="Pick the cache made with this resize mode (squash|pad|crop)."
        ),
        mlp_precision: str = typer.Option(
            "auto", "--mlp-precision", help="auto | float32 | bfloat16: matmuls of fused mlp grid training "
            "(auto: $FEATCACHE_MLP_PRECISION, else bfloat16 on CPUs with AMX/AVX512-BF16 and, with the JAX "
            "trainer, on accelerators; recorded in run.json)."
        ),
        mlp_trainer: str = typer.Option(
            "auto", "--mlp-trainer", help="auto | tf | jax: implementation of fused mlp grid training "
            "(auto: $FEATCACHE_MLP_TRAINER, else JAX when Keras runs on JAX, e.g. KERAS_BACKEND=jax on a "
            "GPU; recorded in run.json)."
        ),
        as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
    ) -> None:
        """Train heads on cached features with patient-grouped selection; the test split is used once.

        Rerun an interrupted grid to resume it (mlp: fused chunks from their last epoch checkpoint), with
        the same numbers.
        When the cache folder holds several extractions of a backbone (other --weights, --dtype, --resize,
        --pooling or --image-size), pick one with those flags: fit never chooses between them silently.

        Example: featcache fit --data data/chest_xray --backbone mobilenet-0.75 --head mlp --layers 1024,512
        """
        from featcache.fit import FitOptions, fit
        from featcache.grids import PRESETS

        preset_head = PRESETS[preset].head if preset in PRESETS else None
        # only Keras heads need the backend, and only to train: a rerun with every run done imports none
        before_train = ((lambda: import_backend_quietly(tensorflow_too=True))
                        if (head or preset_head) == "mlp" else None)

        opts = FitOptions(
            task=task,
            grid_args=list(grid),
            grid_file=grid_file,
            preset=preset,
            layers=layers_option(layers),
            cv_folds=cv_folds,
            val_fraction=val_fraction,
            test_fraction=test_fraction,
            refit=refit,
            metric=metric,
            balance=balance,
            train_views=train_views,
            tta=tta,
            tta_views=tta_views,
            aug_views=aug_views,
            threshold=threshold,
            seed=seed,
            tags=list(tag),
            retrain=retrain,
            runs_dir=runs_dir,
            cache_dir=cache_dir,
            pooling=pooling,
            image_size=image_size,
            weights=weights,
            dtype=dtype,
            resize=resize,
            mlp_precision=mlp_precision,
            mlp_trainer=mlp_trainer,
            command=typed_command(ctx),
        )
        console = Console(stderr=True)
        if as_json:
            result = fit(data, backbone or [], head, opts, before_train=before_train)
        else:
            with Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("{task.fields[msg]}"),
                console=console,
                transient=True,
                disable=not console.is_interactive,  # in a pipe it would only leave an empty line
            ) as bar:
                ids: dict[str, int] = {}

                def on_event(ev) -> None:  # noqa: ANN001 - ProgressEvent
                    if ev.phase not in ids:
                        ids[ev.phase] = bar.add_task(ev.phase, total=ev.total, msg="")
                    bar.update(ids[ev.phase], completed=ev.done, total=ev.total, msg=escape(ev.message[:60]))

                from featcache.cli.text import LogLines  # a log gets dated lines, not silence

                result = fit(data, backbone or [], head, opts, before_train=before_train,
                             progress=LogLines(console) if bar.disable else on_event)
        rows = [summary(r) for r in result.runs]
        if as_json:
            typer.echo(json.dumps(fit_dict(result), indent=2, default=str))
            return
        out = Console()
        for name, path in result.caches.items():
            out.print(f"features of {shown(name)}: {shown(path)}", soft_wrap=True)
        for note in result.notes:
            out.print(f"[bold]note[/] {escape(note)}", highlight=False, soft_wrap=True)
        if result.left_out:
            out.print(f"{len(result.left_out)} image(s) cannot be decoded and were left out (extract "
                      "skipped them too):", soft_wrap=True)
            for rel, why in result.left_out[:5]:
                out.print(f"  {shown(rel)}: {shown(why)}", soft_wrap=True, highlight=False)
        if result.skipped and result.selection == "cv":  # one run holds the whole CV search
            out.print(f"this search over {result.n_configs} config(s) already has a finished run in "
                      f"{escape(str(runs_dir))} ({escape(result.skipped[0])}); skipped it (--retrain trains "
                      "it again).", soft_wrap=True)
        elif result.skipped:
            out.print(
                f"{len(result.skipped)} of {result.n_configs} config(s) already had a finished run "
                f"in {escape(str(runs_dir))}; skipped them (--retrain trains them again).", soft_wrap=True
            )
        if not rows:
            out.print("Nothing new to train.")
            return
        resumed = [e for e in map(resumed_epoch, result.runs) if e]
        if resumed:
            epochs = ", ".join(map(str, sorted(set(resumed))))
            out.print(f"{len(resumed)} config(s) resumed at epoch {epochs} from a checkpoint.")
        # a grid's fixed settings in the title, once: on every row they folded the varying ones into
        # strips of a few letters in 80 columns; the rows best first, as the report ranks them
        fixed = shared_params(rows) if len(rows) > 1 else rows[0]["params"]
        varying = len(rows) > 1 and any(k not in fixed for r in rows for k in r["params"])
        metric_name = rows[0]["metric"]
        # the metric in the title, not in four headers whose width squeezed the params column
        title = (f"fit sweep {escape(result.sweep_id)}: validation and test {escape(metric_name)}"
                 + (f", {len(rows)} runs, best first" if len(rows) > 1 else "")
                 + (f"; {_fixed_word(len(rows), result.selection)}{shown(params_text(fixed))}"
                    if fixed else ""))
        table = Table(title=title, box=box.SIMPLE_HEAD, show_edge=False, collapse_padding=True)
        for col in ("run", *(("params",) if varying else ()), "val", "test", "test 95% CI", "thr"):
            # the id whole (to copy) and the numbers unbroken; the params fold, one setting per line
            table.add_column(col, overflow="fold", no_wrap=col != "params")
        for r in best_first(rows):
            ci = r["test_ci"]
            table.add_row(
                shown(r["id"]),
                *((shown(params_text({k: v for k, v in r["params"].items() if k not in fixed}) or "-"),)
                  if varying else ()),
                fmt(r["val"]),
                fmt(r["test"]),
                f"{ci[0]:.3f}-{ci[1]:.3f}" if ci else "-",
                threshold_text(r["threshold"], "-"),
            )
        print_table(out, table)
        if not any(r["has_test"] for r in rows):  # say why the test columns are blank
            out.print(NO_TEST_LINE, soft_wrap=True, highlight=False)


NO_TEST_LINE = ("no test images in the data (no test/ folder, no split=test rows): the test columns are "
                "blank, and the validation numbers are the only estimate; --test-fraction 0.2 holds out a "
                "patient-grouped test split.")


def typed_command(ctx: typer.Context) -> list[str]:
    """The command line as the user typed it, for run.json (`runs show` and the report print it, shell-quoted,
    as the command that reruns the run).

    Why as typed: it was rebuilt from the parsed options, in the order of the command's declaration and
    without options left at their default, so a user looking for "the same command" saw flags they had
    not typed in that order. The root app (``featcache.cli.app.run``) puts the argv it was given in
    ``ctx.obj``; that works in-process too, where sys.argv is the caller's. A command invoked without it
    (click's own test runner) gets the parsed form.
    """
    obj = ctx.find_root().obj
    if isinstance(obj, dict) and isinstance(obj.get("argv"), list):
        return [str(a) for a in obj["argv"]]
    return _parsed_command(ctx)


def _parsed_command(ctx: typer.Context) -> list[str]:
    """The command line rebuilt from the parsed options (declaration order, defaults left out)."""
    argv = ["featcache", ctx.info_name or "fit"]
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if value is None or value == [] or value == param.default or not param.opts:
            continue
        flag = param.opts[0]
        if isinstance(value, bool):
            argv.append(flag if value else (param.secondary_opts[0] if param.secondary_opts else flag))
        elif isinstance(value, (list, tuple)):
            for v in value:
                argv += [flag, str(v)]
        else:
            argv += [flag, str(value)]
    return argv
