"""Checkpoints left by interrupted MLP sweeps: `runs ls` tells interrupted from running sweeps, and
`runs drop-checkpoints` deletes them, never those of a sweep still running unless forced."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from featcache.cli.app import run as cli

from featcache.errors import RunError
from featcache.runs import CHECKPOINTS_DIR, drop_checkpoints, pending_checkpoints


def _dead_pid() -> int:
    """The pid of a process that has exited (reaped), as a killed fit leaves in its sweep.json."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _sweep(runs_dir: Path, sweep_id: str, pid: int, host: str | None = None, mb: int = 1) -> Path:
    """A sweep's checkpoint folder as fit leaves it: one chunk file and its label."""
    folder = runs_dir / CHECKPOINTS_DIR / sweep_id
    folder.mkdir(parents=True)
    (folder / "chunk-0.npz").write_bytes(b"\0" * (mb * 1_000_000))
    about = {"sweep_id": sweep_id, "command": ["featcache", "fit", "--head", "mlp", "--seed", sweep_id],
             "configs": 3, "owner": {"host": host or socket.gethostname(), "pid": pid}}
    (folder / "sweep.json").write_text(json.dumps(about))
    return folder


@pytest.fixture
def runs_dir(tmp_path: Path) -> Path:
    runs = tmp_path / "runs"
    _sweep(runs, "aaaaaaaaaaaa", _dead_pid(), mb=2)                # killed
    _sweep(runs, "bbbbbbbbbbbb", os.getpid())                      # its fit still runs (this process)
    _sweep(runs, "cccccccccccc", os.getpid(), host="elsewhere")    # another host: cannot be checked
    return runs


def test_a_sweep_whose_fit_still_runs_here_is_told_apart(runs_dir: Path) -> None:
    found = {p.sweep_id: p for p in pending_checkpoints(runs_dir)}
    assert set(found) == {"aaaaaaaaaaaa", "bbbbbbbbbbbb", "cccccccccccc"}
    assert found["bbbbbbbbbbbb"].running_pid == os.getpid()
    assert found["aaaaaaaaaaaa"].running_pid is None and found["cccccccccccc"].running_pid is None
    assert found["cccccccccccc"].other_host == "elsewhere"
    assert found["aaaaaaaaaaaa"].other_host is None and found["bbbbbbbbbbbb"].other_host is None
    assert [p.may_be_running for p in (found[k] for k in sorted(found))] == [False, True, True]
    assert found["aaaaaaaaaaaa"].size_bytes == 2_000_000


def test_drop_named_sweeps_deletes_only_them(runs_dir: Path) -> None:
    dropped = drop_checkpoints(runs_dir, ["aaaaaaaaaaaa"])
    assert [p.sweep_id for p in dropped] == ["aaaaaaaaaaaa"]
    assert sorted(p.name for p in (runs_dir / CHECKPOINTS_DIR).iterdir()) == ["bbbbbbbbbbbb", "cccccccccccc"]
    # another machine's sweep: its process cannot be checked from here, so it takes --force
    dropped = drop_checkpoints(runs_dir, ["cccccccccccc"], force=True)
    assert [p.sweep_id for p in dropped] == ["cccccccccccc"]
    assert [p.name for p in (runs_dir / CHECKPOINTS_DIR).iterdir()] == ["bbbbbbbbbbbb"]


def test_a_sweep_is_named_by_the_start_of_its_id(runs_dir: Path) -> None:
    """`runs show` takes part of a run id; drop-checkpoints refused the first characters of a sweep id."""
    _sweep(runs_dir, "aaaaaa000000", _dead_pid())
    before = sorted((runs_dir / CHECKPOINTS_DIR).iterdir())
    with pytest.raises(RunError, match="'aaaaaa' starts 2 sweep ids .*give more of the id"):
        drop_checkpoints(runs_dir, ["aaaaaa"])
    assert sorted((runs_dir / CHECKPOINTS_DIR).iterdir()) == before
    assert [p.sweep_id for p in drop_checkpoints(runs_dir, ["aaaaaaa"])] == ["aaaaaaaaaaaa"]
    assert [p.sweep_id for p in drop_checkpoints(runs_dir, ["aaaaaa000000"])] == ["aaaaaa000000"]


