//! Where the workers come from: the one seam between the training job and whatever starts
//! worker processes. `none`: they come from elsewhere (compose, a script, a person); `kubernetes`:
//! the coordinator creates, supervises and deletes worker pods itself ([`kubernetes`]), with the
//! decisions in the pure [`plan`].
//!
//! `--launcher auto` (the default) picks `kubernetes` in a pod (the in-cluster configuration is
//! present) and `none` elsewhere.

pub mod kubernetes;
pub mod plan;

pub use plan::WorkerPod;

use crate::state::Shared;
use clap::{Args, ValueEnum};
use proto::transport::files;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LauncherKind {
    /// `kubernetes` in a pod, `none` elsewhere.
    Auto,
    /// Workers come from elsewhere.
    None,
    /// The coordinator creates and supervises worker pods (it must run in a pod).
    Kubernetes,
}

/// The launcher's flags (README "Kubernetes").
#[derive(Debug, Args, Clone)]
pub struct LauncherArgs {
    #[arg(long, env = "COORDINATOR_LAUNCHER", default_value = "auto")]
    pub launcher: LauncherKind,
    /// Worker image (default: the coordinator pod's own image).
    #[arg(long, env = "COORDINATOR_WORKER_IMAGE")]
    pub worker_image: Option<String>,
    /// CPU of each worker pod (request; also its compute threads, rounded up).
    #[arg(long, env = "COORDINATOR_WORKER_CPU", default_value = "1")]
    pub worker_cpu: String,
    /// Memory of each worker pod (request and limit).
    #[arg(long, env = "COORDINATOR_WORKER_MEMORY", default_value = "1Gi")]
    pub worker_memory: String,
    /// GPUs per worker pod (`nvidia.com/gpu`); the workers then run `--backend tch --device
    /// cuda:0` (use a worker image with libtorch: deploy/k8s/gpu).
    #[arg(long, env = "COORDINATOR_WORKER_GPUS", default_value_t = 0)]
    pub worker_gpus: u32,
    /// A Pod (YAML or JSON) the worker pods start from: node selectors, tolerations, extra
    /// arguments of the `worker` container, its own resources or security context.
    #[arg(long, env = "COORDINATOR_WORKER_POD_TEMPLATE")]
    pub worker_pod_template: Option<PathBuf>,
    /// The Secret holding the job's TLS files and token (from `coordinator certs`); worker
    /// pods mount only their own files of it. Needed when the coordinator uses TLS or a token.
    #[arg(long, env = "COORDINATOR_WORKER_SECRET")]
    pub worker_secret: Option<String>,
    /// The URL workers reach the coordinator at (default: the Service's ClusterIP from the
    /// `<SERVICE>_SERVICE_HOST` variables Kubernetes injects, which needs no cluster DNS).
    #[arg(long, env = "COORDINATOR_WORKER_URL")]
    pub worker_url: Option<String>,
    /// The coordinator's Service (for the default --worker-url).
    #[arg(
        long,
        env = "COORDINATOR_SERVICE",
        default_value = "dtrain-coordinator"
    )]
    pub service: String,
    /// Worker pod losses after which the job fails (default: twice --workers, at least 3).
    #[arg(long, env = "COORDINATOR_MAX_WORKER_POD_FAILURES")]
    pub max_worker_pod_failures: Option<u32>,
    /// Seconds a worker pod may stay pending (unschedulable, image missing) before the job
    /// fails, or goes on with fewer when --min-workers run.
    #[arg(
        long,
        env = "COORDINATOR_WORKER_PENDING_TIMEOUT",
        default_value_t = 300.0
    )]
    pub worker_pending_timeout: f64,
    /// Leave the worker pods when the job ends (for debugging).
    #[arg(long, env = "COORDINATOR_KEEP_WORKER_PODS")]
    pub keep_worker_pods: bool,
    /// The job's id in worker pod names and labels (default: the coordinator's Job, or pod).
    #[arg(long, env = "COORDINATOR_JOB_ID")]
    pub job_id: Option<String>,
    /// The coordinator's own pod (downward API `metadata.name`; default: the host name).
    #[arg(long, env = "POD_NAME")]
    pub pod_name: Option<String>,
    /// Its namespace (downward API; default: the service account's namespace file).
    #[arg(long, env = "POD_NAMESPACE")]
    pub pod_namespace: Option<String>,
}

const SA_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

impl LauncherArgs {
    /// The launcher this process uses.
    pub fn kind(&self) -> LauncherKind {
        match self.launcher {
            LauncherKind::Auto if in_cluster() => LauncherKind::Kubernetes,
            LauncherKind::Auto => LauncherKind::None,
            k => k,
        }
    }

    pub fn max_worker_pod_failures(&self, workers: u32) -> u32 {
        self.max_worker_pod_failures.unwrap_or((2 * workers).max(3))
    }

