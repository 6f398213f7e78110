//! The worker: registers with the coordinator, then pulls shards, computes their gradients with
//! the configured backend, and sends them back, until the coordinator says the job is over.
//!
//! It never hangs: every call has a deadline, a heartbeat task proves liveness while it
//! computes, and a lost coordinator is retried with exponential backoff and jitter (so a
//! restarted coordinator gets its workers back) until `--reconnect-timeout` runs out.

use clap::Parser;
use common::engine::{BackendKind, Engine, MicroBatch};
use common::model::{ModelKind, ModelSpec, Pool};
use common::schedule::Schedule;
use common::tree::Node;
use proto::get_work_response::Reply;
use proto::trainer_client::TrainerClient;
use proto::{
    GetWorkRequest, HeartbeatRequest, NodeGradient, NodeRange, RegisterRequest, SubmitRequest, Task,
};
use rand::Rng;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};
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
    /// Speaks this protocol version (for testing version checks).
    #[arg(long, hide = true, default_value_t = proto::PROTOCOL_VERSION)]
    pub protocol_version: u32,
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
        if !(self.connect_timeout > 0.0 && self.reconnect_timeout > 0.0) {
            return Err("--connect-timeout and --reconnect-timeout must be positive".into());
        }
        Endpoint::from_shared(self.coordinator.clone())
            .map_err(|e| format!("--coordinator {:?} is not a URL: {e}", self.coordinator))?;
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
    #[error("bad task from the coordinator: {0}")]
    BadTask(String),
}

/// Trains `steps` steps of the default job in this process (`--local-steps`); returns images/s
/// after 3 warm-up steps and the last step's loss.
pub fn run_local(args: &Args, steps: u64) -> Result<(f64, f64), WorkerError> {
    use common::train::{Batcher, TrainConfig, TrainState, local_step};
    const WARMUP: u64 = 3;
    let backend: BackendKind = args.backend.parse()?;
    let data = common::mnist::load(&args.data_dir)?;
    let cfg = TrainConfig::DEFAULT;
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
    let endpoint = Endpoint::from_shared(args.coordinator.clone())
        .map_err(|e| WorkerError::Refused(e.to_string()))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(CALL_TIMEOUT)
        .tcp_nodelay(true)
        .initial_stream_window_size(Some(proto::STREAM_WINDOW_BYTES))
        .initial_connection_window_size(Some(proto::CONNECTION_WINDOW_BYTES));
    let channel = endpoint.connect_lazy();
    let max = proto::MAX_MESSAGE_BYTES;
    let mut client = TrainerClient::new(channel)
        .max_decoding_message_size(max)
        .max_encoding_message_size(max);
    let name = args.name.clone().unwrap_or_else(default_name);
    let mut engine: Option<Engine> = None;
    let mut patience = Duration::from_secs_f64(args.connect_timeout);

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
        };
        info!(worker = me.id, model = %spec, backend = %backend, device = args.device, "registered");

        let session = CancellationToken::new();
        let beat = tokio::spawn(heartbeats(
            client.clone(),
            me,
            Duration::from_millis(u64::from(reg.heartbeat_interval_ms.max(50))),
            session.clone(),
        ));
        let outcome = work(&mut client, me, &engine, &shutdown).await;
        session.cancel();
        let _ = beat.await;
        match outcome {
            Ok(()) => return Ok(()),
            Err(status) if is_refusal(status.code()) => {
                return Err(WorkerError::Refused(status.message().to_string()));
            }
            // The coordinator forgot us (it restarted) or went away: register again.
            Err(status) => {
                warn!(worker = me.id, code = ?status.code(), error = %status.message(), "lost the coordinator; re-registering");
            }
        }
    }
}

/// Who this worker is to the coordinator process it registered with.
#[derive(Debug, Clone, Copy)]
struct Me {
    id: u64,
    incarnation: u64,
}

