//! The worker: registers with the coordinator, then pulls shards, computes their gradients with
//! the configured backend, and sends them back, until the coordinator says the job is over.
//!
//! It never hangs: every call has a deadline, a heartbeat task proves liveness while it
//! computes, and a lost coordinator is retried with exponential backoff and jitter (so a
//! restarted coordinator gets its workers back) until `--reconnect-timeout` runs out.

use backon::{ExponentialBuilder, Retryable};
use bytes::Bytes;
use clap::Parser;
use common::codec::WireFormat;
use common::engine::{BackendKind, Engine, Incoming, MicroBatch, Params, Phases};
use common::model::{ModelKind, ModelSpec, Pool};
use common::schedule::Schedule;
use common::tree::Node;
use proto::trainer_client::TrainerClient;
use proto::transport::{AuthChannel, ClientSecurity, Role, SecurityArgs, TransportError};
use proto::{
    FailureKind, FailureReport, GetWorkRequest, HeartbeatRequest, NodeGradient, NodeRange, Offer,
    RegisterRequest, SubmitRequest, Task,
};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tonic::{Code, Status};
use tracing::{info, warn};

/// Worker flags; each also readable from the environment.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "worker",
    version,
    about = "Computes gradients for the training coordinator"
)]
pub struct Args {
    /// The coordinator's gRPC URL.
    #[arg(
        long,
        env = "WORKER_COORDINATOR",
        default_value = "http://127.0.0.1:50051"
    )]
    pub coordinator: String,
    /// Compute threads (default: all cores).
    #[arg(long, env = "WORKER_THREADS")]
    pub threads: Option<usize>,
    /// Tensor backend: flex (pure Rust) or tch (libtorch, needs the `tch` build).
    #[arg(long, env = "WORKER_BACKEND", default_value = "flex")]
    pub backend: String,
    /// Device: cpu or cuda:N (tch only).
    #[arg(long, env = "WORKER_DEVICE", default_value = "cpu")]
    pub device: String,
    /// Refuse to join a job that trains another model (seed or inception).
    #[arg(long, env = "WORKER_MODEL")]
    pub model: Option<String>,
    /// Name shown in status (default: host name and process id).
    #[arg(long, env = "WORKER_NAME")]
    pub name: Option<String>,
    /// Seconds to keep trying to reach the coordinator at start-up.
    #[arg(long, env = "WORKER_CONNECT_TIMEOUT", default_value_t = 60.0)]
    pub connect_timeout: f64,
    /// Seconds to keep trying after losing a coordinator it was working for.
    #[arg(long, env = "WORKER_RECONNECT_TIMEOUT", default_value_t = 300.0)]
    pub reconnect_timeout: f64,
    /// Instead of joining a coordinator: train this many steps of the default job in this
    /// process on --backend/--device, print images/s and the loss, and exit (checks a GPU or
    /// a backend without a cluster).
    #[arg(long, value_name = "STEPS")]
    pub local_steps: Option<u64>,
    /// MNIST directory, for --local-steps.
    #[arg(long, env = "WORKER_DATA_DIR", default_value = "./data/mnist")]
    pub data_dir: std::path::PathBuf,
    /// Images per step, for --local-steps (the coordinator's --batch-size; default 128).
    #[arg(long, requires = "local_steps")]
    pub batch_size: Option<usize>,
    /// Images per micro-batch, for --local-steps (the coordinator's --micro-batch; default 32).
    #[arg(long, requires = "local_steps")]
    pub micro_batch: Option<usize>,
    /// Stop after failing this many shards in a row on this device (each failure is reported
    /// to the coordinator, which hands the shard to another worker).
    #[arg(long, env = "WORKER_MAX_SHARD_FAILURES", default_value_t = 3)]
    pub max_shard_failures: u32,
    #[command(flatten)]
    pub security: SecurityArgs,
    /// Log lines as text or as JSON objects (for log shippers).
    #[arg(long, env = "WORKER_LOG_FORMAT", default_value = "text")]
    pub log_format: common::process::LogFormat,
    /// Speaks this protocol version (for testing version checks).
    #[arg(long, hide = true, default_value_t = proto::PROTOCOL_VERSION)]
    pub protocol_version: u32,
    /// Fails the first N shards as a broken device would, once the first piece of the answer
    /// is out (for testing failure reports and the cancelled submission).
    #[arg(long, hide = true, default_value_t = 0)]
    pub inject_shard_failures: u32,
}

