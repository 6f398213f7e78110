//! The libtorch backend (`--features tch`, CPU here): its gradients match the pure-Rust
//! backend's, it trains through the real binaries, and flex and tch workers train one job
//! together. Run by the README's test command with libtorch from scripts/setup-libtorch.sh.
#![cfg(feature = "tch")]

use cluster_tests::*;
use common::engine::{BackendKind, Engine, MicroBatch};
use common::mnist::PIXELS;
use common::model::{ModelKind, ModelSpec, Pool};
use std::path::Path;
use std::time::Duration;

/// Largest difference relative to the largest magnitude of `a`.
fn relative_error(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = a.iter().fold(0f64, |m, x| m.max(f64::from(x.abs())));
    let diff = a
        .iter()
        .zip(b)
        .fold(0f64, |m, (x, y)| m.max(f64::from((x - y).abs())));
    diff / scale.max(f64::MIN_POSITIVE)
}

/// Tolerance of the backend comparison: both compute in f32 but sum in different orders
/// (flex's im2col GEMM vs oneDNN's convolutions); measured differences are about 1e-6.
const TOLERANCE: f64 = 1e-4;

#[test]
fn flex_and_tch_give_the_same_gradients_for_one_batch() {
    let data = common::mnist::load(Path::new(&mnist_dir())).unwrap();
    let inception = ModelSpec {
        kind: ModelKind::Inception,
        pool: Pool::Max,
    };
    for spec in [ModelSpec::SEED, inception] {
        let params = spec.init(3);
        let n = 32;
        let batch = [MicroBatch {
            images: &data.train.images[..n * PIXELS],
            labels: &data.train.labels[..n],
            dropout_seed: 11,
        }];
        let flex = Engine::new(spec, BackendKind::Flex, "cpu", 0.75).unwrap();
        let tch = Engine::new(spec, BackendKind::Tch, "cpu", 0.75).unwrap();
        let a = flex.gradients(&params, &batch).unwrap().remove(0);
        let b = tch.gradients(&params, &batch).unwrap().remove(0);
        let err = relative_error(&a.values, &b.values);
        println!(
            "{spec:?}: gradient relative error {err:.2e}, loss {} vs {}",
            a.loss_sum, b.loss_sum
        );
        assert!(err < TOLERANCE, "{spec:?}: relative error {err:.2e}");
        assert!((a.loss_sum - b.loss_sum).abs() < 1e-4 * a.loss_sum.abs());
        // Predictions agree too.
        let images = &data.test.images[..500 * PIXELS];
        assert_eq!(
            flex.predict(&params, images).unwrap(),
            tch.predict(&params, images).unwrap()
        );
    }
}

/// Runs 40 steps with one worker per entry of `backends`; returns the coordinator's log and the
/// final parameters.
fn train(name: &str, backends: &[&str]) -> (String, Vec<NamedTensor>) {
    let dir = scratch(name);
    let ck = dir.join("ck");
    let mut args = short_job(40, 0, &ck);
    args.extend(["--workers".into(), backends.len().to_string()]);
    args.extend(["--eval-every".into(), "20".into()]);
    let (mut c, url) = start_coordinator(&dir, "coordinator", &args).unwrap();
    let ws: Vec<Proc> = backends
        .iter()
        .enumerate()
        .map(|(i, b)| start_worker(&dir, &format!("worker{i}-{b}"), &url, &["--backend", b]))
        .collect::<anyhow::Result<_>>()
        .unwrap();
    let status = c.wait_exit(Duration::from_secs(600)).unwrap();
    let tails: Vec<String> = ws.iter().map(Proc::tail).collect();
    assert!(status.success(), "{}\n{}", c.tail(), tails.join("\n"));
    let log = c.log_text();
    for (w, b) in ws.iter().zip(backends) {
        assert!(
            w.log_text().contains(&format!("backend={b}")),
            "{}",
            w.tail()
        );
    }
    (log, latest_params(&ck).unwrap())
}

#[test]
fn a_tch_cluster_trains_through_the_real_binaries() {
    let (log, _) = train("tch-cluster", &["tch", "tch"]);
    let acc = validation_accuracies(&log);
    let (first, last) = (acc.first().unwrap(), acc.last().unwrap());
    assert!(last.0 < first.0, "loss did not fall: {acc:?}");
    assert!(last.1 > 0.8, "validation accuracy {acc:?}");
}

#[test]
fn flex_and_tch_workers_train_one_job_together() {
    let (log, mixed) = train("mixed-cluster", &["flex", "tch"]);
    assert!(validation_accuracies(&log).last().unwrap().1 > 0.8, "{log}");
    // The same job on flex alone ends within float noise of the mixed one.
    let (_, flex) = train("flex-cluster", &["flex", "flex"]);
    for ((name, _, a), (_, _, b)) in mixed.iter().zip(&flex) {
        let err = relative_error(b, a);
        assert!(err < 1e-2, "{name}: mixed vs flex relative error {err:.2e}");
    }
}
