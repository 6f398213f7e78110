#!/usr/bin/env bash
# The whole test suite (the README's test command):
#   1. every crate on the default build (pure-Rust backend): unit tests, the real-binary cluster
#      tests, S3 checkpoints (needs `weed`), `docker compose up` (needs Docker);
#   2. the libtorch backend: `--features tch` tests, with libtorch 2.9.0 from PyPI
#      (scripts/setup-libtorch.sh, into $LIBTORCH_DIR, default .libtorch), and the full run (the
#      default job to its test accuracy) on libtorch workers, 1.6x faster than on the default
#      backend here (tests/tests/full_run.rs).
# One test at a time: the cluster tests each use every core of a 2-core machine.
#
# The Kubernetes tests (tests/tests/kubernetes.rs) need ../shared/k8s's single-node cluster:
# when it is built (../shared/k8s/build.sh, which .ci/run runs) and not running, it is started
# here and stopped at the end, also on failure; one already running is left as it is.
set -euo pipefail
cd "$(dirname "$0")/.."

k8s_shared="$(cd .. && pwd)/shared/k8s"
k8s_home="${K8S_HOME:-/var/tmp/k8s-local}"
kubeconfig="$k8s_home/run/kubeconfig/admin.conf"
if [[ -x "$k8s_home/bin/kubelet" && -x "$k8s_shared/up.sh" ]] &&
    ! "$k8s_home/bin/kubectl" --kubeconfig "$kubeconfig" get --raw /readyz > /dev/null 2>&1; then
    "$k8s_shared/up.sh" > "$k8s_home/up.log" 2>&1 || { tail -30 "$k8s_home/up.log"; exit 1; }
    trap '"$k8s_shared/down.sh" > "$k8s_home/down.log" 2>&1 || tail -20 "$k8s_home/down.log"' EXIT
fi

# The suite-time report, printed at the end: each test binary's time (libtest's own figure) and
# the slowest tests. A test's time is from the line before its result to its result (`timed`
# stamps the lines as they pass): exact where tests run one at a time, understated for the
# Kubernetes tests, which run two at a time.
report="$(mktemp)"
timed() {
    local line
    while IFS= read -r line; do
        printf '%s\n' "$line"
        printf '%s %s\n' "$EPOCHREALTIME" "$line" >> "$report"
    done
}
summary() {
    echo "== suite time by test binary (seconds)"
    awk '/ Running /{name = $3; if (name == "unittests") {name = $NF; gsub(/^.*\/|-[0-9a-f]+\)$/, "", name); name = name " (unit tests)"}} /^[0-9.]+ test result:/{sub("s$", "", $NF); if ($NF > 0.05) printf "%8.1f  %s\n", $NF, name}' "$report" | sort -rn
    echo "== the 12 slowest tests (seconds)"
    # (A test's result can come a line later, after the binaries' build has said "Finished".)
    awk '$2 == "test" && $4 == "..." {name = $3; start = last}
         name != "" && $NF ~ /^(ok|FAILED)$/ {printf "%8.1f  %s\n", $1 - start, name; name = ""}
         {last = $1}' "$report" | sort -rn | head -12
    echo "   in all: $SECONDS s"
}

cargo test --workspace -- --test-threads=1 --skip kubernetes_ 2>&1 | timed
# The Kubernetes tests mostly wait on the cluster (pods scheduled, failing, stopped), so two run
# at a time (each in its own namespace): 346 s one at a time here, 218 s two at a time.
cargo test --workspace --test kubernetes -- --test-threads=2 2>&1 | timed

libtorch="${LIBTORCH_DIR:-.libtorch}"
scripts/setup-libtorch.sh "$libtorch"
# shellcheck source=/dev/null
source "$libtorch/env.sh"
# Built exactly as the test harness builds the binaries (all targets, these features), so
# nothing compiles twice; the filter runs the libtorch tests only (tests/tests/tch.rs,
# tests/tests/full_run.rs, common/src/torch.rs).
cargo test --workspace --all-targets --features cluster-tests/tch,coordinator/tch,worker/tch \
    -- --test-threads=1 libtorch_ 2>&1 | timed
summary
