//! A real coordinator and real workers train on the real MNIST.

use cluster_tests::*;
use std::time::Duration;

#[test]
fn two_workers_train_100_steps_and_validation_accuracy_passes_90_percent() {
    let dir = scratch("train-100");
    let ck = dir.join("checkpoints");
    let log = run_job(
        &dir,
        2,
        &[
            "--max-steps",
            "100",
            "--eval-every",
            "25",
            "--test-size",
            "2000",
            "--checkpoint-url",
            ck.to_str().unwrap(),
        ],
        Duration::from_secs(900),
    )
    .unwrap();
    let points = validation_accuracies(&log);
    assert!(
        points.len() >= 4,
        "expected a validation line every 25 steps:\n{log}"
    );
    let (first_loss, _) = points[0];
    let (last_loss, last_acc) = *points.last().unwrap();
    assert!(last_loss < first_loss, "loss did not fall: {points:?}");
    assert!(
        last_acc > 0.90,
        "validation accuracy {last_acc} after 100 steps"
    );
    assert!(test_accuracy(&log).is_some_and(|a| a > 0.90), "{log}");
    assert_eq!(latest_manifest(&ck).unwrap()["step"], 100);
}