def test_a_refused_drop_deletes_nothing(runs_dir: Path) -> None:
    before = sorted((runs_dir / CHECKPOINTS_DIR).iterdir())
    with pytest.raises(RunError, match="no checkpoints of sweep nope"):
        drop_checkpoints(runs_dir, ["aaaaaaaaaaaa", "nope"])
    with pytest.raises(RunError, match=rf"bbbbbbbbbbbb \(process {os.getpid()}\) is still running.*--force"):
        drop_checkpoints(runs_dir, ["aaaaaaaaaaaa", "bbbbbbbbbbbb"])
    with pytest.raises(RunError, match=r"cccccccccccc \(host elsewhere\) was started on another machine.*"
                                       r"--force"):
        drop_checkpoints(runs_dir, ["aaaaaaaaaaaa", "cccccccccccc"])
    assert sorted((runs_dir / CHECKPOINTS_DIR).iterdir()) == before
    assert [p.sweep_id for p in drop_checkpoints(runs_dir, ["bbbbbbbbbbbb"], force=True)] == ["bbbbbbbbbbbb"]


def test_drop_all_keeps_sweeps_that_may_run_and_then_the_folder_goes(runs_dir: Path) -> None:
    assert [p.sweep_id for p in drop_checkpoints(runs_dir)] == ["aaaaaaaaaaaa"]
    assert sorted(p.sweep_id for p in pending_checkpoints(runs_dir)) == ["bbbbbbbbbbbb", "cccccccccccc"]
    drop_checkpoints(runs_dir, ["bbbbbbbbbbbb"], force=True)
    assert (runs_dir / CHECKPOINTS_DIR).is_dir()  # cccccccccccc still keeps its checkpoints there
    drop_checkpoints(runs_dir, ["cccccccccccc"], force=True)
    assert not (runs_dir / CHECKPOINTS_DIR).exists() and runs_dir.is_dir()


