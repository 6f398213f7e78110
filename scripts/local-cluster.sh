#!/usr/bin/env bash
# Builds the release binaries and runs a local cluster: one coordinator and two workers.
# Arguments go to the coordinator (e.g. --max-steps 200). Ctrl-C stops everything cleanly
# (the coordinator checkpoints first). Secured like any cluster: mutual TLS and a token from
# `coordinator certs` in ./tls (made once; `coordinator status --tls-dir tls` reads status).
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --bins
bin="${CARGO_TARGET_DIR:-target}/release"

if [ -n "${MNIST_DIR:-}" ]; then
  data=(--data-dir "$MNIST_DIR")
elif [ -f ../shared/mnist/train-images-idx3-ubyte.gz ]; then
  data=(--data-dir ../shared/mnist)
else
  data=(--data-dir data/mnist --download)
fi

tls="${TLS_DIR:-tls}"
[ -s "$tls/token" ] || "$bin/coordinator" certs "$tls"

port="${PORT:-50051}"
"$bin/coordinator" --listen "127.0.0.1:$port" --workers 2 --tls-dir "$tls" "${data[@]}" "$@" &
coordinator=$!
trap 'kill $coordinator ${workers[*]:-} 2>/dev/null || true; wait' INT TERM
workers=()
for i in 1 2; do
  "$bin/worker" --coordinator "https://127.0.0.1:$port" --tls-dir "$tls" --threads 1 --name "worker-$i" &
  workers+=($!)
done
wait "$coordinator"
wait "${workers[@]}"
