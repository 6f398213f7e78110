//! The product's promise: default flags, 3 epochs, 2 workers reach >= 99.0% test accuracy.
//! About 12 minutes on a 2-core machine; it is part of the suite CI runs.

use cluster_tests::*;
use std::time::Duration;

#[test]
fn three_epochs_on_two_workers_reach_99_percent_test_accuracy() {
    let dir = scratch("full-run");
    let log = run_job(
        &dir,
        2,
        &["--checkpoint-url", dir.join("ck").to_str().unwrap()],
        Duration::from_secs(3600),
    )
    .unwrap();
    let acc = test_accuracy(&log).unwrap_or_else(|| panic!("no test accuracy in\n{log}"));
    println!("test accuracy after 3 epochs: {acc}");
    assert!(acc >= 0.99, "test accuracy {acc} < 0.99");
}
