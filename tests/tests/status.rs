//! Live status over gRPC, the standard health and reflection services, the Prometheus
//! endpoint, and the `status` CLI, against a real training job.

use cluster_tests::*;
use proto::status_client::StatusClient;
use proto::{JobState, StatusReply, WatchStatusRequest};
use std::io::{Read, Write};
use std::time::Duration;

/// The services a reflection endpoint lists, asked in reflection version `$v` (`v1`, or
/// `v1alpha`, the one grpcurl and grpcio-reflection speak): the two are the same protocol in
/// separately generated types.
macro_rules! list_services {
    ($v:ident, $url:expr) => {{
        use tonic_reflection::pb::$v::ServerReflectionRequest;
        use tonic_reflection::pb::$v::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::$v::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::$v::server_reflection_response::MessageResponse;
        let mut client = ServerReflectionClient::new(channel($url).await);
        let req = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut stream = client
            .server_reflection_info(tokio_stream::iter(vec![req]))
            .await
            .unwrap()
            .into_inner();
        match stream
            .message()
            .await
            .unwrap()
            .and_then(|r| r.message_response)
        {
            Some(MessageResponse::ListServicesResponse(l)) => l
                .service
                .into_iter()
                .map(|s| s.name)
                .collect::<Vec<String>>(),
            other => panic!("unexpected reflection answer {other:?}"),
        }
    }};
}

async fn status(url: &str) -> StatusReply {
    get_status(url).await.expect("coordinator reachable")
}

fn http_get(addr: &str, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    body.split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .to_string()
}

