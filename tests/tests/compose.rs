//! `docker compose up` on the real Docker engine: the compose file of `deploy/` with the
//! `prebuilt` targets (this machine cannot pull images; `deploy/ci/prepare-images.sh` makes the
//! base image and puts the host-built binaries in place). The test talks to the cluster only
//! through the ports published on 127.0.0.1, kills a worker container, sees it lost and back,
//! finds a checkpoint in the S3 container, and removes everything it made, also on failure.
//!
//! Needs Docker, root for debootstrap (first run), and the `weed` binary (`DTRAIN_WEED`).
//! Outside CI it is skipped when one is missing; in CI that is a failure.

use cluster_tests::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .unwrap()
}

/// `docker compose` (v2) where the plugin exists, else the v1 `docker-compose`.
fn compose_tool() -> Vec<String> {
    let v2 = Command::new("docker")
        .args(["compose", "version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if v2 {
        vec!["docker".into(), "compose".into()]
    } else {
        vec!["docker-compose".into()]
    }
}

fn available() -> Option<PathBuf> {
    let docker = Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .output()
        .is_ok_and(|o| o.status.success());
    let weed = std::env::var_os("DTRAIN_WEED").map(PathBuf::from);
    match (docker, weed) {
        (true, Some(weed)) => Some(weed),
        _ => {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI must provide a Docker engine and DTRAIN_WEED"
            );
            eprintln!("skipping: needs a Docker engine and DTRAIN_WEED");
            None
        }
    }
}

/// One compose project; `down -v` when dropped, whatever happened.
struct Cluster {
    tool: Vec<String>,
    project: String,
    env: Vec<(String, String)>,
}

impl Cluster {
    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.tool[0]);
        cmd.args(&self.tool[1..])
            .args(["-p", &self.project])
            .args([
                "-f",
                "docker-compose.yml",
                "-f",
                "docker-compose.prebuilt.yml",
            ])
            .args(args)
            .current_dir(repo().join("deploy"))
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd
    }

    fn run(&self, args: &[&str], within: Duration) -> String {
        let out = run_with_deadline(&mut self.command(args), within).unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "compose {args:?} failed:\n{text}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn logs(&self, service: &str) -> String {
        self.run(&["logs", "--no-color", service], Duration::from_secs(60))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let down = self.command(&["down", "-v", "--remove-orphans", "--timeout", "10"]);
        match run_with_deadline(&mut { down }, Duration::from_secs(180)) {
            Ok(o) if o.status.success() => {}
            other => eprintln!("compose down failed: {other:?}"),
        }
    }
}

