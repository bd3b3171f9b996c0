"""Keep TensorFlow's native start-up log off the CLI's stderr.

TensorFlow 2.21 writes its C++ start-up lines (the oneDNN notice and "Could not find cuda drivers",
twice, and on a machine without a GPU a "failed call to cuInit" *error*) through absl before absl's
logging is initialised, so ``TF_CPP_MIN_LOG_LEVEL`` no longer hides them. A user's first
``featcache demo`` then opens with nine lines of native log, one of them a CUDA error that means only
"no GPU here". C++ writes them to file descriptor 2, out of Python's reach, so the commands that need
the backend import it once with descriptor 2 pointed at a temporary file and then write back every
line that ``TF_CPP_MIN_LOG_LEVEL`` would have kept (the CLI sets it to 2 unless the user did).
This is presentation, so it lives in the CLI; the library never touches descriptor 2.
"""
from __future__ import annotations

import logging
import os
import re
import sys
import tempfile
from collections.abc import Callable

#: absl's line prefix: severity letter, MMDD, time, thread id, ``file:line]``.
_ABSL_LINE = re.compile(r"^([IWEF])\d{4} \S+\s+\d+ [^\]\s]+:\d+\] ")
#: Lines that start a message of their own, never an absl continuation: Python warnings, tracebacks.
_OWN_MESSAGE = re.compile(r"^(.+:\d+: \w*(Warning|Error)\b|Traceback \(most recent call last\))")
_SEVERITY = {"I": 0, "W": 1, "E": 2, "F": 3}
_PREINIT_BANNER = "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
_NO_CUDA_DRIVER = "Could not find cuda drivers"
_CUINIT_FAILED = "failed call to cuInit"


def min_log_level() -> int:
    """``TF_CPP_MIN_LOG_LEVEL`` as TensorFlow reads it: 0 shows all, 1 hides INFO, 2 WARNING, 3 ERROR."""
    try:
        return max(0, min(3, int(os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0"))))
    except ValueError:
        return 0


def kept_lines(text: str, min_level: int) -> str:
    """The lines of captured native stderr that ``min_level`` keeps, in order.

    absl messages below ``min_level`` go, with their continuation lines (up to the next absl line,
    Python warning or traceback) and absl's banner about logging before its initialisation. FATAL
    messages and lines that follow no dropped absl line (Python warnings, other libraries'
    messages) stay. CUDA's "failed call to cuInit" error also goes when, in the same capture,
    TensorFlow said it found no CUDA driver: then it only restates that there is no GPU. On a
    machine with a driver it stays, because there it means something is broken.
    """
    lines = text.splitlines(keepends=True)
    no_driver = any(_NO_CUDA_DRIVER in line for line in lines)
    kept: list[str] = []
    dropping = False  # inside a dropped absl message, whose later lines carry no prefix
    for line in lines:
        if min_level >= 1 and line.strip() == _PREINIT_BANNER:
            dropping = False
            continue
        if _OWN_MESSAGE.match(line):
            dropping = False
        match = _ABSL_LINE.match(line)
        if match:
            severity = _SEVERITY[match.group(1)]
            dropping = min_level >= 1 and severity < 3 and (
                severity < min_level or (no_driver and _CUINIT_FAILED in line)
            )
        if not dropping:
            kept.append(line)
    return "".join(kept)


def run_capturing_fd2(fn: Callable[[], object]) -> tuple[str, BaseException | None]:
    """Call ``fn`` with file descriptor 2 redirected to a temporary file.

    Returns what was written to descriptor 2 (decoded, undecodable bytes replaced) and the
    exception ``fn`` raised, if any, so the caller decides what to show. Descriptor 2 is restored
    whatever happens, Ctrl-C included (KeyboardInterrupt is re-raised after the restore).
    """
    sys.stderr.flush()
    saved = os.dup(2)
    error: BaseException | None = None
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            fn()
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # noqa: BLE001 - handed back to the caller
            error = exc
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            text = tmp.read().decode("utf-8", errors="replace")
    return text, error


def _import_backend(tensorflow_too: bool = False) -> None:
    import importlib.util

    import keras

    if keras.backend.backend() == "tensorflow" or (
            tensorflow_too and importlib.util.find_spec("tensorflow") is not None):
        import tensorflow as tf

        tf.config.list_physical_devices()  # CUDA's start-up (cuInit) logs here


def _refuse_backend(error: Exception) -> None:
    """A Keras backend that does not exist or is not installed: one sentence saying where it was set.
    Other import failures are left to the command (see ``import_backend_quietly``)."""
    import importlib.util

    from featcache.errors import ConfigError
    from featcache.runs import keras_backend

    name = keras_backend()
    if "Unable to import backend" not in str(error) and (
            name in ("tensorflow", "jax") and importlib.util.find_spec(name) is not None):
        return
    where = ("$KERAS_BACKEND" if os.environ.get("KERAS_BACKEND")
             else "the \"backend\" of keras.json in $KERAS_HOME (or ~/.keras)")
    installed = [b for b, module in (("tensorflow", "tensorflow"), ("jax", "jax"))
                 if importlib.util.find_spec(module) is not None]
    raise ConfigError(f"Keras cannot use the backend '{name}' set by {where} ({error}); set it to "
                      f"{' or '.join(installed) or 'tensorflow'} (installed here)") from None


def import_backend_quietly(tensorflow_too: bool = False) -> None:
    """Import Keras and its backend with the native start-up log filtered by ``TF_CPP_MIN_LOG_LEVEL``.

    ``tensorflow_too``: also import TensorFlow, when installed, under another Keras backend (JAX). Why:
    training an mlp head calls ``keras.utils.set_random_seed``, which imports TensorFlow whenever it is
    installed, to seed it too; imported there, its start-up lines reached the terminal unfiltered.

    If the import fails, everything it wrote is shown unfiltered and nothing is raised here: the
    command then meets the same failure where it always did and reports it its own way. At level 2
    or more TensorFlow's Python logger is also set to ERROR, which hides its warnings about
    ``tf.function`` retracing when a command predicts with several small models in turn.
    """
    level = min_log_level()
    text, error = run_capturing_fd2(lambda: _import_backend(tensorflow_too))
    if isinstance(error, (ValueError, ImportError)):
        _refuse_backend(error)
    shown = text if error is not None else kept_lines(text, level)
    if shown:
        sys.stderr.write(shown)
        sys.stderr.flush()
    if error is None and level >= 2:
        logging.getLogger("tensorflow").setLevel(logging.ERROR)
