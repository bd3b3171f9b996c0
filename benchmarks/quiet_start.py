"""Import the Keras backend with TensorFlow's native start-up lines filtered, as the CLI does.

Shared by the benchmark scripts. featcache's CLI package (``featcache.cli``) exists only when featcache
is installed; run from a source tree on PYTHONPATH (``gpu_mlp.sh``) the lines simply stay.
"""
from __future__ import annotations


def quiet_backend_start() -> None:
    """Filter the start-up lines by ``TF_CPP_MIN_LOG_LEVEL`` if the CLI's filter is importable."""
    try:
        from featcache.cli.native_log import import_backend_quietly
    except ImportError:  # featcache on PYTHONPATH from a source tree: no CLI package
        return
    import_backend_quietly()