fn docker(args: &[&str]) -> String {
    let out =
        run_with_deadline(Command::new("docker").args(args), Duration::from_secs(60)).unwrap();
    assert!(
        out.status.success(),
        "docker {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn compose_up_trains_survives_a_killed_worker_and_checkpoints_to_s3() {
    let Some(weed) = available() else { return };
    let prepare = run_with_deadline(
        Command::new(repo().join("deploy/ci/prepare-images.sh"))
            .arg(bin_dir())
            .arg(&weed),
        Duration::from_secs(600),
    )
    .unwrap();
    assert!(
        prepare.status.success(),
        "prepare-images.sh failed:\n{}{}",
        String::from_utf8_lossy(&prepare.stdout),
        String::from_utf8_lossy(&prepare.stderr)
    );

    let (grpc, metrics, s3) = (free_port(), free_port(), free_port());
    let env: Vec<(String, String)> = [
        ("WORKERS", "4".to_string()),
        ("MNIST_DIR", mnist_dir().display().to_string()),
        ("GRPC_PORT", grpc.to_string()),
        ("METRICS_PORT", metrics.to_string()),
        ("S3_PORT", s3.to_string()),
        (
            "DTRAIN_ARGS",
            "--max-steps 2000 --checkpoint-every 20 --eval-every 25 --validation-size 500 --test-size 500"
                .to_string(),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let cluster = Cluster {
        tool: compose_tool(),
        project: format!("dtrain-test-{}", std::process::id()),
        env,
    };
    cluster.run(&["build"], Duration::from_secs(600));
    cluster.run(&["up", "-d"], Duration::from_secs(300));
    for image in ["dtrain:latest", "dtrain/seaweedfs:latest"] {
        let size: u64 = docker(&["image", "inspect", "--format", "{{.Size}}", image])
            .parse()
            .unwrap();
        println!("image {image}: {:.1} MB", size as f64 / 1e6);
    }

    // Secured by default: the material the `certs` service wrote, copied out of its volume,
    // is what a status client needs; without it the coordinator refuses.
    let coordinator = cluster.run(&["ps", "-q", "coordinator"], Duration::from_secs(60));
    let tls = scratch("compose-tls").join("tls");
    docker(&[
        "cp",
        &format!("{}:/tls", coordinator.trim()),
        tls.to_str().unwrap(),
    ]);
    let reader = ClientSecurity::new(&material(&tls, Role::Reader)).unwrap();
    let url = format!("https://127.0.0.1:{grpc}");
    let s = wait_status_as(&url, &reader, "step 50", Duration::from_secs(600), |s| {
        s.step >= 50
    })
    .await;
    // TLS without a token or a client certificate is refused (UNAUTHENTICATED).
    let ca_only = Material {
        ca: Some(std::fs::read(tls.join("ca.pem")).unwrap()),
        ..Material::default()
    };
    let ca_only = ClientSecurity::new(&ca_only).unwrap();
    assert!(get_status_as(&url, &ca_only).await.is_none());
    let http_url = format!("http://127.0.0.1:{grpc}");
    assert!(
        get_status(&http_url).await.is_none(),
        "plaintext status answered"
    );
    assert_eq!(s.live_workers, 4, "{s:?}");

    // Kill one worker container: status shows it lost and training goes on.
    let workers = cluster.run(&["ps", "-q", "worker"], Duration::from_secs(60));
    let victim = workers
        .lines()
        .next()
        .expect("a worker container")
        .to_string();
    docker(&["kill", &victim]);
    let lost = wait_status_as(
        &url,
        &reader,
        "a lost worker",
        Duration::from_secs(60),
        |s| s.workers.iter().any(|w| w.state == "lost"),
    )
    .await;
    wait_status_as(
        &url,
        &reader,
        "training after the loss",
        Duration::from_secs(300),
        |s| s.step >= lost.step + 10,
    )
    .await;

    // Restarted (by its restart policy or by us), it joins again as a fifth registration.
    let _ = run_with_deadline(
        Command::new("docker").args(["start", &victim]),
        Duration::from_secs(60),
    );
    wait_status_as(
        &url,
        &reader,
        "the worker back",
        Duration::from_secs(120),
        |s| s.live_workers == 4 && s.workers.len() >= 5,
    )
    .await;

    // A checkpoint object in the S3 container, listed through its published port.
    wait_status_as(
        &url,
        &reader,
        "a checkpoint",
        Duration::from_secs(300),
        |s| !s.last_checkpoint.is_empty(),
    )
    .await;
    let list = run_with_deadline(
        Command::new(bin_dir().join("coordinator"))
            .args(["checkpoints", "--checkpoint-url", "s3://dtrain/checkpoints"])
            .envs([
                ("AWS_ACCESS_KEY_ID", "dtrain"),
                ("AWS_SECRET_ACCESS_KEY", "dtrain-local-secret"),
                ("AWS_REGION", "us-east-1"),
                ("AWS_ALLOW_HTTP", "true"),
            ])
            .env("AWS_ENDPOINT", format!("http://127.0.0.1:{s3}")),
        Duration::from_secs(60),
    )
    .unwrap();
    let listed = String::from_utf8_lossy(&list.stdout);
    assert!(
        list.status.success() && listed.contains("step-"),
        "{listed}{}",
        String::from_utf8_lossy(&list.stderr)
    );

    // The lecture's lines in the coordinator's log; the host's status CLI works too.
    let logs = cluster.logs("coordinator");
    assert!(logs.contains("Validation Accuracy:"), "{logs}");
    let cli = run_with_deadline(
        Command::new(bin_dir().join("coordinator"))
            .args(["status", "--coordinator", &url, "--tls-dir"])
            .arg(&tls),
        Duration::from_secs(30),
    )
    .unwrap();
    assert!(cli.status.success(), "{cli:?}");
    let metrics_body = std::net::TcpStream::connect(("127.0.0.1", metrics)).is_ok();
    assert!(metrics_body, "metrics port not published");
}
