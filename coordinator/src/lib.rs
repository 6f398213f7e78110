//! The coordinator: a parameter server that shards MNIST batches over gRPC to workers, reduces
//! their gradients, applies SGD, checkpoints to object storage and serves training status.
//!
//! [`run`] is the whole server, started by the thin `main` on its listener; it returns when
//! training ends (after `--linger`) or `shutdown` is cancelled (after a checkpoint).

pub mod args;
pub mod certs;
pub mod checkpoint;
pub mod core;
pub mod data;
pub mod driver;
pub mod launcher;
pub mod loss_watch;
pub mod metrics;
pub mod plot;
pub mod service;
pub mod state;
pub mod status;
pub mod status_client;
pub mod toolkit;

use crate::args::TrainArgs;
use crate::checkpoint::CheckpointStore;
use crate::core::{Core, CoreConfig};
use crate::driver::{Driver, Outcome};
use crate::launcher::{Launcher, LauncherKind, Setup};
use crate::service::TrainerService;
use crate::state::{JobState, JobStatus, Shared};
use crate::status::StatusService;
use common::engine::Engine;
use common::train::TrainState;
use futures::future::BoxFuture;
use proto::status_server::StatusServer;
use proto::trainer_server::TrainerServer;
use proto::transport::{Guard, Role, ServerSecurity, check_exposure};
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic_health::pb::health_server::HealthServer;
use tracing::info;

/// Runs a training job to its end, serving gRPC on `listener`.
///
/// The future is boxed so that the server's code is generated once, in this crate. Awaited as
/// a plain `async fn`, it would be generated again in every crate that awaits it (the binary,
/// the in-process tests): optimised builds do not share generic code between crates, and an
/// async call tree is instantiated where it is polled. That was about 3.4 minutes of
/// compilation per crate (measured with `cargo build --timings`).
pub fn run(
    args: TrainArgs,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> BoxFuture<'static, anyhow::Result<Outcome>> {
    Box::pin(serve_job(args, listener, shutdown))
}

