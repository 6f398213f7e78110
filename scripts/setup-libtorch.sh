#!/usr/bin/env bash
# Provisions libtorch 2.9.0 (the version burn-tch 0.22 pins) from PyPI, for `--features tch`.
#
#   scripts/setup-libtorch.sh [--cuda] [DIR]      (DIR defaults to .libtorch in the repository)
#
# CPU (default): only the torch wheel and the two small CUDA runtime wheels its CPU library
# links against; the CUDA libraries of the wheel are moved aside, so nothing needs a GPU.
# About 900 MB to download, 650 MB on disk (most of it torch/lib).
# --cuda: the full `pip install torch==2.9.0` with its CUDA 12.8 dependencies (several GB),
# for GPU workers (`worker --backend tch --device cuda:0`); needs an NVIDIA driver >= 570.
#
# Writes DIR/env.sh; `source` it before building or running:
#   LIBTORCH=DIR/torch               where burn-tch's build finds headers and libraries
#   LD_LIBRARY_PATH=DIR/torch/lib    where the binaries find them at run time
# Nothing is downloaded from outside PyPI: burn-tch's own build would fetch libtorch from
# download.pytorch.org when LIBTORCH is unset, and .cargo/config.toml always sets it.
set -euo pipefail

TORCH_VERSION=2.9.0
cuda=0
if [[ "${1:-}" == "--cuda" ]]; then
    cuda=1
    shift
fi
root="$(cd "$(dirname "$0")/.." && pwd)"
dir="$(mkdir -p "${1:-$root/.libtorch}" && cd "${1:-$root/.libtorch}" && pwd)"
python="${PYTHON:-python3}"

if [[ -f "$dir/torch/lib/libtorch_cpu.so" ]] &&
    grep -qx "$TORCH_VERSION.*" "$dir/torch/version.txt" 2>/dev/null; then
    echo "libtorch $TORCH_VERSION already in $dir/torch"
else
    rm -rf "$dir/torch"
    if [[ $cuda == 1 ]]; then
        "$python" -m pip install --quiet --upgrade --target "$dir" "torch==$TORCH_VERSION"
    else
        "$python" -m pip install --quiet --upgrade --no-deps --target "$dir" "torch==$TORCH_VERSION" \
            nvidia-cuda-runtime-cu12==12.8.90 nvidia-cuda-cupti-cu12==12.8.90
        # Without its CUDA libraries (1.1 GB) the wheel's libtorch is a CPU libtorch.
        (cd "$dir/torch/lib" && rm -f libtorch_cuda.so libtorch_cuda_linalg.so libc10_cuda.so \
            libtorch_nvshmem.so libcaffe2_nvrtc.so)
    fi
    # torch-sys checks this file against the version it was written for.
    echo "$TORCH_VERSION" > "$dir/torch/build-version"
    echo "$TORCH_VERSION" > "$dir/torch/version.txt"
fi

libs="$dir/torch/lib"
if [[ $cuda == 1 ]]; then
    # The CUDA libraries come in their own nvidia-* packages.
    for d in "$dir"/nvidia/*/lib; do libs="$libs:$d"; done
else
    libs="$libs:$dir/nvidia/cuda_runtime/lib:$dir/nvidia/cuda_cupti/lib"
fi
cat > "$dir/env.sh" <<ENV
export LIBTORCH="$dir/torch"
export LD_LIBRARY_PATH="$libs\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
ENV
echo "libtorch $TORCH_VERSION ready; before building or running with --features tch:"
echo "  source $dir/env.sh"