impl Args {
    pub fn threads(&self) -> usize {
        self.threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
    }

    pub fn validate(&self) -> Result<(), String> {
        let backend: BackendKind = self
            .backend
            .parse()
            .map_err(|e: common::Error| e.to_string())?;
        common::engine::device(backend, &self.device).map_err(|e| e.to_string())?;
        if self.threads == Some(0) {
            return Err("--threads must be at least 1".into());
        }
        if let Some(m) = &self.model {
            m.parse::<ModelKind>().map_err(|e| e.to_string())?;
        }
        if self.batch_size == Some(0) || self.micro_batch == Some(0) {
            return Err("--batch-size and --micro-batch must be at least 1".into());
        }
        if self.max_shard_failures == 0 {
            return Err("--max-shard-failures must be at least 1".into());
        }
        if !(self.connect_timeout > 0.0 && self.reconnect_timeout > 0.0) {
            return Err("--connect-timeout and --reconnect-timeout must be positive".into());
        }
        // The TLS material is read once, by `run`.
        ClientSecurity::none()
            .endpoint(&self.coordinator)
            .map_err(|e| format!("--coordinator: {e}"))?;
        Ok(())
    }
}

/// Why the worker stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("coordinator at {url} unreachable for {secs:.0}s: {last}")]
    Unreachable {
        url: String,
        secs: f64,
        last: String,
    },
    #[error("the coordinator refused this worker: {0}")]
    Refused(String),
    #[error(transparent)]
    Compute(#[from] common::Error),
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("bad task from the coordinator: {0}")]
    BadTask(String),
    #[error("the loss or gradient of {0} is NaN or infinite")]
    NonFinite(String),
    /// The rest of a task's parameters did not come (the `GetWork` call failed while they
    /// streamed): not the device's fault, and not reported as a failed shard.
    #[error("the task's parameters did not come: {}", .0.message())]
    Lost(Status),
    #[error("this worker failed {failures} shards in a row on {device}; stopping (last: {last})")]
    Sick {
        failures: u32,
        device: String,
        last: String,
    },
}

impl WorkerError {
    /// How a failure to compute a task is reported to the coordinator.
    fn kind(&self) -> FailureKind {
        match self {
            WorkerError::BadTask(_) => FailureKind::BadTask,
            WorkerError::NonFinite(_) => FailureKind::NonFinite,
            _ => FailureKind::Compute,
        }
    }
}

/// Trains `steps` steps of the default job (with `--batch-size`/`--micro-batch` if given) in
/// this process (`--local-steps`); returns images/s after 3 warm-up steps and the last step's
/// loss.
pub fn run_local(args: &Args, steps: u64) -> Result<(f64, f64), WorkerError> {
    use common::train::{Batcher, TrainConfig, TrainState, local_step};
    const WARMUP: u64 = 3;
    let backend: BackendKind = args.backend.parse()?;
    let data = common::mnist::load(&args.data_dir)?;
    let d = TrainConfig::DEFAULT;
    let cfg = TrainConfig {
        batch_size: args.batch_size.unwrap_or(d.batch_size),
        micro_batch: args.micro_batch.unwrap_or(d.micro_batch),
        ..d
    };
    let engine = Engine::new(cfg.model, backend, &args.device, cfg.keep_prob)?;
    let mut state = TrainState::new(&cfg);
    let mut batcher = Batcher::new(&data.train, cfg.schedule(data.train.len()));
    let mut loss = f64::NAN;
    let mut started = std::time::Instant::now();
    for step in 0..WARMUP + steps {
        if step == WARMUP {
            started = std::time::Instant::now();
        }
        loss = local_step(&cfg, &engine, &mut batcher, &mut state)?;
        if (step + 1) % 50 == 0 {
            info!(step = step + 1, loss, "local step");
        }
    }
    let rate = (steps as usize * cfg.batch_size) as f64 / started.elapsed().as_secs_f64();
    Ok((rate, loss))
}

