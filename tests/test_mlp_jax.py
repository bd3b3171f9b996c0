"""The JAX grid trainer (``mlp_fused_jax``): the TF trainer's trajectory, trainer choice, Keras on JAX.

JAX is a dev dependency (CI installs it); without it, asking for this trainer is a ConfigError.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from featcache.errors import ConfigError
from featcache.heads import get_head

pytest.importorskip("jax")


def data(n: int = 300, d: int = 32, seed: int = 0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d)).astype(np.float32)
    y = (X[:, 0] + 0.5 * X[:, 1] > 0).astype(int)
    return X, y


def test_jax_trainer_follows_the_tensorflow_trainer():
    """No dropout, float32, the same minibatch order: both implementations must trace the same path.

    The grid mixes two architectures (two stacks), class weights, L2, tanh, a checkpointed member, early
    stopping, and epochs that end at different times (members leave; the stack is compacted)."""
    X, y = data()
    y[::7] = 2  # three classes
    Xtr, ytr, Xva, yva = X[:220], y[:220], X[220:], y[220:]
    head = get_head("mlp")
    configs = [{"layers": (16, 8), "lr": 0.01, "epochs": 4, "batch_size": 32},
               {"layers": (16, 8), "lr": 0.001, "epochs": 7, "batch_size": 32, "class_weight": "balanced",
                "l2": 1e-3},
               {"layers": (16, 8), "lr": 0.003, "epochs": 5, "batch_size": 32, "checkpoint": True,
                "activation": "tanh"},
               {"layers": (12,), "lr": 0.05, "epochs": 9, "batch_size": 32, "patience": 1},
               {"layers": (12,), "lr": 0.01, "epochs": 2, "batch_size": 32}]
    tf_runs = head.train_many(Xtr, ytr, Xva, yva, configs, seed=3, fuse=True, precision="float32",
                              trainer="tf")
    jx_runs = head.train_many(Xtr, ytr, Xva, yva, configs, seed=3, fuse=True, precision="float32",
                              trainer="jax")
    assert [r[0].trainer["path"] for r in jx_runs] == ["fused-jax"] * 5
    assert jx_runs[0][0].trainer["precision"] == "float32"
    for (h_tf, a), (h_jx, b) in zip(tf_runs, jx_runs, strict=True):
        assert len(a["loss"]) == len(b["loss"])
        for key in ("loss", "val_loss", "accuracy", "val_accuracy"):
            np.testing.assert_allclose(b[key], a[key], rtol=1e-4, atol=1e-5)
        for w_tf, w_jx in zip(h_tf.model.get_weights(), h_jx.model.get_weights(), strict=True):
            np.testing.assert_allclose(w_jx, w_tf, atol=1e-4)
    assert len(jx_runs[3][1]["loss"]) < 9  # early stopping did stop it


def test_jax_trainer_binary_sigmoid_dropout_and_bfloat16():
    X, y = data(400, 24, seed=1)
    Xtr, ytr, Xva, yva = X[:300], y[:300], X[300:], y[300:]
    head = get_head("mlp")
    configs = [{"layers": (32,), "lr": 0.01, "epochs": 6, "batch_size": 50, "dropout": 0.3},
               {"layers": (32,), "lr": 0.01, "epochs": 6, "batch_size": 50, "output_activation": "sigmoid"}]
    jx = head.train_many(Xtr, ytr, Xva, yva, configs, seed=0, precision="float32", trainer="jax")
    tf = head.train_many(Xtr, ytr, Xva, yva, configs, seed=0, precision="float32", trainer="tf")
    np.testing.assert_allclose(jx[1][1]["val_loss"], tf[1][1]["val_loss"], rtol=1e-4, atol=1e-5)
    # dropout masks come from different generators: the same accuracy within noise, a different path
    assert abs(jx[0][1]["val_accuracy"][-1] - tf[0][1]["val_accuracy"][-1]) <= 0.05
    assert jx[0][1]["val_accuracy"][-1] > 0.8  # it learns (chance is about 0.5)
    assert not np.allclose(jx[0][1]["loss"], tf[0][1]["loss"])
    lo = head.train_many(Xtr, ytr, Xva, yva, configs, seed=0, precision="bfloat16", trainer="jax")
    assert lo[1][0].trainer["precision"] == "bfloat16"
    assert abs(lo[1][1]["val_accuracy"][-1] - jx[1][1]["val_accuracy"][-1]) <= 0.05
    proba = lo[1][0].predict_proba(Xva)
    assert proba.shape == (100, 2) and np.allclose(proba.sum(1), 1, atol=1e-5)


def test_trainer_choice(monkeypatch):
    from featcache.heads import mlp_fused
    from featcache.heads.mlp_fused_jax import accelerator

    monkeypatch.delenv(mlp_fused.TRAINER_ENV, raising=False)
    assert mlp_fused.resolve_trainer() == "tf"  # Keras runs on TensorFlow in this test process
    assert mlp_fused.resolve_trainer("jax") == "jax"
    monkeypatch.setenv(mlp_fused.TRAINER_ENV, "jax")
    assert mlp_fused.resolve_trainer("auto") == "jax"
    with pytest.raises(ConfigError, match="trainer"):
        mlp_fused.resolve_trainer("torch")
    monkeypatch.setattr(mlp_fused.importlib.util, "find_spec", lambda name: None)  # as if jax were absent
    with pytest.raises(ConfigError, match="pip install jax"):
        mlp_fused.resolve_trainer("jax")
    monkeypatch.undo()
    monkeypatch.delenv(mlp_fused.TRAINER_ENV, raising=False)
    monkeypatch.delenv(mlp_fused.PRECISION_ENV, raising=False)
    monkeypatch.setattr(mlp_fused, "cpu_has_bf16_matmul", lambda: True)
    expected = "bfloat16" if accelerator() is not None else "float32"  # XLA CPU: no bf16 -> f32 product
    assert mlp_fused.resolve_precision("auto", "jax") == expected
    assert mlp_fused.resolve_precision("auto", "tf") == "bfloat16"


@pytest.mark.slow
def test_grid_training_with_keras_on_jax(tmp_path):
    """KERAS_BACKEND=jax (e.g. a GPU image without TensorFlow): grids pick the JAX trainer on their own,
    and the exported heads are ordinary Keras-on-JAX models that save, load and predict."""
    script = textwrap.dedent(f"""
        import json, numpy as np, keras
        from featcache.heads import get_head, load_fitted
        rng = np.random.default_rng(0)
        X = rng.normal(size=(200, 16)).astype(np.float32); y = (X[:, 0] > 0).astype(int)
        head = get_head("mlp")
        cfgs = [{{"layers": (8,), "lr": 0.01, "epochs": 3, "batch_size": 32}},
                {{"layers": (8,), "lr": 0.003, "epochs": 2, "batch_size": 32}}]
        res = head.train_many(X[:150], y[:150], X[150:], y[150:], cfgs)
        fitted = res[0][0]
        fitted.save({str(tmp_path)!r})
        again = load_fitted("mlp", {str(tmp_path)!r})
        same = bool(np.allclose(again.predict_proba(X[150:]), fitted.predict_proba(X[150:]), atol=1e-6))
        print(json.dumps({{"backend": keras.backend.backend(), "paths": [r[0].trainer["path"] for r in res],
                          "epochs": [len(r[1]["loss"]) for r in res], "same": same}}))
    """)
    env = {**os.environ, "KERAS_BACKEND": "jax"}
    env.pop("FEATCACHE_MLP_TRAINER", None)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got == {"backend": "jax", "paths": ["fused-jax", "fused-jax"], "epochs": [3, 2], "same": True}


@pytest.mark.slow
def test_model_fit_on_keras_jax_takes_the_loss_from_the_logits_as_the_fused_trainer():
    """Keras' JAX backend computes a softmax/sigmoid output's loss from a clipped probability (TensorFlow's
    from the logit), so on JAX model.fit (configs trained alone, refits) and the fused trainers parted on
    saturated outputs (val_loss 6.85 flat against 1.13). ``train`` fits the logits now: on saturating
    inputs and full batches both paths must give the same history."""
    script = textwrap.dedent("""
        import json, numpy as np, keras
        from featcache.heads import get_head
        rng = np.random.default_rng(5)
        X = np.maximum(rng.normal(size=(160, 64)), 0).astype(np.float32) * 200
        y = (X[:, :4].sum(1) > np.median(X[:, :4].sum(1))).astype(int)
        y[rng.random(160) < 0.1] ^= 1
        head = get_head("mlp")
        out = {"backend": keras.backend.backend(), "max_loss": 0.0, "diff": 0.0}
        for act in ("softmax", "sigmoid"):
            cfg = {"layers": (16,), "lr": 0.05, "epochs": 4, "batch_size": 120, "output_activation": act}
            _, ref = head.train(X[:120], y[:120], X[120:], y[120:], cfg, seed=2)
            (_, h), = head.train_many(X[:120], y[:120], X[120:], y[120:], [cfg], seed=2, fuse=True,
                                      precision="float32", trainer="jax")
            out["max_loss"] = max(out["max_loss"], max(ref["loss"] + ref["val_loss"]))
            for key in ("loss", "val_loss"):
                rel = np.abs(np.array(h[key]) - ref[key]) / np.maximum(np.abs(ref[key]), 1.0)
                out["diff"] = max(out["diff"], float(rel.max()))
        print(json.dumps(out))
    """)
    env = {**os.environ, "KERAS_BACKEND": "jax"}
    env.pop("FEATCACHE_MLP_TRAINER", None)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["backend"] == "jax"
    assert got["max_loss"] > 17  # beyond the clipped loss's cap: the case is exercised
    assert got["diff"] < 1e-3


def test_jax_trainer_accelerator_layout_on_the_cpu(monkeypatch):
    """The GPU layout, exercised here: one group per batch size, finished members kept in their stack
    (never restacked). Same trajectory as the TensorFlow trainer, one compilation for the whole group."""
    from featcache.heads import mlp_fused_jax

    X, y = data(260, 20, seed=2)
    Xtr, ytr, Xva, yva = X[:200], y[:200], X[200:], y[200:]
    head = get_head("mlp")
    configs = [{"layers": (16,), "lr": 0.01, "epochs": e, "batch_size": 40, "class_weight": cw}
               for e, cw in ((2, None), (5, "balanced"), (3, None), (6, None))]
    configs.append({"layers": (8, 8), "lr": 0.003, "epochs": 4, "batch_size": 40, "patience": 1})
    tf_runs = head.train_many(Xtr, ytr, Xva, yva, configs, seed=1, precision="float32", trainer="tf")
    builds = []
    real = mlp_fused_jax._build_epoch
    monkeypatch.setattr(mlp_fused_jax, "_build_epoch", lambda *a: (builds.append(len(a[0])), real(*a))[1])
    monkeypatch.setattr(mlp_fused_jax, "accelerator", lambda: "gpu")
    jx_runs = head.train_many(Xtr, ytr, Xva, yva, configs, seed=1, precision="float32", trainer="jax")
    assert builds == [2]  # two architectures, compiled once: members that finished were never restacked
    assert [r[0].trainer["group_size"] for r in jx_runs] == [5] * 5
    for (h_tf, a), (h_jx, b) in zip(tf_runs, jx_runs, strict=True):
        assert len(b["loss"]) == len(a["loss"])
        np.testing.assert_allclose(b["val_loss"], a["val_loss"], rtol=1e-4, atol=1e-5)
        for w_tf, w_jx in zip(h_tf.model.get_weights(), h_jx.model.get_weights(), strict=True):
            np.testing.assert_allclose(w_jx, w_tf, atol=1e-4)


def test_jax_trainer_compiles_no_per_shape_helpers(caplog):
    """Host arrays reach the device without a staging program per shape, and members leave a stack through
    one program per stack layout, not a slice and a squeeze per array shape: on paper 000's grid those
    helpers were 95 of 139 compilations (each costs more on a GPU than the training it serves)."""
    import re
    from collections import Counter

    import jax

    from featcache.heads import mlp_fused_jax

    jax.clear_caches()  # programs compiled by earlier tests for the same shapes would not be logged
    mlp_fused_jax._take_member.cache_clear()
    X, y = data(300, 32, seed=4)
    head = get_head("mlp")
    configs = [{"layers": (16, 8), "lr": lr, "epochs": e, "batch_size": 32}
               for lr, e in ((0.01, 3), (0.001, 2))]
    configs.append({"layers": (12,), "lr": 0.01, "epochs": 2, "batch_size": 32, "checkpoint": True})
    with caplog.at_level(logging.WARNING, logger="jax"), jax.log_compiles(True):
        head.train_many(X[:220], y[:220], X[220:], y[220:], configs, seed=0, trainer="jax",
                        precision="float32")
    names = Counter(m.group(1) for r in caplog.records
                    if (m := re.search(r"Compiling (\S+)", r.getMessage())))
    assert names["jit(epoch)"] == 2  # two stacks, then one restack when 1 of 3 members still trains
    assert names["jit(stage)"] <= 1 and names["jit(dynamic_slice)"] == 0 and names["jit(squeeze)"] == 0, names
    assert 1 <= names["jit(take)"] <= 3, names  # at most one per stack layout


def test_jax_groups_compile_ahead_on_an_accelerator(monkeypatch):
    """On an accelerator (faked here) every batch-size group is prepared before the first trains, and each
    group's epoch program is compiled in a background thread from shapes alone; training then uses that
    program (no second build) and follows the TensorFlow trainer's path as before."""
    import threading

    from featcache.heads import mlp_fused_jax

    X, y = data(260, 20, seed=5)
    Xtr, ytr, Xva, yva = X[:200], y[:200], X[200:], y[200:]
    head = get_head("mlp")
    # within a group the configs are out of epoch order, which the CPU's chunks sort by: every chunk of a
    # group still draws the group's minibatch stream, so both layouts train on the same minibatches
    configs = [{"layers": (16,), "lr": lr, "epochs": e, "batch_size": b}
               for b in (40, 64) for lr, e in ((0.01, 3), (0.003, 2))]
    tf_runs = head.train_many(Xtr, ytr, Xva, yva, configs, seed=1, precision="float32", trainer="tf")
    events, builds = [], []
    real_build, real_prepare = mlp_fused_jax._build_epoch, mlp_fused_jax._prepare
    real_train = mlp_fused_jax._train

    def build(*a):
        builds.append(threading.current_thread().name)
        return real_build(*a)

    monkeypatch.setattr(mlp_fused_jax, "_build_epoch", build)
    monkeypatch.setattr(mlp_fused_jax, "_prepare", lambda *a: (events.append("prepare"), real_prepare(*a))[1])
    monkeypatch.setattr(mlp_fused_jax, "_train", lambda p: (events.append("train"), real_train(p))[1])
    monkeypatch.setattr(mlp_fused_jax, "accelerator", lambda: "gpu")
    jx_runs = head.train_many(Xtr, ytr, Xva, yva, configs, seed=1, precision="float32", trainer="jax")
    assert events == ["prepare", "prepare", "train", "train"]
    assert len(builds) == 2 and all(name.startswith("featcache-xla") for name in builds), builds
    for (h_tf, a), (h_jx, b) in zip(tf_runs, jx_runs, strict=True):
        assert len(b["loss"]) == len(a["loss"])
        np.testing.assert_allclose(b["val_loss"], a["val_loss"], rtol=1e-4, atol=1e-5)
        for w_tf, w_jx in zip(h_tf.model.get_weights(), h_jx.model.get_weights(), strict=True):
            np.testing.assert_allclose(w_jx, w_tf, atol=1e-4)
    monkeypatch.setattr(mlp_fused_jax, "accelerator", lambda: None)  # on a CPU: one group after the other
    events.clear()
    builds.clear()
    head.train_many(Xtr, ytr, Xva, yva, configs, seed=1, precision="float32", trainer="jax")
    assert events == ["prepare", "train", "prepare", "train"]
    assert len(builds) == 4 and set(builds) == {"MainThread"}  # each group: its stack, then a restack
