#!/usr/bin/env bash
# Wheels the GPU machine's image lacks (bitsandbytes; datasets and its needs), for
# tools/gpu_check.py on a lent device (see the README's GPU section). A device call carries at
# most 64 MiB, and bitsandbytes (43 MB) and pyarrow (55 MB) do not fit together, so they go in
# three folders, one per call, each installed into .site/ (ignored; kept on a warm machine):
#
#   bash tools/gpu_wheels.sh            # here, once: fills .whl/1 .whl/2 .whl/3
#   call 1: carry [.whl/1]  pip install ... --target .site .whl/1/*.whl
#   call 2: carry [.whl/2]  the same with .whl/2
#   call 3: carry [.whl/3]  the same with .whl/3, then PYTHONPATH=.site python tools/gpu_check.py --out $OUT
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
grep -qx '/.site/' .git/info/exclude 2>/dev/null || echo /.site/ >> .git/info/exclude
PLATFORM=(--only-binary=:all: --no-deps --python-version 3.12 --implementation cp
          --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
          --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
get() { local dir=$1; shift; mkdir -p "$dir"; python3 -m pip download -q "${PLATFORM[@]}" -d "$dir" "$@"; }
get .whl/1 "bitsandbytes>=0.45"
get .whl/2 "pyarrow>=24"
get .whl/3 "datasets>=3.0" pandas "dill<0.4.2,>=0.3.0" xxhash "multiprocess<0.70.20"
du -sh .whl/*
echo "install line for each call: python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .site .whl/N/*.whl"
