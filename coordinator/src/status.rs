//! The `Status` gRPC service: a snapshot of the job and its workers, a stream of snapshots
//! (one per change, rate-limited, ending when the job ends or the client goes away), and the
//! loss/accuracy history for plotting.

use crate::state::{JobState, Shared};
use proto::status_server::Status as StatusApi;
use proto::{
    GetHistoryRequest, GetStatusRequest, HistoryPoint, HistoryReply, StatusReply,
    WatchStatusRequest, WorkerStatus,
};
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

pub struct StatusService {
    shared: Arc<Shared>,
    watchers: Arc<Mutex<Watchers>>,
}

/// `WatchStatus` streams at most per connection and in all; more are refused with
/// RESOURCE_EXHAUSTED (each stream holds a task and a snapshot per update).
pub const MAX_WATCHES_PER_CONNECTION: usize = 4;
pub const MAX_WATCHES: usize = 64;
/// The update rates a watcher may ask for (`max_per_second`, 0 meaning the default 10).
const WATCH_RATES: std::ops::RangeInclusive<f32> = 0.1..=20.0;

/// Open `WatchStatus` streams by connection.
#[derive(Default)]
struct Watchers {
    by_peer: HashMap<String, usize>,
    total: usize,
}

/// One open stream's place; given back when the stream ends.
struct WatchSlot {
    watchers: Arc<Mutex<Watchers>>,
    peer: String,
}

impl Drop for WatchSlot {
    fn drop(&mut self) {
        let mut w = self.watchers.lock().unwrap_or_else(|p| p.into_inner());
        w.total -= 1;
        if let Some(n) = w.by_peer.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                w.by_peer.remove(&self.peer);
            }
        }
    }
}

impl StatusService {
    pub fn new(shared: Arc<Shared>) -> Self {
        StatusService {
            shared,
            watchers: Arc::default(),
        }
    }

    fn take_watch_slot(&self, peer: String) -> Result<WatchSlot, Status> {
        let mut w = self.watchers.lock().unwrap_or_else(|p| p.into_inner());
        let mine = w.by_peer.get(&peer).copied().unwrap_or(0);
        if mine >= MAX_WATCHES_PER_CONNECTION || w.total >= MAX_WATCHES {
            return Err(Status::resource_exhausted(format!(
                "too many WatchStatus streams (at most {MAX_WATCHES_PER_CONNECTION} per connection, {MAX_WATCHES} in all); use GetStatus or retry later"
            )));
        }
        *w.by_peer.entry(peer.clone()).or_default() += 1;
        w.total += 1;
        Ok(WatchSlot {
            watchers: self.watchers.clone(),
            peer,
        })
    }
}

