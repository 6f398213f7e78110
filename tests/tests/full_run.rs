//! The product's promise: the default job (5 epochs, lr 0.1 falling linearly to zero) on 2
//! workers reaches 99.3% test accuracy (99.32% measured); checked >= 99.2%.
//!
//! The workers run libtorch (`--features tch`, the suite's second phase): on this 2-core CPU it
//! computes a step 2.6x faster than the pure-Rust backend (316 against 121 images/s per thread,
//! `worker --local-steps`), so the job takes 11 minutes instead of 18. The job is the same and
//! the backend a run-time choice. libtorch on one thread per worker is deterministic on a given
//! CPU, but its BLAS picks kernels by CPU model: the margin covers another machine's rounding.
#![cfg(feature = "tch")]

use cluster_tests::*;
use std::time::Duration;

#[test]
fn the_default_job_on_two_libtorch_workers_reaches_99_2_percent_test_accuracy() {
    let dir = scratch("full-run");
    let log = run_job_on(
        &dir,
        2,
        &["--backend", "tch"],
        &[
            "--backend",
            "tch",
            "--checkpoint-url",
            dir.join("ck").to_str().unwrap(),
        ],
        Duration::from_secs(3600),
    )
    .unwrap();
    // Both workers registered as libtorch: the figure is libtorch's, not a fallback's.
    let registered = |backend: &str| {
        log.lines()
            .filter(|l| l.contains("worker registered") && l.contains(backend))
            .count()
    };
    assert_eq!(registered("backend=\"tch\""), 2, "{log}");
    assert_eq!(registered("backend=\"flex\""), 0, "{log}");
    // And the coordinator validates on libtorch too, as asked: the device its engine holds.
    assert!(
        log.lines()
            .any(|l| l.contains("computed on this engine") && l.contains("LibTorch(")),
        "{log}"
    );
    let acc = test_accuracy(&log).unwrap_or_else(|| panic!("no test accuracy in\n{log}"));
    println!("test accuracy after the default job's 5 epochs: {acc}");
    assert!(acc >= 0.992, "test accuracy {acc} < 0.992");
}
