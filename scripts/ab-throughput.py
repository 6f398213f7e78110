#!/usr/bin/env python3
"""A/B throughput of two builds of the cluster: images/s of a real coordinator and its workers,
each build's binaries in turn, rounds alternating their order so that a drift of the machine
weighs on both sides alike.

    scripts/ab-throughput.py BASELINE_DIR [NEW_DIR]

Each directory holds a `coordinator` and a `worker` binary (NEW_DIR defaults to
$CARGO_TARGET_DIR/debug, or target/debug). To keep a baseline: `git worktree add /tmp/wt REV`,
build it with the same CARGO_TARGET_DIR and the same features, copy the two binaries aside, then
rebuild here. Set-ups are BACKEND:WORKERS (`AB_CONFIGS`, default flex:1,tch:1,flex:2), each
worker on one thread; `AB_ROUNDS` (3) rounds of `AB_STEPS` (20) timed steps after 3, the default
job (batch 128 in 4 micro-batches of 32) on the MNIST copy in `AB_DATA` (../shared/mnist).
Images/s come from the coordinator's "step done" log lines; each worker's own profile (its "time
per shard" line) is printed beside them. A tch set-up needs tch builds and libtorch's
environment (scripts/setup-libtorch.sh).
"""
import datetime
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WARMUP = 3
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(bins, backend, workers, steps, data, scratch):
    shutil.rmtree(scratch, ignore_errors=True)
    os.makedirs(scratch)
    port = free_port()
    env = dict(os.environ, RUST_LOG="coordinator=debug,worker=info")
    log = lambda name: open(os.path.join(scratch, name), "w")
    coordinator = subprocess.Popen(
        [f"{bins}/coordinator", "--listen", f"127.0.0.1:{port}", "--workers", str(workers),
         "--max-steps", str(WARMUP + steps), "--eval-every", "100000", "--validation-size", "10",
         "--test-size", "10", "--checkpoint-every", "0", "--checkpoint-url",
         os.path.join(scratch, "ck"), "--data-dir", data, "--no-metrics"],
        stdout=log("coordinator.log"), stderr=subprocess.STDOUT, env=env)
    procs = [subprocess.Popen(
        [f"{bins}/worker", "--coordinator", f"http://127.0.0.1:{port}", "--backend", backend,
         "--threads", "1", "--data-dir", data],
        stdout=log(f"worker-{i}.log"), stderr=subprocess.STDOUT, env=env) for i in range(workers)]
    try:
        coordinator.wait(timeout=1800)
    finally:
        for p in procs + [coordinator]:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
    done = {}
    for line in open(os.path.join(scratch, "coordinator.log")):
        m = re.search(r"^(\S+)Z .*step done.*step=(\d+)", ANSI.sub("", line))
        if m:
            done[int(m.group(2))] = datetime.datetime.fromisoformat(m.group(1)[:26])
    if WARMUP not in done or WARMUP + steps not in done:
        sys.exit(f"the job in {scratch} did not log its steps; see its logs")
    rate = steps * 128 / (done[WARMUP + steps] - done[WARMUP]).total_seconds()
    profiles = []
    for i in range(workers):
        for line in open(os.path.join(scratch, f"worker-{i}.log")):
            if "time per shard" in line:
                profiles.append(ANSI.sub("", line).split("time per shard, ")[1].strip())
    return rate, profiles


def main():
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    base = sys.argv[1]
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
    new = sys.argv[2] if len(sys.argv) == 3 else os.path.join(target, "debug")
    steps = int(os.environ.get("AB_STEPS", "20"))
    rounds = int(os.environ.get("AB_ROUNDS", "3"))
    data = os.environ.get("AB_DATA", os.path.join(ROOT, "..", "shared", "mnist"))
    configs = os.environ.get("AB_CONFIGS", "flex:1,tch:1,flex:2").split(",")
    scratch = tempfile.mkdtemp(prefix="ab-throughput-")
    for config in configs:
        backend, workers = config.split(":")
        rates = {"new": [], "base": []}
        for r in range(rounds):
            for which in (["new", "base"] if r % 2 == 0 else ["base", "new"]):
                bins = new if which == "new" else base
                rate, profiles = run(bins, backend, int(workers), steps, data,
                                     os.path.join(scratch, f"{backend}-{workers}-{which}-{r}"))
                rates[which].append(rate)
                print(f"{backend} {workers}w {which:4} round {r}: {rate:7.1f} images/s", flush=True)
                for p in profiles:
                    print(f"    {p}", flush=True)
        ratios = [n / b for n, b in zip(rates["new"], rates["base"])]
        print(f"== {backend}, {workers} worker(s): new {statistics.median(rates['new']):.1f}, "
              f"baseline {statistics.median(rates['base']):.1f} images/s; new/baseline per round "
              f"{', '.join(f'{x:.3f}' for x in ratios)} (median {statistics.median(ratios):.3f})",
              flush=True)
    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
