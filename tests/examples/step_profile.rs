//! Where one training step's time goes, phase by phase, with the real parts in one process:
//! the engine's upload (of the parameters as the wire's bytes, as a worker gives them), forward,
//! backward, on-device reduction and download (`Engine::node_gradients`), the worker's gradient
//! encode, the coordinator's decode, and its SGD step, which also encodes the next step's
//! parameters (`TrainState::apply_then`, as the coordinator calls it). The wire itself is the
//! transport benchmark's (`--example transport`). Printed in ms per step and as a share of the
//! step.
//!
//!   cargo run -p cluster-tests --example step_profile [-- STEPS]      (default 20, flex)
//!   BENCH_BACKENDS=flex,tch DEVICE=cpu BATCH=128 MICRO=32 THREADS=2 \
//!     cargo run -p cluster-tests --features tch --example step_profile

use cluster_tests::*;
use common::engine::{BackendKind, Engine, Params, Phases};
use common::train::{Batcher, TrainConfig, TrainState, micro_batches};
use common::tree::Node;
use std::time::{Duration, Instant};

const WARMUP: u64 = 3;

/// Runs `f`, adding its time to `total`.
fn timed<T>(total: &mut Duration, f: impl FnOnce() -> T) -> T {
    let started = Instant::now();
    let out = f();
    *total += started.elapsed();
    out
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() -> anyhow::Result<()> {
    // As the coordinator and worker binaries do (the local loop's baseline too).
    common::process::keep_large_buffers();
    let steps: u64 = std::env::args().nth(1).map_or(Ok(20), |s| s.parse())?;
    let device: String = env_or("DEVICE", "cpu".to_string());
    let threads: usize = env_or("THREADS", 2);
    let cfg = TrainConfig {
        batch_size: env_or("BATCH", 128),
        micro_batch: env_or("MICRO", 32),
        ..TrainConfig::DEFAULT
    };
    common::engine::set_compute_threads(threads)?;
    let data = common::mnist::load(&mnist_dir())?;
    let schedule = cfg.schedule(data.train.len());
    let leaves = schedule.leaves().len() as u32;
    println!(
        "seed convnet, batch {} in {leaves} micro-batches of {}, {threads} threads, {steps} steps after {WARMUP} warm-up",
        cfg.batch_size, cfg.micro_batch
    );
    for name in std::env::var("BENCH_BACKENDS")
        .unwrap_or_else(|_| "flex".into())
        .split(',')
    {
        let backend: BackendKind = name.parse()?;
        let engine = Engine::new(cfg.model, backend, &device, cfg.keep_prob)?;
        let mut state = TrainState::new(&cfg);
        let mut batcher = Batcher::new(&data.train, schedule);
        let (mut phases, mut encode, mut decode, mut sgd) = (
            Phases::default(),
            Duration::ZERO,
            Duration::ZERO,
            Duration::ZERO,
        );
        // The parameters in wire form, from the last step's SGD pass (the first step encodes).
        let mut encoded: Option<Vec<u8>> = None;
        for step in 0..WARMUP + steps {
            if step == WARMUP {
                (phases, encode, decode, sgd) = Default::default();
            }
            let batch = batcher.batch(state.step);
            let shard = micro_batches(&batch, &schedule, state.step, 0..leaves);
            // Coordinator: the parameters onto the wire; worker: off it.
            let n = engine.param_count();
            let wire = match encoded.take() {
                Some(wire) => wire,
                None => timed(&mut encode, || common::codec::encode_f32(&state.params)),
            };
            // As a worker takes them: the wire's bytes, no decoded vector (`Params::LeF32`).
            let params = Params::LeF32(bytes::Bytes::from(wire));
            let root = engine
                .node_gradients(params, 0, &shard, &[Node::root(leaves)], &mut phases)?
                .remove(0);
            // Worker: the node's sum onto the wire; coordinator: off it.
            let wire = timed(&mut encode, || common::codec::encode_f32(&root.values));
            let sum = timed(&mut decode, || common::codec::decode_f32(&wire, n))?;
            let lr = cfg.lr_at(state.step, schedule.steps_per_epoch());
            let f32 = common::codec::WireFormat::F32;
            let mut next = Vec::with_capacity(n * 4);
            timed(&mut sgd, || {
                state.apply_then(sum.as_slice(), root.examples, lr, None, |p| {
                    common::codec::encode_append(f32, p, &mut next)
                })
            })?;
            encoded = Some(next);
        }
        let total = phases.total() + encode + decode + sgd;
        let ms = |d: Duration| d.as_secs_f64() * 1e3 / steps as f64;
        let row = |what: &str, d: Duration| {
            println!(
                "[{name} {device}] {what:<44} {:>8.2} ms  {:>5.1}%",
                ms(d),
                100.0 * d.as_secs_f64() / total.as_secs_f64()
            )
        };
        row("parameter upload (one flat tensor)", phases.upload);
        row("forward (with images, mask, loss read)", phases.forward);
        row("backward (and flatten on the device)", phases.backward);
        row("reduce along the tree (on the device)", phases.reduce);
        row("gradient download (one per node)", phases.download);
        row("encode (gradient; parameters in the SGD step)", encode);
        row("decode (gradient; parameters go up as bytes)", decode);
        row("SGD, its checks, the parameter encode", sgd);
        println!(
            "[{name} {device}] step {:.2} ms: {:.1} images/s without the wire",
            ms(total),
            cfg.batch_size as f64 / (ms(total) / 1e3)
        );
    }
    Ok(())
}
