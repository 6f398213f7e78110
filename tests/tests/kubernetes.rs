//! `coordinator --workers 4` on a real single-node Kubernetes (../shared/k8s, started by
//! scripts/test.sh): the kustomization of deploy/k8s through its test overlay, the images the
//! compose test makes, everything through `kubectl` and the API. Each test works in a namespace
//! of its own and deletes it, also on failure.
//!
//! Needs the cluster (its kubeconfig under `K8S_HOME`, default /var/tmp/k8s-local), Docker,
//! and root for debootstrap (first run). Outside CI a test is skipped when one is missing; in
//! CI that is a failure.

use cluster_tests::*;
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const STEPS: u64 = 160;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .unwrap()
}

fn k8s_home() -> PathBuf {
    std::env::var_os("K8S_HOME").map_or_else(|| PathBuf::from("/var/tmp/k8s-local"), PathBuf::from)
}

/// The admin kubeconfig when the cluster answers.
fn cluster() -> Option<PathBuf> {
    let kc = k8s_home().join("run/kubeconfig/admin.conf");
    let up = kc.exists()
        && run_with_deadline(
            Command::new(k8s_home().join("bin/kubectl"))
                .arg("--kubeconfig")
                .arg(&kc)
                .args(["get", "--raw", "/readyz"]),
            Duration::from_secs(20),
        )
        .is_ok_and(|o| o.status.success());
    if up {
        return Some(kc);
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "CI must start the Kubernetes cluster (../shared/k8s/up.sh)"
    );
    eprintln!("skipping: no Kubernetes cluster (../shared/k8s/build.sh and up.sh)");
    None
}

fn kubectl_cmd(kc: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(k8s_home().join("bin/kubectl"));
    cmd.arg("--kubeconfig").arg(kc).args(args);
    cmd
}

