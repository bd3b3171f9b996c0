"""The CLI's filter for TensorFlow's native start-up log (featcache.cli.native_log)."""
from __future__ import annotations

import importlib.util
import os

import pytest
from featcache.cli import native_log
from featcache.cli.native_log import kept_lines, run_capturing_fd2

BANNER = "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
ONEDNN = "I0000 00:00:1796355911.412531   17883 port.cc:153] oneDNN custom operations are on.\n"
NO_DRIVER = (
    "I0000 00:00:1796355911.412907   17883 cudart_stub.cc:31] Could not find cuda drivers on your "
    "machine, GPU will not be used.\n"
)
GUARD = "I0000 00:00:1796355911.5   17883 cpu_feature_guard.cc:227] This TensorFlow binary is optimized.\n"
GUARD_MORE = "To enable the following instructions: AVX2 AVX512F FMA, rebuild TensorFlow.\n"
CUINIT = (
    "E0000 00:00:1796355915.665654   17883 cuda_platform.cc:52] failed call to cuInit: INTERNAL: "
    "CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)\n"
)
OTHER_ERROR = "E1204 03:41:00.000001   17883 some_op.cc:10] could not open libfoo.so\n"
WARN = "W1204 03:41:00.000002   17883 other.cc:20] slow path taken\n"
FATAL = "F1204 03:41:00.000003   17883 check.cc:30] Check failed: x > 0\n"
PY_WARNING = "/site-packages/foo.py:3: UserWarning: something a user should see\n"

STARTUP = BANNER + ONEDNN + NO_DRIVER + GUARD + GUARD_MORE + PY_WARNING + BANNER + ONEDNN + NO_DRIVER + CUINIT


def test_level_2_drops_tensorflows_startup_lines_and_keeps_the_rest():
    assert kept_lines(STARTUP, 2) == PY_WARNING
    # errors that are not CUDA's "no GPU here", and fatal lines, stay; warnings go at level 2
    assert kept_lines(BANNER + OTHER_ERROR + WARN + FATAL, 2) == OTHER_ERROR + FATAL


def test_levels_follow_tf_cpp_min_log_level():
    assert kept_lines(STARTUP + OTHER_ERROR + WARN + FATAL, 0) == STARTUP + OTHER_ERROR + WARN + FATAL
    assert kept_lines(ONEDNN + WARN + OTHER_ERROR, 1) == WARN + OTHER_ERROR
    assert kept_lines(ONEDNN + WARN + OTHER_ERROR + FATAL, 3) == FATAL


def test_cuinit_failure_is_kept_when_a_cuda_driver_was_found():
    # without TensorFlow's "no driver" line the cuInit error means a broken GPU set-up: show it
    assert kept_lines(BANNER + ONEDNN + CUINIT, 2) == CUINIT


def test_capture_restores_descriptor_2(capfd):
    def noisy() -> None:
        os.write(2, b"native line\n")

    text, error = run_capturing_fd2(noisy)
    assert (text, error) == ("native line\n", None)
    os.write(2, b"after\n")
    assert capfd.readouterr().err == "after\n"


def test_capture_hands_back_the_exception(capfd):
    def broken() -> None:
        os.write(2, b"partial output\n")
        raise ImportError("no module named tensorflow")

    text, error = run_capturing_fd2(broken)
    assert text == "partial output\n" and isinstance(error, ImportError)
    os.write(2, b"restored\n")
    assert capfd.readouterr().err == "restored\n"


def test_import_backend_quietly_shows_only_kept_lines(monkeypatch, capfd):
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    monkeypatch.setattr(native_log, "_import_backend", lambda *_a: os.write(2, STARTUP.encode()))
    native_log.import_backend_quietly()
    assert capfd.readouterr().err == PY_WARNING


def test_import_backend_quietly_shows_everything_when_the_import_fails(monkeypatch, capfd):
    def failing(*_a) -> None:
        os.write(2, STARTUP.encode())
        raise ImportError("broken install")

    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    monkeypatch.setattr(native_log, "_import_backend", failing)
    native_log.import_backend_quietly()  # the command meets the failure later, in its own words
    assert capfd.readouterr().err == STARTUP


@pytest.mark.parametrize("value, level", [("2", 2), ("", 0), ("x", 0), ("7", 3), ("-1", 0)])
def test_min_log_level_parsing(monkeypatch, value, level):
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", value)
    assert native_log.min_log_level() == level


def test_an_mlp_under_jax_does_not_print_tensorflows_startup_lines():
    """Under KERAS_BACKEND=jax, training an mlp calls keras.utils.set_random_seed, which imports
    TensorFlow (when installed) to seed it: its start-up lines reached the terminal unfiltered. The mlp
    commands now import it inside the filter first."""
    import subprocess
    import sys

    pytest.importorskip("jax")
    pytest.importorskip("tensorflow")
    script = ("from featcache.cli.native_log import import_backend_quietly\n"
              "import_backend_quietly(tensorflow_too={too})\n"
              "import keras\n"
              "keras.utils.set_random_seed(0)\n")
    env = {**os.environ, "KERAS_BACKEND": "jax", "TF_CPP_MIN_LOG_LEVEL": "2"}

    def startup_lines(too: bool) -> list[str]:
        proc = subprocess.run([sys.executable, "-c", script.format(too=too)], env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        return [line for line in proc.stderr.splitlines()
                if "absl::InitializeLog" in line or "cuda drivers" in line or "oneDNN" in line]

    if not startup_lines(False):
        pytest.skip("TensorFlow printed no start-up lines on this machine: nothing to filter")
    assert startup_lines(True) == []


@pytest.mark.parametrize("backend", ["foo", "torch"])
def test_a_backend_keras_cannot_use_is_one_sentence(tmp_path, backend):
    """KERAS_BACKEND=foo (or an uninstalled one) ended extract, mlp fits and predict in a traceback."""
    import subprocess
    import sys

    if backend == "torch" and importlib.util.find_spec("torch") is not None:
        pytest.skip("torch is installed here: Keras can use it")
    from conftest import write_xray

    write_xray(tmp_path / "d" / "train" / "a" / "x.png", 0, 16)
    code = "import sys; from featcache.cli.app import run; sys.exit(run(sys.argv[1:]))"
    env = {**os.environ, "KERAS_BACKEND": backend}
    proc = subprocess.run([sys.executable, "-c", code, "extract", "--data", str(tmp_path / "d"), "--backbone",
                           "mobilenet-0.75", "--weights", "none", "--cache-dir", str(tmp_path / "c")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"Keras cannot use the backend '{backend}' set by $KERAS_BACKEND" in " ".join(proc.stderr.split())