/// Parses Prometheus text format strictly enough to catch malformed lines.
fn parse_metrics(text: &str) -> std::collections::BTreeMap<String, f64> {
    let mut out = std::collections::BTreeMap::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        if let Some(rest) = line.strip_prefix('#') {
            assert!(
                [" HELP ", " TYPE ", " UNIT "]
                    .iter()
                    .any(|p| rest.starts_with(p))
                    || rest == " EOF",
                "bad comment line {line:?}"
            );
            continue;
        }
        let (name, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("no value in {line:?}"));
        let bare = name.split('{').next().unwrap();
        assert!(
            bare.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') && !bare.is_empty(),
            "bad metric name in {line:?}"
        );
        let v: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line:?}"));
        out.insert(name.to_string(), v);
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn status_follows_a_job_from_waiting_to_finished() {
    let dir = scratch("status");
    let (mut c, url) = start_coordinator(
        &dir,
        "coordinator",
        &[
            "--workers",
            "2",
            "--max-steps",
            "60",
            "--eval-every",
            "10",
            "--validation-size",
            "300",
            "--test-size",
            "500",
            "--heartbeat-timeout",
            "2",
            "--checkpoint-url",
            dir.join("ck").to_str().unwrap(),
        ],
    )
    .unwrap();
    let metrics_line = c
        .wait_for_line("metrics listening on http://", Duration::from_secs(10))
        .unwrap();
    let metrics_addr = metrics_line
        .split("http://")
        .nth(1)
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_string();

    // Before any worker: waiting, step 0.
    let s = status(&url).await;
    assert_eq!(s.state, JobState::WaitingForWorkers as i32, "{s:?}");
    assert_eq!(s.step, 0);
    // Nothing measured yet: absent, not NaN or 0.
    assert!(
        s.last_loss.is_none()
            && s.last_validation_accuracy.is_none()
            && s.test_accuracy.is_none()
            && s.eta_secs.is_none()
            && s.last_grad_norm.is_none(),
        "{s:?}"
    );

    // Health and reflection work without the .proto file.
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel(&url).await);
    let h = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "dtrain.v1.Status".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        h.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    let services = list_services!(v1, &url);
    assert!(
        services.contains(&"dtrain.v1.Status".to_string()),
        "{services:?}"
    );
    let older = list_services!(v1alpha, &url);
    for name in ["dtrain.v1.Status", "dtrain.v1.Trainer"] {
        assert!(older.contains(&name.to_string()), "{older:?}");
    }
    assert!(
        services.contains(&"dtrain.v1.Trainer".to_string()),
        "{services:?}"
    );

    let mut watch = StatusClient::connect(url.clone())
        .await
        .unwrap()
        .watch_status(WatchStatusRequest {
            max_per_second: 20.0,
        })
        .await
        .unwrap()
        .into_inner();
    let watched = tokio::spawn(async move {
        let mut seen = Vec::new();
        while let Ok(Some(r)) = watch.message().await {
            seen.push(r);
        }
        seen
    });

    let w1 = start_worker(&dir, "worker1", &url, &[]).unwrap();
    let _w2 = start_worker(&dir, "worker2", &url, &[]).unwrap();
    let a = wait_status(&url, "step 5", Duration::from_secs(120), |s| s.step >= 5).await;
    assert_eq!(a.state, JobState::Running as i32);
    assert_eq!(a.live_workers, 2);
    let b = wait_status(&url, "progress", Duration::from_secs(120), |s| {
        s.step > a.step + 2
    })
    .await;
    assert!(
        b.examples_seen > a.examples_seen && b.progress > a.progress,
        "{a:?} {b:?}"
    );
    assert!(b.images_per_sec > 0.0, "{b:?}");
    assert!(b.last_loss.is_some_and(f64::is_finite), "{b:?}");
    assert!(b.eta_secs.is_some_and(|t| t > 0.0), "{b:?}");

    // /metrics parses and agrees with GetStatus.
    let before = status(&url).await;
    let m = parse_metrics(&http_get(&metrics_addr, "/metrics"));
    let after = status(&url).await;
    let step = m["dtrain_step"];
    assert!(
        step >= before.step as f64 && step <= after.step as f64,
        "metrics step {step}, status {} .. {}",
        before.step,
        after.step
    );
    assert_eq!(m["dtrain_live_workers"], 2.0);
    assert!(m["dtrain_gradient_bytes_received_total"] > 0.0);
    assert!(m.contains_key("dtrain_step_seconds_bucket{le=\"+Inf\"}"));

    // The CLI: JSON for scripts (the same values GetStatus gives around it), and a plot.
    let before = status(&url).await;
    let out = std::process::Command::new(bin_dir().join("coordinator"))
        .args(["status", "--json", "--coordinator", &url])
        .output()
        .unwrap();
    let after = status(&url).await;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let step = json["step"].as_u64().unwrap_or(u64::MAX);
    assert!(before.step <= step && step <= after.step, "{json}");
    assert_eq!(json["state"], "running", "{json}");
    assert_eq!(json["model"], after.model.as_str(), "{json}");
    assert_eq!(json["total_steps"], after.total_steps, "{json}");
    assert_eq!(json["live_workers"], 2, "{json}");
    let mut names: Vec<&str> = json["workers"]
        .as_array()
        .map(|ws| ws.iter().filter_map(|w| w["name"].as_str()).collect())
        .unwrap_or_default();
    let mut want: Vec<&str> = after.workers.iter().map(|w| w.name.as_str()).collect();
    names.sort_unstable();
    want.sort_unstable();
    assert_eq!(names, want, "{json}");
    // The chart: one point per step done, with its axes and legend.
    let plot = dir.join("history.svg");
    let before = status(&url).await;
    let out = std::process::Command::new(bin_dir().join("coordinator"))
        .args([
            "status",
            "--plot",
            plot.to_str().unwrap(),
            "--coordinator",
            &url,
        ])
        .output()
        .unwrap();
    let after = status(&url).await;
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let points: u64 = said
        .split('(')
        .nth(1)
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no point count in {said:?}"));
    assert!(
        before.step <= points && points <= after.step,
        "{points} points, steps {} .. {}",
        before.step,
        after.step
    );
    let svg = std::fs::read_to_string(&plot).unwrap();
    for text in ["step", "training loss", "validation accuracy"] {
        assert!(svg.contains(text), "no {text:?} in the chart");
    }

    // A killed worker shows as lost.
    w1.signal("KILL").unwrap();
    let lost = wait_status(&url, "a lost worker", Duration::from_secs(30), |s| {
        s.workers.iter().any(|w| w.state == "lost")
    })
    .await;
    assert_eq!(lost.live_workers, 1);
    assert!(lost.workers.iter().any(|w| w.failures == 1));

    // Training finishes on the remaining worker; the stream ends with the final state.
    assert!(
        c.wait_exit(Duration::from_secs(600)).unwrap().success(),
        "{}",
        c.tail()
    );
    let seen = watched.await.unwrap();
    let steps: Vec<u64> = seen.iter().map(|s| s.step).collect();
    assert!(steps.windows(2).all(|w| w[0] <= w[1]), "{steps:?}");
    assert!(
        steps
            .iter()
            .collect::<std::collections::BTreeSet<_>>()
            .len()
            > 10,
        "{steps:?}"
    );
    let last = seen.last().unwrap();
    assert_eq!(last.state, JobState::Finished as i32, "{last:?}");
    assert!(last.test_accuracy.is_some_and(|a| a > 0.5), "{last:?}");
    assert_eq!(last.step, 60);
}

async fn channel(url: &str) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(url.to_string())
        .unwrap()
        .connect()
        .await
        .unwrap()
}
