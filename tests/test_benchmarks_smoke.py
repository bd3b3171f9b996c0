"""Smoke test of the benchmarks' --quick mode: they run and report every ratio (no speed assertions)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_run_py_quick_json_reports_every_ratio(tmp_path: Path) -> None:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--json"],
                          capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["quick"] is True and not out["failed"] and not out["missing"]
    assert set(out["pipeline_efficiency"]) == {"mobilenet-0.75"}
    for key in ("cache_hit_fraction", "memory_ratio", "logreg_speedup", "mlp_grid_speedup"):
        assert isinstance(out[key], (int, float)) and out[key] > 0, key
    logreg = out["benchmarks"]["logreg"]
    assert logreg["same_params"] and logreg["max_cv_score_diff"] <= 0.005
    mlp = out["benchmarks"]["mlp"]
    assert len(mlp["val_acc_featcache"]) == len(mlp["val_acc_reference"]) == mlp["n_configs"]


def test_table_gives_verdicts_only_for_a_full_run(capsys) -> None:
    """--quick ratios come from tiny inputs: the table must not call them missed targets."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_run", ROOT / "benchmarks" / "run.py")
    run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run)
    out = {"benchmarks": {}, "wall_seconds": {}, "missing": [], "failed": {}, "logreg_speedup": 12.0,
           "memory_ratio": 1.0}
    run.print_table({**out, "quick": True})
    text = capsys.readouterr().out
    assert "smoke test" in text and "MISSED" not in text
    run.print_table({**out, "quick": False})
    text = capsys.readouterr().out
    assert "logreg_speedup" in text and "MISSED" in text and "smoke test" not in text
