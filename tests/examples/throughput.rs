//! Throughput benchmark: images/s of the single-process loop, of one distributed worker and of
//! two, each worker on one thread, all measured in this one run on this machine, with ratios
//! and the bytes sent per step. Run: `cargo run -p cluster-tests --example throughput`
//! (`-- STEPS` to change the 30 timed steps).

use cluster_tests::*;
use common::engine::{BackendKind, Engine};
use common::model::ModelSpec;
use common::train::{Batcher, TrainConfig, TrainState, local_step};
use proto::GetStatusRequest;
use proto::status_client::StatusClient;
use std::time::{Duration, Instant};

const WARMUP: u64 = 3;
const BATCH: usize = 128;

fn cfg() -> TrainConfig {
    TrainConfig {
        model: ModelSpec::SEED,
        batch_size: BATCH,
        micro_batch: 32,
        lr: 0.05,
        momentum: 0.9,
        keep_prob: 0.75,
        seed: 1,
        epochs: 1,
        max_steps: None,
    }
}

/// Images/s of the in-process loop on the current rayon pool.
fn local(data: &common::mnist::Split, steps: u64) -> anyhow::Result<f64> {
    let cfg = cfg();
    let engine = Engine::new(cfg.model, BackendKind::Flex, "cpu", cfg.keep_prob)?;
    let mut state = TrainState::new(&cfg);
    let mut batcher = Batcher::new(data, cfg.schedule(data.len()));
    for _ in 0..WARMUP {
        local_step(&cfg, &engine, &mut batcher, &mut state)?;
    }
    let t = Instant::now();
    for _ in 0..steps {
        local_step(&cfg, &engine, &mut batcher, &mut state)?;
    }
    Ok((steps as usize * BATCH) as f64 / t.elapsed().as_secs_f64())
}

/// Images/s and bytes per step of a cluster with `workers` one-thread workers.
async fn distributed(workers: usize, steps: u64, backend: &str) -> anyhow::Result<(f64, f64)> {
    let dir = scratch(&format!("bench-{workers}-{backend}"));
    let total = (WARMUP + steps).to_string();
    let w = workers.to_string();
    let ck = dir.join("ck");
    let (mut c, url) = start_coordinator(
        &dir,
        "coordinator",
        &[
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
        ],
    )?;
    let _ws: Vec<Proc> = (0..workers)
        .map(|i| start_worker(&dir, &format!("w{i}"), &url, &["--backend", backend]))
        .collect::<anyhow::Result<_>>()?;
    let mut client = StatusClient::connect(url).await?;
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
    let steps: u64 = std::env::args().nth(1).map_or(Ok(30), |s| s.parse())?;
    let backends: Vec<String> = std::env::var("BENCH_BACKENDS")
        .unwrap_or_else(|_| "flex".into())
        .split(',')
        .map(str::to_string)
        .collect();
    rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build_global()?;
    let data = common::mnist::load(&mnist_dir())?;
    let rt = tokio::runtime::Runtime::new()?;
    println!(
        "seed convnet, batch {BATCH} (4 micro-batches of 32), {steps} timed steps after {WARMUP} warm-up"
    );
    for backend in &backends {
        let local1 = if backend == "flex" {
            local(&data.train, steps)?
        } else {
            f64::NAN
        };
        let (d1, bytes1) = rt.block_on(distributed(1, steps, backend))?;
        let (d2, bytes2) = rt.block_on(distributed(2, steps, backend))?;
        println!("[{backend}] local loop, 1 thread:        {local1:>8.1} images/s");
        println!(
            "[{backend}] 1 worker x 1 thread:         {d1:>8.1} images/s  ({:.3}x local)",
            d1 / local1
        );
        println!(
            "[{backend}] 2 workers x 1 thread:        {d2:>8.1} images/s  ({:.3}x one worker)",
            d2 / d1
        );
        println!(
            "[{backend}] bytes per step, 1 worker:    {:>8.1} MB",
            bytes1 / 1e6
        );
        println!(
            "[{backend}] bytes per step, 2 workers:   {:>8.1} MB",
            bytes2 / 1e6
        );
    }
    Ok(())
}