/// The per-call deadline; `GetWork` long-polls for at most 2 s of it.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs until the job ends (Ok), the coordinator stays unreachable, or `shutdown`.
pub async fn run(args: Args, shutdown: CancellationToken) -> Result<(), WorkerError> {
    let backend: BackendKind = args.backend.parse()?;
    let security = ClientSecurity::new(&args.security.load(Role::Worker)?)?;
    let endpoint = security
        .endpoint(&args.coordinator)?
        .connect_timeout(Duration::from_secs(5))
        .timeout(CALL_TIMEOUT);
    let channel = security.authorize(endpoint.connect_lazy());
    let max = proto::MAX_MESSAGE_BYTES;
    let mut client = TrainerClient::new(channel)
        .max_decoding_message_size(max)
        .max_encoding_message_size(max);
    let name = args.name.clone().unwrap_or_else(default_name);
    let mut engine: Option<Engine> = None;
    let mut patience = Duration::from_secs_f64(args.connect_timeout);
    let mut health = Health {
        device: format!("{}/{}", args.backend, args.device),
        in_a_row: 0,
        max_in_a_row: args.max_shard_failures,
        to_inject: args.inject_shard_failures,
    };

    loop {
        // (Re-)register, retrying while the coordinator is away.
        let reg = retrying(&args.coordinator, patience, &shutdown, || {
            let mut c = client.clone();
            let req = RegisterRequest {
                protocol_version: args.protocol_version,
                model: args.model.clone().unwrap_or_default(),
                backend: args.backend.clone(),
                device: args.device.clone(),
                threads: args.threads() as u32,
                name: name.clone(),
            };
            async move { c.register(req).await.map(|r| r.into_inner()) }
        })
        .await?;
        let Some(reg) = reg else { return Ok(()) };
        patience = Duration::from_secs_f64(args.reconnect_timeout);
        let spec = ModelSpec {
            kind: reg.model.parse()?,
            pool: reg.pool.parse::<Pool>()?,
        };
        if engine.as_ref().is_none_or(|e| e.spec() != spec) {
            engine = Some(Engine::new(spec, backend, &args.device, reg.keep_prob)?);
        }
        let Some(engine) = engine.clone() else {
            continue;
        };
        if engine.param_count() as u64 != reg.parameter_count {
            return Err(WorkerError::Refused(format!(
                "coordinator's model has {} parameters, this worker's {}",
                reg.parameter_count,
                engine.param_count()
            )));
        }
        let me = Me {
            id: reg.worker_id,
            incarnation: reg.incarnation,
            wire: match reg.wire_format() {
                proto::WireFormat::F32 => WireFormat::F32,
                proto::WireFormat::Bf16 => WireFormat::Bf16,
            },
        };
        info!(worker = me.id, model = %spec, backend = %backend, device = args.device, "registered");

        let session = CancellationToken::new();
        let beat = tokio::spawn(heartbeats(
            client.clone(),
            me,
            Duration::from_millis(u64::from(reg.heartbeat_interval_ms.max(50))),
            session.clone(),
        ));
        let outcome = work(&mut client, me, &engine, &mut health, &shutdown).await;
        session.cancel();
        let _ = beat.await;
        match outcome {
            Ok(()) => return Ok(()),
            Err(Stop::Sick(e)) => return Err(e),
            Err(Stop::Call(status)) if is_refusal(status.code()) => {
                return Err(WorkerError::Refused(status.message().to_string()));
            }
            // The coordinator forgot us (it restarted) or went away: register again.
            Err(Stop::Call(status)) => {
                warn!(worker = me.id, code = ?status.code(), error = %status.message(), "lost the coordinator; re-registering");
            }
        }
    }
}

