#!/usr/bin/env bash
# GPU check, run on a machine with an NVIDIA GPU and PyTorch installed (the device tool's
# machines have PyTorch 2.11 + CUDA 13, nothing to install). Uses binaries built elsewhere
# against that torch's libtorch (scripts/build-gpu-variant.sh) and the machine's torch
# libraries. Prints, in one run on one GPU, the table of issue #12 with each ratio:
#   PyTorch's parameter-server worker step (../shared/gpu/torch_ps_sim.py) and its own training
#   loop (torch_ref.py), then this project's local loop (`worker --local-steps`), a coordinator
#   with 1 and with 4 GPU workers, batch 1024 in micro-batches of 256 (local and 1 worker), and
#   the default job end to end (time to its test accuracy); then a GPU worker's time per shard,
#   phase by phase (its log's "time per shard" line), and the distributed step's overhead.
#
#   scripts/gpu-check.sh BIN_DIR MNIST_DIR [STEPS] [REF_DIR]
#     STEPS: timed steps per measurement (default 300); REF_DIR: the PyTorch scripts
#     (default ../shared/gpu next to the repository). Output also under $OUT (default /tmp/gpu-check).
set -euo pipefail
bin="$(cd "$1" && pwd)"
mnist="$(cd "$2" && pwd)"
steps="${3:-300}"
ref="${4:-$(cd "$(dirname "$0")/../.." && pwd)/shared/gpu}"
out="${OUT:-/tmp/gpu-check}"
mkdir -p "$out"

torch_lib="$(python3 -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')"
export LD_LIBRARY_PATH="$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export CUBLAS_WORKSPACE_CONFIG=:4096:8
nvidia-smi -L || true
python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'

ratio() { python3 -c "print(f'{$1 / $2:.2f}x')"; }
# images/s from a line "... NNN images/s ..."
rate_of() { grep -oE '[0-9.]+ images/s' | tail -1 | cut -d' ' -f1; }

echo "== PyTorch, same GPU"
python3 "$ref/torch_ps_sim.py" cuda | tee "$out/torch_ps_sim.txt"
python3 "$ref/torch_ref.py" "$mnist" cuda 5 128 | tee "$out/torch_ref.txt"
torch_micro="$(grep 'micro-batches + params H2D + grads D2H (pinned)' "$out/torch_ps_sim.txt" | head -1 | rate_of || true)"
torch_one="$(grep '1 pass of 128 + transfers (pinned)' "$out/torch_ps_sim.txt" | rate_of || true)"

local_loop() { # BATCH MICRO STEPS
    "$bin/worker" --backend tch --device cuda:0 --local-steps "$3" --batch-size "$1" \
        --micro-batch "$2" --data-dir "$mnist" | tee -a "$out/local.txt" | rate_of
}

# A coordinator and N workers on cuda:0 for STEPS steps of batch BATCH/MICRO: images/s measured
# by the coordinator's status over the steps after the first 10 (start-up excluded).
cluster() { # N BATCH MICRO STEPS
    local n=$1 batch=$2 micro=$3 total=$(($4 + 10)) port=50051 log="$out/cluster-$1-$2.log"
    "$bin/coordinator" --listen "127.0.0.1:$port" --metrics-listen 127.0.0.1:0 --workers "$n" \
        --data-dir "$mnist" --max-steps "$total" --batch-size "$batch" --micro-batch "$micro" \
        --eval-every 1000000 --validation-size 100 --test-size 100 --checkpoint-every 0 \
        --checkpoint-url "$out/ck-$n-$batch" --fresh --linger 1 > "$log" 2>&1 &
    local coordinator=$! workers=()
    for i in $(seq "$n"); do
        "$bin/worker" --coordinator "http://127.0.0.1:$port" --backend tch --device cuda:0 \
            > "$out/worker-$n-$batch-$i.log" 2>&1 &
        workers+=($!)
    done
    local t0="" s0="" t1="" s1=""
    for _ in $(seq 6000); do
        local s
        s="$("$bin/coordinator" status --coordinator "http://127.0.0.1:$port" --json 2>/dev/null |
            python3 -c 'import json,sys; print(json.load(sys.stdin)["step"])' 2>/dev/null || true)"
        if [[ -n "$s" && -z "$t0" && "$s" -ge 10 ]]; then t0=$(date +%s.%N) s0=$s; fi
        if [[ -n "$s" && "$s" -ge "$total" ]]; then t1=$(date +%s.%N) s1=$s; break; fi
        kill -0 $coordinator 2>/dev/null || break
        sleep 0.05
    done
    wait $coordinator || true
    for w in "${workers[@]}"; do wait "$w" || true; done
    if [[ -z "$t1" || -z "$t0" ]]; then echo 0; tail -5 "$log" >&2; return; fi
    python3 -c "print(round(($s1 - $s0) * $batch / ($t1 - $t0), 1))"
}

