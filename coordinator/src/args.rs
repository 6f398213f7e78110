//! The coordinator's command line (clap): the server's flags and its subcommands.
//!
//! Every flag has an environment fallback (`COORDINATOR_*` for the server's own settings) and a
//! default that works out of the box; [`TrainArgs::validate`] says what to change when a value
//! cannot work.

use clap::{Args, Parser, Subcommand, ValueEnum};
use common::codec::WireFormat;
use common::engine::BackendKind;
use common::model::{ModelKind, ModelSpec, Pool};
use common::train::{LrSchedule, TrainConfig};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Parser)]
#[command(
    name = "coordinator",
    version,
    about = "Parameter server for data-parallel MNIST training",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub train: TrainArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Train (the default when no subcommand is given).
    Train(Box<TrainArgs>),
    /// Print a model's layers with output shapes and parameter counts.
    Summary {
        #[arg(long, default_value = "seed")]
        model: ModelArg,
        #[arg(long, default_value = "max")]
        pool: PoolArg,
    },
    /// Output shape and parameter counts of one convolution layer (TensorFlow padding rules).
    Shape {
        /// Input volume, HxWxD.
        #[arg(long)]
        input: String,
        /// Filter height x width, e.g. 8x8.
        #[arg(long)]
        filter: String,
        #[arg(long, default_value_t = 1)]
        filters: usize,
        #[arg(long, default_value_t = 1)]
        stride: usize,
        /// same, valid, or a number of zeros on each side.
        #[arg(long, default_value = "same")]
        padding: String,
    },
    /// Query a running coordinator's training status.
    Status(StatusArgs),
    /// Create the cluster's TLS material and token in DIR (for --tls-dir): a CA, the
    /// coordinator's server certificate, a worker client certificate, a job token and a
    /// read-only status token. A CA already in DIR (ca.pem, ca.key: your own) is reused.
    Certs(CertsArgs),
    /// Verify the MNIST files in --data-dir (every file's SHA-256), first downloading missing
    /// ones with --download; the Kubernetes init container.
    Mnist(MnistArgs),
    /// List the checkpoints at a URL (by default each job's under ./checkpoints).
    Checkpoints {
        #[arg(
            long,
            env = "COORDINATOR_CHECKPOINT_URL",
            default_value = "./checkpoints"
        )]
        checkpoint_url: String,
    },
}

#[derive(Debug, Args, Clone)]
pub struct StatusArgs {
    #[arg(
        long,
        env = "COORDINATOR_URL",
        default_value = "http://127.0.0.1:50051"
    )]
    pub coordinator: String,
    /// Follow the job with a live progress bar until it ends.
    #[arg(long)]
    pub watch: bool,
    /// Print machine-readable JSON.
    #[arg(long)]
    pub json: bool,
    /// Write an SVG chart of loss and validation accuracy against steps.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Give up after this many seconds without an answer.
    #[arg(long, default_value_t = 10.0)]
    pub timeout_secs: f64,
    #[command(flatten)]
    pub security: proto::transport::SecurityArgs,
}

