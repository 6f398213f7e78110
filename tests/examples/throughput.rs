//! Throughput benchmark: images/s of the single-process loop (1 and 2 threads), of one
//! distributed worker (1 and 2 threads, 1 thread over mutual TLS with a token, 1 thread with the
//! bf16 wire) and of two one-thread workers, with two one-thread local loops run at once as the
//! two workers' ceiling, per backend, all measured in this one run on this machine, with ratios
//! and the bytes sent per step.
//!
//! On a shared machine the figures drift by tens of percent within minutes, so with
//! `BENCH_ROUNDS=N` every configuration is measured N times, in rounds that alternate their
//! order; each ratio is taken within a round and the median over rounds is printed with its range.
//!
//!   cargo run -p cluster-tests --example throughput [-- STEPS]            (flex; 30 steps, 1 round)
//!   BENCH_BACKENDS=flex,tch cargo run -p cluster-tests --features tch --example throughput
//!   BENCH_ROUNDS=3 cargo run -p cluster-tests --example throughput -- 20

use cluster_tests::*;
use common::engine::{BackendKind, Engine};
use common::train::{Batcher, TrainConfig, TrainState, local_step};
use proto::GetStatusRequest;
use proto::status_client::StatusClient;
use std::time::{Duration, Instant};

const WARMUP: u64 = 3;
const BATCH: usize = 128;

fn cfg() -> TrainConfig {
    TrainConfig {
        epochs: 1,
        ..TrainConfig::DEFAULT
    }
}

/// Images/s of the in-process loop on `threads` threads.
fn local(
    data: &common::mnist::Split,
    backend: BackendKind,
    threads: usize,
    steps: u64,
) -> anyhow::Result<f64> {
    let (start, end) = local_loop(data, backend, threads, steps, || ())?;
    Ok((steps as usize * BATCH) as f64 / (end - start).as_secs_f64())
}

/// Images/s of two one-thread local loops running at once, each with its own engine and
/// parameters, timed from their common start to the later one's end: what the two cores give
/// two computations that never wait for each other, the ceiling of two one-thread workers
/// (which share the cores with the coordinator and wait for each other every step).
fn local_pair(
    data: &common::mnist::Split,
    backend: BackendKind,
    steps: u64,
) -> anyhow::Result<f64> {
    let warm = std::sync::Barrier::new(2);
    let ends = std::thread::scope(|s| {
        let loops: Vec<_> = (0..2)
            .map(|_| {
                s.spawn(|| {
                    local_loop(data, backend, 1, steps, || {
                        warm.wait();
                    })
                })
            })
            .collect();
        loops
            .into_iter()
            .map(|l| l.join().expect("a local loop panicked"))
            .collect::<anyhow::Result<Vec<_>>>()
    })?;
    let start = ends.iter().map(|e| e.0).min().expect("two loops");
    let end = ends.iter().map(|e| e.1).max().expect("two loops");
    Ok((2 * steps as usize * BATCH) as f64 / (end - start).as_secs_f64())
}

/// Runs the in-process loop on `threads` threads: warm-up steps, then `ready()`, then `steps`
/// timed steps. Returns when the timed steps started and ended.
fn local_loop(
    data: &common::mnist::Split,
    backend: BackendKind,
    threads: usize,
    steps: u64,
    ready: impl FnOnce(),
) -> anyhow::Result<(Instant, Instant)> {
    let cfg = cfg();
    let mut state = TrainState::new(&cfg);
    let mut batcher = Batcher::new(data, cfg.schedule(data.len()));
    // `ready` is called whatever happens before it (a loop beside this one may wait in it).
    let mut warm_up = || -> anyhow::Result<_> {
        let engine = Engine::new(cfg.model, backend, "cpu", cfg.keep_prob)?;
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()?;
        common::engine::set_libtorch_threads(threads);
        pool.install(|| {
            (0..WARMUP).try_for_each(|_| {
                local_step(&cfg, &engine, &mut batcher, &mut state).map(|_loss| ())
            })
        })?;
        Ok((engine, pool))
    };
    let warmed = warm_up();
    ready();
    let (engine, pool) = warmed?;
    pool.install(|| {
        let start = Instant::now();
        for _ in 0..steps {
            local_step(&cfg, &engine, &mut batcher, &mut state)?;
        }
        Ok((start, Instant::now()))
    })
}