    pub fn namespace(&self) -> String {
        self.pod_namespace.clone().unwrap_or_else(|| {
            std::fs::read_to_string(format!("{SA_DIR}/namespace"))
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|_| "default".into())
        })
    }

    pub fn pod_name(&self) -> String {
        self.pod_name.clone().unwrap_or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .map(|s| s.trim().to_string())
                .unwrap_or_default()
        })
    }

    pub fn validate(&self) -> Result<(), String> {
        if !(self.worker_pending_timeout.is_finite() && self.worker_pending_timeout > 0.0) {
            return Err("--worker-pending-timeout must be a positive number of seconds".into());
        }
        if self.max_worker_pod_failures == Some(0) {
            return Err("--max-worker-pod-failures must be at least 1".into());
        }
        Ok(())
    }

    /// The URL worker pods use: --worker-url, else the Service's ClusterIP, else the pod's IP
    /// (which a re-created coordinator does not keep: said in a warning).
    fn worker_url(
        &self,
        scheme: &str,
        pod_ip: Option<String>,
        port: u16,
    ) -> anyhow::Result<String> {
        if let Some(url) = &self.worker_url {
            return Ok(url.clone());
        }
        let var = self.service.to_ascii_uppercase().replace('-', "_");
        let host = std::env::var(format!("{var}_SERVICE_HOST")).ok();
        let svc_port = std::env::var(format!("{var}_SERVICE_PORT_GRPC"))
            .or_else(|_| std::env::var(format!("{var}_SERVICE_PORT")))
            .ok();
        match (host, svc_port, pod_ip) {
            (Some(h), Some(p), _) => Ok(format!("{scheme}://{h}:{p}")),
            (_, _, Some(ip)) => {
                tracing::warn!(
                    service = self.service,
                    "no {var}_SERVICE_HOST: workers use the pod's IP, which a re-created coordinator does not keep (give --worker-url or create the Service first)"
                );
                Ok(format!("{scheme}://{ip}:{port}"))
            }
            _ => anyhow::bail!(
                "cannot tell workers where the coordinator is: no --worker-url, no {var}_SERVICE_HOST, no pod IP"
            ),
        }
    }
}

fn in_cluster() -> bool {
    std::env::var_os("KUBERNETES_SERVICE_HOST").is_some()
        && std::path::Path::new(SA_DIR).join("token").exists()
}

/// A running launcher: `None` starts nothing.
pub enum Launcher {
    None,
    Kubernetes {
        k8s: Arc<kubernetes::Kubernetes>,
        task: JoinHandle<()>,
        stop: CancellationToken,
    },
}

/// What the launcher needs to know of the coordinator's own set-up.
pub struct Setup {
    pub workers: u32,
    pub min_workers: u32,
    pub listen_port: u16,
    /// The coordinator serves TLS (workers then connect with https and the Secret's files).
    pub tls: bool,
    /// The coordinator requires the job token.
    pub token: bool,
}

impl Setup {
    /// How worker pods join: the URL (see [`LauncherArgs::worker_url`]) and, when the
    /// coordinator uses TLS or a token, the keys of the Secret they mount.
    fn join(
        &self,
        args: &LauncherArgs,
        pod_ip: Option<String>,
    ) -> anyhow::Result<kubernetes::Join> {
        let scheme = if self.tls { "https" } else { "http" };
        let mut keys = Vec::new();
        if self.tls {
            keys.extend([files::CA, files::WORKER_CERT, files::WORKER_KEY]);
        }
        if self.token {
            keys.push(files::TOKEN);
        }
        let secret = match (&args.worker_secret, keys.is_empty()) {
            (_, true) => None,
            (Some(s), false) => Some((s.clone(), keys)),
            (None, false) => anyhow::bail!(
                "the coordinator uses TLS or a token: give --worker-secret (the Secret made from `coordinator certs`) so that worker pods can join"
            ),
        };
        Ok(kubernetes::Join {
            url: args.worker_url(scheme, pod_ip, self.listen_port)?,
            secret,
        })
    }
}

impl Launcher {
    /// Starts the launcher `args` choose; worker pods are created right away.
    pub async fn start(
        args: &LauncherArgs,
        setup: Setup,
        shared: Arc<Shared>,
    ) -> anyhow::Result<Launcher> {
        if args.kind() == LauncherKind::None {
            return Ok(Launcher::None);
        }
        let k8s = Arc::new(kubernetes::Kubernetes::connect(args, &setup).await?);
        let stop = CancellationToken::new();
        let task = tokio::spawn(k8s.clone().supervise(shared, stop.clone()));
        Ok(Launcher::Kubernetes { k8s, task, stop })
    }

    /// Stops supervising. When the job is over (finished or failed, not interrupted), the
    /// worker pods are deleted.
    pub async fn stop(self, job_over: bool) {
        if let Launcher::Kubernetes { k8s, task, stop } = self {
            stop.cancel();
            let _ = task.await;
            if job_over {
                k8s.clean_up().await;
            }
        }
    }
}
