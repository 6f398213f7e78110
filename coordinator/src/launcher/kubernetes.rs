//! The thin layer between [`super::plan`] and the Kubernetes API (kube-rs): finds the
//! coordinator's own pod, builds worker pods, watches them, carries out the plan's actions and
//! deletes the pods when the job is over.
//!
//! Permissions used (deploy/k8s/rbac.yaml): pods get, list, watch, create, delete; pods/log get;
//! jobs get (is the owning Job still there before worker pods are created).

use super::plan::{self, Action, Observed, Phase, Policy, Supervisor};
use super::{LauncherArgs, Setup};
use crate::state::Shared;
use futures::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{
    Capabilities, Container, EmptyDirVolumeSource, EnvVar, EnvVarSource, KeyToPath,
    ObjectFieldSelector, Pod, PodSecurityContext, PodSpec, ResourceRequirements,
    SecretVolumeSource, SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, DeleteParams, ListParams, LogParams, PostParams};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub const NAME_LABEL: &str = "app.kubernetes.io/name";
pub const COMPONENT_LABEL: &str = "app.kubernetes.io/component";
pub const JOB_LABEL: &str = "dtrain.io/job";
pub const SLOT_LABEL: &str = "dtrain.io/slot";
pub const ATTEMPT_LABEL: &str = "dtrain.io/attempt";
/// The worker container's name, also the one a pod template's container must have to be
/// filled in (else its first container is).
pub const WORKER_CONTAINER: &str = "worker";
/// Where a worker pod mounts the job's TLS material and token.
const TLS_MOUNT: &str = "/tls";

/// What the launcher learned at start and keeps for each pod it builds.
pub struct Kubernetes {
    pods: Api<Pod>,
    jobs: Api<Job>,
    template: Pod,
    owner: OwnerReference,
    policy: Policy,
    keep_pods: bool,
}

/// What the worker pods need to join: the coordinator's URL and the job's secret material.
pub struct Join {
    pub url: String,
    /// The Secret with the worker's TLS files and token, and which keys of it to mount.
    pub secret: Option<(String, Vec<&'static str>)>,
}

impl Kubernetes {
    /// Connects with the in-cluster configuration and reads the coordinator's own pod.
    pub async fn connect(args: &LauncherArgs, setup: &Setup) -> anyhow::Result<Self> {
        let client = kube::Client::try_default()
            .await
            .map_err(|e| anyhow::anyhow!("--launcher kubernetes: no cluster configuration: {e}"))?;
        let namespace = args.namespace();
        let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);
        let jobs: Api<Job> = Api::namespaced(client, &namespace);
        let me_name = args.pod_name();
        let me = pods.get(&me_name).await.map_err(|e| {
            anyhow::anyhow!(
                "--launcher kubernetes: cannot read the coordinator's own pod {namespace}/{me_name} (POD_NAME): {e}"
            )
        })?;
        let owner = owner_of(&me)?;
        let job = dns_label(
            args.job_id
                .clone()
                .unwrap_or_else(|| owner.name.clone())
                .as_str(),
        );
        let pod_ip = me.status.as_ref().and_then(|s| s.pod_ip.clone());
        let join = setup.join(args, pod_ip)?;
        let mine = me
            .spec
            .as_ref()
            .and_then(|s| {
                s.containers
                    .iter()
                    .find(|c| c.name == "coordinator")
                    .or(s.containers.first())
            })
            .cloned()
            .unwrap_or_default();
        let image = args
            .worker_image
            .clone()
            .or(mine.image.clone())
            .ok_or_else(|| anyhow::anyhow!("no --worker-image and no image on the own pod"))?;
        let base = match &args.worker_pod_template {
            Some(path) => read_template(path)?,
            None => Pod::default(),
        };
        let template = worker_template(
            base,
            &WorkerSpec {
                image,
                pull_policy: mine.image_pull_policy.clone(),
                cpu: args.worker_cpu.clone(),
                memory: args.worker_memory.clone(),
                gpus: args.worker_gpus,
                join,
                job: job.clone(),
            },
        );
        let policy = Policy {
            job,
            workers: setup.workers,
            min_workers: setup.min_workers,
            max_failures: args.max_worker_pod_failures(setup.workers),
            pending_timeout: Duration::from_secs_f64(args.worker_pending_timeout),
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            stable_after: Duration::from_secs(30),
        };
        info!(
            job = policy.job,
            owner = format!("{}/{}", owner.kind, owner.name),
            workers = setup.workers,
            "launching worker pods (Kubernetes)"
        );
        Ok(Kubernetes {
            pods,
            jobs,
            template,
            owner,
            policy,
            keep_pods: args.keep_worker_pods,
        })
    }