/// Runs kubectl; its stdout, or the error with both streams.
fn kubectl(kc: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = run_with_deadline(&mut kubectl_cmd(kc, args), Duration::from_secs(120))?;
    anyhow::ensure!(
        out.status.success(),
        "kubectl {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn kubectl_json(kc: &Path, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.extend(["-o", "json"]);
    serde_json::from_str(&kubectl(kc, &all).unwrap()).unwrap()
}

/// The images of deploy/Dockerfile (`prebuilt` target: the host-built binaries), made as the
/// compose test makes them, once per test run.
fn images() {
    static MADE: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    MADE.get_or_init(make_images);
}

fn make_images() {
    let weed = std::env::var_os("DTRAIN_WEED").expect("DTRAIN_WEED");
    let prepare = run_with_deadline(
        Command::new(repo().join("deploy/ci/prepare-images.sh"))
            .arg(bin_dir())
            .arg(weed),
        Duration::from_secs(600),
    )
    .unwrap();
    assert!(prepare.status.success(), "{prepare:?}");
    let build = run_with_deadline(
        Command::new("docker")
            .env("DOCKER_BUILDKIT", "0")
            .args([
                "build",
                "-q",
                "-f",
                "deploy/Dockerfile",
                "--target",
                "prebuilt",
                "-t",
                "dtrain:latest",
                ".",
            ])
            .current_dir(repo()),
        Duration::from_secs(600),
    )
    .unwrap();
    assert!(build.status.success(), "{build:?}");
}

/// The Secret's files, made once into deploy/k8s/base/tls (git-ignored) as the README says.
/// Once per test run: scripts/test.sh runs these tests two at a time.
fn certs() -> PathBuf {
    static MADE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    MADE.get_or_init(make_certs).clone()
}

fn make_certs() -> PathBuf {
    let tls = repo().join("deploy/k8s/base/tls");
    if !tls.join("token").exists() {
        let out = run_with_deadline(
            Command::new(bin_dir().join("coordinator"))
                .arg("certs")
                .arg(&tls),
            Duration::from_secs(60),
        )
        .unwrap();
        assert!(out.status.success(), "{out:?}");
    }
    tls
}

/// One applied job in its own namespace, deleted (with everything in it) when dropped.
struct Job {
    kc: PathBuf,
    ns: String,
    checkpoints: PathBuf,
    tls: PathBuf,
}

impl Job {
    /// Renders the test overlay with these settings and applies it in a fresh namespace.
    fn apply(kc: &Path, name: &str, steps: u64, max_failures: u32, bad_flag: bool) -> Job {
        let ns = format!("dtrain-{name}-{}", std::process::id());
        let tls = certs();
        let checkpoints = scratch(&format!("k8s-{name}")).join("checkpoints");
        std::fs::create_dir_all(&checkpoints).unwrap();
        // The pods run as uid 10001.
        let chown = Command::new("chown")
            .args(["-R", "10001:10001"])
            .arg(&checkpoints)
            .status()
            .unwrap();
        assert!(chown.success());
        let rendered = kubectl(
            kc,
            &[
                "kustomize",
                repo().join("deploy/k8s/test").to_str().unwrap(),
            ],
        )
        .unwrap();
        let mut rendered = rendered
            .replace("namespace: dtrain-test", &format!("namespace: {ns}"))
            .replace("@MAX_STEPS@", &steps.to_string())
            .replace("@MAX_FAILURES@", &max_failures.to_string())
            .replace("@MNIST_DIR@", mnist_dir().to_str().unwrap())
            .replace("@CHECKPOINTS@", checkpoints.to_str().unwrap());
        if bad_flag {
            rendered = rendered.replace("--reconnect-timeout", "--no-such-flag");
        }
        kubectl(kc, &["create", "namespace", &ns]).unwrap();
        let job = Job {
            kc: kc.to_path_buf(),
            ns,
            checkpoints,
            tls,
        };
        let mut apply = kubectl_cmd(kc, &["apply", "-f", "-"]);
        apply.stdin(Stdio::piped());
        let out = pipe(&mut apply, &rendered);
        assert!(out.status.success(), "apply: {out:?}");
        job
    }

    fn get(&self, args: &[&str]) -> Value {
        let mut all = vec!["-n", &self.ns, "get"];
        all.extend(args);
        kubectl_json(&self.kc, &all)
    }

    fn kubectl(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut all = vec!["-n", self.ns.as_str()];
        all.extend(args);
        kubectl(&self.kc, &all)
    }

    /// Every worker pod, also those on their way out.
    fn all_workers(&self) -> Vec<Value> {
        self.get(&["pods", "-l", "app.kubernetes.io/component=worker"])["items"]
            .as_array()
            .unwrap()
            .clone()
    }

    /// Worker pods not on their way out.
    fn workers(&self) -> Vec<Value> {
        let mut pods = self.all_workers();
        pods.retain(|p| p["metadata"]["deletionTimestamp"].is_null());
        pods
    }

    /// Waits until no worker pod is left, not even a terminating one.
    fn wait_no_workers(&self, what: &str, within: Duration) {
        self.wait(what, within, |j| j.all_workers().is_empty().then_some(()));
    }

    fn coordinator_pods(&self) -> Vec<Value> {
        self.get(&["pods", "-l", "app.kubernetes.io/component=coordinator"])["items"]
            .as_array()
            .unwrap()
            .clone()
    }

    /// Waits for `what` to hold, polling every half second; panics with the pods' state.
    fn wait<T>(&self, what: &str, within: Duration, mut f: impl FnMut(&Job) -> Option<T>) -> T {
        let start = Instant::now();
        loop {
            if let Some(v) = f(self) {
                return v;
            }
            if start.elapsed() > within {
                let pods = self
                    .kubectl(&["get", "pods", "-o", "wide"])
                    .unwrap_or_default();
                let logs = self
                    .kubectl(&["logs", "--tail", "40", "job/dtrain"])
                    .unwrap_or_default();
                panic!("timed out waiting for {what}\n{pods}\n{logs}");
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// The status endpoint through the Service's ClusterIP (kube-proxy), over TLS as a reader.
    fn status_url(&self) -> String {
        let svc = self.get(&["service", "dtrain-coordinator"]);
        format!(
            "https://{}:50051",
            svc["spec"]["clusterIP"].as_str().unwrap()
        )
    }

    fn reader(&self) -> ClientSecurity {
        let mut m = material(&self.tls, Role::Reader);
        m.server_name = Some("coordinator".into());
        ClientSecurity::new(&m).unwrap()
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        let delete = kubectl_cmd(
            &self.kc,
            &[
                "delete",
                "namespace",
                &self.ns,
                "--wait=true",
                "--timeout=180s",
            ],
        )
        .output();
        if !delete.is_ok_and(|o| o.status.success()) {
            eprintln!("could not delete namespace {}", self.ns);
        }
    }
}

fn pipe(cmd: &mut Command, input: &str) -> std::process::Output {
    use std::io::Write;
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn name_of(pod: &Value) -> String {
    pod["metadata"]["name"].as_str().unwrap().to_string()
}

fn phase_of(pod: &Value) -> &str {
    pod["status"]["phase"].as_str().unwrap_or("")
}

#[tokio::test(flavor = "multi_thread")]
async fn kubernetes_job_launches_replaces_adopts_and_cleans_up_its_worker_pods() {
    let Some(kc) = cluster() else { return };
    images();
    let applied = Instant::now();
    let job = Job::apply(&kc, "main", STEPS, 8, false);

    // 1. Exactly 4 worker pods, labelled and owned by the Job.
    let pods = job.wait("4 running worker pods", Duration::from_secs(240), |j| {
        let w = j.workers();
        (w.len() == 4 && w.iter().all(|p| phase_of(p) == "Running")).then_some(w)
    });
    let job_uid = job.get(&["job", "dtrain"])["metadata"]["uid"]
        .as_str()
        .unwrap()
        .to_string();
    for p in &pods {
        let labels = &p["metadata"]["labels"];
        assert_eq!(labels["app.kubernetes.io/name"], "dtrain");
        assert_eq!(labels["app.kubernetes.io/component"], "worker");
        assert_eq!(labels["dtrain.io/job"], "dtrain");
        let owner = &p["metadata"]["ownerReferences"][0];
        assert_eq!(
            (owner["kind"].as_str(), owner["uid"].as_str()),
            (Some("Job"), Some(job_uid.as_str()))
        );
    }
    let url = job.status_url();
    let reader = job.reader();
    let first = wait_status_as(
        &url,
        &reader,
        "4 live workers and a step",
        Duration::from_secs(240),
        |s| s.live_workers == 4 && s.step >= 1,
    )
    .await;
    let to_first_step = applied.elapsed();
    let names: BTreeSet<String> = pods.iter().map(name_of).collect();
    let live: BTreeSet<String> = first
        .workers
        .iter()
        .filter(|w| w.state != "lost")
        .map(|w| w.name.clone())
        .collect();
    assert_eq!(live, names, "status names the pods");
    assert_eq!(first.launcher, "kubernetes");
    assert_eq!(first.pods.len(), 4, "{:?}", first.pods);

    // 2. A worker pod deleted mid-training is replaced; training goes on.
    let victim = name_of(&pods[1]);
    job.kubectl(&["delete", "pod", &victim, "--wait=false"])
        .unwrap();
    let deleted = Instant::now();
    job.wait("a replacement worker pod", Duration::from_secs(120), |j| {
        let w = j.workers();
        (w.len() == 4
            && w.iter().all(|p| phase_of(p) == "Running")
            && !w.iter().any(|p| name_of(p) == victim))
        .then_some(())
    });
    let replaced = deleted.elapsed();
    let s = wait_status_as(
        &url,
        &reader,
        "4 live workers again",
        Duration::from_secs(120),
        |s| s.live_workers == 4,
    )
    .await;
    let reason = s
        .pods
        .iter()
        .map(|p| p.last_reason.clone())
        .collect::<Vec<_>>();
    assert!(reason.iter().any(|r| r.contains("deleted")), "{reason:?}");

    // 4. The coordinator pod deleted: the Job re-creates it, it resumes and adopts the pods.
    wait_status_as(
        &url,
        &reader,
        "a checkpoint",
        Duration::from_secs(300),
        |s| !s.last_checkpoint.is_empty() && s.step >= 60,
    )
    .await;
    let before: BTreeSet<String> = job.workers().iter().map(name_of).collect();
    let old = name_of(&job.coordinator_pods()[0]);
    job.kubectl(&["delete", "pod", &old, "--wait=false"])
        .unwrap();
    let mut most = 0;
    job.wait(
        "a new coordinator pod running",
        Duration::from_secs(180),
        |j| {
            most = most.max(j.workers().len());
            let c = j.coordinator_pods();
            c.iter()
                .any(|p| name_of(p) != old && phase_of(p) == "Running")
                .then_some(())
        },
    );
    let resumed = wait_status_as(
        &url,
        &reader,
        "training resumed",
        Duration::from_secs(180),
        |s| s.live_workers >= 1 && s.state == proto::JobState::Running as i32,
    )
    .await;
    let adopted: BTreeSet<String> = job.workers().iter().map(name_of).collect();
    assert_eq!(
        adopted, before,
        "the new coordinator adopts, creates nothing: {resumed:?}"
    );

    // 5. The Job completes; its coordinator pod succeeded; no worker pod is left.
    job.wait("the Job complete", Duration::from_secs(600), |j| {
        most = most.max(j.workers().len());
        (j.get(&["job", "dtrain"])["status"]["succeeded"].as_i64() == Some(1)).then_some(())
    });
    assert!(most <= 4, "{most} worker pods at once");
    let pods = job.coordinator_pods();
    assert!(pods.iter().any(|p| phase_of(p) == "Succeeded"), "{pods:?}");
    job.wait_no_workers("no worker pod left", Duration::from_secs(60));

    // 2 and 4: bit-identical to a fault-free run of the same seed.
    let reference = local_reference(&default_config(STEPS), STEPS);
    assert_checkpoint_is(&job.checkpoints, &reference, "the fault-free run");

    // 6. The coordinator's ServiceAccount may do what the launcher needs and no more.
    let sa = format!("--as=system:serviceaccount:{}:dtrain-coordinator", job.ns);
    // `what` is a resource or resource/subresource (kubectl takes `pods/log` as a pod's name).
    let can = |verb: &str, what: &str| {
        let (resource, sub) = what.split_once('/').unwrap_or((what, ""));
        let mut args = vec!["-n", &job.ns, "auth", "can-i", verb, resource, &sa];
        let sub = format!("--subresource={sub}");
        if what.contains('/') {
            args.push(&sub);
        }
        let out = kubectl_cmd(&kc, &args).output().unwrap();
        String::from_utf8_lossy(&out.stdout).trim() == "yes"
    };
    for (verb, what) in [
        ("create", "pods"),
        ("delete", "pods"),
        ("watch", "pods"),
        ("get", "pods/log"),
        ("get", "jobs"),
    ] {
        assert!(can(verb, what), "cannot {verb} {what}");
    }
    for (verb, what) in [
        ("get", "secrets"),
        ("create", "pods/exec"),
        ("update", "pods"),
        ("deletecollection", "pods"),
        ("create", "deployments"),
        ("delete", "jobs"),
    ] {
        assert!(!can(verb, what), "may {verb} {what}");
    }
    println!(
        "kubernetes: apply to first step {:.1} s, deleted worker replaced (Running) in {:.1} s",
        to_first_step.as_secs_f64(),
        replaced.as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn kubernetes_worker_pods_that_keep_failing_fail_the_job_after_the_cap() {
    let Some(kc) = cluster() else { return };
    images();
    let job = Job::apply(&kc, "failing", STEPS, 3, true);
    let url = job.status_url();
    let reader = job.reader();
    let s = wait_status_as(
        &url,
        &reader,
        "the job failed",
        Duration::from_secs(300),
        |s| s.state == proto::JobState::Failed as i32,
    )
    .await;
    assert!(
        s.reason.contains("--max-worker-pod-failures 3") && s.reason.contains("--no-such-flag"),
        "{}",
        s.reason
    );
    assert!(
        s.pods.iter().any(|p| p.last_reason.contains("exit code 2")),
        "{:?}",
        s.pods
    );
    // The Job gives up (its retries stop at once: the failure is recorded); no pod churn.
    job.wait("the Job failed", Duration::from_secs(300), |j| {
        let failed = j.get(&["job", "dtrain"])["status"]["conditions"]
            .as_array()
            .is_some_and(|c| {
                c.iter()
                    .any(|c| c["type"] == "Failed" && c["status"] == "True")
            });
        failed.then_some(())
    });
    let events = job.kubectl(&["get", "events", "-o", "json"]).unwrap();
    let created: BTreeSet<String> = serde_json::from_str::<Value>(&events).unwrap()["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| {
            let name = e["involvedObject"]["name"].as_str()?;
            (name.contains("-worker-") && e["reason"] == "Scheduled").then(|| name.to_string())
        })
        .collect();
    // The first 4 were scheduled (the events are there); the cap stopped the churn.
    assert!(
        (4..=8).contains(&created.len()),
        "{} worker pods scheduled: {created:?}",
        created.len()
    );
    job.wait_no_workers("no worker pod left", Duration::from_secs(60));
}

#[tokio::test(flavor = "multi_thread")]
async fn kubernetes_deleting_the_job_removes_its_worker_pods() {
    let Some(kc) = cluster() else { return };
    images();
    let job = Job::apply(&kc, "deleted", 100_000, 8, false);
    let running = job.wait("4 running worker pods", Duration::from_secs(240), |j| {
        let pods = j.workers();
        let all_running = pods.len() == 4 && pods.iter().all(|p| phase_of(p) == "Running");
        all_running.then(|| pods.iter().map(name_of).collect::<BTreeSet<_>>())
    });
    job.kubectl(&["delete", "job", "dtrain", "--wait=false"])
        .unwrap();
    // The garbage collector deletes them, and the coordinator (its Job gone) replaces none of
    // them; a replacement would be deleted in turn, or linger as Terminating.
    let no_new_pod = |j: &Job| {
        let names: BTreeSet<String> = j.all_workers().iter().map(name_of).collect();
        assert!(
            names.is_subset(&running),
            "worker pods created after the Job was deleted: {names:?} (were {running:?})"
        );
    };
    job.wait(
        "the garbage collector to delete the worker pods",
        Duration::from_secs(60),
        |j| {
            no_new_pod(j);
            let marked = |p: &Value| !p["metadata"]["deletionTimestamp"].is_null();
            j.all_workers().iter().all(marked).then_some(())
        },
    );
    // Then the kubelet stops them; 1.20's at times takes well over the grace period
    // (kubernetes/kubernetes#97288), hence the generous deadline.
    job.wait("no worker pod left", Duration::from_secs(300), |j| {
        no_new_pod(j);
        j.all_workers().is_empty().then_some(())
    });
}

/// The manifests (base, GPU and test overlays) as kubectl's kustomize renders them, checked
/// offline against the Kubernetes API schemas by `kubernetes-validate` (PyPI; its oldest bundled
/// schemas, 1.25: every kind used is stable since 1.20) in strict mode (no unknown fields).
#[test]
fn kubernetes_manifests_validate_offline_in_strict_mode() {
    let tool = std::env::var_os("DTRAIN_KUBERNETES_VALIDATE").map(PathBuf::from);
    let kubectl = k8s_home().join("bin/kubectl");
    let (Some(tool), true) = (tool, kubectl.exists()) else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must provide DTRAIN_KUBERNETES_VALIDATE and the cluster's kubectl"
        );
        eprintln!(
            "skipping: needs DTRAIN_KUBERNETES_VALIDATE and {}",
            kubectl.display()
        );
        return;
    };
    certs();
    let dir = scratch("k8s-validate");
    for overlay in ["", "gpu", "test"] {
        let out = Command::new(&kubectl)
            .arg("kustomize")
            .arg(repo().join("deploy/k8s").join(overlay))
            .output()
            .unwrap();
        assert!(out.status.success(), "kustomize {overlay}: {out:?}");
        let file = dir.join(format!(
            "rendered-{}.yaml",
            if overlay.is_empty() { "base" } else { overlay }
        ));
        std::fs::write(&file, &out.stdout).unwrap();
        let check = Command::new("python3")
            .arg(&tool)
            .args(["--strict", "--kubernetes-version", "1.25.0"])
            .arg(&file)
            .env("PYTHONPATH", tool.parent().unwrap().parent().unwrap())
            .output()
            .unwrap();
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr)
        );
        assert!(check.status.success(), "{overlay}: {said}");
        assert!(said.contains("job/dtrain"), "{said}");
    }
}