/// Why the work loop stopped.
enum Stop {
    /// A call failed: a refusal for good, or a coordinator gone or restarted.
    Call(Status),
    /// Too many shards failed in a row on this device.
    Sick(WorkerError),
}

impl From<Status> for Stop {
    fn from(s: Status) -> Self {
        Stop::Call(s)
    }
}

/// This worker's own record of shards it could not compute.
struct Health {
    device: String,
    in_a_row: u32,
    max_in_a_row: u32,
    /// Shards still to fail on purpose (`--inject-shard-failures`).
    to_inject: u32,
}

impl Health {
    /// Records a failed shard; the error to stop with once too many failed in a row.
    fn failed(&mut self, e: &WorkerError) -> Option<WorkerError> {
        self.in_a_row += 1;
        (self.in_a_row >= self.max_in_a_row).then(|| WorkerError::Sick {
            failures: self.in_a_row,
            device: self.device.clone(),
            last: e.to_string(),
        })
    }
}

/// Where this worker's shards spent their time, summed over the shards it answered after the
/// first (whose wait also holds the job's start), and logged when the job ends: the distributed
/// step's profile as a worker sees it (`scripts/gpu-check.sh` prints it for a GPU worker).
#[derive(Debug, Default)]
struct ShardTimes {
    shards: u32,
    /// From asking for work to holding the task: the coordinator's step (the tree sum; the
    /// SGD pass runs after the next step opens) and the task's download; with several
    /// workers, also the wait for the round's slowest. The parameters come after the task:
    /// the wait for the trunk's is in `first_params`, the wait for the head's in the engine's
    /// upload.
    wait: Duration,
    compute: ComputeTimes,
    /// From the compute's end to the coordinator's answer: what of the node sums the network
    /// had not yet taken (on a CPU the dense layers' parts go out while the convolutions'
    /// are computed, so mostly the latter), the coordinator's last checks and its answer.
    submit: Duration,
}

impl ShardTimes {
    fn add(&mut self, wait: Duration, compute: &ComputeTimes, submit: Duration) {
        self.shards += 1;
        self.wait += wait;
        self.compute += *compute;
        self.submit += submit;
    }

    fn log(&self) {
        if self.shards == 0 {
            return;
        }
        let ms = |d: Duration| d.as_secs_f64() * 1e3 / f64::from(self.shards);
        let (c, e) = (&self.compute, &self.compute.engine);
        info!(
            "time per shard, mean of {} (ms): wait for the task {:.2}, first parameters {:.2}, upload {:.2}, \
             forward {:.2}, backward {:.2}, reduce {:.2}, download {:.2}, check {:.2}, submit {:.2}",
            self.shards,
            ms(self.wait),
            ms(c.first_params),
            ms(e.upload),
            ms(e.forward),
            ms(e.backward),
            ms(e.reduce),
            ms(e.download),
            ms(c.check),
            ms(self.submit)
        );
    }
}

/// Where [`compute`] spent its time.
#[derive(Debug, Default, Clone, Copy)]
pub struct ComputeTimes {
    /// The trunk's parameters waited for and decoded from the wire (bf16; f32 goes to the
    /// engine as it came). The head's come while the engine computes (its upload phase).
    pub first_params: Duration,
    /// The engine's phases.
    pub engine: Phases,
    /// The node sums' pieces checked finite and taken as the wire's bytes.
    pub check: Duration,
}

impl std::ops::AddAssign for ComputeTimes {
    fn add_assign(&mut self, other: ComputeTimes) {
        self.first_params += other.first_params;
        self.engine += other.engine;
        self.check += other.check;
    }
}

/// Who this worker is to the coordinator process it registered with.
#[derive(Debug, Clone, Copy)]
struct Me {
    id: u64,
    incarnation: u64,
    /// How this job's tensors travel.
    wire: WireFormat,
}

