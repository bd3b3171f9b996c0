"""CLI behaviour common to every command: help texts survive rich markup, Ctrl-C is reported."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest
import typer
from featcache.cli.app import app
from rich.text import Text

STYLE_TAG = re.compile(r"(?<!\\)\[/?(bold|dim|italic|red|green|yellow|cyan)?\]")  # markup used on purpose


def _commands(cmd, path: str = "featcache"):  # noqa: ANN001 - typer's (vendored) click command
    yield path, cmd
    for name, sub in (getattr(cmd, "commands", None) or {}).items():
        yield from _commands(sub, f"{path} {name}")


def test_help_texts_keep_their_brackets() -> None:
    """The app uses rich_markup_mode="rich", so "[grid]" in a help string would print as "" unless escaped."""
    root = typer.main.get_command(app)
    eaten = []
    texts = 0
    for path, cmd in _commands(root):
        texts_of = [("help", cmd.help or "")] + [(p.name, getattr(p, "help", None) or "") for p in cmd.params]
        for where, raw in texts_of:
            texts += 1
            shown = Text.from_markup(raw).plain
            meant = STYLE_TAG.sub("", raw).replace("\\[", "[")  # what the author meant the reader to see
            if shown != meant:
                eaten.append(f"{path} {where}: {raw!r} shows as {shown!r}")
    assert texts > 100  # every command and option was visited
    assert not eaten, "\n".join(eaten)


def test_every_help_text_has_an_example_and_there_is_a_version_flag(capsys) -> None:
    """The README promises an example in every command's --help, the root's included."""
    from featcache.cli.app import run

    from featcache import __version__

    root = typer.main.get_command(app)
    leaves = [(path, cmd) for path, cmd in _commands(root) if not getattr(cmd, "commands", None)]
    missing = [path for path, cmd in leaves if "Example" not in (cmd.help or "") + (cmd.epilog or "")]
    assert not missing, missing
    assert "Example:" in (root.help or "")
    assert run(["--version"]) == 0 and capsys.readouterr().out.splitlines()[0] == f"featcache {__version__}"


def test_help_shows_flags_without_a_value_placeholder(capsys, monkeypatch) -> None:
    """typer 0.29 printed "--json <bool>" and "--help <bool>", as if the flags took a value; options that
    take one keep their placeholder."""
    from featcache.cli.app import run

    monkeypatch.setenv("COLUMNS", "120")
    assert run(["extract", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--json" in out and "--strict" in out
    assert "<bool>" not in out
    assert re.search(r"--batch-size\s+<int>", out)


def test_version_command_and_flag_print_the_same(capsys) -> None:
    """`featcache version` printed the bare number and `--version` "featcache X": two answers to one
    question. Both now print the featcache version line, then the library versions and Keras backend."""
    import importlib.metadata as md

    from featcache.cli.app import run

    from featcache import __version__

    assert run(["version"]) == 0
    by_command = capsys.readouterr().out
    assert run(["--version"]) == 0
    by_flag = capsys.readouterr().out
    assert by_command == by_flag
    first, libraries = by_command.splitlines()
    assert first == f"featcache {__version__}"
    assert f"numpy {md.version('numpy')}" in libraries and f"keras {md.version('keras')}" in libraries
    assert "Keras backend " in libraries


@pytest.mark.parametrize("argv", [[], ["cache"], ["data"], ["data", "download"], ["runs"]])
def test_a_command_group_alone_shows_its_help_and_succeeds(argv, capsys) -> None:
    """`featcache` alone printed the help and exited 2, the status of a usage error, as did `featcache cache`
    and the other groups: asking for nothing is asking for the help, so they end as `--help` does."""
    from featcache.cli.app import run

    assert run([*argv, "--help"]) == 0
    asked = capsys.readouterr().out
    assert run(argv) == 0
    bare = capsys.readouterr()
    assert bare.out == asked and "Usage: featcache" in bare.out and "Commands" in bare.out
    assert bare.err == ""


@pytest.mark.parametrize("command", [[], ["fit"], ["cache", "ls"], ["data", "download", "kermany"]])
def test_dash_h_is_help_everywhere(command, capsys) -> None:
    """`featcache -h` said "No such option: -h": the spelling most tools accept, and a new user's first try.
    It is --help now, for the root and every subcommand (same text, exit 0), and no option else uses it."""
    from featcache.cli.app import run

    assert run([*command, "--help"]) == 0
    long_form = capsys.readouterr().out
    assert run([*command, "-h"]) == 0
    assert capsys.readouterr().out == long_form and "Usage: featcache" in long_form
    root = typer.main.get_command(app)
    taken = [path for path, cmd in _commands(root) for p in cmd.params if "-h" in getattr(p, "opts", [])]
    assert not taken, taken


def test_a_leaf_command_alone_is_still_a_usage_error(capsys) -> None:
    """Only groups get their help: `featcache fit` without its required options stays exit 2 with click's
    message naming the missing option."""
    from featcache.cli.app import run

    assert run(["fit"]) == 2
    assert "Missing option" in capsys.readouterr().err


def test_ctrl_c_exits_130_with_one_line_saying_work_is_kept(tmp_path, monkeypatch, capsys) -> None:
    """typer turns KeyboardInterrupt into a silent exit 130; the CLI still says what happened."""
    from featcache.cli.app import run

    import featcache.datasets

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(featcache.datasets, "discover", interrupted)
    assert run(["data", "inspect", str(tmp_path)]) == 130
    err = capsys.readouterr().err
    assert err.strip() == "interrupted: nothing was changed."  # a listing: nothing to save or resume
    # by command (a CLI audit: predict said "finished work is saved; run the same command to resume")
    from featcache.cli.app import _print_interrupted

    for argv, said in ((["extract", "--data", "d"], "finished work is saved; run the same command"),
                       (["cache", "merge", "a.h5"], "finished work is saved"),
                       (["report", "--top", "3"], "the previous report is kept whole."),
                       (["predict", "x.png", "--run", "r"], "nothing was changed.")):
        _print_interrupted(argv)
        assert said in capsys.readouterr().err, argv
    # a second Ctrl-C while that line prints (people press it twice) is ignored, not a traceback
    import signal

    import featcache.cli.app as app_module

    real_print, before = app_module.err_console.print, signal.getsignal(signal.SIGINT)

    def print_then_ctrl_c(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        real_print(*args, **kwargs)

    monkeypatch.setattr(app_module.err_console, "print", print_then_ctrl_c)
    assert run(["data", "inspect", str(tmp_path)]) == 130
    assert "interrupted: nothing was changed" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is before  # the handler is back for the next command


def test_sigterm_unwinds_like_ctrl_c_and_exits_143(tmp_path) -> None:
    """docker stop / systemd / SLURM send SIGTERM: the command unwinds (writers close, locks go), says what
    was kept, and exits 143 instead of dying with no word and a cache "not closed cleanly"."""
    code = ("import os, signal, sys, time\n"
            "import featcache.datasets as d\n"
            "from featcache.cli import app\n"
            "app.install_signal_handlers()\n"
            "def slow(*a, **k):\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    time.sleep(30)\n"
            "d.discover = slow\n"
            "sys.exit(app.run(['data', 'inspect', sys.argv[1]]))\n")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 143, done.stderr
    assert done.stderr.strip() == "terminated (SIGTERM): nothing was changed."


def test_ctrl_c_inside_a_gc_callback_is_delivered_again(monkeypatch) -> None:
    """JAX's garbage-collector callback swallowed a Ctrl-C that landed in it (Python prints and drops it),
    and the command ran to its end: the handler sends it again, outside the callback."""
    import gc

    from featcache.cli import app as cli_app

    seen, sent = {}, []
    monkeypatch.setattr(cli_app.os, "kill", lambda pid, sig: sent.append(sig))

    def callback(phase, info):
        if phase == "start":
            seen["inside"] = cli_app._in_gc_callback(sys._getframe())
            cli_app._on_int(2, sys._getframe())  # does not raise here
            seen["timer"] = True

    gc.callbacks.append(callback)
    try:
        gc.collect()
    finally:
        gc.callbacks.remove(callback)
    assert seen == {"inside": True, "timer": True}
    time.sleep(0.3)
    assert sent == [cli_app.signal.SIGINT]  # sent again, once, outside the callback
    assert not cli_app._in_gc_callback(sys._getframe())
    with pytest.raises(KeyboardInterrupt):
        cli_app._on_int(2, sys._getframe())


@pytest.mark.parametrize("layers", ["1024,,512", "8-", "-5", "0", "abc", ""])
@pytest.mark.parametrize("command", ["fit", "run"])
def test_bad_layers_are_one_sentence_before_any_work(command, layers, tmp_path, capsys) -> None:
    """`run` used to extract first and then fail in Keras (units=0) or with a ValueError traceback."""
    from featcache.cli.app import run

    data = tmp_path / "data"
    args = [command, "--data", str(data), "--backbone", "mobilenet-0.75", "--head", "mlp",
            f"--layers={layers}", "--cache-dir", str(tmp_path / "cache"),
            "--runs-dir", str(tmp_path / "runs")]
    assert run(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --layers expects positive sizes like 1024,512"), err
    assert not (tmp_path / "cache").exists()


def test_run_summary_counts_configs_resumed_from_a_checkpoint(monkeypatch, capsys) -> None:
    from types import SimpleNamespace

    from featcache.cli import pipeline_cmd

    monkeypatch.setattr(pipeline_cmd, "print_outputs", lambda *_a: None)
    runs = [{"trainer": {"selection": {"path": "fused", "resumed_from_epoch": 7}}},
            {"trainer": {"selection": {"path": "fused"}}}, {}]
    fits = [SimpleNamespace(sweep_id="abc", runs=runs, skipped=["x"], left_out=[], notes=[]),
            SimpleNamespace(sweep_id="def", runs=runs[1:], skipped=[], left_out=[("a.jpeg", "zero bytes")],
                            notes=["1 patient(s) have images in both the training and the test split"])]
    pipeline_cmd._summary(SimpleNamespace(extracts=[], fits=fits, report=None))
    assert capsys.readouterr().out.splitlines() == [
        "fit sweep abc: 3 run(s) trained, 1 already done, 1 resumed from a checkpoint",
        "note 1 patient(s) have images in both the training and the test split",
        "fit sweep def: 2 run(s) trained, 0 already done, 1 undecodable image(s) left out"]


def test_run_summary_shows_damaged_images_before_hidden_clutter(monkeypatch, capsys) -> None:
    """`run` shows the first three skipped files: on a Mac-made copy they were three .DS_Store files, and the
    damaged image that needed the user went unshown. Hidden entries now come last (each kind in order)."""
    from pathlib import Path
    from types import SimpleNamespace

    from featcache.cli import pipeline_cmd

    monkeypatch.setattr(pipeline_cmd, "print_outputs", lambda *_a: None)
    skipped = [(".DS_Store", "hidden file"), ("train/.DS_Store", "hidden file"),
               ("train/.ipynb_checkpoints/", "hidden folder"), ("train/NORMAL/a.jpeg", "truncated image"),
               ("train/NORMAL/b.jpeg", "zero bytes")]
    ex = SimpleNamespace(cache_path=Path("c.h5"), rows_computed=4, rows_reused=0, skipped=skipped, notes=[])
    pipeline_cmd._summary(SimpleNamespace(extracts=[ex], fits=[], report=None))
    assert capsys.readouterr().out.splitlines()[1:] == [
        "  skipped train/NORMAL/a.jpeg: truncated image", "  skipped train/NORMAL/b.jpeg: zero bytes",
        "  skipped .DS_Store: hidden file"]


def test_run_json_lists_skipped_and_left_out_files_as_path_reason_objects(tmp_path) -> None:
    """`run --json` (extract's and fit's shapes inside) lists files as {path, reason}, as inspect and predict
    do: extract printed [path, reason] pairs while fit printed objects, so scripts needed two readers."""
    from types import SimpleNamespace

    from featcache.cli.pipeline_cmd import pipeline_dict

    bad = [("train/NORMAL/zero.jpeg", "zero-byte file")]
    ex = SimpleNamespace(cache_path=tmp_path / "c.h5", n_files=2, n_unique=1, rows_computed=1, rows_reused=0,
                         rows_copied=0, duplicates=0, skipped=bad, seconds=0.5, images_per_s=2.0,
                         feature_dim=8, timings={}, notes=[])
    fr = SimpleNamespace(sweep_id="abc", n_configs=1, caches={}, left_out=bad, runs=[], skipped=[],
                         retired=[], cleaned=[], notes=[])
    result = SimpleNamespace(notes=[], extracts=[ex], fits=[fr], report=None)
    out = json.loads(json.dumps(pipeline_dict(result)))
    expected = [{"path": "train/NORMAL/zero.jpeg", "reason": "zero-byte file"}]
    assert out["extracts"][0]["skipped"] == expected and out["fits"][0]["left_out"] == expected


def test_runs_show_says_how_an_mlp_run_was_trained() -> None:
    from featcache.runs import describe_trainer as _trainer_text

    fused = {"path": "fused", "precision": "bfloat16", "group_size": 18}
    assert _trainer_text({"selection": fused, "saved_model": fused}) == "fused (bfloat16, chunk of 18)"
    refit = {"path": "keras.fit", "precision": "float32"}
    assert _trainer_text({"selection": {**fused, "resumed_from_epoch": 40}, "saved_model": refit}) == (
        "fused (bfloat16, chunk of 18), resumed at epoch 40 from a checkpoint; "
        "saved model refit: keras.fit (float32)")
    assert _trainer_text({"selection": {**fused, "resumed_from_epoch": 40}, "saved_model": fused},
                         detail=False) == "fused (bfloat16)"


def test_an_operating_system_error_is_one_sentence_not_a_traceback(tmp_path, monkeypatch, capsys) -> None:
    """An output folder that cannot be created (here: under a regular file) or a full disk ends in one line
    naming the path and the reason, with exit status 1."""
    from featcache.cli.app import run

    import featcache.datasets

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert run(["demo", "--weights", "none", "--workdir", str(blocker / "demo")]) == 1
    raw = capsys.readouterr().err
    assert raw.count("\n") == 1  # one line whatever the path's length: a newline would break the path
    err = " ".join(raw.split())
    assert err.startswith(f"error: the operating system refused a file operation ({blocker / 'demo'}")
    assert err.endswith(f"): Not a directory: {blocker} is a file, where a folder is needed; choose another "
                        "path. Anything finished before the error is kept.")
    # --out that is itself a file where a folder is made ("File exists"): the file is named too
    from featcache.cli.app import _os_error_sentence

    runs_dir = tmp_path / "runs"
    runs_dir.mkdir()

    assert _os_error_sentence(FileExistsError(17, "File exists", str(blocker)), ["cache", "merge"]) == (
        f"the operating system refused a file operation ({blocker}): File exists: {blocker} is a file, where "
        "a folder is needed; choose another path. Anything finished before the error is kept.")
    assert _os_error_sentence(FileExistsError(17, "File exists", str(runs_dir)), ["report"]) == (
        f"the operating system refused a file operation ({runs_dir}): File exists. The previous report is "
        "kept whole.")  # an existing folder: nothing to blame on a file

    def disk_full(*_args, **_kwargs):
        raise OSError(28, "No space left on device", "/data/x.h5")

    monkeypatch.setattr(featcache.datasets, "discover", disk_full)
    assert run(["data", "inspect", str(tmp_path)]) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert err.endswith("refused a file operation (/data/x.h5): No space left on device.")  # nothing to keep
    assert "Traceback" not in err


def test_names_from_the_data_are_shown_as_one_visible_line() -> None:
    """A newline in a file name would split a table row; an escape sequence would reach the terminal."""
    from featcache.cli.text import printable, shown

    odd = os.fsdecode(b"a\nb\tc\x1b[31m\xff[red]d\x85.png")
    assert printable(odd) == "a\\nb\\tc\\x1b[31m\\xff[red]d\\x85.png"
    assert shown(odd) == "a\\nb\\tc\\x1b[31m\\xff\\[red]d\\x85.png"  # rich markup escaped
    assert printable("line\u0085next\u2028") == "line\\x85next\u2028"  # C1 control escaped too
    assert printable("thorax-ü.png") == "thorax-ü.png"  # printable UTF-8 is left alone


@pytest.mark.parametrize(("argv", "status"), [(["--version"], 0), (["runs", "show", "no-such-run"], 2)])
def test_ctrl_c_after_the_command_finished_keeps_its_status(argv, status, tmp_path) -> None:
    """A Ctrl-C during the exit hooks (after the summary was printed) printed an "Exception ignored"
    traceback after a successful command. It now ends the process at once with the command's own status.
    The SIGINT is sent from an exit hook registered first, so it runs last, when the command is done."""
    code = (
        "import atexit, os, signal, sys, time\n"
        "atexit.register(lambda: (os.kill(os.getpid(), signal.SIGINT), time.sleep(5)))\n"
        "from featcache.cli.app import main\n"
        f"sys.argv = ['featcache', *{argv!r}]\n"
        "main()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert proc.returncode == status, proc.stderr
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr, proc.stderr


@pytest.mark.parametrize(("argv", "said"), [
    (["fit", "--head", "logreg", "--seed", "1", "--seed", "2"],
     "--seed was given twice (--seed 1, --seed 2)"),
    (["fit", "--seed=1", "--head", "knn", "--seed", "3"], "--seed was given twice (--seed=1, --seed 3)"),
    (["report", "--inspect", "--no-inspect"], "--inspect was given twice (--inspect, --no-inspect)"),
    (["cache", "merge", "--wait", "1", "a", "--wait", "2", "--wait", "3"],
     "--wait was given 3 times (--wait 1, --wait 2, --wait 3)"),
])
def test_a_single_value_option_given_twice_is_refused(argv, said, tmp_path, monkeypatch, capsys) -> None:
    """click keeps the last value of a repeated option without a word: `fit --seed 1 ... --seed 2` recorded
    seed 2. It is refused before any work, in one sentence."""
    from featcache.cli.app import run

    monkeypatch.chdir(tmp_path)
    assert run(argv) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert err.startswith(f"error: {said}") and err.endswith("give it once (the last one would win without "
                                                             "a word).")
    assert not any(tmp_path.iterdir())  # nothing was written


def test_repeatable_options_values_that_look_like_options_and_help_are_not_refused() -> None:
    """--tag and --grid repeat on purpose; a value is skipped even when it looks like an option
    (--title --seed); --help and anything after `--` are left to click."""
    from featcache.cli.app import app
    from featcache.cli.repeats import check_repeated_options

    root = typer.main.get_command(app)
    check_repeated_options(root, ["run", "--tag", "a", "--tag", "b", "--grid", "C=1", "--grid", "mlp:lr=1"])
    check_repeated_options(root, ["report", "--title", "--metric", "--metric", "auc"])
    check_repeated_options(root, ["fit", "--seed", "1", "--seed", "2", "--help"])
    check_repeated_options(root, ["predict", "--", "--out", "--out"])
    check_repeated_options(root, ["fit", "--seed", "1", "--nope", "--seed"])  # click names --nope itself


def test_progress_into_a_log_is_dated_lines_not_silence(monkeypatch) -> None:
    """rich's bar is off where it cannot animate, so `featcache run > log 2>&1` wrote nothing for the whole
    run (a researcher's audit): a log gets a line at most every interval and the end of a phase that got
    one; a command done within the interval prints nothing (its one error message stays alone)."""
    from featcache.cli.text import LogLines
    from rich.console import Console

    from featcache.progress import ProgressEvent

    clock = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    console = Console(record=True, width=200)
    log = LogLines(console, every=30)
    for done in range(0, 101, 10):  # 11 s of hashing: nothing
        log(ProgressEvent("hash", done, 100, ""))
        clock[0] += 1
    assert console.export_text(clear=False) == ""
    for done in range(0, 61):  # a minute of extraction: a line at 30 s and at 60 s, then its end
        log(ProgressEvent("extract", done, 61, "[red]x\nray"))
        clock[0] += 1
    log(ProgressEvent("extract", 61, 61, "[red]x\nray"))
    log(ProgressEvent("extract", 61, 61, "[red]x\nray"))  # the same finished count again: said once
    log(ProgressEvent("fit", 3, 3, "done"))  # a phase that never got a line: its end is not said either
    lines = console.export_text().splitlines()
    assert [line.split(" ", 1)[1] for line in lines] == [  # markup and a newline shown as they are
        "extract 19/61 [red]x\\nray", "extract 49/61 [red]x\\nray", "extract 61/61 [red]x\\nray"]
    assert all(re.match(r"\d\d:\d\d:\d\d ", line) for line in lines)
