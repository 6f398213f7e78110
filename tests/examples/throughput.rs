//! Throughput benchmark: images/s of the single-process loop (1 and 2 threads), of one
//! distributed worker (1 and 2 threads, 1 thread over mutual TLS with a token, 1 thread with the
//! bf16 wire) and of two one-thread workers, per backend, all measured in this one run on this
//! machine, with ratios and the bytes sent per step.
//!
//!   cargo run -p cluster-tests --example throughput [-- STEPS]            (flex; 30 steps)
//!   BENCH_BACKENDS=flex,tch cargo run -p cluster-tests --features tch --example throughput

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
    let cfg = cfg();
    let engine = Engine::new(cfg.model, backend, "cpu", cfg.keep_prob)?;
    let mut state = TrainState::new(&cfg);
    let mut batcher = Batcher::new(data, cfg.schedule(data.len()));
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()?;
    common::engine::set_libtorch_threads(threads);
    pool.install(|| {
        for _ in 0..WARMUP {
            local_step(&cfg, &engine, &mut batcher, &mut state)?;
        }
        let t = Instant::now();
        for _ in 0..steps {
            local_step(&cfg, &engine, &mut batcher, &mut state)?;
        }
        Ok((steps as usize * BATCH) as f64 / t.elapsed().as_secs_f64())
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

fn main() -> anyhow::Result<()> {
    // As the coordinator and worker binaries do (the local loop's baseline too).
    common::process::keep_large_buffers();
    let steps: u64 = std::env::args().nth(1).map_or(Ok(30), |s| s.parse())?;
    let backends: Vec<String> = std::env::var("BENCH_BACKENDS")
        .unwrap_or_else(|_| "flex".into())
        .split(',')
        .map(str::to_string)
        .collect();
    let data = common::mnist::load(&mnist_dir())?;
    let rt = tokio::runtime::Runtime::new()?;
    println!(
        "seed convnet, batch {BATCH} (4 micro-batches of 32), {steps} timed steps after {WARMUP} warm-up"
    );
    for name in &backends {
        let backend: BackendKind = name.parse()?;
        let local1 = local(&data.train, backend, 1, steps)?;
        let local2 = local(&data.train, backend, 2, steps)?;
        let (d1, bytes1) = rt.block_on(distributed(1, 1, steps, name, false, &[]))?;
        let (d1tls, _) = rt.block_on(distributed(1, 1, steps, name, true, &[]))?;
        let bf16 = ["--wire-format", "bf16"];
        let (d1bf16, bytes_bf16) = rt.block_on(distributed(1, 1, steps, name, false, &bf16))?;
        let (d1t2, _) = rt.block_on(distributed(1, 2, steps, name, false, &[]))?;
        let (d2, bytes2) = rt.block_on(distributed(2, 1, steps, name, false, &[]))?;
        println!("[{name}] local loop, 1 thread:        {local1:>8.1} images/s");
        println!("[{name}] local loop, 2 threads:       {local2:>8.1} images/s");
        println!(
            "[{name}] 1 worker x 1 thread:         {d1:>8.1} images/s  ({:.3}x local, 1 thread)",
            d1 / local1
        );
        println!(
            "[{name}] 1 worker x 1 thread, TLS:    {d1tls:>8.1} images/s  ({:.3}x plaintext)",
            d1tls / d1
        );
        println!(
            "[{name}] 1 worker x 1 thread, bf16:   {d1bf16:>8.1} images/s  ({:.3}x local, 1 thread; {:.1} MB per step)",
            d1bf16 / local1,
            bytes_bf16 / 1e6
        );
        println!(
            "[{name}] 1 worker x 2 threads:        {d1t2:>8.1} images/s  ({:.3}x local, 2 threads)",
            d1t2 / local2
        );
        println!(
            "[{name}] 2 workers x 1 thread:        {d2:>8.1} images/s  ({:.3}x one worker)",
            d2 / d1
        );
        println!(
            "[{name}] bytes per step, 1 worker:    {:>8.1} MB",
            bytes1 / 1e6
        );
        println!(
            "[{name}] bytes per step, 2 workers:   {:>8.1} MB",
            bytes2 / 1e6
        );
    }
    Ok(())
}
