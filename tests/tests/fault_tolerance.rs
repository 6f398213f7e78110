//! Training goes on through failures and loses nothing: workers killed at random and restarted,
//! a worker frozen with SIGSTOP, and a hostile client sending every kind of bad input. The
//! coordinator-restart case is in `resume.rs`; the state machine's own cases are unit tests in
//! `coordinator/src/core.rs`.

use cluster_tests::*;
use proto::{
    GetWorkRequest, HeartbeatRequest, NodeGradient, NodeRange, RegisterRequest, RegisterResponse,
    SubmitRequest,
};
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::Path;
use std::sync::OnceLock;
use std::time::{Duration, Instant};
use tonic::Code;

const STEPS: u64 = 50;

/// The parameters of the single-process loop after `STEPS` steps, computed once per binary.
fn reference() -> &'static BTreeMap<String, Vec<f32>> {
    static REF: OnceLock<BTreeMap<String, Vec<f32>>> = OnceLock::new();
    REF.get_or_init(|| local_reference(&default_config(STEPS), STEPS))
}

fn assert_equals_reference(ck: &Path) {
    assert_checkpoint_is(ck, reference(), "the fault-free run");
}

/// The steps the coordinator logged as done, in order (needs `coordinator=debug`).
fn steps_done(log: &str) -> Vec<u64> {
    log.lines()
        .filter(|l| l.contains("step done"))
        .filter_map(|l| {
            l.split("step=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

fn debug_log() -> Vec<(String, String)> {
    vec![("RUST_LOG".into(), "info,coordinator=debug".into())]
}

/// A coordinator of a `STEPS`-step job for `workers` workers, checkpointing to `dir/ck`.
fn coordinator(dir: &Path, workers: usize, extra: &[&str]) -> (Proc, String) {
    let mut args = short_job(STEPS, 0, &dir.join("ck"));
    args.extend(["--workers".into(), workers.to_string()]);
    args.extend(extra.iter().map(|s| s.to_string()));
    start(dir, &args)
}

/// A coordinator with `args`, logging every step done.
fn start(dir: &Path, args: &[String]) -> (Proc, String) {
    let mut c = Proc::start_with_env(
        "coordinator",
        "coordinator",
        dir,
        &coordinator_args(args),
        &debug_log(),
    )
    .unwrap();
    let url = c.grpc_url().unwrap();
    (c, url)
}

#[tokio::test(flavor = "multi_thread")]
async fn ten_random_kill_9s_lose_no_step_and_change_no_parameter() {
    let dir = scratch("chaos");
    let ck = dir.join("ck");
    // A job no machine finishes during the kills (100 epochs); SIGTERM ends it afterwards with a
    // checkpoint at the step it reached, and the reference is the local loop to that step. So
    // the test does not depend on how fast the machine is.
    let mut args = short_job(u64::MAX, 0, &ck);
    args.extend(
        [
            "--epochs",
            "100",
            "--workers",
            "3",
            "--heartbeat-timeout",
            "1",
        ]
        .map(String::from),
    );
    let (mut c, url) = start(&dir, &args);
    let mut workers: Vec<Proc> = (0..3)
        .map(|i| start_worker(&dir, &format!("worker{i}"), &url, &[]).unwrap())
        .collect();
    wait_status(&url, "step 2", Duration::from_secs(120), |s| s.step >= 2).await;

    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    for kill in 0..10 {
        tokio::time::sleep(Duration::from_millis(rng.random_range(200..1200))).await;
        assert!(c.child.try_wait().unwrap().is_none(), "{}", c.tail());
        let i = rng.random_range(0..workers.len());
        workers[i].signal("KILL").unwrap();
        workers[i].wait_exit(Duration::from_secs(10)).unwrap();
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..800))).await;
        workers[i] = start_worker(&dir, &format!("worker{i}-{kill}"), &url, &[]).unwrap();
    }
    // Training goes on after the last kill; then the job is stopped.
    let after = get_status(&url).await.map_or(0, |s| s.step);
    wait_status(
        &url,
        "3 steps after the kills",
        Duration::from_secs(300),
        |s| s.step >= after + 3,
    )
    .await;
    c.signal("TERM").unwrap();
    let status = c.wait_exit(Duration::from_secs(120)).unwrap();
    assert!(status.success(), "{}", c.tail());

    let step = latest_manifest(&ck).unwrap()["step"].as_u64().unwrap();
    let log = c.log_text();
    assert_eq!(
        steps_done(&log),
        (1..=step).collect::<Vec<_>>(),
        "a step was lost or applied twice"
    );
    let lost = log.matches("worker lost").count();
    assert!(lost >= 5, "only {lost} losses noticed for 10 kills");
    println!("chaos: 10 kills, {lost} losses noticed, {step} steps");
    // (The learning rate falls over the job's 100 epochs, so the reference trains that job.)
    let cfg = common::train::TrainConfig {
        epochs: 100,
        ..default_config(step)
    };
    let reference = local_reference(&cfg, step);
    assert_checkpoint_is(&ck, &reference, "the fault-free run");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_frozen_worker_is_lost_within_the_deadline_and_rejoins_when_thawed() {
    let dir = scratch("sigstop");
    let timeout = 1.5;
    // A high straggler factor: the frozen worker's shard must come back through its
    // missed heartbeats, not through a backup copy.
    let (mut c, url) = coordinator(
        &dir,
        2,
        &[
            "--heartbeat-timeout",
            &timeout.to_string(),
            "--straggler-factor",
            "1000",
        ],
    );
    let w0 = start_worker(&dir, "worker0", &url, &["--name", "steady"]).unwrap();
    let w1 = start_worker(&dir, "worker1", &url, &["--name", "frozen"]).unwrap();
    wait_status(&url, "step 3", Duration::from_secs(120), |s| s.step >= 3).await;

    w1.signal("STOP").unwrap();
    let frozen_at = Instant::now();
    let lost = wait_status(
        &url,
        "the frozen worker lost",
        Duration::from_secs(30),
        |s| {
            s.workers
                .iter()
                .any(|w| w.name == "frozen" && w.state == "lost")
        },
    )
    .await;
    // How soon is a measurement, not a check (a loaded machine delays this test's polls): the
    // deadline itself is checked with an injected clock in coordinator/src/core.rs.
    println!(
        "frozen worker lost {:.2} s after SIGSTOP (deadline {timeout} s)",
        frozen_at.elapsed().as_secs_f64()
    );
    // Its shard is redone: training moves on while it is frozen.
    wait_status(&url, "steps while frozen", Duration::from_secs(120), |s| {
        s.step >= lost.step + 3
    })
    .await;

    w1.signal("CONT").unwrap();
    let back = wait_status(
        &url,
        "the thawed worker live",
        Duration::from_secs(30),
        |s| {
            s.workers
                .iter()
                .any(|w| w.name == "frozen" && w.state == "live")
        },
    )
    .await;
    let done_before = back
        .workers
        .iter()
        .find(|w| w.name == "frozen")
        .unwrap()
        .steps_done;
    wait_status(
        &url,
        "the thawed worker working",
        Duration::from_secs(120),
        |s| {
            s.workers
                .iter()
                .any(|w| w.name == "frozen" && w.steps_done > done_before)
        },
    )
    .await;

    let status = c.wait_exit(Duration::from_secs(600)).unwrap();
    assert!(
        status.success(),
        "{}\n{}\n{}",
        c.tail(),
        w0.tail(),
        w1.tail()
    );
    assert_eq!(steps_done(&c.log_text()), (1..=STEPS).collect::<Vec<_>>());
    assert_equals_reference(&dir.join("ck"));
}

/// Checks that `got` was refused with `code`, and records `what`.
fn expect<T>(
    refused: &mut Vec<&'static str>,
    what: &'static str,
    got: Result<T, tonic::Status>,
    code: Code,
) {
    let Err(e) = got else {
        panic!("{what}: accepted")
    };
    assert_eq!(e.code(), code, "{what}: {e:?}");
    refused.push(what);
}

fn register(model: &str, protocol_version: u32) -> RegisterRequest {
    RegisterRequest {
        protocol_version,
        model: model.into(),
        backend: "test".into(),
        device: "none".into(),
        threads: 1,
        name: "hostile".into(),
    }
}

fn answer(me: &RegisterResponse, task: &proto::Task, gradient: &[f32]) -> SubmitRequest {
    let bytes = common::codec::encode_f32(gradient);
    SubmitRequest {
        worker_id: me.worker_id,
        incarnation: me.incarnation,
        task_id: task.task_id,
        step: task.step,
        nodes: task
            .nodes
            .iter()
            .map(|n| NodeGradient {
                node: Some(*n),
                gradient: bytes.clone().into(),
                loss_sum: 1.0,
                offset: 0,
            })
            .collect(),
    }
}

/// A submission as one streamed message.
fn one(req: SubmitRequest) -> impl tonic::IntoStreamingRequest<Message = SubmitRequest> {
    tokio_stream::once(req)
}

/// Sends `bytes` on a fresh connection to `addr`; returns once the server has closed it.
fn garbage(addr: &str, bytes: &[u8]) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = s.write_all(bytes);
    let mut sink = Vec::new();
    // Ok(_) is end of stream, Err a reset; a timeout would mean the server kept it open.
    match s.read_to_end(&mut sink) {
        Ok(_) => {}
        Err(e) => assert!(
            !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
            "the server kept a garbage connection open"
        ),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_kind_of_bad_input_is_refused_and_training_goes_on() {
    hostile_client("hostile", false).await;
}

/// The same, through mutual TLS with a token: a client holding valid credentials is refused
/// exactly as on plaintext.
#[tokio::test(flavor = "multi_thread")]
async fn every_kind_of_bad_input_is_refused_through_tls_too() {
    hostile_client("hostile-tls", true).await;
}

async fn hostile_client(name: &str, tls: bool) {
    // The first step waits for two workers: the hostile client and a silent accomplice whose
    // shard stays open, so the round is still running when the duplicate arrives. An honest
    // worker joins afterwards and does the training.
    let dir = scratch(name);
    let tls_dir = tls.then(|| make_certs(&dir).unwrap());
    let tls_args: Vec<String> = tls_dir
        .iter()
        .flat_map(|d| ["--tls-dir".to_string(), d.display().to_string()])
        .collect();
    let mut extra = vec!["--heartbeat-timeout", "3", "--max-bad-inputs", "8"];
    extra.extend(tls_args.iter().map(String::as_str));
    let (mut c, url) = coordinator(&dir, 2, &extra);
    let (worker_security, reader) = match &tls_dir {
        Some(d) => (
            ClientSecurity::new(&material(d, Role::Worker)).unwrap(),
            ClientSecurity::new(&material(d, Role::Reader)).unwrap(),
        ),
        None => (ClientSecurity::none(), ClientSecurity::none()),
    };

    let mut client = trainer_client(&url, &worker_security).await.unwrap();
    let mut refused: Vec<&str> = Vec::new();

    // Registration of a worker speaking another protocol, or built for another model.
    expect(
        &mut refused,
        "other protocol version",
        client.register(register("seed", 999)).await,
        Code::FailedPrecondition,
    );
    expect(
        &mut refused,
        "other model",
        client
            .register(register("inception", proto::PROTOCOL_VERSION))
            .await,
        Code::FailedPrecondition,
    );
    let reg = client
        .register(register("seed", proto::PROTOCOL_VERSION))
        .await
        .unwrap()
        .into_inner();
    let me = reg.worker_id;
    let incarnation = reg.incarnation;
    let n = reg.parameter_count as usize;
    client
        .register(register("seed", proto::PROTOCOL_VERSION))
        .await
        .unwrap();

    expect(
        &mut refused,
        "unknown worker id",
        client
            .heartbeat(HeartbeatRequest {
                worker_id: 424_242,
                incarnation,
            })
            .await,
        Code::NotFound,
    );
    expect(
        &mut refused,
        "worker id of an earlier coordinator process",
        client
            .heartbeat(HeartbeatRequest {
                worker_id: me,
                incarnation: incarnation ^ 2,
            })
            .await,
        Code::NotFound,
    );

    // Take a shard as a worker would.
    let task = take_shard(&mut client, &reg).await;
    let zeros = vec![0.0f32; n];

    let mut long = zeros.clone();
    long.push(0.0);
    expect(
        &mut refused,
        "gradient of the wrong length",
        client
            .submit_gradients(one(answer(&reg, &task, &long)))
            .await,
        Code::InvalidArgument,
    );
    // One value short: a submission that ends before it is whole is how a cancelled one looks
    // (hyper ends a body reset with CANCEL like a complete one), so it is refused as given up
    // and not counted.
    let short = client
        .submit_gradients(one(answer(&reg, &task, &zeros[1..])))
        .await;
    assert!(
        short.as_ref().is_err_and(|e| e.code() == Code::Cancelled),
        "{short:?}"
    );
    let mut nan = zeros.clone();
    nan[n / 2] = f32::NAN;
    expect(
        &mut refused,
        "NaN in the gradient",
        client
            .submit_gradients(one(answer(&reg, &task, &nan)))
            .await,
        Code::InvalidArgument,
    );
    let mut inf = zeros.clone();
    inf[0] = f32::INFINITY;
    expect(
        &mut refused,
        "Inf in the gradient",
        client
            .submit_gradients(one(answer(&reg, &task, &inf)))
            .await,
        Code::InvalidArgument,
    );
    // Finite, but with a norm far over --max-node-grad-norm (1e6 per example by default).
    let mut poisoned = zeros.clone();
    poisoned[n / 3] = 1e30;
    let refusal = client
        .submit_gradients(one(answer(&reg, &task, &poisoned)))
        .await;
    assert!(
        refusal
            .as_ref()
            .is_err_and(|e| e.message().contains("--max-node-grad-norm")),
        "{refusal:?}"
    );
    expect(
        &mut refused,
        "finite gradient with a norm over the bound",
        refusal,
        Code::InvalidArgument,
    );
    let mut stale = answer(&reg, &task, &zeros);
    stale.step += 1000;
    expect(
        &mut refused,
        "stale or unknown step",
        client.submit_gradients(one(stale)).await,
        Code::Aborted,
    );
    let mut unknown_task = answer(&reg, &task, &zeros);
    unknown_task.task_id += 1_000_000;
    expect(
        &mut refused,
        "unknown task",
        client.submit_gradients(one(unknown_task)).await,
        Code::InvalidArgument,
    );
    let mut wrong_nodes = answer(&reg, &task, &zeros);
    wrong_nodes.nodes[0].node = Some(NodeRange { lo: 0, hi: 10_000 });
    expect(
        &mut refused,
        "gradient for other tree nodes",
        client.submit_gradients(one(wrong_nodes)).await,
        Code::InvalidArgument,
    );
    // A node's gradient in two parts, the second claiming the first's place.
    let mut overlapping = answer(&reg, &task, &zeros[..n / 2]);
    overlapping.nodes.insert(1, overlapping.nodes[0].clone());
    let refusal = client.submit_gradients(one(overlapping)).await;
    // Refused for the overlap, not for a length it would also get wrong without the offset
    // check.
    assert!(
        refusal
            .as_ref()
            .is_err_and(|e| e.message().contains("overlaps values that already came")),
        "{refusal:?}"
    );
    expect(
        &mut refused,
        "overlapping gradient parts",
        refusal,
        Code::InvalidArgument,
    );
    let mut impostor = answer(&reg, &task, &zeros);
    impostor.worker_id = 424_242;
    expect(
        &mut refused,
        "answer from an unknown worker id",
        client.submit_gradients(one(impostor)).await,
        Code::NotFound,
    );
    // A well-formed answer is taken...
    let taken = client
        .submit_gradients(one(answer(&reg, &task, &zeros)))
        .await
        .unwrap();
    assert!(taken.into_inner().accepted);
    // ...once: the eighth bad submission quarantines the sender.
    expect(
        &mut refused,
        "duplicate answer",
        client
            .submit_gradients(one(answer(&reg, &task, &zeros)))
            .await,
        Code::AlreadyExists,
    );
    expect(
        &mut refused,
        "calls from a quarantined worker",
        client
            .get_work(GetWorkRequest {
                worker_id: me,
                incarnation,
            })
            .await,
        Code::PermissionDenied,
    );

    let mut huge = answer(&reg, &task, &zeros);
    huge.nodes[0].gradient = vec![0u8; proto::MAX_MESSAGE_BYTES + 1024].into();
    expect(
        &mut refused,
        "oversized message",
        client.submit_gradients(one(huge)).await,
        Code::OutOfRange,
    );

    let addr = url.trim_start_matches("http://");
    garbage(addr, &[0xde; 100_000]);
    garbage(addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    let mut bad_frames = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    bad_frames.extend_from_slice(&[0xff; 4096]);
    garbage(addr, &bad_frames);
    refused.push("garbage bytes on the port");

    // The sender is named in status and in the log; training goes on.
    let worker_args: Vec<&str> = tls_args.iter().map(String::as_str).collect();
    let w0 = start_worker(&dir, "worker0", &url, &worker_args).unwrap();
    let s = get_status_as(&url, &reader).await.unwrap();
    let hostile = s.workers.iter().find(|w| w.id == me).unwrap();
    assert_eq!(hostile.state, "quarantined", "{hostile:?}");
    assert_eq!(hostile.bad_inputs, 8, "{hostile:?}");
    assert!(
        hostile.last_bad_input.contains("already answered"),
        "{hostile:?}"
    );
    assert!(s.bad_inputs >= 8, "{s:?}");
    let log = c.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("refused bad input") && l.contains(&format!("worker={me}"))),
        "{}",
        c.tail()
    );
    assert!(log.contains("quarantined"), "{}", c.tail());

    let status = c.wait_exit(Duration::from_secs(600)).unwrap();
    assert!(status.success(), "{}\n{}", c.tail(), w0.tail());
    assert_eq!(steps_done(&c.log_text()), (1..=STEPS).collect::<Vec<_>>());
    assert_eq!(refused.len(), 17, "{refused:?}");
    println!("refused {} kinds of bad input: {refused:#?}", refused.len());
}