    fn selector(&self) -> String {
        format!("{JOB_LABEL}={},{COMPONENT_LABEL}=worker", self.policy.job)
    }

    /// Watches the job's worker pods and keeps `--workers` of them until `stop`; a job that
    /// cannot go on is failed through `shared` (the driver ends it).
    pub async fn supervise(self: Arc<Self>, shared: Arc<Shared>, stop: CancellationToken) {
        let mut sup = Supervisor::new(self.policy.clone());
        let (reader, writer) = reflector::store();
        let config = watcher::Config::default().labels(&self.selector());
        let stream = watcher(self.pods.clone(), config)
            .default_backoff()
            .reflect(writer);
        let mut stream = std::pin::pin!(stream);
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut said_error = false;
        // Nothing is decided before the first whole list: a restarted coordinator must see the
        // pods it adopts before it creates any.
        let mut listed = false;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                event = stream.next() => match event {
                    Some(Err(e)) if !said_error => {
                        warn!(error = %e, "watching worker pods failed; retrying");
                        said_error = true;
                    }
                    Some(Ok(event)) => {
                        said_error = false;
                        listed |= matches!(event, watcher::Event::InitDone);
                    }
                    _ => {}
                },
                _ = tick.tick() => {}
            }
            if !listed {
                continue;
            }
            // Workers leave (pods succeed) once the job is over: nothing to replace then.
            if shared.core().finished().is_some() {
                return;
            }
            let observed: Vec<Observed> =
                reader.state().iter().filter_map(|p| observe(p)).collect();
            let decision = sup.observe(&observed, Instant::now());
            for (name, why) in &decision.lost {
                warn!(pod = name, "worker pod lost: {why}");
            }
            for (name, why) in &decision.stuck {
                warn!(pod = name, "worker pod stuck: {why}");
            }
            let creates = decision
                .actions
                .iter()
                .any(|a| matches!(a, Action::Create { .. }));
            if creates && let Some(why) = self.owner_going().await {
                // `kubectl delete job`: the garbage collector is deleting the worker pods and
                // this pod; a replacement would only be deleted in turn (or, created while the
                // kubelet tears the others down, linger as Terminating).
                info!("{why}: no worker pod is created any more");
                return;
            }
            for action in decision.actions {
                if let Err(e) = self.act(&action).await {
                    shared.fail_job(e);
                    return;
                }
            }
            shared.set_pods(sup.rows());
            if let Some(why) = decision.fail {
                shared.fail_job(why);
                return;
            }
        }
    }

    /// Why no worker pod may be created any more: the owner (the Job, or the coordinator's own
    /// pod) is gone, replaced by another of the same name, or being deleted. `None` when it
    /// is there, and when that cannot be told (the API is slow, or an older Role lacks `jobs
    /// get`): supervision goes on as before.
    async fn owner_going(&self) -> Option<String> {
        let o = &self.owner;
        let read = async {
            if o.kind == "Job" {
                self.jobs
                    .get_opt(&o.name)
                    .await
                    .map(|j| j.map(|j| j.metadata))
            } else {
                self.pods
                    .get_opt(&o.name)
                    .await
                    .map(|p| p.map(|p| p.metadata))
            }
        };
        let meta = match tokio::time::timeout(Duration::from_secs(10), read).await {
            Ok(Ok(meta)) => meta,
            Ok(Err(e)) => {
                warn!(owner = o.name, error = %e, "cannot read the worker pods' owner");
                return None;
            }
            Err(_) => return None,
        };
        match meta {
            None => Some(format!("{} {} is gone", o.kind, o.name)),
            Some(m) if m.uid.as_deref() != Some(o.uid.as_str()) => {
                Some(format!("{} {} was replaced", o.kind, o.name))
            }
            Some(m) if m.deletion_timestamp.is_some() => {
                Some(format!("{} {} is being deleted", o.kind, o.name))
            }
            Some(_) => None,
        }
    }

    /// Carries out one action. Errors that no retry mends (forbidden, an invalid pod) are
    /// returned; others are logged and the plan asks again.
    async fn act(&self, action: &Action) -> Result<(), String> {
        match action {
            Action::Create { slot, attempt } => {
                let pod = self.pod(*slot, *attempt);
                let name = pod.metadata.name.clone().unwrap_or_default();
                match self.pods.create(&PostParams::default(), &pod).await {
                    Ok(_) => info!(pod = name, slot, "worker pod created"),
                    Err(kube::Error::Api(s)) if s.code == 409 => {}
                    Err(kube::Error::Api(s)) if matches!(s.code, 400 | 403 | 422) => {
                        return Err(format!("cannot create worker pod {name}: {}", s.message));
                    }
                    Err(e) => {
                        warn!(pod = name, error = %e, "creating a worker pod failed; retrying")
                    }
                }
            }
            Action::Delete { name, lost } => {
                if *lost {
                    self.log_tail(name).await;
                }
                match self.pods.delete(name, &DeleteParams::default()).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(s)) if s.code == 404 => {}
                    Err(e) => warn!(pod = name, error = %e, "deleting a worker pod failed"),
                }
            }
        }
        Ok(())
    }

    /// Logs the last lines a lost pod printed (cheap: one short read, bounded in time).
    async fn log_tail(&self, name: &str) {
        let params = LogParams {
            tail_lines: Some(5),
            ..LogParams::default()
        };
        let read = tokio::time::timeout(Duration::from_secs(5), self.pods.logs(name, &params));
        if let Ok(Ok(text)) = read.await {
            for line in text.lines().filter(|l| !l.trim().is_empty()) {
                warn!(pod = name, "  {line}");
            }
        }
    }

    /// The job is over: its worker pods go (unless `--keep-worker-pods`).
    pub async fn clean_up(&self) {
        if self.keep_pods {
            info!("keeping the worker pods (--keep-worker-pods)");
            return;
        }
        let params = ListParams::default().labels(&self.selector());
        let list = self.pods.list(&params);
        let pods = match tokio::time::timeout(Duration::from_secs(10), list).await {
            Ok(Ok(pods)) => pods.items,
            Ok(Err(e)) => {
                warn!(error = %e, "cannot list worker pods to delete them");
                return;
            }
            Err(_) => {
                warn!("listing worker pods timed out; they are left to the garbage collector");
                return;
            }
        };
        for pod in pods {
            let Some(name) = pod.metadata.name else {
                continue;
            };
            let params = DeleteParams::default();
            let delete = self.pods.delete(&name, &params);
            match tokio::time::timeout(Duration::from_secs(10), delete).await {
                Ok(Ok(_)) => info!(pod = name, "worker pod deleted (job over)"),
                Ok(Err(kube::Error::Api(s))) if s.code == 404 => {}
                Ok(Err(e)) => warn!(pod = name, error = %e, "cannot delete worker pod"),
                Err(_) => warn!(pod = name, "deleting worker pod timed out"),
            }
        }
    }

    /// The worker pod of `slot`, attempt `attempt`.
    fn pod(&self, slot: u32, attempt: u32) -> Pod {
        let mut pod = self.template.clone();
        let meta = &mut pod.metadata;
        meta.name = Some(plan::pod_name(&self.policy.job, slot, attempt));
        meta.generate_name = None;
        let labels = meta.labels.get_or_insert_with(BTreeMap::new);
        labels.insert(SLOT_LABEL.into(), slot.to_string());
        labels.insert(ATTEMPT_LABEL.into(), attempt.to_string());
        meta.owner_references = Some(vec![self.owner.clone()]);
        pod
    }
}