/// Pulls and computes shards until the job ends (Ok), a call fails, or the device fails too
/// many shards in a row.
async fn work(
    client: &mut TrainerClient<AuthChannel>,
    me: Me,
    engine: &Engine,
    health: &mut Health,
    shutdown: &CancellationToken,
) -> Result<(), Stop> {
    // Shards this worker answered (said at the end: tests prove a worker took part with it).
    let mut answered = 0u64;
    let mut times = ShardTimes::default();
    let mut first = true;
    let mut asked = Instant::now();
    loop {
        // One deadline for the call: the first reply and a task's parameters after it.
        let deadline = tokio::time::Instant::now() + CALL_TIMEOUT;
        let reply = tokio::select! {
            _ = shutdown.cancelled() => {
                times.log();
                return Ok(());
            }
            r = tokio::time::timeout_at(deadline, ask_for_work(client, me)) => r
                .unwrap_or_else(|_| Err(Status::deadline_exceeded("GetWork took too long"))),
        };
        let (task, mut replies) = match reply {
            Ok((Offer::Task(task), replies)) => (task, replies),
            Ok((Offer::Wait, _)) => continue,
            Ok((Offer::Shutdown(reason), _)) => {
                info!(reason, shards = answered, "job over; exiting");
                times.log();
                return Ok(());
            }
            // ABORTED: the step was abandoned while its parameters came (the job failed):
            // ask again, to hear why. Any other error ends this session (see `run`).
            Err(s) => {
                ignore_races(s)?;
                asked = Instant::now();
                continue;
            }
        };
        let wait = asked.elapsed();
        let (step, task_id) = (task.step, task.task_id);
        let inject = health.to_inject > 0;
        health.to_inject = health.to_inject.saturating_sub(1);
        // The parameters follow the task. The compute starts with the trunk's (the first part)
        // and waits for the head's (the rest) only once the first micro-batch's forward pass
        // through the trunk is done: meanwhile the coordinator still writes and sends them.
        let (trunk_ready, trunk) = tokio::sync::oneshot::channel();
        let (rest_ready, rest) = tokio::sync::oneshot::channel();
        let (values, trunk_len) = (engine.param_count(), engine.trunk_len());
        let receiving = tokio::spawn(async move {
            let received = proto::receive_params(
                &mut replies,
                values,
                me.wire.bytes_per_value(),
                trunk_len,
                |trunk| drop(trunk_ready.send(trunk)),
            );
            let received = tokio::time::timeout_at(deadline, received)
                .await
                .unwrap_or_else(|_| Err(Status::deadline_exceeded("GetWork took too long")));
            let _ = rest_ready.send(received);
        });
        // The node sums go out in parts of 1 MiB, one message each, as the engine hands them
        // out (on a CPU the dense layers' first, while it computes the convolutions'): the
        // coordinator decodes and checks one part while the next is on the wire, and no
        // message nears the size bound. The queue holds slices of the encoded sums, so it
        // needs no bound of its own.
        let (parts, to_send) = tokio::sync::mpsc::unbounded_channel();
        let call = tokio::spawn(submit(client.clone(), to_send));
        // The submission ends on the mark this sender puts after a compute that succeeded; a
        // failed compute cancels the call instead.
        let held = parts.clone();
        let e = engine.clone();
        let computed = tokio::task::spawn_blocking(move || {
            // The parameters that did not come: why.
            let lost = |why: Result<Result<Bytes, Status>, _>| match why {
                Ok(Err(status)) => status,
                _ => Status::internal("the task's parameters were dropped"),
            };
            let mut compute_times = ComputeTimes::default();
            let started = Instant::now();
            let Ok(trunk) = trunk.blocking_recv() else {
                return Err(WorkerError::Lost(lost(rest.blocking_recv())));
            };
            compute_times.first_params += started.elapsed();
            let rest = move || match rest.blocking_recv() {
                Ok(Ok(rest)) => Ok(rest),
                why => Err(lost(why)),
            };
            let mut send = |piece: NodeGradient| {
                for part in proto::gradient_parts(piece, me.wire.bytes_per_value()) {
                    let part = SubmitRequest {
                        worker_id: me.id,
                        incarnation: me.incarnation,
                        task_id,
                        step,
                        nodes: vec![part],
                    };
                    // A call already over (refused, or the coordinator lost) says so in its
                    // answer; the rest of the compute is wasted, never stuck.
                    if parts.send(Some(part)).is_err() {
                        break;
                    }
                }
                // A device that fails once part of the answer is out: the hard case.
                if inject {
                    return Err(WorkerError::Compute(common::Error::Tensor(
                        "injected device failure (--inject-shard-failures)".into(),
                    )));
                }
                Ok(())
            };
            compute(
                &e,
                &task,
                trunk,
                rest,
                me.wire,
                &mut compute_times,
                &mut send,
            )
            .map(|()| compute_times)
        })
        .await
        .unwrap_or_else(|panic| {
            Err(WorkerError::Compute(common::Error::Tensor(format!(
                "the engine panicked: {panic}"
            ))))
        });
        let compute_times = match computed {
            Ok(done) => done,
            Err(err) => {
                // Without the end mark the parts never end: only the cancel ends the call, so
                // the coordinator never takes the parts sent as a whole submission.
                receiving.abort();
                call.abort();
                let _ = call.await;
                if let WorkerError::Lost(status) = err {
                    // As a `GetWork` call that failed: ABORTED (the step was abandoned while
                    // its parameters came; the job failed): ask again, to hear why. Any other
                    // error ends this session (see `run`).
                    ignore_races(status)?;
                    asked = Instant::now();
                    continue;
                }
                warn!(step, error = %err, "could not compute this shard; reporting it");
                client
                    .report_failure(FailureReport {
                        worker_id: me.id,
                        incarnation: me.incarnation,
                        task_id,
                        step,
                        kind: err.kind() as i32,
                        reason: err.to_string(),
                    })
                    .await
                    .map(|_| ())
                    .or_else(ignore_races)?;
                match health.failed(&err) {
                    Some(sick) => return Err(Stop::Sick(sick)),
                    None => {
                        asked = Instant::now();
                        continue;
                    }
                }
            }
        };
        health.in_a_row = 0;
        // The end mark: the submission is whole. (A call already over ignores it.)
        let _ = held.send(None);
        let sent = Instant::now();
        let submitted = match call.await {
            Ok(Some(answer)) => answer,
            Ok(None) => Err(Status::invalid_argument("a task without tree nodes")),
            Err(e) => Err(Status::internal(format!("the submission failed: {e}"))),
        };
        if !std::mem::take(&mut first) {
            times.add(wait, &compute_times, sent.elapsed());
        }
        asked = Instant::now();
        match submitted {
            Ok(r) if !r.get_ref().accepted => {
                info!(step, "another copy of this shard answered first")
            }
            Ok(_) => answered += 1,
            // The coordinator refused this answer (counted against us; a quarantine follows
            // if it keeps happening): drop it and go on.
            Err(s) if matches!(s.code(), Code::InvalidArgument | Code::AlreadyExists) => {
                warn!(step, error = %s.message(), "the coordinator refused this answer")
            }
            Err(s) => ignore_races(s)?,
        }
    }
}