def test_cli_lists_then_drops(runs_dir: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    assert cli(["runs", "ls", "--runs-dir", str(runs_dir)]) == 0
    err = capsys.readouterr().err
    assert err.startswith("1 interrupted sweep(s), 1 running and 1 from other machines keep epoch "
                          "checkpoints in")
    assert "featcache runs drop-checkpoints ID" in err
    line = next(x for x in err.splitlines() if x.strip().startswith("bbbbbbbbbbbb"))
    assert f"(running now: process {os.getpid()}): featcache fit --head mlp --seed bbbbbbbbbbbb" in line
    assert "running now" not in next(x for x in err.splitlines() if x.strip().startswith("aaaaaaaaaaaa"))
    line = next(x for x in err.splitlines() if x.strip().startswith("cccccccccccc"))
    assert "(started on elsewhere: whether it still runs cannot be checked from here): featcache fit" in line

    assert cli(["runs", "drop-checkpoints", "--runs-dir", str(runs_dir)]) == 2
    assert "name the sweep ids" in capsys.readouterr().err
    assert cli(["runs", "drop-checkpoints", "aaaaaaaaaaaa", "--all", "--runs-dir", str(runs_dir)]) == 2
    assert "not both" in capsys.readouterr().err
    assert cli(["runs", "drop-checkpoints", "bbbbbbbbbbbb", "--runs-dir", str(runs_dir)]) == 2
    assert "still running on this machine" in capsys.readouterr().err
    assert cli(["runs", "drop-checkpoints", "cccccccccccc", "--runs-dir", str(runs_dir)]) == 2
    assert "started on another machine" in capsys.readouterr().err
    assert len(pending_checkpoints(runs_dir)) == 3

    assert cli(["runs", "drop-checkpoints", "--all", "--runs-dir", str(runs_dir)]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == "Deleted the checkpoints of 1 sweep(s) (2.0 MB): aaaaaaaaaaaa."
    assert captured.err.startswith("0 interrupted sweep(s), 1 running and 1 from other machines keep epoch "
                                   "checkpoints")


def test_run_files_name_the_file_a_full_disk_refused_and_are_readable_by_others(tmp_path: Path,
                                                                                   monkeypatch) -> None:
    """run.json and metrics.json were written 0600 (mkstemp) beside 0644 prediction files; and a write
    refused for lack of space raised OSError(28) with no file name, so the CLI could not say where."""
    import csv

    import numpy as np

    from featcache.runs import RunWriter

    w = RunWriter(tmp_path / "runs", {"head": "logreg", "config_hash": "c" * 64})
    w.write_metrics({"val": {"accuracy": 1.0}})
    umask = os.umask(0)
    os.umask(umask)
    for name in ("run.json", "metrics.json"):
        assert (w.path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name

    def disk_full(*_a, **_k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(csv, "writer", disk_full)
    with pytest.raises(OSError, match="No space left on device") as info:
        w.write_predictions("val", ["a.png"], ["k" * 64], np.array([0]), np.array([[0.9, 0.1]]),
                            np.array([0]), ["NORMAL", "PNEUMONIA"])
    assert info.value.errno == 28 and info.value.filename == str(w.path / "predictions_val.csv")


def test_a_run_refused_its_first_file_leaves_no_empty_folder(tmp_path: Path, monkeypatch) -> None:
    """A fit refused on its very first run.json (full disk) left an empty run folder that no rerun
    removed."""
    import featcache.runs as runs_mod

    def disk_full(path, obj):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(runs_mod, "write_json_atomic", disk_full)
    with pytest.raises(OSError, match="No space left"):
        runs_mod.RunWriter(tmp_path / "runs", {"head": "logreg", "config_hash": "c" * 64})
    assert list((tmp_path / "runs").iterdir()) == []


def test_prediction_csvs_do_not_hand_a_spreadsheet_a_formula(tmp_path: Path) -> None:
    """A class folder or file name starting with = (+, -, @) was written raw into predictions_*.csv,
    which a spreadsheet opening the file runs as a formula. It is written with a leading quote now, and
    read back (by the report and `Run.predictions`) as the name it is."""
    import csv

    import numpy as np

    from featcache.report.collect import read_predictions
    from featcache.runs import Run, RunWriter

    names = ["=HYPERLINK(\"http://x\")/a.png", "'quoted/b.png", "-2/c.png", "@SUM(1)/d.png", "plain/e.png"]
    groups = ["+1", "''", "p1", "=g", "p2"]
    w = RunWriter(tmp_path / "runs", {"head": "logreg", "config_hash": "c" * 64})
    w.write_predictions("val", names, ["k" * 64] * 5, np.zeros(5, int), np.full((5, 2), 0.5),
                        np.zeros(5, int), ["NORMAL", "PNEUMONIA"], groups=groups)
    path = w.path / "predictions_val.csv"
    with open(path, encoding="utf-8", newline="") as fh:
        raw = list(csv.DictReader(fh))
    assert [r["relpath"] for r in raw] == ["'" + n for n in names[:4]] + ["plain/e.png"]
    assert [r["group"] for r in raw] == ["'+1", "'''", "p1", "'=g", "p2"]
    back = read_predictions(path)
    assert back.relpaths == names and back.groups == groups
    rows = Run(w.id, w.path, {}).predictions("val")
    assert [r["relpath"] for r in rows] == names and [r["group"] for r in rows] == groups
    # a file written before the quoting keeps a name such as 'quoted/b.png as it is (runs pair by name)
    text = path.read_text(encoding="utf-8")
    path.write_text(text.replace("''quoted", "'quoted").replace(",'''\n", ",'p9\n"), encoding="utf-8")
    back = read_predictions(path)
    assert back.relpaths[1] == "'quoted/b.png" and back.groups[1] == "'p9" and back.relpaths[0] == names[0]


def test_a_resumed_sweep_is_running_before_its_first_save(runs_dir: Path) -> None:
    """A rerun of a killed sweep relabels its checkpoint folder only at its first save (3 minutes by
    default); until then the label named the killed fit, so `runs ls` called the sweep interrupted and
    `drop-checkpoints` deleted the state the running fit resumes from. The sweep's lock says who trains it."""
    from featcache.runs import sweep_lock

    with sweep_lock(runs_dir, "aaaaaaaaaaaa", ["h1"]):  # this process resumes the killed sweep
        found = {p.sweep_id: p for p in pending_checkpoints(runs_dir)}
        assert found["aaaaaaaaaaaa"].running_pid == os.getpid() and found["aaaaaaaaaaaa"].may_be_running
        with pytest.raises(RunError, match=rf"aaaaaaaaaaaa \(process {os.getpid()}\) is still running"):
            drop_checkpoints(runs_dir, ["aaaaaaaaaaaa"])
        assert drop_checkpoints(runs_dir) == []  # --all leaves it alone too
        assert (runs_dir / CHECKPOINTS_DIR / "aaaaaaaaaaaa" / "chunk-0.npz").is_file()
    # the fit ended (or was killed): its lock is free, and the sweep is an interrupted one again
    assert [p.sweep_id for p in drop_checkpoints(runs_dir)] == ["aaaaaaaaaaaa"]


def test_a_file_given_as_the_runs_folder_is_called_a_file(tmp_path: Path, capsys) -> None:
    """`runs ls --runs-dir some.jpeg` said "No finished runs" (exit 0), drop-checkpoints "Deleted 0", and
    report, predict and runs show said the folder "does not exist", though it does: it is a file."""
    not_a_folder = tmp_path / "some.jpeg"
    not_a_folder.write_bytes(b"x")
    flag = ["--runs-dir", str(not_a_folder)]
    for argv in (["runs", "ls", *flag], ["runs", "drop-checkpoints", "--all", *flag],
                 ["runs", "show", "abc", *flag], ["report", *flag, "--out", str(tmp_path / "rep")],
                 ["predict", str(not_a_folder), "--run", "abc", *flag]):
        assert cli(argv) == 2, argv
        assert "is a file, not a folder" in " ".join(capsys.readouterr().err.split()), argv
    assert not (tmp_path / "rep").exists()