#[derive(Debug, Args, Clone)]
pub struct CertsArgs {
    /// Directory to write (created if missing; existing certificates and tokens are replaced).
    pub dir: PathBuf,
    /// Extra names or IP addresses for the coordinator's certificate, besides localhost,
    /// 127.0.0.1, ::1, `coordinator` (compose) and the Kubernetes service names.
    #[arg(long = "san", value_name = "NAME")]
    pub sans: Vec<String>,
    /// Kubernetes namespace for the service names in the certificate.
    #[arg(long, default_value = "default")]
    pub namespace: String,
    /// Days the coordinator and worker certificates are valid (the CA: ten years).
    #[arg(long, default_value_t = 365)]
    pub days: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ModelArg {
    Seed,
    Inception,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PoolArg {
    Max,
    Avg,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Preset {
    /// Momentum SGD (lr 0.1, momentum 0.9) decaying linearly to zero over 5 epochs: 99.32%
    /// test accuracy.
    Default,
    /// The lecture's exact hyperparameters: plain gradient descent at lr 0.00001, 10 epochs,
    /// validation on 256 images after every batch, test on 256 images.
    Seed,
}

impl ModelArg {
    pub fn spec(self, pool: PoolArg) -> ModelSpec {
        ModelSpec {
            kind: match self {
                ModelArg::Seed => ModelKind::Seed,
                ModelArg::Inception => ModelKind::Inception,
            },
            pool: match pool {
                PoolArg::Max => Pool::Max,
                PoolArg::Avg => Pool::Avg,
            },
        }
    }
}

/// Where MNIST comes from.
#[derive(Debug, Args, Clone)]
pub struct MnistArgs {
    /// Directory with the MNIST files (gzipped or raw).
    #[arg(long, env = "COORDINATOR_DATA_DIR", default_value = "./data/mnist")]
    pub data_dir: PathBuf,
    /// Download missing MNIST files from `--mnist-mirror` (checksums are always verified).
    #[arg(long, env = "COORDINATOR_DOWNLOAD")]
    pub download: bool,
    #[arg(
        long,
        env = "COORDINATOR_MNIST_MIRROR",
        default_value = "https://storage.googleapis.com/cvdf-datasets/mnist/"
    )]
    pub mnist_mirror: String,
}

/// Flags of a training job.
#[derive(Debug, Args, Clone)]
pub struct TrainArgs {
    /// gRPC address to listen on (port 0 picks a free port; the bound address is logged).
    /// Any address but loopback needs TLS and a token (--tls-dir), or --insecure.
    #[arg(long, env = "COORDINATOR_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// Prometheus text endpoint (`GET /metrics`, over TLS when TLS is configured); port 0
    /// picks one (logged). Any address but loopback needs TLS, or --insecure.
    #[arg(
        long,
        env = "COORDINATOR_METRICS_LISTEN",
        default_value = "127.0.0.1:9090"
    )]
    pub metrics_listen: SocketAddr,
    #[command(flatten)]
    pub security: proto::transport::SecurityArgs,
    #[command(flatten)]
    pub launcher: crate::launcher::LauncherArgs,
    /// Log lines as text or as JSON objects (for log shippers).
    #[arg(long, env = "COORDINATOR_LOG_FORMAT", default_value = "text")]
    pub log_format: common::process::LogFormat,
    /// Allow listening beyond loopback without TLS and a token (anyone who reaches the port
    /// can join the job, read the model and poison it).
    #[arg(long, env = "COORDINATOR_INSECURE")]
    pub insecure: bool,
    /// Live workers at most; more registrations are refused with RESOURCE_EXHAUSTED (the
    /// worker retries). Records of lost workers are pruned beyond the newest 64.
    #[arg(long, env = "COORDINATOR_MAX_WORKERS", default_value_t = 256)]
    pub max_workers: usize,
    /// Serve no metrics endpoint.
    #[arg(long, env = "COORDINATOR_NO_METRICS")]
    pub no_metrics: bool,
    /// Workers to wait for before the first step of a fresh job (a resumed job waits for
    /// --min-workers).
    #[arg(long, env = "COORDINATOR_WORKERS", default_value_t = 2)]
    pub workers: usize,
    /// Training pauses (and says why) while fewer workers than this are live.
    #[arg(long, env = "COORDINATOR_MIN_WORKERS", default_value_t = 1)]
    pub min_workers: usize,
    #[command(flatten)]
    pub mnist: MnistArgs,
    /// Hyperparameter preset; explicit flags override it.
    #[arg(long, env = "COORDINATOR_PRESET", default_value = "default")]
    pub preset: Preset,
    #[arg(long, env = "COORDINATOR_MODEL", default_value = "seed")]
    pub model: ModelArg,
    #[arg(long, env = "COORDINATOR_POOL", default_value = "max")]
    pub pool: PoolArg,
    #[arg(long, env = "COORDINATOR_EPOCHS")]
    pub epochs: Option<u64>,
    /// Stop after this many steps (before the epochs are done).
    #[arg(long, env = "COORDINATOR_MAX_STEPS")]
    pub max_steps: Option<u64>,
    #[arg(long, env = "COORDINATOR_BATCH_SIZE")]
    pub batch_size: Option<usize>,
    /// Images per micro-batch, the unit of work. The batch is cut into batch/micro-batch
    /// leaves, which bounds how many workers one step can use.
    #[arg(long, env = "COORDINATOR_MICRO_BATCH", default_value_t = 32)]
    pub micro_batch: usize,
    #[arg(long, env = "COORDINATOR_LR")]
    pub lr: Option<f32>,
    #[arg(long, env = "COORDINATOR_MOMENTUM")]
    pub momentum: Option<f32>,
    /// How the learning rate moves: linear (from --lr down to zero at the end of the last
    /// epoch; the default preset's) or constant (the seed preset's).
    #[arg(long, env = "COORDINATOR_LR_SCHEDULE")]
    pub lr_schedule: Option<LrSchedule>,
    /// Dropout keep probability of the hidden dense layer.
    #[arg(long, env = "COORDINATOR_KEEP_PROB", default_value_t = 0.75)]
    pub keep_prob: f32,
    #[arg(long, env = "COORDINATOR_SEED", default_value_t = 1)]
    pub seed: u64,
    /// Validate every N steps (and at each epoch end).
    #[arg(long, env = "COORDINATOR_EVAL_EVERY")]
    pub eval_every: Option<u64>,
    /// Tensor backend of the validation and test accuracy: flex (pure Rust) or tch (libtorch,
    /// needs the `tch` build). Workers choose their own.
    #[arg(long, env = "COORDINATOR_BACKEND", default_value = "flex")]
    pub backend: BackendKind,
    /// Device of the validation and test accuracy: cpu, or cuda:N with --backend tch.
    #[arg(long, env = "COORDINATOR_DEVICE", default_value = "cpu")]
    pub device: String,
    /// Validation images used (from the 5,000 held out).
    #[arg(long, env = "COORDINATOR_VALIDATION_SIZE")]
    pub validation_size: Option<usize>,
    /// Test images used for the final accuracy (of 10,000).
    #[arg(long, env = "COORDINATOR_TEST_SIZE")]
    pub test_size: Option<usize>,
    /// Where checkpoints go: a path, file://, s3://bucket/prefix, gs://, az://. Default:
    /// `./checkpoints/<job>`, the job named by its model and a digest of the settings a resume
    /// must share (e.g. `./checkpoints/seed-3f2a9c1e`): the same job started again resumes,
    /// a different one gets a folder of its own.
    #[arg(long, env = "COORDINATOR_CHECKPOINT_URL")]
    pub checkpoint_url: Option<String>,
    /// Checkpoint every N steps (also at each epoch end, at the end and on shutdown); 0: never
    /// periodically.
    #[arg(long, env = "COORDINATOR_CHECKPOINT_EVERY", default_value_t = 200)]
    pub checkpoint_every: u64,
    /// Checkpoints kept; older ones are deleted.
    #[arg(long, env = "COORDINATOR_KEEP_LAST", default_value_t = 3)]
    pub keep_last: usize,
    /// Ignore existing checkpoints and start from scratch.
    #[arg(long, env = "COORDINATOR_FRESH")]
    pub fresh: bool,
    /// Seconds without a heartbeat after which a worker is declared lost.
    #[arg(long, env = "COORDINATOR_HEARTBEAT_TIMEOUT", default_value_t = 5.0)]
    pub heartbeat_timeout: f64,
    /// A shard running this many times longer than its peers is also sent to an idle worker.
    #[arg(long, env = "COORDINATOR_STRAGGLER_FACTOR", default_value_t = 3.0)]
    pub straggler_factor: f64,
    /// Bad submissions after which a worker is quarantined.
    #[arg(long, env = "COORDINATOR_MAX_BAD_INPUTS", default_value_t = 5)]
    pub max_bad_inputs: u32,
    /// Seconds to wait for enough workers before giving up (at start or after losing them).
    #[arg(long, env = "COORDINATOR_WORKER_WAIT", default_value_t = 600.0)]
    pub worker_wait: f64,
    /// Clip each step's mean gradient to this global L2 norm (as PyTorch's `clip_grad_norm_`).
    #[arg(long, env = "COORDINATOR_CLIP_GRAD_NORM")]
    pub clip_grad_norm: Option<f32>,
    /// Refuse a worker's node gradient whose L2 norm per example exceeds this (counted against
    /// the worker, see --max-bad-inputs); 0: no bound.
    #[arg(long, env = "COORDINATOR_MAX_NODE_GRAD_NORM", default_value_t = 1e6)]
    pub max_node_grad_norm: f64,
    /// How parameters and gradients travel: f32 (exact; results do not depend on the number of
    /// workers) or bf16 (half the bytes; each tensor rounded to 3 significant digits in
    /// flight, so results depend slightly on how the batch was shared out). The coordinator's
    /// weights and momentum stay f32 either way.
    #[arg(long, env = "COORDINATOR_WIRE_FORMAT", default_value = "f32")]
    pub wire_format: WireFormat,
    /// Seconds the server stays up after the job ends, so workers hear it is over and status
    /// clients read the outcome (health says NOT_SERVING meanwhile).
    #[arg(long, env = "COORDINATOR_LINGER", default_value_t = 3.0)]
    pub linger: f64,
}

