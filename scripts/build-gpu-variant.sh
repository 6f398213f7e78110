#!/usr/bin/env bash
# Builds coordinator and worker with --features tch against the libtorch of PyPI's torch 2.11.0
# (the version the device tool's GPU machines carry), into gpu-bin/, for scripts/gpu-check.sh.
# burn-tch 0.22 is written for libtorch 2.9; torch-sys compiles against 2.11 with the version
# check bypassed. Only headers and libraries for linking come from the wheel (--no-deps); at run
# time the GPU machine's own torch provides libtorch and CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${TORCH211_DIR:-/var/tmp/dtrain-tools/torch-2.11}"
if [[ ! -f "$dir/torch/lib/libtorch_cpu.so" ]]; then
    python3 -m pip install --quiet --no-deps --target "$dir" torch==2.11.0
fi
export LIBTORCH="$dir/torch" LIBTORCH_BYPASS_VERSION_CHECK=1
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/dtrain-target}-torch211"
# The CUDA libraries libtorch_cuda.so needs are on the GPU machine, not here.
export RUSTFLAGS="${RUSTFLAGS:-} -C link-arg=-Wl,--allow-shlib-undefined"
cargo build --release -p coordinator -p worker --features coordinator/tch,worker/tch
mkdir -p gpu-bin
cp "$CARGO_TARGET_DIR/release/coordinator" "$CARGO_TARGET_DIR/release/worker" gpu-bin/
echo "built gpu-bin/; on the GPU machine: scripts/gpu-check.sh gpu-bin ../shared/mnist"