/// Pulls and computes shards until the job ends (Ok) or a call fails (Err).
async fn work(
    client: &mut TrainerClient<Channel>,
    me: Me,
    engine: &Engine,
    shutdown: &CancellationToken,
) -> Result<(), Status> {
    loop {
        let reply = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            r = client.get_work(GetWorkRequest {
                worker_id: me.id,
                incarnation: me.incarnation,
            }) => r?.into_inner().reply,
        };
        match reply {
            Some(Reply::Task(task)) => {
                let step = task.step;
                let task_id = task.task_id;
                let started = Instant::now();
                let e = engine.clone();
                let nodes = tokio::task::spawn_blocking(move || compute(&e, &task))
                    .await
                    .map_err(|e| Status::internal(e.to_string()))?
                    .map_err(|e| Status::invalid_argument(e.to_string()))?;
                let compute_ms = started.elapsed().as_millis() as u32;
                let res = client
                    .submit_gradients(SubmitRequest {
                        worker_id: me.id,
                        incarnation: me.incarnation,
                        task_id,
                        step,
                        nodes,
                        compute_ms,
                    })
                    .await;
                match res {
                    Ok(r) if !r.get_ref().accepted => {
                        info!(step, "another copy of this shard answered first")
                    }
                    Ok(_) => {}
                    // The step moved on without us (we were declared lost): just ask again.
                    Err(s) if s.code() == Code::FailedPrecondition => {
                        warn!(step, error = %s.message(), "stale answer dropped")
                    }
                    Err(s) => return Err(s),
                }
            }
            Some(Reply::Wait(_)) | None => {}
            Some(Reply::Shutdown(s)) => {
                info!(reason = s.reason, "job over; exiting");
                return Ok(());
            }
        }
    }
}

/// Computes a task's node gradients.
pub fn compute(engine: &Engine, task: &Task) -> Result<Vec<NodeGradient>, WorkerError> {
    let bad = |m: String| WorkerError::BadTask(m);
    let params = proto::decode_f32(&task.params, engine.param_count())
        .map_err(|e| bad(format!("parameters: {e}")))?;
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
    if nodes
        .iter()
        .any(|n| n.lo < first || n.hi > last || n.lo >= n.hi)
    {
        return Err(bad(format!(
            "nodes {nodes:?} outside leaves {first}..{last}"
        )));
    }
    let grads = engine.gradients(&params, &batches)?;
    let losses: Vec<f64> = grads.iter().map(|g| g.loss_sum).collect();
    let sums =
        common::train::node_sums(first, grads.into_iter().map(|g| g.values).collect(), &nodes)
            .ok_or_else(|| bad("nodes do not tile the leaves".into()))?;
    Ok(nodes
        .iter()
        .zip(sums)
        .map(|(n, sum)| {
            let leaves = (n.lo - first) as usize..(n.hi - first) as usize;
            NodeGradient {
                node: Some(NodeRange { lo: n.lo, hi: n.hi }),
                gradient: proto::encode_f32(&sum).into(),
                loss_sum: losses[leaves].iter().sum(),
            }
        })
        .collect())
}

/// Sends heartbeats until `stop`.
async fn heartbeats(
    mut client: TrainerClient<Channel>,
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
/// quarantine, a gradient it will never accept. Everything else is "try again": a coordinator
/// killed mid-call reaches tonic as Unavailable, Unknown, Internal (a broken pipe, an h2 reset),
/// Cancelled or DeadlineExceeded depending on the moment, and NotFound means a restarted
/// coordinator does not know this worker yet.
fn is_refusal(code: Code) -> bool {
    matches!(
        code,
        Code::InvalidArgument
            | Code::FailedPrecondition
            | Code::PermissionDenied
            | Code::OutOfRange
            | Code::Unimplemented
            | Code::Unauthenticated
    )
}

/// Calls `f` until it succeeds, retrying with exponential backoff and jitter for at most
/// `patience`. Ok(None) on shutdown; a refusal ([`is_refusal`]) is returned at once.
async fn retrying<T, F, Fut>(
    url: &str,
    patience: Duration,
    shutdown: &CancellationToken,
    mut f: F,
) -> Result<Option<T>, WorkerError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, Status>>,
{
    let started = Instant::now();
    let mut delay = Duration::from_millis(100);
    loop {
        let last = match f().await {
            Ok(v) => return Ok(Some(v)),
            Err(s) if is_refusal(s.code()) => {
                return Err(WorkerError::Refused(s.message().to_string()));
            }
            Err(s) => s.message().to_string(),
        };
        if started.elapsed() >= patience {
            return Err(WorkerError::Unreachable {
                url: url.to_string(),
                secs: patience.as_secs_f64(),
                last,
            });
        }
        let jitter = rand::rng().random_range(0.5..1.5);
        let wait = delay
            .mul_f64(jitter)
            .min(patience.saturating_sub(started.elapsed()));
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(None),
            _ = tokio::time::sleep(wait) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(5));
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
