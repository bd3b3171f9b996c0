"""The sweep lock: the same sweep, or another sweep with a config in common, started while a fit trains it
is refused; a killed fit leaves no lock behind (the OS drops a dead process's flock), so a rerun resumes
as before."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from featcache.errors import RunError
from featcache.runs import LOCKS_DIR, sweep_lock


def test_a_held_sweep_is_refused_with_its_holder_and_released_after(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    with sweep_lock(runs, "aaaaaaaaaaaa"):
        assert (runs / LOCKS_DIR / "aaaaaaaaaaaa.lock").is_file()
        # flock conflicts between two opens of the file, also inside one process
        held = rf"sweep aaaaaaaaaaaa is being trained now by process {os.getpid()} on .*stop it and rerun"
        with pytest.raises(RunError, match=held), sweep_lock(runs, "aaaaaaaaaaaa"):
            pass
        with sweep_lock(runs, "bbbbbbbbbbbb"):  # another sweep is not held up
            pass
        assert (runs / LOCKS_DIR / "aaaaaaaaaaaa.lock").is_file()  # the refusal did not release it
    assert not (runs / LOCKS_DIR).exists() and runs.is_dir()
    with sweep_lock(runs, "aaaaaaaaaaaa"):
        pass


def test_the_lock_is_released_when_the_body_fails(tmp_path: Path) -> None:
    with pytest.raises(ValueError), sweep_lock(tmp_path, "aaaaaaaaaaaa"):
        raise ValueError("a failing sweep")
    with sweep_lock(tmp_path, "aaaaaaaaaaaa"):
        pass


def test_a_killed_holder_leaves_a_file_but_no_lock(tmp_path: Path) -> None:
    code = ("import sys, time; from featcache.runs import sweep_lock\n"
            "with sweep_lock(sys.argv[1], 'aaaaaaaaaaaa', ['h1', 'h2']):\n"
            "    print('held', flush=True); time.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunError, match=f"by process {holder.pid} on"), \
                sweep_lock(tmp_path, "aaaaaaaaaaaa"):
            pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (tmp_path / LOCKS_DIR / "aaaaaaaaaaaa.lock").is_file()  # killed before its cleanup
    with sweep_lock(tmp_path, "bbbbbbbbbbbb", ["h2"]):  # its claim died with it
        pass
    with sweep_lock(tmp_path, "aaaaaaaaaaaa"):  # and nothing holds its lock
        pass
    assert not (tmp_path / LOCKS_DIR).exists()


def test_a_config_claimed_by_another_live_sweep_is_refused(tmp_path: Path) -> None:
    with sweep_lock(tmp_path, "aaaaaaaaaaaa", ["h1", "h2"]):
        overlap = (rf"1 of this sweep's 2 config\(s\) are being trained now by sweep aaaaaaaaaaaa "
                   rf"\(process {os.getpid()} on .*\); wait")
        with pytest.raises(RunError, match=overlap), sweep_lock(tmp_path, "bbbbbbbbbbbb", ["h2", "h3", "h3"]):
            pass
        assert sorted(p.name for p in (tmp_path / LOCKS_DIR).iterdir()) == ["aaaaaaaaaaaa.lock"]
        with sweep_lock(tmp_path, "bbbbbbbbbbbb", ["h3"]):  # no config in common
            pass
    with sweep_lock(tmp_path, "bbbbbbbbbbbb", ["h2", "h3"]):  # the first has finished
        pass