/// The job's resolved settings.
#[derive(Debug, Clone)]
pub struct JobConfig {
    pub train: TrainConfig,
    /// How parameters and gradients travel to and from workers.
    pub wire: WireFormat,
    pub eval_every: u64,
    pub validation_size: usize,
    pub test_size: usize,
}

impl TrainArgs {
    /// Applies the preset under the explicit flags.
    pub fn job(&self) -> JobConfig {
        let lecture = self.preset == Preset::Seed;
        let d = TrainConfig::DEFAULT;
        let train = TrainConfig {
            model: self.model.spec(self.pool),
            batch_size: self.batch_size.unwrap_or(d.batch_size),
            micro_batch: self.micro_batch,
            lr: self.lr.unwrap_or(if lecture { 0.00001 } else { d.lr }),
            momentum: self
                .momentum
                .unwrap_or(if lecture { 0.0 } else { d.momentum }),
            keep_prob: self.keep_prob,
            seed: self.seed,
            epochs: self.epochs.unwrap_or(if lecture { 10 } else { d.epochs }),
            max_steps: self.max_steps,
            clip_grad_norm: self.clip_grad_norm,
            lr_schedule: self.lr_schedule.unwrap_or(if lecture {
                LrSchedule::Constant
            } else {
                d.lr_schedule
            }),
        };
        JobConfig {
            train,
            wire: self.wire_format,
            eval_every: self.eval_every.unwrap_or(if lecture { 1 } else { 100 }),
            validation_size: self.validation_size.unwrap_or(if lecture {
                256
            } else {
                common::mnist::VALIDATION
            }),
            test_size: self.test_size.unwrap_or(if lecture { 256 } else { 10_000 }),
        }
    }

