"""Root typer app.

Thin by design: each command module parses flags, calls the library and renders with rich.
Library errors (:class:`featcache.errors.FeatcacheError`) become one sentence on stderr and a
non-zero exit status, never a traceback; so do operating-system errors (exit 1).
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import warnings
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape

from featcache.errors import FeatcacheError, os_reason

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's C++ banner off the CLI


def _hide_flag_placeholders() -> None:
    """Show on/off flags in ``--help`` without a value placeholder.

    Why: typer 0.29's rich help prints the type of every option, flags included (``--json <bool>``,
    ``--help <bool>``), which reads as if the flag took a value; ``--json true`` then fails with "unexpected
    extra argument". A flag with its own metavar keeps it. Typer versions without ``display_type_rich``
    print no placeholder for flags, so there is nothing to change.
    """
    from typer.core import TyperOption

    original = getattr(TyperOption, "display_type_rich", None)
    if original is None or getattr(original, "_featcache_flags", False):
        return

    def display_type_rich(self: Any, ctx: Any) -> str | None:
        if getattr(self, "is_flag", False) and self.metavar is None:
            return None
        return original(self, ctx)

    display_type_rich._featcache_flags = True  # type: ignore[attr-defined]  # patch once per process
    TyperOption.display_type_rich = display_type_rich  # type: ignore[method-assign]


_hide_flag_placeholders()

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    # -h too: the spelling most command-line tools accept, and a new user's first guess (it was "No such
    # option: -h"); click passes it on to every subcommand's context, and no featcache option uses -h
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    help="featcache: extract frozen-CNN features once into an HDF5 cache, then fit and compare "
    "many cheap classifier heads and publish a report.\n\n"
    "Example: featcache demo   (the whole pipeline on 96 bundled chest X-rays)",
)


def version_text() -> str:
    """What both `featcache version` and `featcache --version` print: the featcache version on the first
    line (what a script reads), then the versions of the libraries that move the numbers and the Keras
    backend, as run.json records them. Why the libraries: a bug report or a "same command, other numbers"
    question needs them, and two spellings of one question should not give two answers. Read from the
    installed packages' metadata, without importing TensorFlow or Keras, so it stays instant."""
    from featcache import __version__
    from featcache.runs import keras_backend, library_versions

    libraries = {k: v for k, v in library_versions().items() if k != "featcache"}  # the line above says it
    return (f"featcache {__version__}\n" + ", ".join(f"{k} {v}" for k, v in libraries.items())
            + f"; Keras backend {keras_backend()}")


def _show_version(value: bool) -> None:
    if value:
        typer.echo(version_text())
        raise typer.Exit()


@app.callback()
def _root(
    show_version: bool = typer.Option(False, "--version", callback=_show_version, is_eager=True,
                                      help="Print the featcache and library versions (as `featcache "
                                      "version`) and exit."),
) -> None:
    """Options of featcache itself (the help text is the Typer app's)."""

err_console = Console(stderr=True)

# Each command module exposes ``register(app: typer.Typer) -> None``.
from featcache.cli import (  # noqa: E402 - registered after the app exists
    cache_cmd,
    data_cmd,
    extract_cmd,
    fit_cmd,
    pipeline_cmd,
    predict_cmd,
    report_cmd,
    runs_cmd,
)

for _module in (extract_cmd, cache_cmd, data_cmd, fit_cmd, runs_cmd, predict_cmd, report_cmd, pipeline_cmd):
    _module.register(app)


@app.command()
def version() -> None:
    """Print the featcache version, then the library versions and Keras backend (same as --version).

    Example: featcache version
    """
    typer.echo(version_text())


class Terminated(KeyboardInterrupt):
    """SIGTERM (docker stop, systemd, SLURM), unwound like Ctrl-C: every ``finally`` runs, so cache writers
    close cleanly and locks are released, instead of the abrupt end of the default handler."""


_terminated = False  # set by the SIGTERM handler: typer reports both signals as exit 130


def _on_term(signum: int, frame: object) -> None:
    global _terminated
    _terminated = True
    raise Terminated()


