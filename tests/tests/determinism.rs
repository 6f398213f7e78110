//! The result of training does not depend on how many workers computed it: batches are cut
//! into fixed micro-batches whose gradients are summed along one fixed tree, and dropout masks
//! are seeded by (seed, step, micro-batch). On one backend the parameters are bit-identical,
//! so the tolerance is zero. The coordinator runs in the test process (nothing here kills it).

use cluster_tests::*;
use std::time::Duration;

const STEPS: u64 = 20;

async fn train_with(workers: usize, name: &str) -> Vec<NamedTensor> {
    let dir = scratch(name);
    let ck = dir.join("checkpoints");
    run_job_in_process(
        &dir,
        workers,
        &short_job(STEPS, 0, &ck),
        Duration::from_secs(600),
    )
    .await
    .unwrap();
    latest_params(&ck).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn one_worker_and_three_workers_give_bit_identical_parameters() {
    let one = train_with(1, "invariance-1").await;
    let three = train_with(3, "invariance-3").await;
    assert_eq!(one.len(), 8);
    assert_eq!(one.len(), three.len());
    for (a, b) in one.iter().zip(&three) {
        assert_eq!(a.0, b.0);
        assert!(a.2 == b.2, "{} differs between 1 and 3 workers", a.0);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cluster_reproduces_the_single_process_training_loop() {
    let cluster = train_with(2, "vs-local").await;
    let by_name = local_reference(&default_config(STEPS), STEPS);
    for (name, shape, values) in &cluster {
        let want = &by_name[name];
        assert_eq!(shape.iter().product::<usize>(), want.len(), "{name}");
        assert!(
            values == want,
            "{name} differs from the single-process loop"
        );
    }
}
