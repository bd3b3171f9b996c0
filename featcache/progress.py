"""Progress events: how the library reports long work without printing.

The CLI turns these into rich progress bars; tests and other callers may ignore them.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class ProgressEvent:
    """One step of a long task (``done`` of ``total`` units in ``phase``)."""

    phase: str
    done: int
    total: int | None
    message: str = ""


ProgressFn = Callable[[ProgressEvent], None]


def emit(progress: ProgressFn | None, phase: str, done: int, total: int | None, message: str = "") -> None:
    """Send an event if someone listens; a no-op otherwise."""
    if progress is not None:
        progress(ProgressEvent(phase, done, total, message))
