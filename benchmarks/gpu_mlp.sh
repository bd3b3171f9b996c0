#!/usr/bin/env bash
# Issue 5 req 5 on a GPU machine whose image has JAX but no TensorFlow (the `device` tool's H200 image):
# the dense-head grid benchmark with Keras on JAX, featcache's JAX grid trainer against one Keras
# model.fit per config. For each epoch scale in EPOCH_SCALES (default "0.1 1": the CPU table's scale, then
# paper 000's full epochs) it writes mlp_gpu_<scale>.json and .log to $OUT (or the current folder), as
# long as the time budget lasts: a scale that cannot finish within BUDGET_S seconds (default 540) of the
# script's start is stopped, and the scales before it keep their results.
#
#   device run, carry [".whl"], timeout_s 580:  bash benchmarks/gpu_mlp.sh
#
# The first scale also runs the thorough agreement check (FIRST_ARGS, default "--noise-configs 33
# --extra-seeds 3": every config's reference again with another seed, up to 3 more where featcache matches
# none); the reference's time is measured before those runs. Extra arguments go to every bench_mlp.py run
# (e.g. --quick as a smoke test).
#
# .whl holds the wheels that image lacks (keras, namex, optree for its Python 3.12): run
# benchmarks/fetch_gpu_wheels.sh here first. Checked on this CPU under the image's versions (Python 3.12.1,
# jax 0.11.2, numpy 2.5.2, no TensorFlow), not yet on a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-.}"
budget="${BUDGET_S:-540}"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" KERAS_BACKEND=jax PYTHONUNBUFFERED=1
command -v nvidia-smi >/dev/null && nvidia-smi -L
python3 -c "import jax, keras; print('jax', jax.__version__, jax.devices(), 'keras', keras.__version__, keras.backend.backend())"
first="${FIRST_ARGS---noise-configs 33 --extra-seeds 3}"
for scale in ${EPOCH_SCALES:-0.1 1}; do
  left=$((budget - SECONDS))
  if [ "$left" -lt 30 ]; then
    echo "epoch scale $scale: skipped, ${left} s of the ${budget} s budget left"
    continue
  fi
  # shellcheck disable=SC2086  # FIRST_ARGS is a list of arguments
  if ! timeout "$left" python3 benchmarks/bench_mlp.py --json --trainer jax --epoch-scale "$scale" $first "$@" \
      > "$out/mlp_gpu_$scale.json" 2> >(tee "$out/mlp_gpu_$scale.log" >&2); then
    echo "epoch scale $scale: stopped or failed after ${left} s at most (see mlp_gpu_$scale.log)"
    first=""
    continue
  fi
  first=""
  python3 -c "
import json, sys
d = json.load(open(sys.argv[1]))
print('epoch scale', d['epoch_scale'], '| mlp_grid_speedup', d['mlp_grid_speedup'], '| featcache', d['t_featcache_s'],
      's | reference', d['t_reference_s'], 's | JAX compiling', d['jax_compile_s'], '| agreeing',
      d['agreement']['configs_agreeing'], 'of', d['agreement']['configs'], '|', d['device'], '| achieved',
      d['achieved_gflops'], 'GFLOP/s, peak', d['matmul_peak'])" "$out/mlp_gpu_$scale.json"
done