    pub fn heartbeat_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.heartbeat_timeout)
    }

    pub fn worker_wait(&self) -> Duration {
        Duration::from_secs_f64(self.worker_wait)
    }

    pub fn linger(&self) -> Duration {
        Duration::from_secs_f64(self.linger)
    }

    pub fn max_node_grad_norm(&self) -> Option<f64> {
        (self.max_node_grad_norm > 0.0).then_some(self.max_node_grad_norm)
    }

    /// Checks the flags, with messages that say what to change.
    pub fn validate(&self) -> Result<(), String> {
        let job = self.job();
        let t = &job.train;
        let checks = [
            (
                self.workers == 0,
                "--workers must be at least 1".to_string(),
            ),
            (
                self.min_workers == 0,
                "--min-workers must be at least 1".into(),
            ),
            (
                self.max_workers < self.workers.max(self.min_workers),
                "--max-workers must be at least --workers and --min-workers".into(),
            ),
            (
                t.batch_size == 0 || t.batch_size > common::mnist::TRAIN,
                format!(
                    "--batch-size must be between 1 and the {} training images",
                    common::mnist::TRAIN
                ),
            ),
            (
                t.micro_batch == 0 || t.micro_batch > t.batch_size,
                format!(
                    "--micro-batch must be between 1 and the batch size ({})",
                    t.batch_size
                ),
            ),
            (
                !(t.lr.is_finite() && t.lr > 0.0),
                "--lr must be a positive number".into(),
            ),
            (
                !(0.0..1.0).contains(&t.momentum),
                "--momentum must be in [0, 1)".into(),
            ),
            (
                !(t.keep_prob > 0.0 && t.keep_prob <= 1.0),
                "--keep-prob must be in (0, 1]".into(),
            ),
            (t.epochs == 0, "--epochs must be at least 1".into()),
            (
                t.max_steps == Some(0),
                "--max-steps must be at least 1".into(),
            ),
            (
                !(self.heartbeat_timeout.is_finite() && self.heartbeat_timeout > 0.0),
                "--heartbeat-timeout must be a positive number of seconds".into(),
            ),
            (
                !(self.straggler_factor.is_finite() && self.straggler_factor > 1.0),
                "--straggler-factor must be greater than 1".into(),
            ),
            (
                !(self.worker_wait.is_finite() && self.worker_wait > 0.0),
                "--worker-wait must be a positive number of seconds".into(),
            ),
            (
                job.eval_every == 0,
                "--eval-every must be at least 1".into(),
            ),
            (self.keep_last == 0, "--keep-last must be at least 1".into()),
            (
                self.clip_grad_norm
                    .is_some_and(|c| !(c.is_finite() && c > 0.0)),
                "--clip-grad-norm must be a positive number".into(),
            ),
            (
                !(self.max_node_grad_norm.is_finite() && self.max_node_grad_norm >= 0.0),
                "--max-node-grad-norm must be a number >= 0 (0: no bound)".into(),
            ),
            (
                !(self.linger.is_finite() && self.linger >= 0.0),
                "--linger must be a number of seconds >= 0".into(),
            ),
        ];
        match checks.into_iter().find(|(bad, _)| *bad) {
            Some((_, msg)) => Err(msg),
            None => {
                common::engine::device(self.backend, &self.device).map_err(|e| e.to_string())?;
                self.launcher.validate()?;
                message_sizes_fit(t)
            }
        }
    }
}

