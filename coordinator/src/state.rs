//! State shared between the training driver and the gRPC handlers: the round state machine
//! behind a mutex, the current step's data, the job's status, and a watch channel that wakes
//! long-polling handlers and status streams whenever any of it changes.

use crate::core::Core;
use bytes::Bytes;
use common::codec::WireFormat;
use common::mnist::Split;
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::watch;

/// What a task of the current step is built from.
#[derive(Debug)]
pub struct StepData {
    pub step: u64,
    /// Current parameters in wire form (`--wire-format`), encoded once per step: by the last
    /// step's SGD pass, while tasks already stream them.
    pub params: WireParams,
    pub batch: Split,
    /// Batch positions of each leaf.
    pub leaves: Vec<std::ops::Range<usize>>,
    pub seed: u64,
}

/// A step's parameters in wire form, as the parts its tasks stream (see `GetWork`): written
/// part by part, by the last step's SGD pass, while tasks already send the parts written so far.
/// This is the reading half; every task of the step clones it.
#[derive(Debug, Clone)]
pub struct WireParams {
    written: watch::Receiver<Written>,
}

/// The writing half of [`WireParams`]. Dropped before [`ParamsWriter::finish`], it abandons
/// them: their readers get [`Abandoned`] once they have read what was written.
#[derive(Debug)]
pub struct ParamsWriter {
    format: WireFormat,
    written: watch::Sender<Written>,
    /// The part being filled: whole values, at most `part_len` bytes.
    pending: Vec<u8>,
    part_len: usize,
}

/// The parts written so far, and whether they are all.
#[derive(Debug, Default)]
struct Written {
    parts: Vec<Bytes>,
    whole: bool,
}

/// The writer of a step's parameters gave up (its SGD pass failed) before they were whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Abandoned;

impl WireParams {
    /// Parameters yet to be written, in `format`, and their writer.
    pub fn channel(format: WireFormat) -> (ParamsWriter, WireParams) {
        let (tx, rx) = watch::channel(Written::default());
        let part_len =
            proto::TENSOR_PART_BYTES / format.bytes_per_value() * format.bytes_per_value();
        let writer = ParamsWriter {
            format,
            written: tx,
            pending: Vec::with_capacity(part_len),
            part_len,
        };
        (writer, WireParams { written: rx })
    }

    /// `values` in `format`, written at once.
    pub fn whole(format: WireFormat, values: &[f32]) -> Self {
        let (mut writer, params) = Self::channel(format);
        writer.write(values);
        writer.finish();
        params
    }

    /// Part `index` (counted from 0) once it is written; `None` past the last part.
    pub async fn part(&mut self, index: usize) -> Result<Option<Bytes>, Abandoned> {
        loop {
            {
                let written = self.written.borrow_and_update();
                if let Some(part) = written.parts.get(index) {
                    return Ok(Some(part.clone()));
                }
                if written.whole {
                    return Ok(None);
                }
            }
            // An error once the writer is gone and everything it wrote has been seen.
            if self.written.changed().await.is_err() {
                return Err(Abandoned);
            }
        }
    }
}

impl ParamsWriter {
    /// Encodes the next `values`; each part goes out as soon as it is full.
    pub fn write(&mut self, mut values: &[f32]) {
        let width = self.format.bytes_per_value();
        while !values.is_empty() {
            let room = (self.part_len - self.pending.len()) / width;
            let (now, later) = values.split_at(room.min(values.len()));
            common::codec::encode_append(self.format, now, &mut self.pending);
            if self.pending.len() == self.part_len {
                self.send_pending();
            }
            values = later;
        }
    }

    /// Sends the last part: the parameters are whole.
    pub fn finish(mut self) {
        if !self.pending.is_empty() {
            self.send_pending();
        }
        self.written.send_modify(|w| w.whole = true);
    }

    fn send_pending(&mut self) {
        let full = std::mem::replace(&mut self.pending, Vec::with_capacity(self.part_len));
        let part = Bytes::from(full);
        self.written.send_modify(|w| w.parts.push(part));
    }
}

/// The job's lifecycle, as status reports it.
#[derive(Debug, Clone, PartialEq)]
pub enum JobState {
    WaitingForWorkers(String),
    Running,
    Checkpointing,
    Finished,
    Failed(String),
}

/// Steps the ETA averages over.
pub const RECENT_STEPS: usize = 20;

/// One point of the training history.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HistoryPoint {
    pub step: u64,
    pub loss: f64,
    pub validation_accuracy: Option<f64>,
}

/// The job's progress, written by the driver, read by status.
#[derive(Debug, Clone)]
pub struct JobStatus {
    pub state: JobState,
    pub model: String,
    pub step: u64,
    pub epoch: u64,
    pub total_steps: u64,
    pub examples_seen: u64,
    pub last_loss: Option<f64>,
    pub last_validation_accuracy: Option<f64>,
    pub test_accuracy: Option<f64>,
    pub learning_rate: f64,
    pub images_per_sec: f64,
    pub gradient_bytes_received: u64,
    pub task_bytes_sent: u64,
    pub bad_inputs: u64,
    /// A warning about the job's health (a loss blow-up), shown until it clears.
    pub warning: Option<String>,
    /// L2 norm of the last step's mean gradient, before clipping.
    pub last_grad_norm: Option<f64>,
    pub last_checkpoint: Option<String>,
    pub checkpoint_error: Option<String>,
    pub history: Vec<HistoryPoint>,
    /// Wall times of the last [`RECENT_STEPS`] steps (for the ETA).
    pub recent_step_seconds: std::collections::VecDeque<f64>,
    /// The launcher in use (`none`, `kubernetes`).
    pub launcher: String,
    /// The worker pods the launcher keeps, one row per slot.
    pub pods: Vec<crate::launcher::WorkerPod>,
}

