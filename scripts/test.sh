#!/usr/bin/env bash
# The whole test suite (the README's test command):
#   1. every crate on the default build (pure-Rust backend): unit tests, the real-binary cluster
#      tests, S3 checkpoints (needs `weed`), `docker compose up` (needs Docker);
#   2. the libtorch backend: `--features tch` tests, with libtorch 2.9.0 from PyPI
#      (scripts/setup-libtorch.sh, into $LIBTORCH_DIR, default .libtorch).
# One test at a time: the cluster tests each use every core of a 2-core machine.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo test --workspace -- --test-threads=1

libtorch="${LIBTORCH_DIR:-.libtorch}"
scripts/setup-libtorch.sh "$libtorch"
# shellcheck source=/dev/null
source "$libtorch/env.sh"
# Built exactly as the test harness builds the binaries (all targets, these features), so
# nothing compiles twice; the filter runs the libtorch tests only (tests/tests/tch.rs, common/src/torch.rs).
cargo test --workspace --all-targets --features cluster-tests/tch,coordinator/tch,worker/tch \
    -- --test-threads=1 libtorch_
