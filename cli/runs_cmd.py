"""`featcache runs ls` / `runs show ID` / `runs drop-checkpoints ID`: finished runs as a list, one run's
full record, and the epoch checkpoints interrupted sweeps leave behind.

Only runs whose run.json says "done" are listed: a run killed half-way is never shown as a result.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import typer
from featcache.cli.text import print_table, shown
from rich.console import Console
from rich.markup import escape
from rich.table import Table

runs_app = typer.Typer(
    no_args_is_help=True,
    help="List the runs stored by `featcache fit`, show one, or delete an interrupted sweep's checkpoints."
    "\n\n"
    "Example: featcache runs ls --runs-dir runs",
)


@runs_app.command("ls")
def ls_cmd(
    runs_dir: Path = typer.Option(Path("runs"), "--runs-dir", help="Where runs are stored."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list instead of a table."),
) -> None:
    """List finished runs with their validation and test metric, oldest first (by the time each run.json
    records it was created, else finished, to the second; within one second by place in the grid, then by
    folder name), so the newest is the last line.

    Example: featcache runs ls --runs-dir runs --json
    """
    from featcache.cli.fit_cmd import fmt, params_text, summary

    from featcache.errors import RunError
    from featcache.runs import by_time, list_runs, run_problems

    _check_runs_dir(runs_dir)
    rows, damaged, unfinished = [], [], []
    for run in by_time(list_runs(runs_dir, include_incomplete=True)):
        if run.status == "corrupt":  # no run.json yet: a run being written (or a stray folder)
            # named either way, as the report names it (a README audit: a run whose run.json was deleted
            # vanished from `runs ls` without a word, while the report counted it as left out)
            if (run.path / "run.json").is_file():
                damaged.append((run.id, "run.json unreadable"))
            else:
                unfinished.append(f"{run.id} (no run.json)")
            continue
        if run.status != "done":
            unfinished.append(run.id)
            continue
        try:
            row = {**summary(run), "tags": list(run.info.get("tags") or [])}
            problems = run_problems(run)  # what the report would leave out, never listed as a result
        except RunError:
            damaged.append((run.id, "metrics.json damaged"))
            continue
        except (TypeError, AttributeError, ValueError):  # valid JSON of the wrong shape (a hand edit)
            damaged.append((run.id, "run.json or metrics.json malformed"))
            continue
        if problems:
            damaged.append((run.id, problems[0]))
        else:
            rows.append(row)
    if as_json:
        typer.echo(json.dumps(rows, indent=2, default=str))
    err = Console(stderr=True, highlight=False)
    if damaged:  # on stderr: the list (or the JSON) stays what it was, and no damaged run is hidden
        err.print(
            f"{len(damaged)} run folder(s) left out, damaged: "
            + "; ".join(f"{escape(rid)} ({why})" for rid, why in damaged)
            + ". Delete them and rerun their fit commands to train those configs anew.", soft_wrap=True)
    if unfinished:
        err.print(f"{len(unfinished)} unfinished run folder(s) left out (training now, or interrupted: rerun "
                  "the fit command to finish them): " + ", ".join(escape(rid) for rid in unfinished) + ".",
                  soft_wrap=True)
    _mention_checkpoints(runs_dir)  # on stderr, with --json too: the JSON list has no room for them
    if as_json:
        return
    console = Console()
    if not rows:
        console.print(f"No finished runs in {escape(str(runs_dir))}; `featcache fit` creates them.")
        return
    tagged = any(r["tags"] for r in rows)
    # the dataset and features columns only where they tell runs apart (as the report's)
    extra = [c for c, differ in (("dataset", len({r["dataset"] for r in rows}) > 1),
                                 ("features", len({(r["backbone"], r["features"]) for r in rows})
                                  > len({r["backbone"] for r in rows}))) if differ]
    cells = {
        "id": lambda r: shown(r["id"]),
        "backbone": lambda r: shown(r["backbone"] + (" (random weights)" if r["random_weights"] else "")),
        **{c: (lambda r, c=c: shown(str(r[c]))) for c in extra},
        "head": lambda r: shown(r["head"]),
        "task": lambda r: shown(r["task"]),
        "params": lambda r: shown(params_text(r["params"])),
        "metric": lambda r: escape(str(r["metric"])),
        "val": lambda r: fmt(r["val"]),
        "test": lambda r: fmt(r["test"]),
        **({"tags": lambda r: shown(",".join(r["tags"]))} if tagged else {}),
    }
    # a column with one value on every row goes to the title: nine columns in 80 were strips of 3 letters
    same = [c for c in ("backbone", "task", "metric", "tags")
            if c in cells and len(rows) > 1 and len({cells[c](r) for r in rows}) == 1]
    title = f"runs in {escape(str(runs_dir))}" + "".join(f", {c} {cells[c](rows[0])}" for c in same)
    table = Table(title=title)
    for col in (c for c in cells if c not in same):
        # the id whole on one line: it is what `runs show` and `predict --run` take, copied or grepped; the
        # scores too (in 80 columns "0.8082" was folded into "0.80" over "82"): the params column gives way
        whole = col in ("id", "val", "test")
        table.add_column(col, overflow="fold", no_wrap=whole, min_width=6 if col in ("val", "test") else None)
    for r in rows:
        table.add_row(*(cells[c](r) for c in cells if c not in same))
    print_table(console, table)


def _check_runs_dir(runs_dir: Path) -> None:
    """A mistyped --runs-dir is not an empty folder (the default runs/ may not exist yet)."""
    from featcache.errors import RunError

    if runs_dir.exists() and not runs_dir.is_dir():  # "No finished runs" would hide the mistake
        raise RunError(f"--runs-dir {runs_dir} is a file, not a folder.")
    if not runs_dir.exists() and runs_dir != Path("runs"):
        raise RunError(f"--runs-dir {runs_dir} does not exist.")


def _mention_checkpoints(runs_dir: Path) -> None:
    """On stderr, the sweeps that keep epoch checkpoints: they resume a grid, and they take space. One line
    each, with its size, when it was last saved and the command that resumes it (or the process training it
    now)."""
    from featcache.runs import CHECKPOINTS_DIR, pending_checkpoints, running_process

    pending = pending_checkpoints(runs_dir)
    if not pending:
        return
    err = Console(stderr=True, highlight=False)
    size = sum(p.size_bytes for p in pending) / 1e6
    running = sum(p.running_pid is not None for p in pending)
    away = sum(p.other_host is not None for p in pending)
    parts = [f"{len(pending) - running - away} interrupted sweep(s)"]
    parts += [f"{running} running"] if running else []
    parts += [f"{away} from other machines"] if away else []
    what = ", ".join(parts[:-1]) + " and " + parts[-1] if len(parts) > 1 else parts[0]
    err.print(f"{what} keep epoch checkpoints in {escape(str(Path(runs_dir) / CHECKPOINTS_DIR))} "
              f"({size:,.1f} MB): rerun an interrupted sweep's command to resume it, or delete its "
              "checkpoints with `featcache runs drop-checkpoints ID`.")
    for p in pending:
        when = datetime.fromtimestamp(p.last_saved).strftime("%Y-%m-%d %H:%M")
        command = shlex.join(p.command) if p.command else "(command not recorded)"
        now = (f" (running now: {running_process(p.running_pid)})" if p.running_pid is not None
               else f" (started on {p.other_host}: whether it still runs cannot be checked from here)"
               if p.other_host is not None else "")
        # unwrapped, so the command can be copied whole
        err.print(f"  {p.sweep_id}  {p.size_bytes / 1e6:,.1f} MB, last saved {when}{now}: {escape(command)}",
                  soft_wrap=True)


@runs_app.command("drop-checkpoints")
def drop_checkpoints_cmd(
    sweep_ids: list[str] | None = typer.Argument(None, metavar="SWEEP_ID",
                                                  help="Sweep ids, as `featcache runs ls` lists them (or "
                                                  "the start of one)."),
    every: bool = typer.Option(False, "--all", help="Every interrupted sweep's checkpoints (not those of a "
                               "sweep running now, nor of one started on another machine)."),
    force: bool = typer.Option(False, "--force", help="Also a named sweep that is still running here, or "
                               "that was started on another machine sharing this runs folder."),
    runs_dir: Path = typer.Option(Path("runs"), "--runs-dir", help="Where runs are stored."),
) -> None:
    """Delete the epoch checkpoints that interrupted MLP sweeps left (finished runs are not touched).

    A sweep rerun afterwards trains its unfinished configs from epoch 0, with the same numbers.

    Example: featcache runs drop-checkpoints 3f2a9c1d0b7e --runs-dir runs
    """
    from featcache.errors import ConfigError
    from featcache.runs import drop_checkpoints

    if sweep_ids and every:
        raise ConfigError("pass sweep ids or --all, not both")
    if not sweep_ids and not every:
        raise ConfigError("name the sweep ids whose checkpoints to delete (`featcache runs ls` lists them), "
                          "or pass --all")
    _check_runs_dir(runs_dir)
    dropped = drop_checkpoints(runs_dir, None if every else sweep_ids, force=force)
    freed = sum(p.size_bytes for p in dropped) / 1e6
    console = Console(highlight=False)
    console.print(f"Deleted the checkpoints of {len(dropped)} sweep(s) ({freed:,.1f} MB)"
                  + (": " + ", ".join(p.sweep_id for p in dropped) if dropped else "") + ".")
    if every:
        _mention_checkpoints(runs_dir)  # what is left: sweeps running now, or started elsewhere


_METRICS = ("accuracy", "macro_f1", "auc", "sensitivity", "specificity", "log_loss")


@runs_app.command("show")
def show_cmd(
    run_id: str = typer.Argument(..., help="Run id (see `featcache runs ls`)."),
    runs_dir: Path = typer.Option(Path("runs"), "--runs-dir", help="Where runs are stored."),
    as_json: bool = typer.Option(False, "--json", help="Print run.json and metrics.json as one JSON object."),
) -> None:
    """Show one run: what was trained on which cache, how it was selected, its metrics with CIs.

    Example: featcache runs show 20250101-120000-logreg-0123abcd
    """
    from featcache.cli.fit_cmd import fmt, params_text

    from featcache.runs import (
        cv_search_text,
        describe_trainer,
        epochs_text,
        load_run,
        replay_command,
        run_problems,
        threshold_text,
        training_settings,
    )

    run = load_run(runs_dir, run_id)
    info, metrics = run.info, run.metrics()
    problems = run_problems(run)
    if problems:  # shown, since it was asked for by id, but never as if it were a result
        Console(stderr=True, highlight=False).print(
            f"[bold]warning[/] run {escape(run.id)} cannot be trusted ({escape('; '.join(problems))}); the "
            "report leaves it out. Delete it and rerun its fit command to train the config anew.",
            soft_wrap=True)
    if as_json:
        out = {"run": info, "metrics": metrics, "path": str(run.path)}
        typer.echo(json.dumps(out, indent=2, default=str))
        return
    sel, thr, ds = info.get("selection") or {}, info.get("threshold") or {}, info.get("dataset") or {}
    about = Table(title=f"run {escape(run.id)}", show_header=False)
    about.add_column(style="bold")
    about.add_column(overflow="fold")
    env = info.get("environment") if isinstance(info.get("environment"), dict) else {}
    setup = training_settings(info)
    rows = [
        ("folder", str(run.path)),
        ("finished", str(info.get("finished", "-"))),
        ("command", replay_command(info) or "-"),
        ("head / task", f"{info.get('head')} / {info.get('task')} ({', '.join(info.get('classes') or [])})"),
        ("params", params_text(info.get("params") or {})),
        *([("setup", ", ".join(f"{k}={v}" for k, v in setup.items()))] if setup else []),
        *([("grid position", f"config {info['grid']['index'] + 1} of {info['grid']['size']} (its seed, "
                             "minibatches and dropout come from its place)")]
          if isinstance(info.get("grid"), dict) and isinstance(info["grid"].get("index"), int) else []),
        ("seed", str(info.get("seed"))),
        ("dataset", f"{ds.get('manifest') or ds.get('root', '-')} ({ds.get('n_images', '?')} images, "
                    f"{ds.get('n_patients', '?')} patients)"),
        ("selection", f"{sel.get('method', '-')} by {sel.get('group_by', '-')} on {info.get('metric')}; "
                      f"train {sel.get('n_train_images', '?')}, validation {sel.get('n_val_images', '?')}, "
                      f"test {sel.get('n_test_images', '?')} images"),
        *([("CV search", search)] if (search := cv_search_text(info, metrics)) else []),
        ("threshold", f"{threshold_text(thr.get('chosen'))} ({thr.get('method', '-')}, "
                      f"on {thr.get('chosen_on', '-')})"
                      if thr.get("chosen") is not None
                      else "none: more than two classes, labelled by the most probable one"
                      if len(info.get("classes") or []) > 2 else "-"),
        ("tags", ", ".join(info.get("tags") or []) or "-"),
    ]
    if info.get("trainer"):
        rows.append(("trained", describe_trainer(info["trainer"])))
    epochs = epochs_text(info, metrics.get("history") if isinstance(metrics, dict) else None)
    if epochs:  # what ran, beside the params' "epochs=200" (what was asked)
        rows.append(("epochs", epochs))
    rows.append(("unusual images", _reference_text(run)))
    caches = [c for c in info.get("caches") or [] if isinstance(c, dict)]
    backbones = [b for b in info.get("backbones") or [] if isinstance(b, dict)]
    for i, c in enumerate(caches):  # fit records backbones[i] from caches[i]
        b = backbones[i] if i < len(backbones) and len(backbones) == len(caches) else {}
        rows.append((f"cache {c.get('name') or b.get('name')}",
                     f"{c.get('path')} ({_backbone_text(c, b)}; config {str(c.get('config_hash'))[:12]}, "
                     f"{c.get('n_rows')} rows × {c.get('feature_dim')})"))
    if not caches:  # a run record without its caches still names its backbones
        rows += [(f"backbone {b.get('name')}", _backbone_text({}, b)) for b in backbones]
    random = [str(b.get("name")) for b in backbones if b.get("weights") == "none"]
    versions = info.get("versions") or {}
    rows.append(("versions", ", ".join(f"{k} {v}" for k, v in versions.items()) or "-"))
    if env.get("source_revision"):
        rows.append(("featcache source", f"git {env['source_revision']}"))
    if env.get("variables"):
        rows.append(("environment", " ".join(f"{k}={v}" for k, v in env["variables"].items())))
    for key, value in rows:
        about.add_row(shown(key), shown(value))
    chosen = _chosen_threshold_rows(info, metrics)
    scores = Table(title=_scores_title(info, metrics, [t for _, t, _ in chosen]))
    scores.add_column("split")
    if chosen:
        scores.add_column("at", justify="right")  # the threshold: narrow, the title names it
    scores.add_column("n", justify="right")
    for name in _METRICS:
        scores.add_column(name, justify="right")
    for split in ("val", "test"):
        m = metrics.get(split) if isinstance(metrics, dict) else None
        if not m or not isinstance(m, dict):  # none, or a hand-edited file of the wrong shape
            continue
        scores.add_row(split, *(["0.5"] if chosen else []), str(m.get("n", "-")), *_metric_cells(m, fmt))
    for split, thr_value, at in chosen:
        # auc and log_loss do not depend on the threshold: left blank rather than repeated
        scores.add_row(split, threshold_text(thr_value), str(at.get("n", "-")),
                       *_metric_cells(at, fmt, skip=("auc", "log_loss")))
    console = Console()
    print_table(console, about)
    print_table(console, scores)
    per_class = _per_class_table(metrics, fmt)
    if per_class is not None:
        print_table(console, per_class)
    if random:  # worded as the report's terminal note: these numbers must not be read as the method's
        console.print(f"[yellow]Random weights: {escape(', '.join(random))} features come from randomly "
                      "initialised weights (--weights none), not ImageNet: this run tests the pipeline, and "
                      "its metrics say nothing about the method.[/]", soft_wrap=True)


def _reference_text(run: Any) -> str:  # featcache.runs.Run
    """How predict tells images unlike the run's training images (featcache.typicality), or why it cannot."""
    from featcache.runs import FEATURE_REFERENCE
    from featcache.typicality import MIN_IMAGES

    ref = run.feature_reference()
    if ref is not None:
        return (f"predict marks them: PCA of {ref.components.shape[0]} components of {ref.n_fit} training "
                f"images' features, limits set by {ref.n_held_out} held out by patient")
    if (run.path / FEATURE_REFERENCE).exists():
        return f"not marked: its {FEATURE_REFERENCE} cannot be read"
    return (f"not marked: no {FEATURE_REFERENCE} (fitted on fewer than {MIN_IMAGES} images, or before "
            "featcache stored one)")