/// One `SubmitGradients` call streaming `parts` as the compute hands them over, until the end
/// mark (`None`); `None` when no part came. The call starts with the first part, so its deadline
/// covers what follows it (on a CPU, one micro-batch's backward pass through the convolutions)
/// and the upload, not the whole shard. Parts that stop coming without the mark (the compute
/// failed) leave the stream open until the caller cancels the call, which resets it: ending it
/// would hand the coordinator a submission that is not whole, which counts against the sender.
async fn submit(
    mut client: TrainerClient<AuthChannel>,
    mut parts: tokio::sync::mpsc::UnboundedReceiver<Option<SubmitRequest>>,
) -> Option<Result<tonic::Response<proto::SubmitResponse>, Status>> {
    let first = parts.recv().await??;
    let rest = futures::stream::unfold(parts, |mut parts| async move {
        match parts.recv().await {
            Some(Some(part)) => Some((part, parts)),
            Some(None) => None,
            None => std::future::pending().await,
        }
    });
    let stream = futures::StreamExt::chain(futures::stream::once(async { first }), rest);
    Some(client.submit_gradients(stream).await)
}

/// One `GetWork` call: its first reply, and the stream a task's parameters follow on (see
/// [`proto::receive_params`]). The caller bounds both with one deadline.
async fn ask_for_work(
    client: &mut TrainerClient<AuthChannel>,
    me: Me,
) -> Result<(Offer, tonic::Streaming<proto::GetWorkResponse>), Status> {
    let request = GetWorkRequest {
        worker_id: me.id,
        incarnation: me.incarnation,
    };
    let mut replies = client.get_work(request).await?.into_inner();
    let offer = proto::receive_offer(&mut replies).await?;
    Ok((offer, replies))
}

