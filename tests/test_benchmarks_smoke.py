"""Smoke test of the benchmarks' --quick mode: they run and report every ratio (no speed assertions)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_run_py_quick_json_reports_every_ratio(tmp_path: Path, capsys) -> None:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    # --extract-repeats: the extract is timed twice, each between two forward measurements (one run.py
    # process checks both, where a second bench_extract.py process cost CI about 40 s)
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--json",
                           "--save", "saved.json", "--extract-repeats", "mobilenet-0.75=2"],
                          capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "I0000 " not in proc.stderr, proc.stderr[:2000]  # TensorFlow's native start-up lines filtered
    out = json.loads(proc.stdout)
    assert out["complete"] is True and json.loads((tmp_path / "saved.json").read_text()) == out
    assert out["quick"] is True and not out["failed"] and not out["missing"]
    assert set(out["pipeline_efficiency"]) == {"mobilenet-0.75"}
    for key in ("cache_hit_fraction", "memory_ratio", "logreg_speedup", "mlp_grid_speedup"):
        assert isinstance(out[key], (int, float)) and out[key] > 0, key
    logreg = out["benchmarks"]["logreg"]
    assert logreg["same_params"] and logreg["max_cv_score_diff"] <= 0.005
    mlp = out["benchmarks"]["mlp"]
    assert len(mlp["val_acc_featcache"]) == len(mlp["val_acc_reference"]) == mlp["n_configs"]
    assert mlp["jax_compile_s"] is None  # both sides ran on TensorFlow
    r = out["benchmarks"]["extract"]["backbones"]["mobilenet-0.75"]
    effs, e2e = r["pipeline_efficiency_runs"], r["extract_images_per_s_runs"]
    fwd = r["forward_images_per_s_runs"]
    assert r["repeats"] == 2 and len(effs) == 2 and len(e2e) == 2 and len(fwd) == 3
    # extract i sits between forward measurements i and i+1
    for i in range(2):
        assert effs[i] == pytest.approx(e2e[i] / ((fwd[i] + fwd[i + 1]) / 2), abs=2e-3)
    assert r["pipeline_efficiency"] == pytest.approx(sum(effs) / 2, abs=2e-3)  # median of two
    assert r["forward_images_per_s_before_after"] == [fwd[0], fwd[-1]]
    assert out["pipeline_efficiency"]["mobilenet-0.75"] == r["pipeline_efficiency"]
    _check_ratios_are_what_they_name(out)
    # the text table of the same object: every ratio printed, called a smoke test, no verdict
    _run_module().print_table(out)
    rows = {ln.split()[0]: ln for ln in capsys.readouterr().out.splitlines() if ln.strip()}
    for key in ("pipeline_efficiency[mobilenet-0.75]", "cache_hit_fraction", "memory_ratio", "logreg_speedup",
                "mlp_grid_speedup"):
        assert rows[key].endswith("(smoke test)"), rows.get(key)


def _check_ratios_are_what_they_name(out: dict) -> None:
    """Each top-level ratio must be the quotient of the raw measurements beside it, of what it names.

    Why: a ratio checked only for being a positive number passes when the second extract recomputes
    every row (no cache hit), the memory check runs the same subset twice, or a speedup divides the
    wrong timings; these ask the JSON for the numerator and the denominator instead.
    """
    ext = out["benchmarks"]["extract"]
    r = ext["backbones"][ext["cache_hit_backbone"]]
    # a cache hit computes nothing, and its fraction divides the two extracts' wall times
    assert r["images"] > 0 and r["second_run_rows_computed"] == 0, r
    assert out["cache_hit_fraction"] == r["cache_hit_fraction"] < 1
    assert r["cache_hit_fraction"] == pytest.approx(r["second_run_seconds"] / r["extract_seconds"],
                                                    rel=0.05, abs=2e-3)
    # peak RSS of the whole (quick) data set over that of a smaller subset, each a real extract
    mem = ext["memory"]
    assert mem["full"]["rows"] == r["images"] > mem["small"]["rows"] > 0, mem
    assert out["memory_ratio"] == mem["memory_ratio"] == pytest.approx(
        mem["full"]["peak_rss_mb"] / mem["small"]["peak_rss_mb"], abs=1e-3)
    # both speedups: the reference's seconds over featcache's, on the same grid
    logreg, mlp = out["benchmarks"]["logreg"], out["benchmarks"]["mlp"]
    assert out["logreg_speedup"] == logreg["logreg_speedup"] == pytest.approx(
        logreg["t_sklearn_s"] / logreg["t_featcache_s"], rel=0.01)
    assert len(logreg["candidates"]) == logreg["grid_size"] == 14
    assert out["mlp_grid_speedup"] == mlp["mlp_grid_speedup"] == pytest.approx(
        mlp["t_reference_s"] / mlp["t_featcache_s"], rel=0.01)
    assert out["logreg_agrees"] is logreg["logreg_agrees"]
    assert out["mlp_grid_agrees"] is mlp["mlp_grid_agrees"]


@pytest.mark.slow
def test_accuracy_benchmark_quick_holds_out_whole_patients_and_reports_each_head(tmp_path: Path) -> None:
    import csv
    import shutil

    from conftest import make_kermany_tree

    train = make_kermany_tree(tmp_path / "data", n_normal=15, n_pneu=30, splits=("train",)) / "train"
    # a byte-identical file under a second patient's name: both patients must land on one side
    shutil.copy(train / "NORMAL" / "IM-1000-0001.jpeg", train / "NORMAL" / "IM-1099-0001.jpeg")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_accuracy.py"), "--quick",
                           "--json", "--data", str(train), "--work", str(tmp_path / "w")],
                          capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    rows = list(csv.DictReader((tmp_path / "w" / "manifest.csv").open()))
    assert len(rows) == out["split"]["images"] == 46 and out["split"]["merged_by_identical_files"] == 1
    side = {r["path"].rsplit("/", 1)[-1]: r["split"] for r in rows}
    assert side["IM-1000-0001.jpeg"] == side["IM-1099-0001.jpeg"]
    for group in {r["group"] for r in rows}:
        assert len({r["split"] for r in rows if r["group"] == group}) == 1, group
    n_test = sum(r["split"] == "test" for r in rows)
    assert 0 < n_test < len(rows)
    assert set(out["tasks"]) == {"binary", "3class"}
    for task, result in out["tasks"].items():
        assert sorted(h["head"] for h in result["heads"]) == ["knn", "logreg"], task
        for h in result["heads"]:
            assert h["n_test"] == n_test and 0 <= h["test_accuracy"] <= 1 and h["config"], (task, h)
            assert (h["threshold"] is None) == (task == "3class")


def test_jax_compile_clock_counts_compilations() -> None:
    pytest.importorskip("jax")
    import jax
    import jax.numpy as jnp

    bench = _bench("mlp")
    assert bench.JaxCompileClock(False).read() is None
    clock = bench.JaxCompileClock(True)
    assert clock.read() == 0.0
    jax.jit(lambda x: jnp.sin(x) * 3.25 + jnp.arange(7.0))(jnp.ones(7)).block_until_ready()  # a new program
    assert clock.read() > 0


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


def test_a_speed_target_counts_only_with_the_same_answers(capsys) -> None:
    """Requirements 4 and 5 are speed *and* the same answers: a fast grid with other answers is not "ok"."""
    run = _run_module()
    out = {"benchmarks": {"logreg": {"logreg_agrees": False}, "mlp": {"mlp_grid_agrees": True}},
           "wall_seconds": {}, "missing": [], "failed": {}, "quick": False, "logreg_speedup": 25.0,
           "mlp_grid_speedup": 3.2}
    run.print_table(out)
    lines = {ln.split()[0]: ln for ln in capsys.readouterr().out.splitlines() if ln.strip()}
    assert lines["logreg_speedup"].endswith("speed ok, answers differ (see the JSON)")
    assert lines["mlp_grid_speedup"].endswith("ok") and "differ" not in lines["mlp_grid_speedup"]
    run._collect_ratios(out)
    assert out["logreg_agrees"] is False and out["mlp_grid_agrees"] is True


def test_grid_flops_count_no_input_gradient_for_the_first_layer_and_the_validation_pass() -> None:
    bench = _bench("mlp")
    cfg = [{"layers": [8], "epochs": 2}]  # 4 -> 8 -> 2: 40 + 18 parameters
    # per epoch: training 6 per weight, less 2 per first-layer weight (4*8), on 10 rows; validation 2 on 5
    assert bench.grid_flops(cfg, 4, 10, n_val=5) == 2 * ((6 * 58 - 2 * 32) * 10 + 2 * 58 * 5)



def test_the_seed_study_judges_a_config_over_seeds_where_one_run_matched_no_reference_run() -> None:
    """A collapse-or-not config: featcache's one run collapsed, the reference's three did not, so the
    0.005-of-some-run rule flagged it; over more seeds both collapse alike and it agrees. A trainer that
    collapses far more often, or reaches another accuracy when it does not collapse, still differs."""
    bench = _bench("mlp")
    ytr, yva = np.array([0, 1, 1, 1]), np.array([0, 1, 1, 1])  # majority (class 1) accuracy: 0.75
    ours, ref_runs = [0.75, 0.90], [[1.0, 0.99, 1.0], [0.9]]

    def judged(ours_study, ref_study) -> dict:
        return bench.judge_agreement(ours, [list(r) for r in ref_runs], ytr, yva, 0,
                                     lambda i, k: ref_study[k], seed_study=len(ours_study),
                                     study_ours=lambda i, k: ours_study[k])

    plain = bench.judge_agreement(ours, ref_runs, ytr, yva, 0, None)
    assert plain["configs_agreeing"] == plain["configs_agreeing_over_seeds"] == 1 and not plain["seed_study"]
    alike = judged([1.0, 0.75, 1.0, 0.75], [0.75, 0.75, 1.0, 0.75])
    assert alike["configs_agreeing"] == 1 and alike["configs_agreeing_over_seeds"] == 2
    assert alike["seed_study"][0]["featcache_collapsed"] == 3 and alike["seed_study"][0]["agrees"]
    assert alike["seed_study"][0]["reference_collapsed"] == 3 and 1 not in alike["seed_study"]
    always = judged([0.75] * 8, [1.0] * 8)  # 9 of 9 against 0 of 11: a real difference
    assert always["seed_study"][0]["fisher_p"] < 0.05 and always["configs_agreeing_over_seeds"] == 1
    elsewhere = judged([0.95, 0.75], [0.75, 1.0])  # collapse rates alike, but 0.95 is no reference outcome
    assert elsewhere["seed_study"][0]["unmatched_featcache_runs"] == [0.95]
    assert not elsewhere["seed_study"][0]["agrees"]



@pytest.mark.slow
def test_the_seed_study_trains_featcache_side_with_the_fused_trainer() -> None:
    """Its first version (and probe_mlp_collapse's) called train_many([config]), where a lone config takes
    the reference's model.fit: the study compared the reference with itself under featcache's name."""
    bench = _bench("mlp")
    from featcache.heads import get_head

    X, y = bench.synthetic_gap(60, 16)
    cfg = {"layers": [8], "batch_size": 16, "epochs": 1, "lr": 0.01, "optimizer": "adam"}
    acc, path = bench.train_alone_fused(get_head("mlp"), (X[:40], y[:40], X[40:], y[40:]), cfg, seed=3)
    assert path.startswith("fused") and 0.0 <= acc <= 1.0


def _run_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_run_t", ROOT / "benchmarks" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_run_saves_what_each_benchmark_measured_before_the_next_starts(tmp_path: Path, monkeypatch) -> None:
    """--save: after every benchmark the file holds the results so far (complete: false), also after one
    that failed, so a full run killed in its last hour keeps what it measured."""
    run = _run_module()
    saved = tmp_path / "run.json"
    seen: list[dict] = []

    class Logreg:
        @staticmethod
        def run(quick: bool, repeats: int) -> dict:
            return {"logreg_speedup": 21.5, "t_featcache_s": 1.0}

    class Mlp:
        @staticmethod
        def run(**_kw) -> dict:
            seen.append(json.loads(saved.read_text()))  # what a kill right now would leave
            raise RuntimeError("out of memory")

    monkeypatch.setattr(run, "_load", {"logreg": Logreg, "mlp": Mlp}.get)
    out = run.run_all(False, None, ["logreg", "mlp"], on_progress=lambda o: run.save_json(o, saved))
    assert seen[0]["complete"] is False and seen[0]["logreg_speedup"] == 21.5
    assert "mlp" not in seen[0]["benchmarks"] and seen[0]["failed"] == {}
    last = json.loads(saved.read_text())
    assert last["failed"] == {"mlp": "RuntimeError: out of memory"} and last["logreg_speedup"] == 21.5
    assert last["complete"] is False and out["complete"] is True  # main saves the finished object last
    assert not list(tmp_path.glob("*.tmp"))


def _bench(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"bench_{name}_t", ROOT / "benchmarks" / f"bench_{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_logreg_repeats_time_featcache_n_times_and_use_the_median() -> None:
    bench = _bench("logreg")
    res = bench.run(quick=True, n=150, d=120, repeats=3)
    runs = res["t_featcache_runs_s"]
    assert res["featcache_repeats"] == 3 and len(runs) == 3
    assert res["t_featcache_s"] == sorted(runs)[1]  # rounding is monotonic: the median of the rounded runs
    assert res["logreg_speedup"] == pytest.approx(res["t_sklearn_s"] / res["t_featcache_s"], rel=0.01)
    assert res["featcache_repeats_identical"] is True and res["same_params"]
    ours, ref = res["featcache_mean_test_scores"], res["sklearn_mean_test_scores"]
    assert len(res["candidates"]) == len(ours) == len(ref) == 14
    assert max(abs(a - b) for a, b in zip(ours, ref, strict=True)) == pytest.approx(res["max_cv_score_diff"])
    assert {"C", "class_weight"} <= set(res["candidates"][0])
    with pytest.raises(ValueError, match="repeats"):
        bench.run(quick=True, n=150, d=120, repeats=0)


def test_extract_repeats_parse_for_all_or_for_named_backbones() -> None:
    bench = _bench("extract")
    assert bench.parse_repeats("3") == 3
    assert bench.parse_repeats("mobilenet-0.75=5, vgg16=2") == {"mobilenet-0.75": 5, "vgg16": 2}
    for bad in ("0", "x", "vgg16=0", "vgg16", "vgg16=two"):
        with pytest.raises(ValueError):
            bench.parse_repeats(bad)
    with pytest.raises(ValueError, match="not benchmarked here: vgg16"):
        bench.run(quick=True, memory=False, repeats={"vgg16": 2})


def test_table_prints_the_measurements_each_ratio_divides(capsys) -> None:
    """Without --json the run must still say what it measured: each speedup's two times, the cache hit's
    two extracts, the memory check's two peaks (the ratio column alone cannot be checked by a reader)."""
    run = _run_module()
    backbone = {"forward_images_per_s": 170.1, "extract_images_per_s": 150.1, "images": 5206,
                "extract_seconds": 34.7, "second_run_seconds": 0.59, "cache_file_mb": 22.4}
    mem = {"backbone": "mobilenet-0.75", "memory_ratio": 1.0, "full": {"peak_rss_mb": 2313.0, "rows": 5206},
           "small": {"peak_rss_mb": 2311.5, "rows": 500}}
    logreg = {"t_sklearn_s": 695.7, "t_featcache_s": 25.42, "featcache_repeats": 3, "n": 5232, "d": 25088,
              "source": "synthetic_vgg", "grid_size": 14, "folds": 5, "same_params": True,
              "max_cv_score_diff": 0.0, "logreg_speedup": 27.37, "logreg_agrees": True}
    mlp = {"t_reference_s": 429.7, "t_featcache_s": 140.1, "n_configs": 33, "epochs": [5, 10, 20, 40],
           "precision": ["bfloat16"], "mlp_grid_speedup": 3.07, "mlp_grid_agrees": False,
           "agreement": {"configs_agreeing": 26, "configs": 33, "tolerance": 0.005}}
    out = {"benchmarks": {"extract": {"backbones": {"mobilenet-0.75": backbone}, "memory": mem,
                                      "memory_by_backbone": {"mobilenet-0.75": mem}},
                          "logreg": logreg, "mlp": mlp},
           "wall_seconds": {}, "missing": [], "failed": {}, "quick": False}
    run.print_table(out)
    text = capsys.readouterr().out
    assert "first run 34.7 s, second (cached) run 0.59 s" in text
    assert "peak RSS 2313.0 MB on 5206 images / 2311.5 MB on 500" in text
    assert "GridSearchCV 695.7 s / featcache 25.42 s (median of 3); 5232 x 25088 synthetic_vgg" in text
    assert "one model.fit per config 429.7 s / fused featcache 140.1 s; 33 configs of 5-40 epochs" in text
    assert "26 of 33 configs within 0.005 of a reference run" in text


def test_the_machine_is_identified_by_cpu_generation_and_features(tmp_path, capsys) -> None:
    """The results tables are split by CPU generation, but the JSON's machine read only "AMD EPYC": the
    family, model and the flags that pick the dense grid's path (bf16, AVX-512) are recorded now, and the
    text table prints them. A run without the extract benchmark (--only logreg,mlp) names its machine too."""
    bench = _bench("extract")
    cpuinfo = tmp_path / "cpuinfo"
    block = ("processor\t: {n}\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\n"
             "model name\t: AMD EPYC\nstepping\t: 1\ncache size\t: 1024 KB\n"
             "flags\t\t: fpu sse2 avx2 fma avx512f avx512_bf16\n")
    cpuinfo.write_text(block.format(n=0) + "\n" + block.format(n=1).replace("avx512_bf16", ""))
    ident = bench.cpu_identity(str(cpuinfo))
    assert ident == {"cpu": "AMD EPYC", "family": 25, "model": 17, "stepping": 1, "cache_size": "1024 KB",
                     "flags": ["avx2", "fma", "avx512f", "avx512_bf16"]}
    assert bench.cpu_identity(str(tmp_path / "absent"))["family"] is None
    run = _run_module()
    out = {"benchmarks": {"logreg": {}}, "wall_seconds": {}, "missing": [], "failed": {}, "quick": True}
    run._collect_ratios(out)
    assert {"cpu", "family", "model", "flags", "cores"} <= set(out["machine"])
    out["machine"] = {**out["machine"], **ident}
    run.print_table(out)
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("machine: AMD EPYC (family 25, model 17; cache 1024 KB; avx2 fma avx512f "
                            "avx512_bf16), ")


def test_quick_json_says_its_ratios_are_not_results() -> None:
    """--quick's ratios sit at the JSON's top level like a full run's (logreg_speedup 143 on tiny inputs),
    with only "quick": true beside them: the JSON now says what they are; a full run's has no such note."""
    run = _run_module()
    quick = run.run_all(quick=True, data=None, only=[])
    assert quick["quick_note"].startswith("--quick: a smoke test on tiny inputs") and "not results" in (
        quick["quick_note"])
    assert "quick_note" not in run.run_all(quick=False, data=None, only=[])
