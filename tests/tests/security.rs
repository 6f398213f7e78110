//! Security by default (README "Security"): a cluster on mutual TLS with a job token trains
//! exactly as on plaintext while every kind of intruder is refused and counted; only loopback
//! may go unsecured; and the servers stay bounded under a load of 200 clients.

use cluster_tests::*;
use proto::status_client::StatusClient;
use proto::trainer_client::TrainerClient;
use proto::{GetStatusRequest, RegisterRequest, WatchStatusRequest};
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use tokio_stream::StreamExt;
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const STEPS: u64 = 100;
/// `coordinator::core::KEPT_GONE_WORKERS`.
const KEPT_GONE_WORKERS: usize = 64;

/// The plaintext single-process reference after `STEPS` steps (computed once per binary).
fn reference() -> &'static BTreeMap<String, Vec<f32>> {
    static R: OnceLock<BTreeMap<String, Vec<f32>>> = OnceLock::new();
    R.get_or_init(|| local_reference(&default_config(STEPS), STEPS))
}

fn register_request() -> RegisterRequest {
    RegisterRequest {
        protocol_version: proto::PROTOCOL_VERSION,
        name: "intruder".into(),
        ..Default::default()
    }
}

/// The gRPC code one `Register` with `m` gets; `Unavailable` when no connection was made.
async fn try_register(url: &str, m: &Material) -> Code {
    let security = ClientSecurity::new(m).expect("client security");
    match trainer_client(url, &security).await {
        Err(_) => Code::Unavailable,
        Ok(mut c) => match c.register(register_request()).await {
            Ok(_) => Code::Ok,
            Err(s) => s.code(),
        },
    }
}

/// The gRPC code one `GetStatus` with `m` gets.
async fn try_status(url: &str, m: &Material) -> Code {
    let security = ClientSecurity::new(m).expect("client security");
    let Ok(channel) = security.endpoint(url).expect("endpoint").connect().await else {
        return Code::Unavailable;
    };
    let mut c = StatusClient::new(security.authorize(channel));
    match c.get_status(GetStatusRequest {}).await {
        Ok(_) => Code::Ok,
        Err(s) => s.code(),
    }
}

/// The gRPC code a reflection `ListServices` with `m` gets.
async fn reflect(url: &str, m: &Material) -> Code {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    let security = ClientSecurity::new(m).expect("client security");
    let channel = security.endpoint(url).unwrap().connect().await.unwrap();
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let call = ServerReflectionClient::new(security.authorize(channel))
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await;
    match call {
        Ok(mut stream) => match stream.get_mut().message().await {
            Ok(_) => Code::Ok,
            Err(s) => s.code(),
        },
        Err(s) => s.code(),
    }
}