async fn serve_job(
    args: TrainArgs,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<Outcome> {
    args.validate().map_err(anyhow::Error::msg)?;
    let security = ServerSecurity::new(&args.security.load(Role::Coordinator)?)?;
    let addr = listener.local_addr()?;
    check_exposure("gRPC", addr, security.is_secured(), args.insecure)?;
    let job = args.job();
    let cfg = job.train.clone();
    let data = Arc::new(data::load(&args.mnist).await?);
    info!(
        train = data.train.len(),
        validation = data.validation.len(),
        test = data.test.len(),
        dir = %args.mnist.data_dir.display(),
        "MNIST loaded and verified"
    );
    let engine = Engine::new(cfg.model, args.backend, &args.device, cfg.keep_prob)?;
    info!(engine = ?engine.device(), "validation and test accuracy computed on this engine");

    let checkpoint_url = args
        .checkpoint_url
        .clone()
        .unwrap_or_else(|| format!("./checkpoints/{}", cfg.job_name()));
    let store = CheckpointStore::open(&checkpoint_url)?;
    // Under the Kubernetes launcher a Job re-creates this coordinator when it fails or is
    // deleted, and its worker pods outlive it for the next one to adopt.
    let in_job = args.launcher.kind() == LauncherKind::Kubernetes;
    if in_job && args.fresh {
        store.clear_failed().await?;
    } else if in_job && let Some(why) = store.failed().await? {
        anyhow::bail!(
            "this job failed for good earlier ({why}); fix the cause and start it with --fresh (or delete FAILED at {})",
            store.url()
        );
    }
    let mut state = TrainState::new(&cfg);
    let latest = if args.fresh {
        None
    } else {
        store.load_latest().await?
    };
    if let Some((name, manifest, resumed)) = latest {
        manifest.check_compatible(&name, &cfg)?;
        info!(
            checkpoint = name,
            step = resumed.step,
            url = store.url(),
            "resuming from checkpoint"
        );
        state = resumed;
        let was = &manifest.config;
        if (was.lr, was.lr_schedule) != (cfg.lr, cfg.lr_schedule) {
            info!(
                from = %was.lr,
                to = %cfg.lr,
                schedule = %cfg.lr_schedule,
                "learning rate changed on resume"
            );
        }
    }

    let heartbeat_timeout = args.heartbeat_timeout();
    let core = Core::new(CoreConfig {
        heartbeat_timeout,
        straggler_factor: args.straggler_factor,
        max_bad_inputs: args.max_bad_inputs,
        max_workers: args.max_workers,
    });
    let status = JobStatus {
        state: JobState::WaitingForWorkers("starting".into()),
        model: cfg.model.to_string(),
        step: state.step,
        epoch: 0,
        total_steps: 0,
        examples_seen: 0,
        last_loss: None,
        last_validation_accuracy: None,
        test_accuracy: None,
        learning_rate: f64::from(
            cfg.lr_at(state.step, cfg.schedule(data.train.len()).steps_per_epoch()),
        ),
        images_per_sec: 0.0,
        gradient_bytes_received: 0,
        task_bytes_sent: 0,
        bad_inputs: 0,
        warning: None,
        last_grad_norm: None,
        last_checkpoint: None,
        checkpoint_error: None,
        history: Vec::new(),
        recent_step_seconds: Default::default(),
        launcher: format!("{:?}", args.launcher.kind()).to_lowercase(),
        pods: Vec::new(),
    };
    // Heartbeats come three times per deadline, so one lost packet never costs a worker.
    let interval_ms = (heartbeat_timeout.as_millis() / 3).clamp(50, 5_000) as u32;
    let shared = Shared::new(
        core,
        status,
        &job,
        interval_ms,
        args.max_node_grad_norm(),
        security.refusals.clone(),
    );

    let server_stop = CancellationToken::new();
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<TrainerServer<TrainerService>>().await;
    health.set_serving::<StatusServer<StatusService>>().await;
    let metrics = if args.no_metrics {
        None
    } else {
        let l = TcpListener::bind(args.metrics_listen)
            .await
            .map_err(|e| anyhow::anyhow!("cannot serve metrics on {}: {e}", args.metrics_listen))?;
        let maddr = l.local_addr()?;
        check_exposure("metrics", maddr, security.tls(), args.insecure)?;
        let scheme = if security.tls() { "https" } else { "http" };
        info!("metrics listening on {scheme}://{maddr}/metrics");
        Some(tokio::spawn(metrics::serve(
            shared.clone(),
            security.incoming(l, server_stop.clone()),
            maddr,
            server_stop.clone(),
        )))
    };
    let server = tokio::spawn(serve(
        shared.clone(),
        health_service,
        security.incoming(listener, server_stop.clone()),
        (security.trainer_guard(), security.reader_guard()),
        server_stop.clone(),
    ));
    info!(%addr, security = security.describe(), "coordinator listening on {addr}");

    let launcher = match Launcher::start(
        &args.launcher,
        Setup {
            workers: args.workers as u32,
            min_workers: args.min_workers as u32,
            listen_port: addr.port(),
            tls: security.tls(),
            token: security.has_token(),
        },
        shared.clone(),
    )
    .await
    {
        Ok(l) => l,
        Err(e) => {
            server_stop.cancel();
            return Err(e);
        }
    };

    let driver = Driver {
        shared: shared.clone(),
        job,
        data,
        engine,
        store: store.clone(),
        checkpoint_every: args.checkpoint_every,
        keep_last: args.keep_last,
        initial_workers: args.workers,
        min_workers: args.min_workers,
        worker_wait: args.worker_wait(),
        release_on_interrupt: !in_job,
    };
    let outcome = driver.run(state, shutdown.clone()).await;
    if in_job && let Err(e) = &outcome {
        // The Job would re-create a failed coordinator: the next one must not start over.
        if let Err(mark) = store.mark_failed(&format!("{e:#}")).await {
            tracing::warn!(error = %mark, "cannot record the job's failure");
        }
    }
    let interrupted = matches!(outcome, Ok(Outcome::Interrupted { .. }));
    launcher.stop(!interrupted).await;
    // The job is over: no more training (the overall status and Trainer say NOT_SERVING), but
    // status stays readable while the server lingers.
    health
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    health
        .set_not_serving::<TrainerServer<TrainerService>>()
        .await;
    if shutdown.is_cancelled() {
        // Stopped by a signal: one long-poll period for the live workers to hear it.
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    } else {
        tokio::select! {
            _ = tokio::time::sleep(args.linger()) => {}
            _ = shutdown.cancelled() => {}
        }
    }
    server_stop.cancel();
    let _ = server.await;
    if let Some(m) = metrics {
        let _ = m.await;
    }
    match outcome {
        // A Job re-creates a coordinator that failed, not one that succeeded: exit non-zero
        // so that it does, and the next one resumes and adopts the worker pods.
        Ok(Outcome::Interrupted { step }) if in_job => anyhow::bail!(
            "interrupted at step {step} after a checkpoint; the worker pods are kept for the next coordinator"
        ),
        other => other,
    }
}

/// Serves the Trainer and Status services, health and reflection on the connections of
/// `incoming` until `stop`. Health is open; the rest is behind the security's guards.
async fn serve(
    shared: Arc<Shared>,
    health: HealthServer<impl tonic_health::pb::health_server::Health>,
    incoming: tokio::sync::mpsc::Receiver<proto::transport::Conn>,
    (trainer, reader): (Guard, Guard),
    stop: CancellationToken,
) -> anyhow::Result<()> {
    // Both reflection versions: grpcurl and Python's grpcio-reflection still speak v1alpha only.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let (reflection_v1, reflection_v1alpha) =
        (reflection().build_v1()?, reflection().build_v1alpha()?);
    let max = proto::MAX_MESSAGE_BYTES;
    let incoming =
        tokio_stream::wrappers::ReceiverStream::new(incoming).map(Ok::<_, std::io::Error>);
    proto::transport::server()
        .add_service(health)
        .add_service(InterceptedService::new(reflection_v1, reader.clone()))
        .add_service(InterceptedService::new(reflection_v1alpha, reader.clone()))
        .add_service(InterceptedService::new(
            TrainerServer::new(TrainerService::new(shared.clone()))
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
            trainer,
        ))
        .add_service(InterceptedService::new(
            StatusServer::new(StatusService::new(shared)),
            reader,
        ))
        .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
        .await?;
    Ok(())
}