/// The owner of the worker pods: the coordinator's Job when a Job runs it (so a re-created
/// coordinator pod finds them and `kubectl delete job` removes them), else its own pod.
fn owner_of(me: &Pod) -> anyhow::Result<OwnerReference> {
    if let Some(job) = me
        .metadata
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true) && o.kind == "Job")
    {
        return Ok(OwnerReference {
            api_version: job.api_version.clone(),
            kind: job.kind.clone(),
            name: job.name.clone(),
            uid: job.uid.clone(),
            controller: None,
            block_owner_deletion: None,
        });
    }
    let (Some(name), Some(uid)) = (me.metadata.name.clone(), me.metadata.uid.clone()) else {
        anyhow::bail!("the coordinator's own pod has no name or uid");
    };
    Ok(OwnerReference {
        api_version: "v1".into(),
        kind: "Pod".into(),
        name,
        uid,
        controller: None,
        block_owner_deletion: None,
    })
}

/// A Kubernetes name part: lowercase alphanumerics and '-', at most 40 characters (the pod
/// name adds `-worker-<slot>-<attempt>`).
pub fn dns_label(s: &str) -> String {
    let mut out: String = s
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    out.truncate(40);
    let out = out.trim_matches('-').to_string();
    if out.is_empty() { "dtrain".into() } else { out }
}