/// Everything the handlers and the driver share.
#[derive(Debug)]
pub struct Shared {
    core: Mutex<Core>,
    step_data: Mutex<Option<Arc<StepData>>>,
    status: Mutex<JobStatus>,
    changed: watch::Sender<u64>,
    pub param_count: usize,
    pub model: common::model::ModelSpec,
    pub keep_prob: f32,
    /// How parameters and gradients travel (`--wire-format`).
    pub wire: common::codec::WireFormat,
    pub heartbeat_interval_ms: u32,
    /// `--max-node-grad-norm`: the largest L2 norm per example of a node's gradient taken.
    pub max_node_grad_norm: Option<f64>,
    /// This process's identity for workers (see `RegisterResponse.incarnation`): random, never 0.
    pub incarnation: u64,
    /// Connections and calls the transport refused.
    pub refusals: Arc<proto::transport::Refusals>,
    /// Set when something outside the driver (the launcher) found that the job cannot go on.
    failure: Mutex<Option<String>>,
    /// What the Prometheus endpoint counts as it happens.
    pub metrics: crate::metrics::Metrics,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave these structures half-updated in a way
    // that matters more than stopping would; keep serving.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    pub fn new(
        core: Core,
        status: JobStatus,
        job: &crate::args::JobConfig,
        heartbeat_interval_ms: u32,
        max_node_grad_norm: Option<f64>,
        refusals: Arc<proto::transport::Refusals>,
    ) -> Arc<Self> {
        Arc::new(Shared {
            core: Mutex::new(core),
            step_data: Mutex::new(None),
            status: Mutex::new(status),
            changed: watch::channel(0).0,
            param_count: job.train.model.param_count(),
            model: job.train.model,
            keep_prob: job.train.keep_prob,
            wire: job.wire,
            heartbeat_interval_ms,
            max_node_grad_norm,
            incarnation: rand::random::<u64>() | 1,
            refusals,
            failure: Mutex::new(None),
            metrics: crate::metrics::Metrics::default(),
        })
    }

    pub fn core(&self) -> MutexGuard<'_, Core> {
        lock(&self.core)
    }

    pub fn status(&self) -> MutexGuard<'_, JobStatus> {
        lock(&self.status)
    }

    pub fn step_data(&self) -> Option<Arc<StepData>> {
        lock(&self.step_data).clone()
    }

    pub fn set_step_data(&self, data: Option<Arc<StepData>>) {
        *lock(&self.step_data) = data;
    }

    /// Fails the job from outside the driver; the driver ends it at its next check.
    pub fn fail_job(&self, why: impl Into<String>) {
        lock(&self.failure).get_or_insert(why.into());
        self.notify();
    }

    /// Why the job must end, once [`Shared::fail_job`] said so.
    pub fn failure(&self) -> Option<String> {
        lock(&self.failure).clone()
    }

    pub fn set_pods(&self, pods: Vec<crate::launcher::WorkerPod>) {
        let changed = {
            let mut s = self.status();
            let changed = s.pods != pods;
            s.pods = pods;
            changed
        };
        if changed {
            self.notify();
        }
    }

    /// Wakes everyone waiting for a change.
    pub fn notify(&self) {
        self.changed.send_modify(|v| *v += 1);
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;

    #[tokio::test]
    async fn tasks_read_each_part_once_it_is_written_and_the_end_once_all_are() {
        let (mut writer, params) = WireParams::channel(WireFormat::F32);
        let mut reader = params.clone();
        let part_values = proto::TENSOR_PART_BYTES / 4;
        let values: Vec<f32> = (0..2 * part_values + 3).map(|i| i as f32).collect();
        writer.write(&values[..100]);
        assert_eq!(reader.part(0).now_or_never(), None, "no whole part yet");
        writer.write(&values[100..]);
        let first = reader.part(0).await.unwrap().unwrap();
        let second = reader.part(1).await.unwrap().unwrap();
        assert_eq!(
            (first.len(), second.len()),
            (4 * part_values, 4 * part_values)
        );
        assert_eq!(
            reader.part(2).now_or_never(),
            None,
            "the last part is not full"
        );
        writer.finish();
        let last = reader.part(2).await.unwrap().unwrap();
        assert_eq!(reader.part(3).await, Ok(None));
        let read = [first, second, last].concat();
        assert_eq!(read, common::codec::encode(WireFormat::F32, &values));
        // A task that starts late reads the same parts.
        let mut late = params.clone();
        assert_eq!(
            late.part(2).await,
            Ok(Some(read[8 * part_values..].to_vec().into()))
        );
    }

    #[tokio::test]
    async fn a_writer_that_gives_up_abandons_the_parameters_after_what_it_wrote() {
        let (mut writer, mut reader) = WireParams::channel(WireFormat::Bf16);
        writer.write(&vec![0.0; proto::TENSOR_PART_BYTES / 2 + 1]);
        drop(writer);
        assert!(matches!(reader.part(0).await, Ok(Some(_))));
        assert_eq!(reader.part(1).await, Err(Abandoned));
    }
}