/// Images/s and bytes per step of a cluster with `workers` workers of `threads` threads, over
/// TLS (material from `coordinator certs`) when `tls`.
async fn distributed(
    workers: usize,
    threads: usize,
    steps: u64,
    backend: &str,
    tls: bool,
    extra: &[&str],
) -> anyhow::Result<(f64, f64)> {
    let suffix = format!("{}{}", if tls { "-tls" } else { "" }, extra.join(""));
    let dir = scratch(&format!("bench-{workers}x{threads}-{backend}{suffix}"));
    let tls_dir = tls.then(|| make_certs(&dir)).transpose()?;
    let tls_args: Vec<String> = tls_dir
        .iter()
        .flat_map(|d| ["--tls-dir".to_string(), d.display().to_string()])
        .collect();
    let reader = match &tls_dir {
        Some(d) => ClientSecurity::new(&material(d, Role::Reader))?,
        None => ClientSecurity::none(),
    };
    let t = threads.to_string();
    let total = (WARMUP + steps).to_string();
    let w = workers.to_string();
    let ck = dir.join("ck");
    let mut args: Vec<String> = [
        "--workers",
        &w,
        "--max-steps",
        &total,
        "--eval-every",
        "100000",
        "--validation-size",
        "10",
        "--test-size",
        "10",
        "--checkpoint-every",
        "0",
        "--checkpoint-url",
        ck.to_str().unwrap_or("ck"),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(tls_args.iter().cloned());
    args.extend(extra.iter().map(|a| a.to_string()));
    let (mut c, url) = start_coordinator(&dir, "coordinator", &args)?;
    let mut worker_args = vec!["--backend", backend, "--threads", &t];
    worker_args.extend(tls_args.iter().map(String::as_str));
    let _ws: Vec<Proc> = (0..workers)
        .map(|i| start_worker(&dir, &format!("w{i}"), &url, &worker_args))
        .collect::<anyhow::Result<_>>()?;
    let channel = reader.endpoint(&url)?.connect().await?;
    let mut client = StatusClient::new(reader.authorize(channel));
    let (mut t0, mut t1, mut bytes) = (None, None, 0.0);
    let deadline = Instant::now() + Duration::from_secs(1800);
    while t1.is_none() && Instant::now() < deadline {
        let s = client.get_status(GetStatusRequest {}).await?.into_inner();
        if s.step >= WARMUP && t0.is_none() {
            t0 = Some((Instant::now(), s.step));
        }
        if s.step >= WARMUP + steps {
            t1 = Some((Instant::now(), s.step));
            bytes = (s.bytes_sent + s.bytes_received) as f64 / s.step as f64;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (Some((a, sa)), Some((b, sb))) = (t0, t1) else {
        anyhow::bail!("cluster did not finish\n{}", c.tail());
    };
    c.wait_exit(Duration::from_secs(120))?;
    Ok((
        ((sb - sa) as usize * BATCH) as f64 / (b - a).as_secs_f64(),
        bytes,
    ))
}

/// One measurement of every configuration, in images/s (and bytes per step where it matters).
#[derive(Default)]
struct Round {
    local1: f64,
    local2: f64,
    pair: f64,
    d1: f64,
    d1tls: f64,
    d1bf16: f64,
    d1t2: f64,
    d2: f64,
    bytes1: f64,
    bytes_bf16: f64,
    bytes2: f64,
}

/// Measures every configuration once, in forward or reverse order (rounds alternate, so a drift
/// of the machine over the run weighs on both sides of each ratio alike).
fn round(
    rt: &tokio::runtime::Runtime,
    data: &common::mnist::Split,
    name: &str,
    steps: u64,
    reverse: bool,
) -> anyhow::Result<Round> {
    let backend: BackendKind = name.parse()?;
    let bf16 = ["--wire-format", "bf16"];
    let mut r = Round::default();
    let mut order: Vec<u8> = (0..8).collect();
    if reverse {
        order.reverse();
    }
    for which in order {
        match which {
            0 => r.local1 = local(data, backend, 1, steps)?,
            1 => r.local2 = local(data, backend, 2, steps)?,
            2 => (r.d1, r.bytes1) = rt.block_on(distributed(1, 1, steps, name, false, &[]))?,
            3 => (r.d1tls, _) = rt.block_on(distributed(1, 1, steps, name, true, &[]))?,
            4 => {
                (r.d1bf16, r.bytes_bf16) =
                    rt.block_on(distributed(1, 1, steps, name, false, &bf16))?
            }
            5 => (r.d1t2, _) = rt.block_on(distributed(1, 2, steps, name, false, &[]))?,
            6 => r.pair = local_pair(data, backend, steps)?,
            _ => (r.d2, r.bytes2) = rt.block_on(distributed(2, 1, steps, name, false, &[]))?,
        }
    }
    Ok(r)
}

/// "median" or, over several rounds, "median (min-max)" (the median of an even count is the
/// mean of the middle two).
fn spread(mut values: Vec<f64>, digits: usize) -> String {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    let m = (values[(n - 1) / 2] + values[n / 2]) / 2.0;
    if n < 2 {
        return format!("{m:.digits$}");
    }
    let (lo, hi) = (values[0], values[n - 1]);
    format!("{m:.digits$} ({lo:.digits$}-{hi:.digits$})")
}

fn main() -> anyhow::Result<()> {
    // As the coordinator and worker binaries do (the local loop's baseline too).
    common::process::keep_large_buffers();
    let steps: u64 = std::env::args().nth(1).map_or(Ok(30), |s| s.parse())?;
    let rounds: usize = std::env::var("BENCH_ROUNDS")
        .map_or(Ok(1), |s| s.parse())
        .map_err(|e| anyhow::anyhow!("BENCH_ROUNDS: {e}"))?;
    anyhow::ensure!(rounds > 0, "BENCH_ROUNDS must be at least 1");
    let backends: Vec<String> = std::env::var("BENCH_BACKENDS")
        .unwrap_or_else(|_| "flex".into())
        .split(',')
        .map(str::to_string)
        .collect();
    let data = common::mnist::load(&mnist_dir())?;
    let rt = tokio::runtime::Runtime::new()?;
    println!(
        "seed convnet, batch {BATCH} (4 micro-batches of 32), {steps} timed steps after {WARMUP} warm-up, {rounds} round(s)"
    );
    for name in &backends {
        let all: Vec<Round> = (0..rounds)
            .map(|i| round(&rt, &data.train, name, steps, i % 2 == 1))
            .collect::<anyhow::Result<_>>()?;
        // Each figure is the median over the rounds; each ratio is taken within a round (both
        // sides measured within minutes of each other) and then its median, with the range
        // across rounds.
        let fig = |f: fn(&Round) -> f64| spread(all.iter().map(f).collect(), 1);
        let ratio = |f: fn(&Round) -> f64| spread(all.iter().map(f).collect(), 3);
        println!(
            "[{name}] local loop, 1 thread:        {} images/s",
            fig(|r| r.local1)
        );
        println!(
            "[{name}] local loop, 2 threads:       {} images/s",
            fig(|r| r.local2)
        );
        println!(
            "[{name}] 2 local loops at once:       {} images/s; {}x one loop (2 workers' ceiling)",
            fig(|r| r.pair),
            ratio(|r| r.pair / r.local1)
        );
        println!(
            "[{name}] 1 worker x 1 thread:         {} images/s; {}x local, 1 thread",
            fig(|r| r.d1),
            ratio(|r| r.d1 / r.local1)
        );
        println!(
            "[{name}] 1 worker x 1 thread, TLS:    {} images/s; {}x plaintext",
            fig(|r| r.d1tls),
            ratio(|r| r.d1tls / r.d1)
        );
        println!(
            "[{name}] 1 worker x 1 thread, bf16:   {} images/s; {}x local, 1 thread; {:.1} MB/step",
            fig(|r| r.d1bf16),
            ratio(|r| r.d1bf16 / r.local1),
            all[0].bytes_bf16 / 1e6
        );
        println!(
            "[{name}] 1 worker x 2 threads:        {} images/s; {}x local, 2 threads",
            fig(|r| r.d1t2),
            ratio(|r| r.d1t2 / r.local2)
        );
        println!(
            "[{name}] 2 workers x 1 thread:        {} images/s; {}x one worker; {}x 2 loops at once",
            fig(|r| r.d2),
            ratio(|r| r.d2 / r.d1),
            ratio(|r| r.d2 / r.pair)
        );
        println!(
            "[{name}] bytes per step, 1 worker:    {:>8.1} MB",
            all[0].bytes1 / 1e6
        );
        println!(
            "[{name}] bytes per step, 2 workers:   {:>8.1} MB",
            all[0].bytes2 / 1e6
        );
    }
    Ok(())
}