def _backbone_text(cache: dict, backbone: dict) -> str:
    """A run's backbone weights and input size, from its cache's recorded config, else run.json's backbone
    entry: "ImageNet weights, 224 px".

    Why: two runs of one backbone name on random, ImageNet or own weights differ in everything, and only the
    command line told them apart; a file is named by its SHA-256 (what predict's --backbone-file must
    match), since its path is not recorded."""
    cfg = cache.get("config") if isinstance(cache.get("config"), dict) else {}
    weights = cfg.get("weights", backbone.get("weights"))
    size = cfg.get("image_size", backbone.get("image_size"))
    wfile, model = str(cfg.get("weights_file_sha256"))[:12], str(cfg.get("model_file_sha256"))[:12]
    if weights == "imagenet":
        text = "ImageNet weights"
    elif weights == "none":
        text = "random weights from --weights none"
    elif weights == "saved":
        text = f"saved model sha256 {wfile}... with its own weights"
    elif weights == "file" and cfg.get("model_file_sha256"):
        text = f"saved model sha256 {model}... with a weights file sha256 {wfile}..."
    elif weights == "file":
        text = f"weights file sha256 {wfile}..."
    else:
        text = "weights not recorded"
    return f"{text}, {size} px" if size else text


def _per_class_table(metrics: object, fmt: Callable[[object], str]) -> Table | None:
    """Each class's precision, recall (with its CI where fit recorded one), F1 and support per split, for
    runs of more than two classes.

    Why: the scores table's sensitivity and specificity are binary's and read "-" on a 3-class run, so its
    virus recall was only in the report or metrics.json."""
    if not isinstance(metrics, dict):
        return None
    splits = [(s, metrics[s]["per_class"]) for s in ("val", "test") if isinstance(metrics.get(s), dict)
              and isinstance(metrics[s].get("per_class"), dict) and len(metrics[s]["per_class"]) > 2]
    if not splits:
        return None
    table = Table(title="per class (labels: the most probable class)")
    for name in ("split", "class", "precision", "recall", "f1", "support"):
        table.add_column(name, justify="left" if name in ("split", "class") else "right")
    for split, classes in splits:
        ci = metrics[split].get("ci") if isinstance(metrics[split].get("ci"), dict) else {}
        recall_ci = ci.get("per_class_recall") if isinstance(ci.get("per_class_recall"), dict) else {}
        for cls, m in classes.items():
            m = m if isinstance(m, dict) else {}
            pair = recall_ci.get(cls)
            recall = fmt(m.get("recall")) + (f" [{pair[0]:.3f}–{pair[1]:.3f}]" if isinstance(pair, list)
                                             and len(pair) == 2 and m.get("recall") is not None else "")
            table.add_row(split, shown(str(cls)), fmt(m.get("precision")), recall, fmt(m.get("f1")),
                          str(m.get("support", "-")))
    return table


