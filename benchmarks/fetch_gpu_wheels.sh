#!/usr/bin/env bash
# Run on the development machine (it reaches the package registry; the GPU machine does not): downloads into
# .whl/ the wheels that the GPU image lacks for benchmarks/gpu_mlp.sh (Keras 3 and the two packages it needs
# that the image does not have), for the image's Python 3.12. .whl/ is not tracked; carry it to the device run.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  -d .whl "keras==${KERAS_VERSION:-3.15.1}" namex optree
ls -1 .whl