def _in_gc_callback(frame: Any) -> bool:
    """Whether ``frame`` runs inside a garbage-collector callback (JAX registers one).

    A KeyboardInterrupt raised there is printed and dropped by Python, and the command runs on to its end.
    """
    import gc

    codes = {getattr(cb, "__code__", None) for cb in gc.callbacks} - {None}
    while frame is not None and codes:
        if frame.f_code in codes:
            return True
        frame = frame.f_back
    return False


def _on_int(signum: int, frame: Any) -> None:
    if _in_gc_callback(frame):  # deliver it again a moment later, outside the callback
        timer = threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGINT))
        timer.daemon = True
        timer.start()
        return
    raise KeyboardInterrupt


def install_signal_handlers() -> None:
    """Ctrl-C that is never swallowed, and SIGTERM handled like it (exit 143 with the same sentence)."""
    signal.signal(signal.SIGINT, _on_int)
    signal.signal(signal.SIGTERM, _on_term)


def run(argv: list[str] | None = None) -> int:
    """Run the CLI with ``argv`` and return the exit status (used by tests and ``main``)."""
    args = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    # scikit-learn's raw ConvergenceWarning (with a featcache source path) reached stderr beside fit's note,
    # which counts the unconverged fits and says how to avoid them (a researcher's audit); the library
    # still warns, as GridSearchCV would, for Python callers
    warnings.filterwarnings("ignore", message="lbfgs failed to converge")
    # the svm head's solvers, counted the same way (liblinear: LinearSVC; libsvm: SVC)
    warnings.filterwarnings("ignore", message="Liblinear failed to converge")
    warnings.filterwarnings("ignore", message="Solver terminated early")
    try:
        from featcache.cli.repeats import check_repeated_options

        root = typer.main.get_command(app)
        check_repeated_options(root, args)
        # the command line as typed, for run.json (`typed_command`): sys.argv is the caller's in-process
        app(args=_help_when_bare(root, args), prog_name="featcache", standalone_mode=True,
            obj={"argv": ["featcache", *args]})
    except SystemExit as exc:  # typer/click exit normally through SystemExit
        code = exc.code
        if code == 130:  # typer turns Ctrl-C (and our SIGTERM) into a silent Exit(130): say what was kept
            _print_interrupted(args)
            return 143 if _terminated else 130
        return code if isinstance(code, int) else (0 if code is None else 1)
    except FeatcacheError as exc:
        sentence = str(exc).strip()
        if sentence and sentence[-1] not in ".!?":
            sentence += "."  # one full sentence, whichever module raised it
        # soft_wrap: one line that the terminal wraps, so a path in it is not split by a newline
        err_console.print(f"[bold red]error:[/] {escape(sentence)}", highlight=False, soft_wrap=True)
        return exc.exit_code
    except KeyboardInterrupt:  # typer versions that let it through
        _print_interrupted(args)
        return 143 if _terminated else 130
    except OSError as exc:  # a folder that cannot be created, a full disk, a path through a file
        words = [a for a in args if not a.startswith("-")]
        err_console.print(f"[bold red]error:[/] {escape(_os_error_sentence(exc, words[:2]))}",
                          highlight=False, soft_wrap=True)
        return 1
    return 0


def _help_when_bare(root: Any, args: list[str]) -> list[str]:
    """``args`` with ``--help`` added when they name a command group and nothing else (``featcache``,
    ``featcache cache``, ``featcache data download``), so that the help they show ends with status 0.

    Why: typer's ``no_args_is_help`` printed the help on stdout and then exited 2, click's status for a
    usage error. A new user who typed `featcache` to see what it offers got a failing status (a red prompt,
    a stopped `set -e` script) for an answer; asking for nothing is asking for the help, so `featcache`
    and `featcache --help` now end alike. ``root`` is the click command of ``app``.
    """
    command = root
    for token in args:
        sub = (getattr(command, "commands", None) or {}).get(token)
        if sub is None:  # an option, a leaf command's arguments or a typo: click handles them as before
            return args
        command = sub
    return [*args, "--help"] if getattr(command, "commands", None) else args