def _metric_cells(m: dict, fmt: Callable[[object], str], skip: tuple[str, ...] = ()) -> list[str]:
    """One row's cells of the metrics table, each with its recorded CI where there is one; ``skip``: the
    metrics left blank (those a threshold does not change, on the chosen-threshold rows)."""
    ci = m.get("ci") if isinstance(m.get("ci"), dict) else {}
    cells = []
    for name in _METRICS:
        if name in skip:
            cells.append("")
            continue
        cell = fmt(m.get(name))
        if name in ci and ci[name]:
            cell += f" [{fmt(ci[name][0])}–{fmt(ci[name][1])}]"
        cells.append(cell)
    return cells


def _chosen_threshold_rows(info: dict, metrics: object) -> list[tuple[str, float, dict]]:
    """(split, threshold, metrics) at the threshold chosen on validation, for the splits metrics.json has
    them for (binary runs).

    Why: ``predict`` labels at that threshold, not at 0.5, so the accuracy, sensitivity and specificity a
    user gets from the run are these; the table showed only the 0.5 ones. The threshold is the one the
    numbers were computed at (metrics.json's own), else run.json's chosen one."""
    if not isinstance(metrics, dict) or len(info.get("classes") or []) > 2:
        return []
    thr_info = info.get("threshold")
    recorded = thr_info.get("chosen") if isinstance(thr_info, dict) else None
    rows = []
    for split in ("val", "test"):
        m = metrics.get(split)
        at = m.get("at_threshold") if isinstance(m, dict) else None
        if not isinstance(at, dict):
            continue
        thr = at.get("threshold") if isinstance(at.get("threshold"), (int, float)) else recorded
        # a chosen threshold of exactly 0.5: its numbers are the 0.5 row's, not a second row labelled 0.5
        if (isinstance(thr, (int, float)) and thr != 0.5
                and any(at.get(name) is not None for name in _METRICS)):
            rows.append((split, float(thr), at))
    return rows


