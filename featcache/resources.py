"""What the machine offers a computation now: usable CPUs and available memory.

Why a module of its own: the logistic-regression search sizes its thread pool and its buffers with them,
and fit refuses a dense head whose weights cannot fit in memory, so neither borrows the other's helper.
"""
from __future__ import annotations

import os


def cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def available_memory(meminfo: str = "/proc/meminfo") -> float:
    """Bytes of memory available for new allocations now; infinity where the OS does not say.

    Linux's MemAvailable counts the page cache that can be dropped, which ``SC_AVPHYS_PAGES`` (free
    pages only) leaves out: after reading a large feature cache most memory is page cache, and free pages
    alone would make the search choose its slower one-workspace path without need.
    """
    try:
        with open(meminfo, encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return float("inf")




def cpu_model(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` says; recorded with every run
    because dense-head and feature numbers move in the last digits with the CPU type."""
    import platform

    try:
        with open(cpuinfo, encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