echo "== this project, same GPU ($steps steps each)"
local32="$(local_loop 128 32 "$steps")"
one="$(cluster 1 128 32 "$steps")"
four="$(cluster 4 128 32 "$steps")"
local256="$(local_loop 1024 256 "$((steps / 4))")"
one256="$(cluster 1 1024 256 "$((steps / 4))")"

echo "== the default job end to end (1 worker on cuda:0; the coordinator validates there too)"
start=$(date +%s.%N)
"$bin/coordinator" --listen 127.0.0.1:50051 --metrics-listen 127.0.0.1:0 --workers 1 \
    --backend tch --device cuda:0 --data-dir "$mnist" --checkpoint-url "$out/ck-full" --fresh --linger 1 > "$out/full.log" 2>&1 &
coordinator=$!
"$bin/worker" --coordinator http://127.0.0.1:50051 --backend tch --device cuda:0 > "$out/full-worker.log" 2>&1 &
worker=$!
wait $coordinator || true
wait $worker || true
full_s="$(python3 -c "import time; print(round(time.time() - $start, 1))")"
# (A line not found leaves its figure empty rather than ending the script before the table.)
grep -E "Validation Accuracy|Testing Accuracy" "$out/full.log" | tail -3 || true
test_acc="$(grep -oE 'Testing Accuracy: [0-9.]+' "$out/full.log" | cut -d' ' -f3 || true)"

echo
echo "| what | this project | PyTorch, same GPU | ratio |"
echo "|---|---|---|---|"
echo "| local loop, batch 128 in 4 x 32 | $local32 images/s | $torch_micro images/s (4 micro-batches + transfers, pinned) | $(ratio "$local32" "$torch_micro") |"
echo "| coordinator + 1 worker, batch 128 | $one images/s | - | $(ratio "$one" "$local32") of the local loop |"
echo "| coordinator + 4 workers sharing the GPU | $four images/s | - | $(ratio "$four" "$one") of 1 worker |"
echo "| local loop, batch 1024 in 4 x 256 | $local256 images/s | $torch_one images/s (1 pass of 128 + transfers) | $(ratio "$local256" "$torch_one") |"
echo "| coordinator + 1 worker, batch 1024 in 4 x 256 | $one256 images/s | - | $(ratio "$one256" "$local256") of its local loop |"
echo "| default job end to end | ${full_s} s to ${test_acc:-?} test accuracy | see torch_ref.txt above | - |"
echo
echo "== a GPU worker's shard, phase by phase (1 worker; 'wait for the task' holds the coordinator's tree sum, 'first parameters' the wait for the first parameter part, 'upload' the wait for the rest)"
for b in 128 1024; do
    echo "batch $b: $(grep -o 'time per shard.*' "$out/worker-1-$b-1.log" | tail -1)"
done
overhead="$(python3 -c "print(f'{128e3 / $one - 128e3 / $local32:.2f} ms')" 2>/dev/null || echo '?')"
echo "distributed step's overhead at batch 128 (1 worker's step minus the local loop's): $overhead (target <= 5 ms)"