def _scores_title(info: dict, metrics: object, chosen: Sequence[float] = ()) -> str:
    """The metrics table's title from the run's own record: a 3-class run labels by its most probable
    class (no 0.5 threshold), a binary run's rows are at 0.5 and, where metrics.json has them, at the
    ``chosen`` threshold(s) from validation; and the test CI resampled what fit recorded (file-name groups
    on data without patient ids; older runs recorded nothing and resampled patients)."""
    from featcache.runs import resampled_words, threshold_text

    n_classes = len(info.get("classes") or [])
    shown_thr = sorted({threshold_text(t) for t in chosen})
    thr_info = info.get("threshold") if isinstance(info.get("threshold"), dict) else {}
    on = str(thr_info.get("chosen_on") or "validation")  # a CV head's: "validation (out-of-fold)"
    rule = ("label: most probable class" if n_classes > 2
            else f"threshold 0.5 and {' / '.join(shown_thr)} chosen on {on}" if shown_thr
            else "threshold 0.5")
    test = metrics.get("test") if isinstance(metrics, dict) else None
    ci = test.get("ci") if isinstance(test, dict) else None
    if not isinstance(ci, dict) or not ci:
        return f"metrics ({rule})"
    unit = str(ci.get("resampled") or "patients")
    return f"metrics ({rule}; test with 95% bootstrap CI over {resampled_words(unit)})"


def register(app: typer.Typer) -> None:
    """Add `featcache runs ...` to the root app."""
    app.add_typer(runs_app, name="runs")