fn read_template(path: &std::path::Path) -> anyhow::Result<Pod> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("--worker-pod-template {}: {e}", path.display()))?;
    serde_saphyr::from_str(&text).map_err(|e| {
        anyhow::anyhow!(
            "--worker-pod-template {}: not a Pod in YAML or JSON: {e}",
            path.display()
        )
    })
}

/// What every worker pod of the job has.
pub struct WorkerSpec {
    pub image: String,
    pub pull_policy: Option<String>,
    pub cpu: String,
    pub memory: String,
    pub gpus: u32,
    pub join: Join,
    pub job: String,
}

fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        value_from: None,
    }
}

/// Whole cores of a CPU quantity ("2", "500m" -> 1), the worker's compute threads.
pub fn cores(cpu: &str) -> u32 {
    let milli = match cpu.strip_suffix('m') {
        Some(m) => m.parse::<f64>().unwrap_or(1000.0),
        None => cpu.parse::<f64>().map_or(1000.0, |c| c * 1000.0),
    };
    ((milli / 1000.0).ceil() as u32).max(1)
}

/// Fills a pod template (the user's, or an empty one) with what the launcher decides: labels,
/// the worker container (image, command, environment, resources, a restrictive security
/// context), the TLS volume. What the template sets itself (node selectors, tolerations,
/// extra arguments, its own resources or security context) is kept.
pub fn worker_template(mut pod: Pod, w: &WorkerSpec) -> Pod {
    let labels = pod.metadata.labels.get_or_insert_with(BTreeMap::new);
    labels.insert(NAME_LABEL.into(), "dtrain".into());
    labels.insert(COMPONENT_LABEL.into(), "worker".into());
    labels.insert(JOB_LABEL.into(), w.job.clone());
    pod.metadata.namespace = None;
    let spec = pod.spec.get_or_insert_with(PodSpec::default);
    // The launcher replaces a failed pod itself, after reading why it failed.
    spec.restart_policy = Some("Never".into());
    spec.automount_service_account_token = Some(false);
    spec.security_context
        .get_or_insert_with(|| PodSecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(10001),
            run_as_group: Some(10001),
            fs_group: Some(10001),
            ..PodSecurityContext::default()
        });
    let i = spec
        .containers
        .iter()
        .position(|c| c.name == WORKER_CONTAINER)
        .unwrap_or(0);
    if spec.containers.is_empty() {
        spec.containers.push(Container::default());
    }
    let c = &mut spec.containers[i];
    c.name = WORKER_CONTAINER.into();
    if c.image.as_deref().is_none_or(str::is_empty) {
        c.image = Some(w.image.clone());
        if c.image_pull_policy.is_none() {
            c.image_pull_policy = w.pull_policy.clone();
        }
    }
    if c.command.is_none() {
        c.command = Some(vec!["worker".into()]);
    }
    // A worker that dies leaves its last log lines in its status: the reason the launcher
    // reports then says what went wrong (a bad flag, a lost device), with no log read.
    c.termination_message_policy
        .get_or_insert_with(|| "FallbackToLogsOnError".into());
    let mut vars = vec![
        env("WORKER_COORDINATOR", &w.join.url),
        env("WORKER_THREADS", cores(&w.cpu).to_string()),
        env("HOME", "/tmp"),
        EnvVar {
            name: "WORKER_NAME".into(),
            value: None,
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector {
                    field_path: "metadata.name".into(),
                    api_version: None,
                }),
                ..EnvVarSource::default()
            }),
        },
    ];
    if w.gpus > 0 {
        vars.push(env("WORKER_BACKEND", "tch"));
        vars.push(env("WORKER_DEVICE", "cuda:0"));
    }
    let mut mounts = vec![VolumeMount {
        name: "tmp".into(),
        mount_path: "/tmp".into(),
        ..VolumeMount::default()
    }];
    let mut volumes = vec![Volume {
        name: "tmp".into(),
        empty_dir: Some(EmptyDirVolumeSource::default()),
        ..Volume::default()
    }];
    if let Some((secret, keys)) = &w.join.secret {
        vars.push(env("DTRAIN_TLS_DIR", TLS_MOUNT));
        // Workers reach the coordinator by IP; its certificate names `coordinator`.
        vars.push(env("DTRAIN_TLS_SERVER_NAME", "coordinator"));
        mounts.push(VolumeMount {
            name: "tls".into(),
            mount_path: TLS_MOUNT.into(),
            read_only: Some(true),
            ..VolumeMount::default()
        });
        volumes.push(Volume {
            name: "tls".into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(secret.clone()),
                // Only the worker's files: never the coordinator's key or the status token.
                items: Some(
                    keys.iter()
                        .map(|k| KeyToPath {
                            key: (*k).into(),
                            path: (*k).into(),
                            mode: None,
                        })
                        .collect(),
                ),
                default_mode: Some(0o440),
                optional: None,
            }),
            ..Volume::default()
        });
    }
    // Ours first: a template's own variables of the same name come later and win.
    let theirs = c.env.take().unwrap_or_default();
    vars.extend(theirs);
    c.env = Some(vars);
    c.volume_mounts.get_or_insert_with(Vec::new).extend(mounts);
    spec.volumes.get_or_insert_with(Vec::new).extend(volumes);
    let c = &mut spec.containers[i];
    if c.resources.is_none() {
        let mut requests = BTreeMap::from([
            ("cpu".to_string(), Quantity(w.cpu.clone())),
            ("memory".to_string(), Quantity(w.memory.clone())),
        ]);
        let mut limits = BTreeMap::from([("memory".to_string(), Quantity(w.memory.clone()))]);
        if w.gpus > 0 {
            limits.insert("nvidia.com/gpu".into(), Quantity(w.gpus.to_string()));
            requests.insert("nvidia.com/gpu".into(), Quantity(w.gpus.to_string()));
        }
        c.resources = Some(ResourceRequirements {
            requests: Some(requests),
            limits: Some(limits),
            ..ResourceRequirements::default()
        });
    }
    c.security_context.get_or_insert_with(|| SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            add: None,
        }),
        ..SecurityContext::default()
    });
    pod
}

