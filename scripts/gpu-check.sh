#!/usr/bin/env bash
# GPU check, run on a machine with an NVIDIA GPU and PyTorch installed (the device tool's
# machines have PyTorch 2.11 + CUDA 13, nothing to install). Uses binaries built elsewhere
# against that torch's libtorch (scripts/build-gpu-variant.sh) and the machine's torch libraries:
#   1. the single-process loop on cuda:0 (`worker --local-steps`), and on the CPU for scale;
#   2. a coordinator + 1 worker with --backend tch --device cuda:0 for STEPS steps;
# and prints images/s and the final loss of each.
#
#   scripts/gpu-check.sh BIN_DIR MNIST_DIR [STEPS]        (STEPS defaults to 300)
set -euo pipefail
bin="$(cd "$1" && pwd)"
mnist="$(cd "$2" && pwd)"
steps="${3:-300}"
out="${OUT:-/tmp/gpu-check}"
mkdir -p "$out"

torch_lib="$(python3 -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')"
export LD_LIBRARY_PATH="$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export CUBLAS_WORKSPACE_CONFIG=:4096:8
nvidia-smi -L || true
python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'

echo "== local loop"
"$bin/worker" --backend tch --device cuda:0 --local-steps "$steps" --data-dir "$mnist"
"$bin/worker" --backend tch --device cpu --local-steps 20 --data-dir "$mnist"

echo "== coordinator + 1 worker on cuda:0, $steps steps"
"$bin/coordinator" --listen 127.0.0.1:50051 --metrics-listen 127.0.0.1:0 --workers 1 \
    --data-dir "$mnist" --max-steps "$steps" --eval-every 100 --checkpoint-every 0 \
    --checkpoint-url "$out/ck" > "$out/coordinator.log" 2>&1 &
coordinator=$!
"$bin/worker" --coordinator http://127.0.0.1:50051 --backend tch --device cuda:0 \
    > "$out/worker.log" 2>&1 &
worker=$!
start=$(python3 -c "import time; print(time.time())")
if ! timeout 480 tail --pid=$coordinator -f /dev/null; then
    kill $coordinator $worker 2>/dev/null || true
    echo "cluster did not finish in 480 s"; tail -20 "$out/coordinator.log" "$out/worker.log"; exit 1
fi
wait $coordinator
elapsed=$(python3 -c "import time; print(round(time.time() - $start, 1))")
wait $worker || true
grep -E "Loss:|Testing Accuracy" "$out/coordinator.log" | tail -4
echo "cluster: $steps steps x 128 images in ${elapsed}s (start-up and validation included):" \
    "$(python3 -c "print(round($steps * 128 / $elapsed, 1))") images/s"
