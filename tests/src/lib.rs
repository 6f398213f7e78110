//! Harness for end-to-end tests: builds the real `coordinator` and `worker` binaries once,
//! starts them as child processes on 127.0.0.1 (port 0, the bound address read from the log),
//! one log file per child, waits on readiness with deadlines, attaches log tails to failures,
//! and kills every child on `Drop`. Where the fault under test is not the coordinator process
//! itself (no `kill -9`, no `SIGSTOP`, no exit code), a test may run the coordinator in its own
//! process instead ([`InProcess`], as mini-redis's tests run their server).

use anyhow::{Context, Result, bail};
pub use proto::transport::{AuthChannel, ClientSecurity, Material, Role, SecurityArgs};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The shared MNIST copy the tests train on (`../shared/mnist` from the repository).
pub fn mnist_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/mnist");
    dir.canonicalize().unwrap_or(dir)
}

/// The directory holding the built binaries, building them on first use.
pub fn bin_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        // Test executables live in <target>/<profile>/deps.
        let exe = std::env::current_exe().expect("test executable path");
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("target dir")
            .to_path_buf();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        // All targets, as `cargo test --workspace` builds them: the same feature unification
        // (dev-dependencies included), so every dependency is already built. `--bins` alone
        // would resolve features differently and compile half the tree a second time.
        cmd.args(["build", "--workspace", "--all-targets"]);
        // Cargo gives test processes the package's own variables (CARGO_PKG_NAME, ...). Some
        // build scripts rerun when those change, which would rebuild half the tree: drop them.
        for (key, _) in std::env::vars() {
            let package_var = [
                "CARGO_PKG_",
                "CARGO_MANIFEST_",
                "CARGO_CRATE_",
                "CARGO_BIN_",
                "CARGO_PRIMARY_PACKAGE",
            ]
            .iter()
            .any(|p| key.starts_with(p));
            if package_var || key == "OUT_DIR" {
                cmd.env_remove(key);
            }
        }
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        if cfg!(feature = "tch") {
            cmd.args(["--features", "cluster-tests/tch,coordinator/tch,worker/tch"]);
        }
        let status = cmd.status().expect("run cargo build");
        assert!(status.success(), "building the binaries failed");
        profile_dir
    })
    .clone()
}

