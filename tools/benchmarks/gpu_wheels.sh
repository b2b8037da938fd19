#!/usr/bin/env bash
# Wheels the GPU machine's image lacks for tools/benchmarks/gpu_check.py (see docs/gpu.md):
# bitsandbytes, liger-kernel (the fused loss of check 6), and datasets with the two of its
# needs the image does not hold (dill, multiprocess; it holds pandas, pyarrow, xxhash, fsspec).
# 45 MB, one device call's 64 MiB:
#
#   bash tools/benchmarks/gpu_wheels.sh                   # here, once: fills .whl/ (git-ignored)
#   device run, carry [.whl]:
#     python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
#       && PYTHONPATH=/tmp/site python3 tools/benchmarks/gpu_check.py --out $OUT
#
# datasets 5 needs pyarrow >= 24; should the image's be older, `bash tools/benchmarks/gpu_wheels.sh pyarrow`
# puts pyarrow (55 MB) into .whl-pyarrow/ for a call of its own that installs it into a folder
# of the repo's ignored paths (a warm machine keeps them between calls).
set -euo pipefail
cd "$(dirname "$0")/.."
for path in /.whl/ /.whl-pyarrow/; do
  grep -qx "$path" .git/info/exclude 2>/dev/null || echo "$path" >> .git/info/exclude
done
PLATFORM=(--only-binary=:all: --no-deps --python-version 3.12 --implementation cp
          --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
          --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
if [ "${1:-}" = pyarrow ]; then
  python3 -m pip download -q "${PLATFORM[@]}" -d .whl-pyarrow "pyarrow>=24"
  du -sh .whl-pyarrow
  exit
fi
python3 -m pip download -q "${PLATFORM[@]}" -d .whl "bitsandbytes>=0.45" "datasets>=3.0" "dill<0.4.2,>=0.3.0" "multiprocess<0.70.20" \
  "liger-kernel>=0.6"  # check 6's fused loss; its Triton comes with the image's CUDA torch
du -sh .whl