/// Builds the status reply from the shared state.
pub fn snapshot(shared: &Shared) -> StatusReply {
    let now = Instant::now();
    let (workers, live) = {
        let core = shared.core();
        let workers: Vec<WorkerStatus> = core
            .workers()
            .map(|w| WorkerStatus {
                id: w.id,
                address: w.info.address.clone(),
                backend: w.info.backend.clone(),
                device: w.info.device.clone(),
                state: w.state.as_str().to_string(),
                last_heartbeat_secs_ago: now.duration_since(w.last_seen).as_secs_f64(),
                steps_done: w.shards_done,
                mean_step_ms: if w.shards_done == 0 {
                    0.0
                } else {
                    w.busy.as_secs_f64() * 1e3 / w.shards_done as f64
                },
                failures: w.failures,
                name: w.info.name.clone(),
                bad_inputs: w.bad_inputs,
                last_bad_input: w.last_bad_input.clone().unwrap_or_default(),
                shard_failures: w.shard_failures,
                last_failure: w.last_failure.clone().unwrap_or_default(),
                threads: w.info.threads,
            })
            .collect();
        (workers, core.live_workers() as u64)
    };
    let s = shared.status();
    let (state, reason) = match &s.state {
        JobState::WaitingForWorkers(why) => (proto::JobState::WaitingForWorkers, why.clone()),
        JobState::Running => (proto::JobState::Running, String::new()),
        JobState::Checkpointing => (proto::JobState::Checkpointing, String::new()),
        JobState::Finished => (proto::JobState::Finished, String::new()),
        JobState::Failed(why) => (proto::JobState::Failed, why.clone()),
    };
    let progress = if s.total_steps == 0 {
        0.0
    } else {
        s.step as f64 / s.total_steps as f64
    };
    let recent = &s.recent_step_seconds;
    let per_step = (!recent.is_empty()).then(|| recent.iter().sum::<f64>() / recent.len() as f64);
    StatusReply {
        state: state as i32,
        reason,
        epoch: s.epoch + 1,
        step: s.step,
        total_steps: s.total_steps,
        examples_seen: s.examples_seen,
        progress,
        eta_secs: per_step.map(|t| t * s.total_steps.saturating_sub(s.step) as f64),
        last_loss: s.last_loss,
        last_validation_accuracy: s.last_validation_accuracy,
        test_accuracy: s.test_accuracy,
        learning_rate: s.learning_rate,
        images_per_sec: s.images_per_sec,
        workers,
        model: s.model.clone(),
        live_workers: live,
        last_checkpoint: s.last_checkpoint.clone().unwrap_or_default(),
        checkpoint_error: s.checkpoint_error.clone().unwrap_or_default(),
        bytes_sent: s.task_bytes_sent,
        bytes_received: s.gradient_bytes_received,
        bad_inputs: s.bad_inputs,
        warning: s.warning.clone().unwrap_or_default(),
        last_grad_norm: s.last_grad_norm,
        refused_handshakes: shared.refusals.handshakes.load(Ordering::Relaxed),
        refused_calls: shared.refusals.calls.load(Ordering::Relaxed),
        launcher: s.launcher.clone(),
        pods: s
            .pods
            .iter()
            .map(|p| proto::WorkerPod {
                name: p.name.clone(),
                slot: p.slot,
                phase: p.phase.clone(),
                restarts: p.restarts,
                last_reason: p.last_reason.clone(),
            })
            .collect(),
    }
}

fn ended(reply: &StatusReply) -> bool {
    reply.state == proto::JobState::Finished as i32 || reply.state == proto::JobState::Failed as i32
}

type StatusStream = Pin<Box<dyn Stream<Item = Result<StatusReply, Status>> + Send>>;

#[tonic::async_trait]
impl StatusApi for StatusService {
    async fn get_status(
        &self,
        _: Request<GetStatusRequest>,
    ) -> Result<Response<StatusReply>, Status> {
        Ok(Response::new(snapshot(&self.shared)))
    }

    type WatchStatusStream = StatusStream;

    async fn watch_status(
        &self,
        req: Request<WatchStatusRequest>,
    ) -> Result<Response<StatusStream>, Status> {
        let slot = self.take_watch_slot(proto::transport::peer_name(&req))?;
        let rate = req.into_inner().max_per_second;
        let rate = if rate.is_finite() && rate > 0.0 {
            rate.clamp(*WATCH_RATES.start(), *WATCH_RATES.end())
        } else {
            10.0
        };
        let min_gap = Duration::from_secs_f32(1.0 / rate);
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let shared = self.shared.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let mut changed = shared.subscribe();
            let mut last_step = None;
            loop {
                changed.borrow_and_update();
                let reply = snapshot(&shared);
                let done = ended(&reply);
                if last_step != Some((reply.step, reply.state, reply.live_workers)) || done {
                    last_step = Some((reply.step, reply.state, reply.live_workers));
                    // A send error means the client went away: stop.
                    if tx.send(Ok(reply)).await.is_err() || done {
                        return;
                    }
                }
                tokio::time::sleep(min_gap).await;
                // Wake on change, or re-send at least every few seconds (worker heartbeats age).
                let _ = tokio::time::timeout(Duration::from_secs(5), changed.changed()).await;
                if tx.is_closed() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn get_history(
        &self,
        _: Request<GetHistoryRequest>,
    ) -> Result<Response<HistoryReply>, Status> {
        let s = self.shared.status();
        Ok(Response::new(HistoryReply {
            points: s
                .history
                .iter()
                .map(|p| HistoryPoint {
                    step: p.step,
                    loss: p.loss,
                    validation_accuracy: p.validation_accuracy,
                })
                .collect(),
        }))
    }
}