/// A fresh scratch directory under the target directory.
pub fn scratch(name: &str) -> PathBuf {
    let dir = bin_dir()
        .join("test-scratch")
        .join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

/// A child process with its own log file, killed when dropped.
pub struct Proc {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    /// Starts `bin` (a binary of this workspace) with `args`, logging to `dir/name.log`.
    pub fn start(bin: &str, name: &str, dir: &Path, args: &[String]) -> Result<Proc> {
        Self::start_with_env(bin, name, dir, args, &[])
    }

    /// [`Proc::start`] with extra environment variables.
    pub fn start_with_env(
        bin: &str,
        name: &str,
        dir: &Path,
        args: &[String],
        env: &[(String, String)],
    ) -> Result<Proc> {
        let log = dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log)?;
        let program = if bin.contains('/') {
            PathBuf::from(bin)
        } else {
            bin_dir().join(bin)
        };
        let child = Command::new(program)
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("TEST_RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env("NO_COLOR", "1")
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(file.try_clone()?)
            .stderr(file)
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("start {bin}"))?;
        Ok(Proc {
            name: name.to_string(),
            child,
            log,
        })
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last lines of the log, for failure messages.
    pub fn tail(&self) -> String {
        let text = self.log_text();
        let lines: Vec<&str> = text.lines().collect();
        format!(
            "--- {} ({}) ---\n{}",
            self.name,
            self.log.display(),
            lines[lines.len().saturating_sub(30)..].join("\n")
        )
    }

    /// Waits until a log line contains `needle`; returns that line.
    pub fn wait_for_line(&mut self, needle: &str, within: Duration) -> Result<String> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(line) = self.log_text().lines().find(|l| l.contains(needle)) {
                return Ok(line.to_string());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "{} exited ({status}) before logging {needle:?}\n{}",
                    self.name,
                    self.tail()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not log {needle:?} within {within:?}\n{}",
                    self.name,
                    self.tail()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for a coordinator to log its bound address; returns its gRPC URL.
    pub fn grpc_url(&mut self) -> Result<String> {
        let line = self.wait_for_line("coordinator listening on ", Duration::from_secs(60))?;
        let addr = line
            .split("coordinator listening on ")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .context("listening line without an address")?;
        Ok(format!("http://{addr}"))
    }

    /// Waits for the process to exit.
    pub fn wait_exit(&mut self, within: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!(
                    "{} still running after {within:?}\n{}",
                    self.name,
                    self.tail()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends a signal (`"KILL"`, `"STOP"`, `"CONT"`, `"TERM"`).
    pub fn signal(&self, sig: &str) -> Result<()> {
        let status = Command::new("kill")
            .args([format!("-{sig}"), self.child.id().to_string()])
            .status()?;
        anyhow::ensure!(status.success(), "kill -{sig} failed");
        Ok(())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A coordinator running in the test process: `coordinator::run` on a listener bound to
/// 127.0.0.1:0, parsed from the same flags as the binary ([`coordinator_args`]); cancelled on
/// `Drop`. Its log goes nowhere (tests of log lines start the binary).
pub struct InProcess {
    pub url: String,
    shutdown: tokio_util::sync::CancellationToken,
    job: Option<tokio::task::JoinHandle<Result<coordinator::driver::Outcome>>>,
}

impl InProcess {
    /// Starts the job; it serves at once (before MNIST is loaded, calls wait).
    pub async fn start(args: &[impl AsRef<str>]) -> Result<InProcess> {
        let train = train_args(&coordinator_args(args))?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let shutdown = tokio_util::sync::CancellationToken::new();
        let job = tokio::spawn(coordinator::run(train, listener, shutdown.clone()));
        Ok(InProcess {
            url,
            shutdown,
            job: Some(job),
        })
    }

    /// Waits for the job's end, at most `within`.
    pub async fn finish(mut self, within: Duration) -> Result<coordinator::driver::Outcome> {
        let job = self.job.take().context("already finished")?;
        tokio::time::timeout(within, job)
            .await
            .with_context(|| format!("the in-process coordinator still runs after {within:?}"))??
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// The coordinator's training flags, parsed as its `main` parses them.
fn train_args(args: &[String]) -> Result<coordinator::args::TrainArgs> {
    use clap::Parser;
    let argv = std::iter::once("coordinator".to_string()).chain(args.iter().cloned());
    let cli = coordinator::args::Cli::try_parse_from(argv)?;
    anyhow::ensure!(
        cli.command.is_none(),
        "not a training command line: {args:?}"
    );
    Ok(cli.train)
}

/// [`run_job`] with the coordinator in the test process: `workers` worker processes against an
/// [`InProcess`] coordinator, to the job's end.
pub async fn run_job_in_process(
    dir: &Path,
    workers: usize,
    args: &[impl AsRef<str>],
    within: Duration,
) -> Result<()> {
    let c = InProcess::start(&job_args(workers, args)).await?;
    let mut ws = start_workers(dir, workers, &c.url, &[])?;
    let outcome = c.finish(within).await;
    anyhow::ensure!(
        matches!(outcome, Ok(coordinator::driver::Outcome::Finished { .. })),
        "the job did not finish: {outcome:?}\n{}",
        tails(&ws)
    );
    workers_exit_cleanly(&mut ws)
}

/// A coordinator's command line on 127.0.0.1:0 (gRPC and metrics) with the shared MNIST and a
/// short `--linger`, then `extra`.
pub fn coordinator_args(extra: &[impl AsRef<str>]) -> Vec<String> {
    // `--listen` may be given in `extra` (a fixed port); clap refuses it twice.
    let given = |flag: &str| extra.iter().any(|a| a.as_ref() == flag);
    let mut all: Vec<String> = Vec::new();
    if !given("--listen") {
        all.extend(["--listen".to_string(), "127.0.0.1:0".into()]);
    }
    // Tests read the outcome from the log and the exit code; a test that reads status after
    // the end gives its own --linger.
    if !given("--linger") {
        all.extend(["--linger".to_string(), "0.5".into()]);
    }
    all.extend([
        "--metrics-listen".to_string(),
        "127.0.0.1:0".into(),
        "--data-dir".into(),
    ]);
    all.push(mnist_dir().display().to_string());
    all.extend(extra.iter().map(|a| a.as_ref().to_string()));
    all
}

/// Flags of a short job: `steps` steps, validation and test on 100 images only at the end, a
/// checkpoint every `every` steps (0: only at the end) to `ck`.
pub fn short_job(steps: u64, every: u64, ck: &Path) -> Vec<String> {
    let mut v: Vec<String> = [
        "--eval-every",
        "1000",
        "--validation-size",
        "100",
        "--test-size",
        "100",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.extend([
        "--max-steps".into(),
        steps.to_string(),
        "--checkpoint-every".into(),
        every.to_string(),
    ]);
    v.extend(["--checkpoint-url".into(), ck.display().to_string()]);
    v
}

/// Starts a coordinator on 127.0.0.1:0 and returns it with its gRPC URL.
pub fn start_coordinator(
    dir: &Path,
    name: &str,
    args: &[impl AsRef<str>],
) -> Result<(Proc, String)> {
    let mut p = Proc::start("coordinator", name, dir, &coordinator_args(args))?;
    let url = p.grpc_url()?;
    Ok((p, url))
}

/// Starts a worker against `url`, on one thread unless `args` say `--threads`.
pub fn start_worker(dir: &Path, name: &str, url: &str, args: &[&str]) -> Result<Proc> {
    let mut all: Vec<String> = vec!["--coordinator".into(), url.into()];
    if !args.contains(&"--threads") {
        all.extend(["--threads".into(), "1".into()]);
    }
    all.extend(args.iter().map(|s| s.to_string()));
    Proc::start("worker", name, dir, &all)
}

/// The validation accuracies a coordinator logged, in the lecture's line format.
pub fn validation_accuracies(log: &str) -> Vec<(f64, f64)> {
    log.lines()
        .filter_map(|l| {
            let loss = l
                .split("Loss:")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()?;
            let acc = l
                .split("Validation Accuracy:")
                .nth(1)?
                .trim()
                .parse()
                .ok()?;
            Some((loss, acc))
        })
        .collect()
}

/// The final test accuracy a coordinator logged.
pub fn test_accuracy(log: &str) -> Option<f64> {
    log.lines()
        .find_map(|l| l.split("Testing Accuracy:").nth(1)?.trim().parse().ok())
}

/// A tensor read from a checkpoint: name, shape, values.
pub type NamedTensor = (String, Vec<usize>, Vec<f32>);

/// The parameters of the checkpoint `latest` points to, by PyTorch name, read with the
/// independent `safetensors` reader.
pub fn latest_params(checkpoints: &Path) -> Result<Vec<NamedTensor>> {
    let name = std::fs::read_to_string(checkpoints.join("latest"))?;
    let bytes = std::fs::read(checkpoints.join(name.trim()).join("model.safetensors"))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)?;
    let mut out: Vec<_> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| {
            let values =
                common::codec::decode_f32(t.data(), t.data().len() / 4).expect("whole f32 values");
            (n, t.shape().to_vec(), values)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// The manifest of the latest checkpoint.
pub fn latest_manifest(checkpoints: &Path) -> Result<serde_json::Value> {
    let name = std::fs::read_to_string(checkpoints.join("latest"))?;
    Ok(serde_json::from_slice(&std::fs::read(
        checkpoints.join(name.trim()).join("manifest.json"),
    )?)?)
}

/// Runs a whole job (coordinator + `workers` workers) to its end and returns the coordinator's
/// log. Panics with log tails when it fails.
pub fn run_job(
    dir: &Path,
    workers: usize,
    args: &[impl AsRef<str>],
    within: Duration,
) -> Result<String> {
    run_job_on(dir, workers, &[], args, within)
}

/// [`run_job`] with `worker_args` given to every worker (`--backend tch`, say).
pub fn run_job_on(
    dir: &Path,
    workers: usize,
    worker_args: &[&str],
    args: &[impl AsRef<str>],
    within: Duration,
) -> Result<String> {
    let (mut c, url) = start_coordinator(dir, "coordinator", &job_args(workers, args))?;
    let mut ws = start_workers(dir, workers, &url, worker_args)?;
    let status = c.wait_exit(within)?;
    anyhow::ensure!(
        status.success(),
        "coordinator failed: {status}\n{}\n{}",
        c.tail(),
        tails(&ws)
    );
    workers_exit_cleanly(&mut ws)?;
    Ok(c.log_text())
}

/// `--workers N` and then `args`.
fn job_args(workers: usize, args: &[impl AsRef<str>]) -> Vec<String> {
    let mut all = vec!["--workers".to_string(), workers.to_string()];
    all.extend(args.iter().map(|a| a.as_ref().to_string()));
    all
}

/// `n` workers (`worker0`, ...) against `url`, each with `args`.
fn start_workers(dir: &Path, n: usize, url: &str, args: &[&str]) -> Result<Vec<Proc>> {
    (0..n)
        .map(|i| start_worker(dir, &format!("worker{i}"), url, args))
        .collect()
}

fn tails(procs: &[Proc]) -> String {
    procs.iter().map(Proc::tail).collect::<Vec<_>>().join("\n")
}

/// Waits for every worker to exit after the job's end; an error unless all succeeded.
fn workers_exit_cleanly(ws: &mut [Proc]) -> Result<()> {
    for w in ws {
        let s = w.wait_exit(Duration::from_secs(30))?;
        anyhow::ensure!(s.success(), "worker {} failed: {s}\n{}", w.name, w.tail());
    }
    Ok(())
}

/// The coordinator's default training config, stopping after `steps`.
pub fn default_config(steps: u64) -> common::train::TrainConfig {
    common::train::TrainConfig {
        max_steps: Some(steps),
        ..common::train::TrainConfig::DEFAULT
    }
}

/// The fault-free reference of every exactness test: the parameters, by PyTorch name, of the
/// single-process loop (`train_local`, pure-Rust backend) after `steps` steps of `cfg`.
pub fn local_reference(
    cfg: &common::train::TrainConfig,
    steps: u64,
) -> std::collections::BTreeMap<String, Vec<f32>> {
    let data = common::mnist::load(&mnist_dir()).expect("MNIST");
    let engine = common::engine::Engine::new(
        cfg.model,
        common::engine::BackendKind::Flex,
        "cpu",
        cfg.keep_prob,
    )
    .expect("engine");
    let local = common::train::train_local(cfg, &engine, &data.train, steps).expect("local loop");
    torch_layout(cfg, &local.params)
}

/// Panics unless the latest checkpoint in `ck` holds exactly `reference`'s parameters.
pub fn assert_checkpoint_is(
    ck: &Path,
    reference: &std::collections::BTreeMap<String, Vec<f32>>,
    what: &str,
) {
    let params = latest_params(ck).expect("latest checkpoint");
    assert_eq!(params.len(), reference.len());
    for (name, _, values) in &params {
        assert!(values == &reference[name], "{name} differs from {what}");
    }
}

/// A flat parameter vector as PyTorch-layout tensors by name.
pub fn torch_layout(
    cfg: &common::train::TrainConfig,
    flat: &[f32],
) -> std::collections::BTreeMap<String, Vec<f32>> {
    let params = cfg.model.params();
    let pieces = common::model::split_flat(&params, flat).expect("a whole parameter vector");
    params
        .iter()
        .zip(pieces)
        .map(|(p, head)| (p.name.clone(), p.convert_layout(head, true)))
        .collect()
}

/// One `GetStatus` call; `None` while the coordinator cannot be reached.
pub async fn get_status(url: &str) -> Option<proto::StatusReply> {
    get_status_as(url, &ClientSecurity::none()).await
}

/// [`get_status`] with TLS material or a token.
pub async fn get_status_as(url: &str, security: &ClientSecurity) -> Option<proto::StatusReply> {
    let channel = security.endpoint(url).ok()?.connect().await.ok()?;
    let mut c = proto::status_client::StatusClient::new(security.authorize(channel));
    let reply = c.get_status(proto::GetStatusRequest {}).await.ok()?;
    Some(reply.into_inner())
}

/// A Trainer client for a test posing as a worker (any message size it likes to send).
pub async fn trainer_client(
    url: &str,
    security: &ClientSecurity,
) -> Result<proto::trainer_client::TrainerClient<AuthChannel>> {
    let channel = security.endpoint(url)?.connect().await?;
    Ok(
        proto::trainer_client::TrainerClient::new(security.authorize(channel))
            .max_encoding_message_size(usize::MAX)
            .max_decoding_message_size(proto::MAX_MESSAGE_BYTES),
    )
}

/// Writes the cluster's TLS material and tokens into `dir` with `coordinator certs`.
pub fn make_certs(dir: &Path) -> Result<PathBuf> {
    let tls = dir.join("tls");
    let out = run_with_deadline(
        Command::new(bin_dir().join("coordinator"))
            .arg("certs")
            .arg(&tls),
        Duration::from_secs(30),
    )?;
    anyhow::ensure!(
        out.status.success(),
        "coordinator certs failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(tls)
}

/// The material a program of `role` reads from a `coordinator certs` directory.
pub fn material(tls: &Path, role: Role) -> Material {
    SecurityArgs {
        tls_dir: Some(tls.to_path_buf()),
        ..SecurityArgs::default()
    }
    .load(role)
    .expect("TLS material")
}

/// Long-polls `GetWork` as the test client registered as `reg` until it is handed a task (its
/// parameters read whole and dropped); panics after a minute.
pub async fn take_shard(
    client: &mut proto::trainer_client::TrainerClient<AuthChannel>,
    reg: &proto::RegisterResponse,
) -> proto::Task {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let values = reg.parameter_count as usize;
    let width = reg.wire_format().bytes_per_value();
    let take = async {
        loop {
            let request = proto::GetWorkRequest {
                worker_id: reg.worker_id,
                incarnation: reg.incarnation,
            };
            let mut replies = client
                .get_work(request)
                .await
                .expect("GetWork")
                .into_inner();
            let work = proto::receive_work(&mut replies, values, width).await;
            if let proto::Work::Task(task, _) = work.expect("a whole reply to GetWork") {
                return task;
            }
        }
    };
    tokio::time::timeout_at(deadline, take)
        .await
        .expect("no shard for the test client within a minute")
}

/// Polls the status until `f` holds; panics with the last status after `within`.
pub async fn wait_status(
    url: &str,
    what: &str,
    within: Duration,
    f: impl Fn(&proto::StatusReply) -> bool,
) -> proto::StatusReply {
    wait_status_as(url, &ClientSecurity::none(), what, within, f).await
}

/// [`wait_status`] with TLS material or a token.
pub async fn wait_status_as(
    url: &str,
    security: &ClientSecurity,
    what: &str,
    within: Duration,
    f: impl Fn(&proto::StatusReply) -> bool,
) -> proto::StatusReply {
    let deadline = Instant::now() + within;
    loop {
        let s = get_status_as(url, security).await;
        if let Some(s) = s.as_ref().filter(|s| f(s)) {
            return s.clone();
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; last status {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs `cmd` to its end, killing it after `within`; returns its status and output.
pub fn run_with_deadline(cmd: &mut Command, within: Duration) -> Result<std::process::Output> {
    use std::io::Read;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("start {cmd:?}"))?;
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            buf
        })
    };
    let out = drain(Box::new(child.stdout.take().context("stdout")?));
    let err = drain(Box::new(child.stderr.take().context("stderr")?));
    let deadline = Instant::now() + within;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{cmd:?} still running after {within:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Ok(std::process::Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    })
}

/// Resident memory of process `pid` in bytes (Linux `/proc`), `None` once it is gone.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// The port of a `http://host:port` URL.
pub fn port_of(url: &str) -> u16 {
    url.rsplit(':')
        .next()
        .and_then(|p| p.trim_end_matches('/').parse().ok())
        .unwrap_or_else(|| panic!("no port in {url}"))
}

/// A TCP port on 127.0.0.1 that was free when asked. Only for servers that cannot be given
/// port 0 and read back (another program could take it in between: rare, and the test then
/// fails to start its server, saying so).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}