/// Swallows `ABORTED`, a call about a step that is already over (we were declared lost and the
/// step moved on) or was abandoned: just ask for work again.
fn ignore_races(s: Status) -> Result<(), Status> {
    if s.code() == Code::Aborted {
        warn!(error = %s.message(), "the step is over; asking for work again");
        Ok(())
    } else {
        Err(s)
    }
}

/// Computes a task's node gradients and hands them to `send` piece by piece as the engine has
/// them, each checked finite and encoded (an error from `send` stops the computation); tensors
/// come and go in `wire` format. The parameters come in two pieces: the trunk's (`trunk`, the
/// first [`Engine::trunk_len`] values) and the rest, which `rest` waits for (its error is
/// [`WorkerError::Lost`]). Adds where the time went to `times`.
pub fn compute(
    engine: &Engine,
    task: &Task,
    trunk: Bytes,
    rest: impl FnOnce() -> Result<Bytes, Status>,
    wire: WireFormat,
    times: &mut ComputeTimes,
    send: &mut dyn FnMut(NodeGradient) -> Result<(), WorkerError>,
) -> Result<(), WorkerError> {
    let bad = |m: String| WorkerError::BadTask(m);
    // The bytes as they came where they are f32: the engine takes them with as few copies as
    // its backend allows (libtorch: none before its own).
    let params = move |bytes: Bytes, values: usize| match wire {
        WireFormat::F32 if bytes.len() == values * 4 => Ok(Params::LeF32(bytes)),
        _ => common::codec::decode(wire, &bytes, values)
            .map(Params::from)
            .map_err(|e| WorkerError::BadTask(format!("parameters: {e}"))),
    };
    let started = Instant::now();
    let trunk_len = engine.trunk_len();
    let trunk = params(trunk, trunk_len)?;
    times.first_params += started.elapsed();
    let head = Box::new(|| {
        params(
            rest().map_err(WorkerError::Lost)?,
            engine.param_count() - trunk_len,
        )
    });
    let total: usize = task.leaf_sizes.iter().map(|&s| s as usize).sum();
    let px = common::mnist::PIXELS;
    if task.labels.len() != total || task.images.len() != total * px {
        return Err(bad(format!(
            "{} labels and {} image bytes for leaves of {:?}",
            task.labels.len(),
            task.images.len(),
            task.leaf_sizes
        )));
    }
    let mut batches = Vec::with_capacity(task.leaf_sizes.len());
    let mut at = 0usize;
    for (i, &size) in task.leaf_sizes.iter().enumerate() {
        let size = size as usize;
        batches.push(MicroBatch {
            images: &task.images[at * px..(at + size) * px],
            labels: &task.labels[at..at + size],
            dropout_seed: Schedule::dropout_seed(task.seed, task.step, task.first_leaf + i as u32),
        });
        at += size;
    }
    let nodes: Vec<Node> = task.nodes.iter().map(|n| Node::new(n.lo, n.hi)).collect();
    let first = task.first_leaf;
    let last = first + task.leaf_sizes.len() as u32;
    if nodes.is_empty() {
        return Err(bad("a task without tree nodes to answer".into()));
    }
    if nodes
        .iter()
        .any(|n| n.lo < first || n.hi > last || n.lo >= n.hi)
    {
        return Err(bad(format!(
            "nodes {nodes:?} outside leaves {first}..{last}"
        )));
    }
    let mut sorted = nodes.clone();
    sorted.sort();
    if sorted.windows(2).any(|w| w[0].hi > w[1].lo) {
        return Err(bad(format!("nodes {nodes:?} overlap")));
    }
    // The engine refuses a malformed batch (no micro-batches, a label that is not a digit): the
    // task's fault, reported as such; any other engine error is the device's.
    let mut check = Duration::ZERO;
    let computed = engine.node_gradients_in_pieces(
        Incoming::InTwo { trunk, head },
        first,
        &batches,
        &nodes,
        &mut times.engine,
        &mut |piece| {
            let started = Instant::now();
            // The coordinator's own check of a gradient: its norm is finite exactly when
            // every value is (an f32's square cannot overflow an f64 sum), and the pass
            // vectorises.
            if !(piece.loss_sum.is_finite() && common::sgd::l2_norm(&piece.values).is_finite()) {
                return Err(WorkerError::NonFinite(format!(
                    "step {} leaves {first}..{last}",
                    task.step + 1
                )));
            }
            let node = NodeGradient {
                node: Some(NodeRange {
                    lo: piece.node.lo,
                    hi: piece.node.hi,
                }),
                gradient: common::codec::encode_owned(wire, piece.values),
                loss_sum: piece.loss_sum,
                offset: piece.offset as u64,
            };
            check += started.elapsed();
            send(node)
        },
    );
    times.check += check;
    match computed {
        Err(WorkerError::Compute(common::Error::BadBatch(m))) => Err(bad(m)),
        other => other,
    }
}

