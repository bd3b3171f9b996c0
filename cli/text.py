"""How text from the data (file names, labels, tags, reasons) is shown in the terminal.

A file name may hold bytes that are not UTF-8 (kept as surrogates by ``os.fsdecode``), control
characters (a newline would split a table row in two and make a listing lie about how many files
there are; an escape sequence would reach the terminal) and rich markup (``[red]`` would vanish).
:func:`shown` turns any of them into visible escapes, so what is printed is one line that names the
file unambiguously.
"""
from __future__ import annotations

import os
import re
from typing import Any

from rich.markup import escape

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _visible(match: re.Match[str]) -> str:
    char = match.group()
    return _NAMED.get(char, f"\\x{ord(char):02x}")


def printable(text: object) -> str:
    """One printable line: undecodable bytes as ``\\xNN``, control characters as ``\\n``/``\\xNN``."""
    raw = os.fsencode(str(text)).decode("utf-8", "backslashreplace")
    return _CONTROL.sub(_visible, raw)


def shown(text: object) -> str:
    """:func:`printable`, with rich markup escaped, for use inside a rich format string."""
    return escape(printable(text))


def print_table(console: Any, table: Any) -> None:
    """Print a rich ``table``; into a pipe or a file (no terminal, no $COLUMNS) as wide as its content.

    Why: without a terminal rich lays tables out in 80 columns and wraps cells mid-value, so `runs ls > f`
    split numbers (0.944 as "0.944" and "4") and `predict DIR > f` split file names, which grep and
    scripts then missed. A terminal, or $COLUMNS, keeps its width.
    """
    if not console.is_terminal and "COLUMNS" not in os.environ:
        from rich.measure import Measurement

        wide = console.options.update(max_width=100_000)  # rich clamps a measurement to the width
        need = Measurement.get(console, wide, table).maximum
        if need > console.width:
            console.width = need
    console.print(table)


class LogLines:
    """Progress as plain, dated lines, for a console that cannot animate a bar (a log file, nohup, a batch
    job): a line at most every ``every`` seconds with what is being done, and the end of each phase that got
    one. A command done (or failed) within ``every`` seconds prints nothing, so its output, or its one error
    message, stays as it was.

    Why: rich's bar is off where it cannot animate, so `featcache run > log 2>&1` wrote nothing for the
    whole run (a 3-class svm grid ran 8 minutes in silence; a researcher's audit).
    """

    def __init__(self, console: Any, every: float = 30.0) -> None:
        import time

        self.console, self.every = console, every
        self._last = time.monotonic()  # the last line, or the start
        self._said: dict[str, tuple] = {}  # per phase that got a line: its last line's state

    def __call__(self, ev: Any) -> None:
        import time

        now = time.monotonic()
        state = (ev.done, ev.total, ev.message)
        finished = (ev.total is not None and ev.done >= ev.total and ev.phase in self._said
                    and self._said[ev.phase] != state)
        if not (finished or now - self._last >= self.every):
            return
        self._last, self._said[ev.phase] = now, state
        count = f"{ev.done}/{ev.total}" if ev.total is not None else str(ev.done)
        stamp = time.strftime("%H:%M:%S")
        self.console.print(f"{stamp} {ev.phase} {count} {printable(ev.message)}", markup=False,
                           highlight=False, soft_wrap=True)