/// A worker certificate signed by the cluster CA in `tls` that expired in 2021.
fn expired_worker_cert(tls: &Path) -> (Vec<u8>, Vec<u8>) {
    let read = |name: &str| std::fs::read_to_string(tls.join(name)).unwrap();
    let ca_key = rcgen::KeyPair::from_pem(&read("ca.key")).unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_pem(&read("ca.pem"), ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name
        .push(rcgen::DnType::CommonName, "dtrain worker");
    p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    p.not_before = rcgen::date_time_ymd(2020, 1, 1);
    p.not_after = rcgen::date_time_ymd(2021, 1, 1);
    let cert = p.signed_by(&key, &issuer).unwrap();
    (cert.pem().into_bytes(), key.serialize_pem().into_bytes())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_secured_cluster_trains_exactly_and_refuses_every_intruder() {
    let dir = scratch("secured");
    let tls = make_certs(&dir).unwrap();
    // Keys and tokens are for their owner's eyes only.
    for secret in [
        "ca.key",
        "coordinator.key",
        "worker.key",
        "token",
        "status-token",
    ] {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(tls.join(secret))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{secret}");
    }
    let other = make_certs(&dir.join("other-ca")).unwrap();
    let tls_flag = tls.display().to_string();
    let ck = dir.join("ck");
    let mut args = short_job(STEPS, 0, &ck);
    args.extend(["--workers", "2", "--linger", "5", "--tls-dir", &tls_flag].map(String::from));
    let (mut c, url) = start_coordinator(&dir, "coordinator", &args).unwrap();
    let workers: Vec<Proc> = (0..2)
        .map(|i| start_worker(&dir, &format!("worker{i}"), &url, &["--tls-dir", &tls_flag]))
        .collect::<anyhow::Result<_>>()
        .unwrap();
    let reader = material(&tls, Role::Reader);
    let reader_security = ClientSecurity::new(&reader).unwrap();
    wait_status_as(
        &url,
        &reader_security,
        "training",
        Duration::from_secs(120),
        |s| s.step >= 2,
    )
    .await;

    let pem = |dir: &Path, name: &str| Some(std::fs::read(dir.join(name)).unwrap());
    let token = std::fs::read_to_string(tls.join("token")).unwrap();
    let status_token = std::fs::read_to_string(tls.join("status-token")).unwrap();
    let worker = || Material {
        ca: pem(&tls, "ca.pem"),
        cert: pem(&tls, "worker.pem"),
        key: pem(&tls, "worker.key"),
        token: Some(token.clone()),
        ..Material::default()
    };
    let (expired_cert, expired_key) = expired_worker_cert(&tls);

    // Refused at the TLS handshake: the connection never carries a call.
    let at_handshake = [
        (
            "a certificate from another CA",
            Material {
                cert: pem(&other, "worker.pem"),
                key: pem(&other, "worker.key"),
                ..worker()
            },
        ),
        (
            "an expired certificate",
            Material {
                cert: Some(expired_cert),
                key: Some(expired_key),
                ..worker()
            },
        ),
        (
            "plaintext to the TLS port",
            Material {
                ca: None,
                cert: None,
                key: None,
                ..worker()
            },
        ),
    ];
    for (what, m) in &at_handshake {
        let code = try_register(&url, m).await;
        assert!(
            !matches!(code, Code::Ok | Code::Unauthenticated),
            "{what}: got {code:?}, wanted a failed handshake"
        );
        println!("refused at the handshake: {what} ({code:?})");
    }
    // Refused per call with UNAUTHENTICATED.
    let unauthenticated = [
        (
            "no client certificate, no token",
            Material {
                cert: None,
                key: None,
                token: None,
                ..worker()
            },
        ),
        (
            "a missing token",
            Material {
                token: None,
                ..worker()
            },
        ),
        (
            "a wrong token",
            Material {
                token: Some("not-the-token".into()),
                ..worker()
            },
        ),
        (
            "the read-only status token on Trainer",
            Material {
                token: Some(status_token.clone()),
                ..worker()
            },
        ),
        (
            "a valid token without a client certificate",
            Material {
                cert: None,
                key: None,
                ..worker()
            },
        ),
    ];
    for (what, m) in &unauthenticated {
        assert_eq!(try_register(&url, m).await, Code::Unauthenticated, "{what}");
        println!("refused unauthenticated: {what}");
    }
    // Status: the read-only token reads; a TLS client with nothing else does not.
    assert_eq!(try_status(&url, &reader).await, Code::Ok);
    let bare = Material {
        ca: pem(&tls, "ca.pem"),
        ..Material::default()
    };
    assert_eq!(try_status(&url, &bare).await, Code::Unauthenticated);
    // Reflection follows Status's rule.
    assert_eq!(reflect(&url, &bare).await, Code::Unauthenticated);
    assert_eq!(reflect(&url, &reader).await, Code::Ok);
    // Health stays open for probes.
    let bare_security = ClientSecurity::new(&bare).unwrap();
    let channel = bare_security
        .endpoint(&url)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let health = HealthClient::new(channel)
        .check(HealthCheckRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(health.status, ServingStatus::Serving as i32);

    // Counted, and nothing joined: the two real workers are the only ones ever registered.
    let s = get_status_as(&url, &reader_security).await.unwrap();
    assert!(s.refused_handshakes >= 3, "{s:?}");
    assert!(s.refused_calls >= 6, "{s:?}");
    assert_eq!(s.workers.len(), 2, "{:?}", s.workers);
    let log = c.log_text();
    assert!(log.contains("refused a call"), "{}", c.tail());
    assert!(log.contains("TLS handshake failed"), "{}", c.tail());
    assert!(!log.contains(&token), "the token leaked into the log");

    // Training went on, and TLS changed no bit of the result.
    let status = c.wait_exit(Duration::from_secs(600)).unwrap();
    let tails: String = workers.iter().map(Proc::tail).collect();
    assert!(status.success(), "{}\n{tails}", c.tail());
    assert_checkpoint_is(&ck, reference(), "the plaintext reference");
}

#[test]
fn only_loopback_may_listen_without_tls_and_a_token() {
    let dir = scratch("exposure");
    let out = run_with_deadline(
        Command::new(bin_dir().join("coordinator"))
            .args(coordinator_args(&["--listen", "0.0.0.0:0"])),
        Duration::from_secs(60),
    )
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("without TLS and a token")
            && stderr.contains("coordinator certs")
            && stderr.contains("--insecure"),
        "{stderr}"
    );

    let mut insecure = Proc::start(
        "coordinator",
        "insecure",
        &dir,
        &coordinator_args(&["--listen", "0.0.0.0:0", "--insecure"]),
    )
    .unwrap();
    insecure.grpc_url().unwrap();
    insecure
        .wait_for_line(
            "--insecure: serving gRPC beyond loopback",
            Duration::from_secs(5),
        )
        .unwrap();

    let tls = make_certs(&dir).unwrap();
    let mut secured = Proc::start(
        "coordinator",
        "secured",
        &dir,
        &coordinator_args(&["--listen", "0.0.0.0:0", "--tls-dir", tls.to_str().unwrap()]),
    )
    .unwrap();
    secured.grpc_url().unwrap();
    assert!(!secured.log_text().contains("--insecure"));
}

#[derive(Debug, Default)]
struct Tally {
    watched: u64,
    watch_refused: u64,
    registered: u64,
    register_refused: u64,
}

/// One load client: five `WatchStatus` streams one after another, each read for a second, or
/// ten registrations of workers that never come back (retrying while the cluster is full, for
/// at most a minute); each on its own connection.
async fn load_client(url: String, watcher: bool) -> Tally {
    let mut tally = Tally::default();
    let channel = tonic::transport::Endpoint::from_shared(url)
        .unwrap()
        .connect()
        .await
        .unwrap();
    if watcher {
        let mut c = StatusClient::new(channel);
        for _ in 0..5 {
            match c
                .watch_status(WatchStatusRequest {
                    max_per_second: 1e6,
                })
                .await
            {
                Ok(stream) => {
                    tally.watched += 1;
                    let mut stream = stream.into_inner();
                    let until = tokio::time::Instant::now() + Duration::from_secs(1);
                    while let Ok(Some(_)) = tokio::time::timeout_at(until, stream.next()).await {}
                }
                Err(s) if s.code() == Code::ResourceExhausted => {
                    tally.watch_refused += 1;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(s) => panic!("WatchStatus: {s:?}"),
            }
        }
    } else {
        let mut c = TrainerClient::new(channel);
        let deadline = Instant::now() + Duration::from_secs(60);
        while tally.registered < 10 && Instant::now() < deadline {
            match c.register(register_request()).await {
                Ok(_) => tally.registered += 1,
                Err(s) if s.code() == Code::ResourceExhausted => tally.register_refused += 1,
                Err(s) => panic!("Register: {s:?}"),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    tally
}

#[tokio::test(flavor = "multi_thread")]
async fn two_hundred_clients_cannot_grow_the_coordinator_or_stop_training() {
    const MEMORY_BOUND: u64 = 256 << 20;
    let dir = scratch("load");
    let ck = dir.join("ck");
    let mut args = short_job(STEPS, 0, &ck);
    // Registered workers that never heartbeat are lost after 2 s: with the default
    // --max-workers (256) the cluster takes about 128 new ones a second.
    args.extend(["--workers", "1", "--heartbeat-timeout", "2"].map(String::from));
    let (mut c, url) = start_coordinator(&dir, "coordinator", &args).unwrap();
    let w = start_worker(&dir, "worker", &url, &[]).unwrap();
    wait_status(&url, "training", Duration::from_secs(120), |s| s.step >= 2).await;

    // At most 4 streams on one connection.
    let channel = tonic::transport::Endpoint::from_shared(url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut one = StatusClient::new(channel);
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(
            one.watch_status(WatchStatusRequest::default())
                .await
                .unwrap(),
        );
    }
    let fifth = one.watch_status(WatchStatusRequest::default()).await;
    assert_eq!(
        fifth.map(|_| ()).unwrap_err().code(),
        Code::ResourceExhausted
    );
    drop(held);

    let pid = c.child.id();
    let rss_before = rss_bytes(pid).unwrap();
    let peak = Arc::new(AtomicU64::new(rss_before));
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (peak, sampling) = (peak.clone(), sampling.clone());
        std::thread::spawn(move || {
            while sampling.load(Ordering::Relaxed) {
                if let Some(rss) = rss_bytes(pid) {
                    peak.fetch_max(rss, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let step_before = get_status(&url).await.unwrap().step;
    let started = Instant::now();
    let clients: Vec<_> = (0..200)
        .map(|i| tokio::spawn(load_client(url.clone(), i % 2 == 0)))
        .collect();
    let mut total = Tally::default();
    for c in clients {
        let t = c.await.unwrap();
        total.watched += t.watched;
        total.watch_refused += t.watch_refused;
        total.registered += t.registered;
        total.register_refused += t.register_refused;
    }
    let load_secs = started.elapsed().as_secs_f64();
    sampling.store(false, Ordering::Relaxed);
    sampler.join().unwrap();
    let peak = peak.load(Ordering::Relaxed);
    let mb = |b: u64| b as f64 / (1 << 20) as f64;
    println!(
        "200 clients for {load_secs:.1}s: {} watch streams ({} refused RESOURCE_EXHAUSTED), {} registrations ({} refused: cluster full); coordinator RSS {:.1} MiB before, peak {:.1} MiB",
        total.watched,
        total.watch_refused,
        total.registered,
        total.register_refused,
        mb(rss_before),
        mb(peak)
    );
    assert_eq!(total.watched + total.watch_refused, 500);
    assert_eq!(total.registered, 1000, "{total:?}");
    assert!(
        total.watch_refused > 0,
        "the watch bound was not reached: {total:?}"
    );
    assert!(
        peak <= rss_before + MEMORY_BOUND,
        "RSS grew from {:.1} to {:.1} MiB",
        mb(rss_before),
        mb(peak)
    );

    // The registered-never-heard-from workers are lost and pruned; the real one trains on.
    let s = wait_status(
        &url,
        "the load's workers gone",
        Duration::from_secs(60),
        |s| s.live_workers == 1 && s.step > step_before,
    )
    .await;
    assert!(
        s.workers.len() <= KEPT_GONE_WORKERS + 1,
        "{} worker records kept",
        s.workers.len()
    );
    println!(
        "after the load: {} worker records, RSS {:.1} MiB",
        s.workers.len(),
        rss_bytes(pid).map_or(0.0, mb)
    );
    let status = c.wait_exit(Duration::from_secs(600)).unwrap();
    assert!(status.success(), "{}\n{}", c.tail(), w.tail());
    assert_checkpoint_is(&ck, reference(), "the reference");
}