/// Sends heartbeats until `stop`.
async fn heartbeats(
    mut client: TrainerClient<AuthChannel>,
    me: Me,
    every: Duration,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let call = client.heartbeat(HeartbeatRequest {
            worker_id: me.id,
            incarnation: me.incarnation,
        });
        match tokio::time::timeout(every * 3, call).await {
            Ok(Ok(_)) => {}
            Ok(Err(s)) if s.code() == Code::NotFound => {
                // The coordinator forgot us; the work loop notices on its next call.
                return;
            }
            _ => {}
        }
    }
}

/// Whether the coordinator turned this worker down for good: an incompatible worker, a
/// quarantine, a message over the bound. A refused answer (INVALID_ARGUMENT) is not: the work
/// loop drops it and goes on. Everything else is "try again": a coordinator killed mid-call
/// reaches tonic as Unavailable, Unknown, Internal (a broken pipe, an h2 reset), Cancelled or
/// DeadlineExceeded depending on the moment, and NotFound means a restarted coordinator does not
/// know this worker yet.
fn is_refusal(code: Code) -> bool {
    matches!(
        code,
        Code::FailedPrecondition
            | Code::PermissionDenied
            | Code::OutOfRange
            | Code::Unimplemented
            | Code::Unauthenticated
    )
}

/// Calls `f` until it succeeds, retrying with exponential backoff (100 ms doubling to 5 s, with
/// jitter; `backon`) while the waits add up to less than `patience`. Ok(None) on shutdown; a
/// refusal ([`is_refusal`]) is returned at once.
async fn retrying<T, F, Fut>(
    url: &str,
    patience: Duration,
    shutdown: &CancellationToken,
    f: F,
) -> Result<Option<T>, WorkerError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, Status>>,
{
    let policy = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(5))
        .with_jitter()
        .with_total_delay(Some(patience))
        .without_max_times();
    let calls = f
        .retry(policy)
        .sleep(tokio::time::sleep)
        .when(|s: &Status| !is_refusal(s.code()));
    let outcome = tokio::select! {
        _ = shutdown.cancelled() => return Ok(None),
        outcome = calls => outcome,
    };
    match outcome {
        Ok(v) => Ok(Some(v)),
        Err(s) if is_refusal(s.code()) => Err(WorkerError::Refused(s.message().to_string())),
        Err(s) => Err(WorkerError::Unreachable {
            url: url.to_string(),
            secs: patience.as_secs_f64(),
            last: s.message().to_string(),
        }),
    }
}

fn default_name() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "worker".into());
    format!("{host}-{}", std::process::id())
}