/// What the plan needs of a pod; `None` for a pod without our slot labels.
pub fn observe(pod: &Pod) -> Option<Observed> {
    let labels = pod.metadata.labels.as_ref()?;
    let slot = labels.get(SLOT_LABEL)?.parse().ok()?;
    let attempt = labels.get(ATTEMPT_LABEL)?.parse().ok()?;
    let status = pod.status.clone().unwrap_or_default();
    let phase = match status.phase.as_deref() {
        Some("Pending") => Phase::Pending,
        Some("Running") => Phase::Running,
        Some("Succeeded") => Phase::Succeeded,
        Some("Failed") => Phase::Failed,
        _ => Phase::Unknown,
    };
    let containers = status.container_statuses.clone().unwrap_or_default();
    let restarts = containers
        .iter()
        .map(|c| c.restart_count.max(0) as u32)
        .sum();
    Some(Observed {
        name: pod.metadata.name.clone()?,
        slot,
        attempt,
        phase,
        reason: reason(pod),
        restarts,
        deleting: pod.metadata.deletion_timestamp.is_some(),
    })
}

/// Why a pod is not running, in the words of the kubelet or the scheduler: a terminated
/// container's reason and exit code, a waiting container's reason, an eviction, or an
/// unschedulable condition.
pub fn reason(pod: &Pod) -> Option<String> {
    let status = pod.status.as_ref()?;
    let with_message = |reason: &str, message: Option<&String>| match message {
        Some(m) if !m.trim().is_empty() => format!("{reason}: {}", m.trim()),
        _ => reason.to_string(),
    };
    for c in status.container_statuses.iter().flatten() {
        let state = c.state.as_ref();
        if let Some(t) = state.and_then(|s| s.terminated.as_ref()) {
            let what = t.reason.as_deref().unwrap_or("Terminated");
            let text = format!("{what} (exit code {})", t.exit_code);
            return Some(with_message(&text, t.message.as_ref()));
        }
        if let Some(w) = state.and_then(|s| s.waiting.as_ref())
            && let Some(r) = &w.reason
            && r != "ContainerCreating"
        {
            return Some(with_message(r, w.message.as_ref()));
        }
    }
    if let Some(r) = &status.reason {
        return Some(with_message(r, status.message.as_ref()));
    }
    status
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "PodScheduled" && c.status == "False")
        .map(|c| {
            with_message(
                c.reason.as_deref().unwrap_or("Unschedulable"),
                c.message.as_ref(),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{
        ContainerState, ContainerStateTerminated, ContainerStateWaiting, ContainerStatus,
        PodCondition, PodStatus,
    };

    fn spec(secret: bool) -> WorkerSpec {
        WorkerSpec {
            image: "dtrain:latest".into(),
            pull_policy: Some("Never".into()),
            cpu: "1500m".into(),
            memory: "1Gi".into(),
            gpus: 0,
            join: Join {
                url: "https://10.0.0.7:50051".into(),
                secret: secret.then(|| ("dtrain-tls".into(), vec!["ca.pem", "token"])),
            },
            job: "mnist".into(),
        }
    }

    fn env_of(pod: &Pod) -> BTreeMap<String, String> {
        pod.spec.as_ref().unwrap().containers[0]
            .env
            .iter()
            .flatten()
            .filter_map(|e| Some((e.name.clone(), e.value.clone()?)))
            .collect()
    }

    #[test]
    fn a_worker_pod_joins_by_address_with_the_worker_files_only() {
        let pod = worker_template(Pod::default(), &spec(true));
        let labels = pod.metadata.labels.clone().unwrap();
        assert_eq!(labels[COMPONENT_LABEL], "worker");
        assert_eq!(labels[JOB_LABEL], "mnist");
        let env = env_of(&pod);
        assert_eq!(env["WORKER_COORDINATOR"], "https://10.0.0.7:50051");
        assert_eq!(env["WORKER_THREADS"], "2");
        assert_eq!(env["DTRAIN_TLS_SERVER_NAME"], "coordinator");
        let s = pod.spec.unwrap();
        assert_eq!(s.restart_policy.as_deref(), Some("Never"));
        let secret = s.volumes.unwrap()[1].secret.clone().unwrap();
        let keys: Vec<_> = secret.items.unwrap().into_iter().map(|k| k.key).collect();
        assert_eq!(keys, ["ca.pem", "token"]);
        let c = &s.containers[0];
        let sc = c.security_context.clone().unwrap();
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(c.image.as_deref(), Some("dtrain:latest"));
    }

    #[test]
    fn a_template_keeps_its_scheduling_and_arguments_and_gpus_add_the_limit() {
        let template: Pod = serde_saphyr::from_str(
            "spec:\n  nodeSelector: {pool: gpu}\n  containers:\n  - name: worker\n    args: [--max-shard-failures, '5']\n",
        )
        .unwrap();
        let pod = worker_template(
            template,
            &WorkerSpec {
                gpus: 1,
                ..spec(false)
            },
        );
        let s = pod.spec.clone().unwrap();
        assert_eq!(s.node_selector.unwrap()["pool"], "gpu");
        let c = &s.containers[0];
        assert_eq!(c.args.clone().unwrap()[0], "--max-shard-failures");
        let limits = c.resources.clone().unwrap().limits.unwrap();
        assert_eq!(limits["nvidia.com/gpu"].0, "1");
        assert_eq!(env_of(&pod)["WORKER_DEVICE"], "cuda:0");
    }

    fn with_status(status: PodStatus) -> Pod {
        Pod {
            status: Some(status),
            ..Pod::default()
        }
    }

    #[test]
    fn reasons_come_from_the_container_the_eviction_or_the_scheduler() {
        let oom = with_status(PodStatus {
            phase: Some("Failed".into()),
            container_statuses: Some(vec![ContainerStatus {
                state: Some(ContainerState {
                    terminated: Some(ContainerStateTerminated {
                        exit_code: 137,
                        reason: Some("OOMKilled".into()),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }]),
            ..Default::default()
        });
        assert_eq!(reason(&oom).unwrap(), "OOMKilled (exit code 137)");
        let pull = with_status(PodStatus {
            container_statuses: Some(vec![ContainerStatus {
                state: Some(ContainerState {
                    waiting: Some(ContainerStateWaiting {
                        reason: Some("ErrImageNeverPull".into()),
                        message: Some("image dtrain:nope is not present".into()),
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }]),
            ..Default::default()
        });
        assert_eq!(
            reason(&pull).unwrap(),
            "ErrImageNeverPull: image dtrain:nope is not present"
        );
        let evicted = with_status(PodStatus {
            reason: Some("Evicted".into()),
            message: Some("low on memory".into()),
            ..Default::default()
        });
        assert_eq!(reason(&evicted).unwrap(), "Evicted: low on memory");
        let unschedulable = with_status(PodStatus {
            conditions: Some(vec![PodCondition {
                type_: "PodScheduled".into(),
                status: "False".into(),
                reason: Some("Unschedulable".into()),
                message: Some("0/1 nodes are available".into()),
                ..Default::default()
            }]),
            ..Default::default()
        });
        assert_eq!(
            reason(&unschedulable).unwrap(),
            "Unschedulable: 0/1 nodes are available"
        );
    }

    #[test]
    fn names_are_dns_labels_and_cpu_rounds_up_to_threads() {
        assert_eq!(dns_label("My_Job.1"), "my-job-1");
        assert_eq!(dns_label("--"), "dtrain");
        assert_eq!(cores("500m"), 1);
        assert_eq!(cores("2"), 2);
        assert_eq!(cores("2.5"), 3);
    }
}
