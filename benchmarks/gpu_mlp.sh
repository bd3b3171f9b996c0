#!/usr/bin/env bash
# Issue 5 req 5 on a GPU machine whose image has JAX but no TensorFlow (the `device` tool's H200 image):
# the dense-head grid benchmark with Keras on JAX, featcache's JAX grid trainer against one Keras
# model.fit per config. Writes mlp_gpu.json (and the log) to $OUT, or to the current folder.
#
#   device run, carry [".whl"]:  bash benchmarks/gpu_mlp.sh        (EPOCH_SCALE=0.1 by default)
#
# .whl holds the wheels that image lacks (keras, namex, optree for its Python 3.12); fetch them here with
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl keras==3.15.1 namex optree
# Extra arguments go to bench_mlp.py (e.g. --quick as a smoke test).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-.}"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" KERAS_BACKEND=jax PYTHONUNBUFFERED=1
command -v nvidia-smi >/dev/null && nvidia-smi -L
python3 -c "import jax, keras; print('jax', jax.__version__, jax.devices(), 'keras', keras.__version__, keras.backend.backend())"
python3 benchmarks/bench_mlp.py --json --trainer jax --epoch-scale "${EPOCH_SCALE:-0.1}" "$@" \
  > "$out/mlp_gpu.json" 2> >(tee "$out/mlp_gpu.log" >&2)
python3 -c "
import json, sys
d = json.load(open(sys.argv[1]))
print('mlp_grid_speedup', d['mlp_grid_speedup'], '| featcache', d['t_featcache_s'], 's | reference', d['t_reference_s'],
      's | JAX compiling', d['jax_compile_s'], '| agreeing', d['agreement']['configs_agreeing'], 'of', d['agreement']['configs'], '|', d['device'],
      '| achieved', d['achieved_gflops'], 'GFLOP/s, peak', d['matmul_peak'])" "$out/mlp_gpu.json"