/// Checks, before any worker joins, that every message this job implies fits the protocol's
/// bound: the largest task (a whole batch of images, when one worker takes every leaf; its
/// parameters follow it in parts) and the largest submission message (one node's gradient).
fn message_sizes_fit(t: &TrainConfig) -> Result<(), String> {
    let params = t.model.param_count();
    let leaves = t.batch_size.div_ceil(t.micro_batch.max(1));
    let task = proto::largest_task_bytes(t.batch_size, leaves);
    let part = proto::largest_submission_part_bytes(params);
    let max = proto::MAX_MESSAGE_BYTES;
    let mb = |b: usize| b as f64 / 1e6;
    if task > max {
        return Err(format!(
            "a task of this job would be {:.1} MB ({} images of 785 bytes), over the {:.1} MB message bound: lower --batch-size",
            mb(task),
            t.batch_size,
            mb(max)
        ));
    }
    if part > max {
        return Err(format!(
            "model {} has {:.1} MB of parameters, over the {:.1} MB message bound",
            t.model,
            mb(params * 4),
            mb(max)
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The message bound never binds for a valid job: the largest task there can be (a batch of
    /// every training image, one image a micro-batch, all to one worker) and the largest model's
    /// gradient fit it.
    #[test]
    fn every_valid_job_fits_the_message_bound() {
        for kind in [ModelKind::Seed, ModelKind::Inception] {
            let t = TrainConfig {
                model: ModelSpec {
                    kind,
                    pool: common::model::Pool::Max,
                },
                batch_size: common::mnist::TRAIN,
                micro_batch: 1,
                ..TrainConfig::DEFAULT
            };
            assert_eq!(message_sizes_fit(&t), Ok(()), "{kind}");
        }
    }
}
