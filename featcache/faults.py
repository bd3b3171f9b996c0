"""Named crash points for fault-injection tests.

Crash-safety claims ("a kill -9 loses at most the chunk in flight") are only worth something if
tests kill the process at the dangerous moments, not at a random time. Code calls
``crash_point("name")`` at those moments; it does nothing unless the environment variable
``FEATCACHE_CRASH_AT`` names that point, e.g. ``FEATCACHE_CRASH_AT=cache.after_data_flush:3``
(SIGKILL this process the 3rd time the point is reached). Several points may be given,
separated by commas. The cost when unset is one dict lookup.
"""
from __future__ import annotations

import os
import signal

_ENV = "FEATCACHE_CRASH_AT"
_hits: dict[str, int] = {}


def _targets() -> dict[str, int]:
    spec = os.environ.get(_ENV, "")
    out: dict[str, int] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, nth = item.partition(":")
        out[name] = int(nth) if nth else 1
    return out


def crash_point(name: str) -> None:
    """SIGKILL the current process here if ``FEATCACHE_CRASH_AT`` asks for it."""
    if _ENV not in os.environ:
        return
    nth = _targets().get(name)
    if nth is None:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] >= nth:
        os.kill(os.getpid(), signal.SIGKILL)