# What an operating-system error leaves behind, by command: the commands that write as they go keep what
# they finished; report publishes only a whole report; the rest (predict, inspect, ls, verify) write nothing.
_SAVED = "Anything finished before the error is kept."  # "is saved" read as if work had been done
_KEPT = {**dict.fromkeys(("extract", "fit", "run", "demo", "cache merge", "data download"), _SAVED),
         "report": "The previous report is kept whole."}


def _kept(words: list[str]) -> str:
    """What a command keeps when it stops early (``_KEPT``), from its words without flags; "" for the
    commands that change nothing."""
    return _KEPT.get(" ".join(words[:2])) or _KEPT.get(words[0] if words else "", "")


def _file_in_the_way(exc: OSError, paths: list[str]) -> str | None:
    """The part of ``paths`` that is a regular file where the operation needed a folder (``--out
    a-file/report``, ``--cache-dir`` under a file), for a "Not a directory" or "File exists" error; None
    otherwise, or when no such file is found (then the operating system's words stand alone)."""
    import errno

    from featcache.errors import nearest_existing

    if exc.errno not in (errno.ENOTDIR, errno.EEXIST):
        return None
    found = (nearest_existing(path) for path in paths)
    return next((os.fsdecode(f) for f in found if f.exists() and not f.is_dir()), None)


def _os_error_sentence(exc: OSError, command: list[str] | None = None) -> str:
    """What the operating system refused, and where. Library code turns the errors it expects (damaged
    caches, unreadable images, locked files) into FeatcacheError; this is for the rest, such as an output
    folder under a regular file or on a read-only mount, which would otherwise end in a traceback."""
    reason = os_reason(exc)  # HDF5's errors carry several lines of detail; the reason is a few words
    paths = [os.fsdecode(f) for f in (exc.filename, exc.filename2) if f is not None]
    where = f" ({' -> '.join(paths)})" if paths else ""
    blocker = _file_in_the_way(exc, paths)
    if blocker is not None:  # "Not a directory" / "File exists" left the user to find which part was a file
        reason += f": {blocker} is a file, where a folder is needed; choose another path"
    kept = _kept(list(command or []))
    return f"the operating system refused a file operation{where}: {reason}." + (f" {kept}" if kept else "")


def _print_interrupted(args: list[str] | None = None) -> None:
    """One line on what was kept, by command: a resumable one saved its finished work, a report kept the
    previous one, the others (predict, listings) changed nothing and have nothing to resume. A second
    Ctrl-C while it prints (people press it twice) is ignored: it raised inside rich and buried the line
    under pages of chained tracebacks."""
    kept = _kept([a for a in (args or []) if not a.startswith("-")])
    if kept == _SAVED:
        kept = "finished work is saved; run the same command to resume."
    elif kept:
        kept = kept[0].lower() + kept[1:]
    else:
        kept = "nothing was changed."
    old = None
    with contextlib.suppress(ValueError, OSError):  # not the main thread: no handler to swap
        old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        what = "terminated (SIGTERM)" if _terminated else "interrupted"
        err_console.print(f"[bold red]{what}:[/] {kept}")
    except KeyboardInterrupt:
        pass
    finally:
        if old is not None:
            signal.signal(signal.SIGINT, old)


def main() -> None:
    """Console-script entry point."""
    install_signal_handlers()
    code = run(sys.argv[1:])
    _exit_on_signal(code)
    sys.exit(code)


def _exit_on_signal(code: int) -> None:
    """From now on, Ctrl-C or SIGTERM ends the process at once with the command's own status.

    Why: the command has finished and said so, but the exit hooks (TensorFlow's, JAX's, joblib's) can
    take a while; a Ctrl-C then printed an "Exception ignored" traceback after a successful command.
    Nothing is left to save: every file is closed. (In the last ~1 s, after the hooks, Python has
    restored the default handlers and a Ctrl-C still ends the process with status 130.)
    """
    def finish(signum: int, frame: object) -> None:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)

    signal.signal(signal.SIGINT, finish)
    signal.signal(signal.SIGTERM, finish)


if __name__ == "__main__":  # pragma: no cover
    main()
