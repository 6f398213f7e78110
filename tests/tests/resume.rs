//! A coordinator killed with SIGKILL resumes from its latest checkpoint at the exact batch; the
//! workers ride out each restart (registering again, with backoff) without being restarted, and
//! the final parameters equal those of an uninterrupted run, bit for bit. A worker still using
//! its id from the killed process is told to register again, not taken for the new holder.

use cluster_tests::*;
use proto::status_client::StatusClient;
use proto::trainer_client::TrainerClient;
use proto::{GetStatusRequest, HeartbeatRequest, RegisterRequest, RegisterResponse};
use rand::{Rng, SeedableRng};
use std::time::{Duration, Instant};

fn common_args(ck: &std::path::Path) -> Vec<String> {
    short_job(40, 5, ck)
}

async fn step_of(url: &str) -> Option<u64> {
    let mut c = StatusClient::connect(url.to_string()).await.ok()?;
    Some(
        c.get_status(GetStatusRequest {})
            .await
            .ok()?
            .into_inner()
            .step,
    )
}

/// Fails at once, with its log, if a worker has failed: they must ride out every restart.
/// (They exit with success when the last coordinator tells them the job is over.)
fn assert_not_failed(workers: &mut [Proc]) {
    for w in workers {
        if let Some(status) = w.child.try_wait().unwrap() {
            assert!(
                status.success(),
                "{} failed ({status})\n{}",
                w.name,
                w.tail()
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_coordinator_killed_three_times_resumes_and_ends_where_an_uninterrupted_run_does() {
    let reference_dir = scratch("resume-reference");
    let ck_ref = reference_dir.join("ck");
    run_job(
        &reference_dir,
        2,
        &common_args(&ck_ref),
        Duration::from_secs(600),
    )
    .unwrap();
    let reference = latest_params(&ck_ref).unwrap();

    let dir = scratch("resume");
    let ck = dir.join("ck");
    let start = |name: &str, port: u16| {
        let mut args = vec!["--workers".to_string(), "2".into()];
        args.extend(common_args(&ck));
        args.extend(["--listen".to_string(), format!("127.0.0.1:{port}")]);
        Proc::start("coordinator", name, &dir, &coordinator_args(&args)).unwrap()
    };
    // The first coordinator takes any free port; the restarted ones take the same, so that
    // they are where the workers look for them.
    let mut coordinator = start("coordinator-0", 0);
    let url = coordinator.grpc_url().unwrap();
    let port = port_of(&url);
    let mut workers = vec![
        start_worker(&dir, "worker1", &url, &["--name", "worker1"]).unwrap(),
        start_worker(&dir, "worker2", &url, &["--name", "worker2"]).unwrap(),
    ];
    // Killed once past each of these steps, at a random moment within the step (mid-compute,
    // mid-upload or mid-checkpoint), seeded so a failure replays.
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    let mut resumed_at = 0;
    for (i, past) in [8u64, 18, 28].into_iter().enumerate() {
        let deadline = Instant::now() + Duration::from_secs(300);
        while step_of(&url).await.unwrap_or(0) < past {
            assert!(
                Instant::now() < deadline,
                "no progress\n{}",
                coordinator.tail()
            );
            assert_not_failed(&mut workers);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..600))).await;
        coordinator.signal("KILL").unwrap();
        coordinator.wait_exit(Duration::from_secs(10)).unwrap();

        coordinator = start(&format!("coordinator-{}", i + 1), port);
        let line = coordinator
            .wait_for_line("resuming from checkpoint", Duration::from_secs(60))
            .unwrap();
        let step: u64 = line
            .split("step=")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no step in {line:?}"));
        assert!(
            step.is_multiple_of(5) && step > resumed_at && step <= past + 5,
            "resumed at step {step} after a kill past step {past} (previous resume {resumed_at})"
        );
        resumed_at = step;
    }
    let deadline = Instant::now() + Duration::from_secs(600);
    while coordinator.child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "{}", coordinator.tail());
        assert_not_failed(&mut workers);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        coordinator.wait_exit(Duration::ZERO).unwrap().success(),
        "{}",
        coordinator.tail()
    );
    for w in &mut workers {
        assert!(
            w.wait_exit(Duration::from_secs(30)).unwrap().success(),
            "{}",
            w.tail()
        );
        assert!(w.log_text().contains("re-registering"), "{}", w.tail());
    }
    // Each restarted coordinator got both workers back as two workers (a worker still using
    // its id from the killed process would not register again), and started on --min-workers.
    for k in 1..=3 {
        let log = std::fs::read_to_string(dir.join(format!("coordinator-{k}.log"))).unwrap();
        for name in ["worker1", "worker2"] {
            let field = format!("name=\"{name}\"");
            assert!(
                log.lines()
                    .any(|l| l.contains("worker registered") && l.contains(&field)),
                "coordinator-{k} never registered {name}\n{log}"
            );
        }
        assert!(log.contains("waiting for workers: 0 of 1 live"), "{log}");
    }

    let resumed = latest_params(&ck).unwrap();
    assert_eq!(reference.len(), resumed.len());
    for (a, b) in reference.iter().zip(&resumed) {
        assert!(a.2 == b.2, "{} differs after the restarts", a.0);
    }
    assert_eq!(latest_manifest(&ck).unwrap()["step"], 40);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_id_from_a_killed_coordinator_is_not_taken_for_its_new_holder() {
    let dir = scratch("incarnation");
    let ck = dir.join("ck");
    let coordinator = |name: &str, port: u16| {
        let mut args = short_job(10, 0, &ck);
        args.extend(["--listen".to_string(), format!("127.0.0.1:{port}")]);
        Proc::start("coordinator", name, &dir, &coordinator_args(&args)).unwrap()
    };
    // Any free port first; the second coordinator takes the same one.
    let mut first = coordinator("first", 0);
    let url = first.grpc_url().unwrap();
    let port = port_of(&url);
    let register = |name: &str| {
        let url = url.clone();
        let req = RegisterRequest {
            protocol_version: proto::PROTOCOL_VERSION,
            name: name.into(),
            ..Default::default()
        };
        async move {
            let mut c = TrainerClient::connect(url).await.unwrap();
            let reg: RegisterResponse = c.register(req).await.unwrap().into_inner();
            (c, reg)
        }
    };
    let heartbeat = |reg: &RegisterResponse| HeartbeatRequest {
        worker_id: reg.worker_id,
        incarnation: reg.incarnation,
    };

    let (_, old) = register("old").await;
    first.signal("KILL").unwrap();
    first.wait_exit(Duration::from_secs(10)).unwrap();

    let mut second = coordinator("second", port);
    second.grpc_url().unwrap();
    let (mut c, new) = register("new").await;
    assert_eq!(new.worker_id, old.worker_id, "ids restart with the process");
    assert_ne!(new.incarnation, old.incarnation);
    c.heartbeat(heartbeat(&new)).await.unwrap();
    let stale = c.heartbeat(heartbeat(&old)).await.unwrap_err();
    assert_eq!(stale.code(), tonic::Code::NotFound, "{stale:?}");
    assert!(stale.message().contains("register again"), "{stale:?}");
}

#[test]
fn a_corrupted_checkpoint_blob_is_refused_and_the_previous_one_used() {
    let dir = scratch("corrupt-checkpoint");
    let ck = dir.join("ck");
    let args = short_job(10, 5, &ck);
    run_job(&dir, 1, &args, Duration::from_secs(300)).unwrap();
    // Corrupt the newest checkpoint's model blob.
    let latest = std::fs::read_to_string(ck.join("latest")).unwrap();
    let blob = ck.join(latest.trim()).join("model.safetensors");
    let mut bytes = std::fs::read(&blob).unwrap();
    let n = bytes.len();
    bytes[n - 10] ^= 0xff;
    std::fs::write(&blob, bytes).unwrap();
    // A longer job over the same store resumes from step 5, not the corrupt step 10.
    let args = short_job(12, 5, &ck);
    let log = run_job(&dir, 1, &args, Duration::from_secs(300)).unwrap();
    assert!(log.contains("refusing checkpoint"), "{log}");
    assert!(log.contains("model.safetensors has SHA-256"), "{log}");
    let line = log
        .lines()
        .find(|l| l.contains("resuming from checkpoint"))
        .unwrap_or_else(|| panic!("{log}"));
    assert!(line.contains("step=5"), "{line}");
}

#[test]
fn a_checkpoint_reads_back_with_pytorch_names_and_shapes() {
    let dir = scratch("checkpoint-layout");
    let ck = dir.join("ck");
    run_job(&dir, 1, &short_job(2, 0, &ck), Duration::from_secs(300)).unwrap();
    let params = latest_params(&ck).unwrap();
    let shapes: Vec<(&str, Vec<usize>)> = params
        .iter()
        .map(|(n, s, _)| (n.as_str(), s.clone()))
        .collect();
    assert_eq!(
        shapes,
        vec![
            ("conv1.bias", vec![32]),
            ("conv1.weight", vec![32, 1, 5, 5]),
            ("conv2.bias", vec![64]),
            ("conv2.weight", vec![64, 32, 5, 5]),
            ("fc1.bias", vec![1024]),
            ("fc1.weight", vec![1024, 3136]),
            ("fc2.bias", vec![10]),
            ("fc2.weight", vec![10, 1024]),
        ]
    );
    let m = latest_manifest(&ck).unwrap();
    assert_eq!(m["step"], 2);
    assert_eq!(
        m["input"]["scale"].as_f64().map(|s| (s * 255.0).round()),
        Some(1.0)
    );
    assert!(
        m["blobs"]["model.safetensors"]["sha256"]
            .as_str()
            .is_some_and(|s| s.len() == 64)
    );
    // Values equal the same two steps trained in this process, converted to PyTorch's layout.
    let by_name = local_reference(&default_config(2), 2);
    for (name, _, values) in &params {
        assert!(
            by_name[name] == *values,
            "{name} differs from the live model"
        );
    }
}

#[test]
fn a_checkpoint_of_another_model_or_config_is_refused_with_a_clear_message() {
    let dir = scratch("incompatible");
    let ck = dir.join("ck");
    let base = short_job(2, 0, &ck);
    run_job(&dir, 1, &base, Duration::from_secs(300)).unwrap();
    for (name, extra) in [
        ("model", ["--model", "inception"]),
        // (The learning rate and clipping may change on resume; the rest may not.)
        ("momentum", ["--momentum", "0.5"]),
    ] {
        let mut args = base.clone();
        args.extend(extra.map(String::from));
        // It refuses before it listens, so start it without waiting for the address.
        let mut c = Proc::start("coordinator", name, &dir, &coordinator_args(&args)).unwrap();
        let status = c.wait_exit(Duration::from_secs(60)).unwrap();
        assert!(!status.success(), "{}", c.tail());
        assert!(
            c.log_text().contains("cannot be resumed by this job"),
            "{}",
            c.tail()
        );
        assert!(c.log_text().contains("--fresh"), "{}", c.tail());
    }
    // A lower learning rate is the remedy for a diverged job: it resumes.
    let mut args = base.clone();
    args.extend(["--lr", "0.01"].map(String::from));
    let mut c = Proc::start("coordinator", "lr", &dir, &coordinator_args(&args)).unwrap();
    let line = c
        .wait_for_line("learning rate changed on resume", Duration::from_secs(60))
        .unwrap();
    assert!(line.contains("from=0.1 to=0.01"), "{line}");
}

#[test]
fn sigterm_checkpoints_before_exit() {
    let dir = scratch("sigterm");
    let ck = dir.join("ck");
    let (mut c, url) = start_coordinator(
        &dir,
        "coordinator",
        &[
            "--workers",
            "1",
            "--eval-every",
            "1000",
            "--validation-size",
            "100",
            "--checkpoint-every",
            "0",
            "--checkpoint-url",
            ck.to_str().unwrap(),
        ],
    )
    .unwrap();
    let _w = start_worker(&dir, "worker", &url, &[]).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while rt.block_on(step_of(&url)).unwrap_or(0) < 3 {
        assert!(Instant::now() < deadline, "{}", c.tail());
        std::thread::sleep(Duration::from_millis(50));
    }
    c.signal("TERM").unwrap();
    assert!(
        c.wait_exit(Duration::from_secs(60)).unwrap().success(),
        "{}",
        c.tail()
    );
    let step = latest_manifest(&ck).unwrap()["step"].as_u64().unwrap();
    assert!(step >= 3, "checkpoint at step {step}");
}
