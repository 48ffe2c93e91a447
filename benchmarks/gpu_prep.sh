#!/usr/bin/env bash
# Before the GPU call, on a machine with the package index: fetch what the GPU machine lacks
# into .whl/ (ignored by git), to be carried with the call (benchmarks/gpu_check.sh installs
# it offline into a folder of its own). The GPU image has torch 2.11 and triton 3.6 but not
# Liger-Kernel, the kernel bench's named baseline; Liger is pure Python and needs nothing
# the image lacks (torch, triton). Wheels for Python 3.12 (the image's python3).
#
#   bash benchmarks/gpu_prep.sh            # -> .whl/liger_kernel-<version>-py3-none-any.whl
set -euo pipefail
cd "$(dirname "$0")/.."
LIGER=${LIGER:-liger-kernel==0.8.5}
PY=${PYTHON:-python3}
mkdir -p .whl
rm -f .whl/liger_kernel-*.whl  # one version only: two stop the offline install
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "$LIGER"
ls -l .whl
for w in .whl/*.whl; do  # what each wheel needs, to check against the image's package list
    echo "$w needs: $(unzip -p "$w" '*/METADATA' | grep '^Requires-Dist' | grep -v 'extra ==' | cut -d' ' -f2- | tr '\n' ' ')"
done
