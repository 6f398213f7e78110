//! One bad number, one bad flag or one sick device never silently ends a job: divergence is a
//! job outcome with its reason, a loss blow-up is flagged, a poisoned gradient is refused, a
//! worker's failure on a shard is reported and the shard redone, every valid job's messages fit,
//! and health says when the job is over. Real processes, real gRPC.

use cluster_tests::*;
use proto::{NodeGradient, RegisterRequest, SubmitRequest};
use std::path::Path;
use std::process::Command;
use std::time::Duration;
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const STEPS: u64 = 20;
const EXIT: Duration = Duration::from_secs(600);

/// Flags of a job that keeps serving status for a minute after it ends.
fn job(dir: &Path, steps: u64, workers: usize, extra: &[&str]) -> Vec<String> {
    let mut args = short_job(steps, 1, &dir.join("ck"));
    if let Some(i) = args.iter().position(|a| a == "--eval-every")
        && extra.contains(&"--eval-every")
    {
        args.drain(i..i + 2);
    }
    args.extend(["--workers".into(), workers.to_string()]);
    args.extend(["--linger".into(), "60".into()]);
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// The serving status of `service` ("" for the server as a whole).
async fn health(url: &str, service: &str) -> ServingStatus {
    let channel = tonic::transport::Endpoint::from_shared(url.to_string())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut c = HealthClient::new(channel);
    let r = c
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .unwrap()
        .into_inner();
    ServingStatus::try_from(r.status).unwrap()
}

/// `coordinator status` against `url`, as a user would run it.
fn status_cli(url: &str) -> String {
    let out = run_with_deadline(
        Command::new(bin_dir().join("coordinator")).args(["status", "--coordinator", url]),
        Duration::from_secs(30),
    )
    .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn ended(s: &proto::StatusReply) -> bool {
    s.state == proto::JobState::Finished as i32 || s.state == proto::JobState::Failed as i32
}

/// The final parameters equal the fault-free single-process run's.
fn assert_equals_reference(ck: &Path, steps: u64) {
    let reference = local_reference(&default_config(steps), steps);
    assert_checkpoint_is(ck, &reference, "the fault-free run");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_diverging_job_fails_with_its_reason_and_keeps_a_finite_checkpoint() {
    // Noticed through the workers' gradients over the norm bound...
    diverges(&["--lr", "1e6"]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_diverging_job_without_a_norm_bound_fails_at_its_first_non_finite_number() {
    // ...or, with the bound off, through the first NaN or infinity in a loss, a gradient or
    // the parameters.
    diverges(&["--lr", "1e6", "--max-node-grad-norm", "0"]).await;
}

async fn diverges(flags: &[&str]) {
    let dir = scratch("diverge");
    let (mut c, url) = start_coordinator(&dir, "coordinator", &job(&dir, STEPS, 2, flags)).unwrap();
    let mut workers: Vec<Proc> = (0..2)
        .map(|i| start_worker(&dir, &format!("worker{i}"), &url, &[]).unwrap())
        .collect();
    let s = wait_status(&url, "the job to end", EXIT, ended).await;
    assert_eq!(s.state, proto::JobState::Failed as i32, "{s:?}");
    assert!(s.reason.contains("diverged at step"), "{s:?}");
    assert!(
        s.reason.contains("lower --lr or add --clip-grad-norm"),
        "{s:?}"
    );
    assert!(s.step < 5, "noticed only at step {}: {s:?}", s.step);
    let text = status_cli(&url);
    assert!(
        text.contains("failed") && text.contains("diverged at step"),
        "{text}"
    );
    assert_eq!(health(&url, "").await, ServingStatus::NotServing);
    assert_eq!(
        health(&url, "dtrain.v1.Trainer").await,
        ServingStatus::NotServing
    );
    assert_eq!(
        health(&url, "dtrain.v1.Status").await,
        ServingStatus::Serving
    );

    // Workers were told the job is over; none was refused or exits with an error.
    for w in &mut workers {
        let status = w.wait_exit(Duration::from_secs(30)).unwrap();
        assert!(status.success(), "{}", w.tail());
        assert!(
            !w.log_text().contains("refused this worker"),
            "{}",
            w.tail()
        );
    }
    c.signal("TERM").unwrap();
    let status = c.wait_exit(Duration::from_secs(30)).unwrap();
    assert!(
        !status.success(),
        "a diverged job must exit non-zero\n{}",
        c.tail()
    );
    assert!(c.log_text().contains("diverged at step"), "{}", c.tail());
    // Every checkpoint written holds finite parameters and loads.
    let params = latest_params(&dir.join("ck")).unwrap();
    assert!(!params.is_empty());
    assert!(
        params
            .iter()
            .all(|(_, _, v)| v.iter().all(|x| x.is_finite()))
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_loss_blow_up_is_flagged_and_clipping_tames_it() {
    // At lr 50 the loss jumps from 2.3 to thousands and stays finite. With the per-node norm
    // bound off, only the blow-up watch can say so.
    let dir = scratch("blow-up");
    let flags = ["--lr", "50", "--eval-every", "2"];
    let mut unbounded = flags.to_vec();
    unbounded.extend(["--max-node-grad-norm", "0"]);
    let (mut c, url) =
        start_coordinator(&dir, "coordinator", &job(&dir, 16, 1, &unbounded)).unwrap();
    let _w = start_worker(&dir, "worker", &url, &["--threads", "2"]).unwrap();
    let s = wait_status(&url, "the blow-up warning", EXIT, |s| !s.warning.is_empty()).await;
    assert!(
        s.warning.contains("learning rate is likely too high"),
        "{s:?}"
    );
    let text = status_cli(&url);
    assert!(text.contains("warning: the training loss"), "{text}");
    c.signal("TERM").unwrap();
    c.wait_exit(Duration::from_secs(60)).unwrap();
    assert!(
        c.log_text().contains("learning rate is likely too high"),
        "{}",
        c.tail()
    );

    // With the default bound, the same gradients are refused and, coming from the only worker
    // twice, end the job as diverged: a clear failure within a few steps, not a stalled job.
    let dir = scratch("blow-up-bounded");
    let (mut c, url) = start_coordinator(&dir, "coordinator", &job(&dir, 16, 1, &flags)).unwrap();
    let _w = start_worker(&dir, "worker", &url, &["--threads", "2"]).unwrap();
    let s = wait_status(&url, "the job to end", EXIT, ended).await;
    assert_eq!(s.state, proto::JobState::Failed as i32, "{s:?}");
    assert!(
        s.reason.contains("diverged at step") && s.reason.contains("--max-node-grad-norm"),
        "{s:?}"
    );
    c.signal("TERM").unwrap();
    assert!(!c.wait_exit(Duration::from_secs(60)).unwrap().success());

    // Clipping bounds a step's length by lr x clip: at lr 50, a clip of 0.01 trains.
    let dir = scratch("blow-up-clipped");
    let mut clipped = flags.to_vec();
    clipped.extend(["--clip-grad-norm", "0.01"]);
    let (mut c, url) = start_coordinator(&dir, "coordinator", &job(&dir, 16, 1, &clipped)).unwrap();
    let _w = start_worker(&dir, "worker", &url, &["--threads", "2"]).unwrap();
    let s = wait_status(&url, "the job to end", EXIT, ended).await;
    assert_eq!(s.state, proto::JobState::Finished as i32, "{s:?}");
    assert!(s.warning.is_empty(), "{s:?}");
    assert!(s.last_grad_norm.is_some_and(|n| n > 0.0), "{s:?}");
    let history = proto::status_client::StatusClient::connect(url.clone())
        .await
        .unwrap()
        .get_history(proto::GetHistoryRequest {})
        .await
        .unwrap()
        .into_inner()
        .points;
    let first = history.first().unwrap().loss;
    let last = history.last().unwrap().loss;
    assert!(
        last < 0.75 * first,
        "clipped loss went from {first} to {last}"
    );
    c.signal("TERM").unwrap();
    assert!(
        c.wait_exit(Duration::from_secs(60)).unwrap().success(),
        "{}",
        c.tail()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_gradient_over_the_norm_bound_is_refused_and_changes_nothing() {
    let dir = scratch("norm-bound");
    let (mut c, url) = start_coordinator(
        &dir,
        "coordinator",
        &job(&dir, STEPS, 2, &["--heartbeat-timeout", "1"]),
    )
    .unwrap();
    let mut client = trainer_client(&url, &ClientSecurity::none()).await.unwrap();
    let reg = client
        .register(RegisterRequest {
            protocol_version: proto::PROTOCOL_VERSION,
            name: "poisoner".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let _w = start_worker(&dir, "worker", &url, &[]).unwrap();
    let task = take_shard(&mut client, &reg).await;
    let mut poisoned = vec![0.0f32; reg.parameter_count as usize];
    poisoned[7] = 1e30;
    let bytes: Vec<u8> = common::codec::encode_f32(&poisoned);
    let parts: Vec<SubmitRequest> = task
        .nodes
        .iter()
        .map(|n| SubmitRequest {
            worker_id: reg.worker_id,
            incarnation: reg.incarnation,
            task_id: task.task_id,
            step: task.step,
            nodes: vec![NodeGradient {
                node: Some(*n),
                gradient: bytes.clone().into(),
                loss_sum: 1.0,
                offset: 0,
            }],
        })
        .collect();
    let refused = client
        .submit_gradients(tokio_stream::iter(parts))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(
        refused.message().contains("--max-node-grad-norm"),
        "{refused:?}"
    );
    // The test client goes silent; its shard is redone by the honest worker.
    let s = get_status(&url).await.unwrap();
    let me = s.workers.iter().find(|w| w.id == reg.worker_id).unwrap();
    assert_eq!(me.bad_inputs, 1, "{me:?}");
    assert!(me.last_bad_input.contains("norm"), "{me:?}");
    let s = wait_status(&url, "the job to end", EXIT, ended).await;
    assert_eq!(s.state, proto::JobState::Finished as i32, "{s:?}");
    c.signal("TERM").unwrap();
    c.wait_exit(Duration::from_secs(30)).unwrap();
    assert_equals_reference(&dir.join("ck"), STEPS);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_shard_a_worker_cannot_compute_is_reported_and_redone() {
    let dir = scratch("sick-device");
    let (mut c, url) = start_coordinator(&dir, "coordinator", &job(&dir, STEPS, 3, &[])).unwrap();
    // One worker fails its first shard and recovers; one fails every shard and gives up.
    let worker = |name: &str, fail: &str| {
        let args = ["--name", name, "--inject-shard-failures", fail];
        start_worker(&dir, name, &url, &args).unwrap()
    };
    let mut flaky = worker("flaky", "1");
    let mut sick = worker("sick", "1000");
    let mut healthy = worker("healthy", "0");
    let running = wait_status(&url, "step 1", EXIT, |s| s.step >= 1).await;
    assert_eq!(
        health(&url, "").await,
        ServingStatus::Serving,
        "{running:?}"
    );

    let status = sick.wait_exit(EXIT).unwrap();
    assert!(!status.success(), "{}", sick.tail());
    assert!(
        sick.log_text()
            .contains("failed 3 shards in a row on flex/cpu"),
        "{}",
        sick.tail()
    );

    let s = wait_status(&url, "the job to end", EXIT, ended).await;
    assert_eq!(s.state, proto::JobState::Finished as i32, "{s:?}");
    for name in ["flaky", "sick"] {
        let w = s.workers.iter().find(|w| w.name == name).unwrap();
        assert!(w.last_failure.contains("injected device failure"), "{w:?}");
    }
    // The failures come once the first piece of each answer is out: the parts already sent
    // never end as a submission (it would not be whole, and count against its sender).
    for w in &s.workers {
        assert_eq!(w.bad_inputs, 0, "{w:?}");
    }
    let failures = |name: &str| {
        s.workers
            .iter()
            .find(|w| w.name == name)
            .unwrap()
            .shard_failures
    };
    assert_eq!(
        (failures("flaky"), failures("sick"), failures("healthy")),
        (1, 3, 0)
    );
    let text = status_cli(&url);
    assert!(
        text.contains("shards it could not compute, last: ")
            && text.contains("injected device failure"),
        "{text}"
    );
    assert_eq!(health(&url, "").await, ServingStatus::NotServing);
    assert_eq!(
        health(&url, "dtrain.v1.Status").await,
        ServingStatus::Serving
    );
    for w in [&mut flaky, &mut healthy] {
        let status = w.wait_exit(Duration::from_secs(30)).unwrap();
        assert!(status.success(), "{}", w.tail());
    }
    c.signal("TERM").unwrap();
    assert!(
        c.wait_exit(Duration::from_secs(30)).unwrap().success(),
        "{}",
        c.tail()
    );
    assert_equals_reference(&dir.join("ck"), STEPS);
}

#[test]
fn micro_batches_of_one_on_three_workers_train() {
    // 128 leaves of one image: a shard of 43 leaves answers with 6 tree nodes (79 MB), more
    // than one message may hold; each node travels as its own message.
    let dir = scratch("micro-batch-1");
    let args = short_job(2, 0, &dir.join("ck"));
    let mut args: Vec<&str> = args.iter().map(String::as_str).collect();
    args.extend(["--micro-batch", "1"]);
    let log = run_job(&dir, 3, &args, EXIT).unwrap();
    assert!(test_accuracy(&log).is_some(), "{log}");
}
