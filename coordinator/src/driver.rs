//! The training driver: the one task that owns the parameters. Each step it publishes the batch
//! and parameters, opens a round, waits (with deadlines) for the workers' gradients, opens the
//! next step's round, applies SGD (whose new parameters that round's tasks stream as they are
//! written), starts a validation (off the critical path), checkpoints and reports. Everything a
//! worker does reaches it through the round state machine in [`crate::core`].

use crate::args::JobConfig;
use crate::checkpoint::{CheckpointStore, Metrics};
use crate::loss_watch::LossWatch;
use crate::state::{HistoryPoint, JobState, Shared, StepData, WireParams};
use common::engine::Engine;
use common::mnist::{Mnist, Split};
use common::train::{Batcher, TrainState};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// How often the driver checks heartbeat deadlines.
const TICK: Duration = Duration::from_millis(100);

/// A loss for a message: 4 decimals, or 4 significant digits when it is huge.
fn shown_loss(loss: f64) -> String {
    if loss.abs() < 1e6 {
        format!("{loss:.4}")
    } else {
        format!("{loss:.3e}")
    }
}

/// A validation running on a snapshot of the parameters after `step`.
struct Validation {
    step: u64,
    epoch: u64,
    pos: u64,
    loss: f64,
    task: JoinHandle<Result<f64, common::Error>>,
}

/// How a round ended.
enum Round {
    Done(crate::core::RoundResult),
    Interrupted,
    /// Workers found the step's numbers non-finite; the reason.
    Diverged(String),
    /// The job cannot go on (no worker for too long, or the launcher said so); the reason.
    Failed(String),
}

/// A step whose round was opened before the last step's SGD pass.
struct Opened {
    /// Its batch's size.
    examples: u32,
    /// When its time starts: when the last step's ended.
    clock: Instant,
}

/// How a job ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Finished {
        test_accuracy: f64,
    },
    /// Shut down (SIGTERM/ctrl-c) after checkpointing at `step`.
    Interrupted {
        step: u64,
    },
}

/// Everything the driver needs.
pub struct Driver {
    pub shared: Arc<Shared>,
    pub job: JobConfig,
    pub data: Arc<Mnist>,
    pub engine: Engine,
    pub store: CheckpointStore,
    pub checkpoint_every: u64,
    pub keep_last: usize,
    pub initial_workers: usize,
    pub min_workers: usize,
    pub worker_wait: Duration,
    /// Tell workers to exit when the coordinator is interrupted (false when a launcher keeps
    /// them for the next coordinator to adopt).
    pub release_on_interrupt: bool,
}

impl Driver {
    pub async fn run(
        self,
        mut state: TrainState,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Outcome> {
        let cfg = self.job.train.clone();
        let train = &self.data.train;
        let schedule = cfg.schedule(train.len());
        let total = cfg.total_steps(train.len());
        let leaves = schedule.leaves();
        let validation = Arc::new(
            self.data
                .validation
                .slice(0..self.job.validation_size.min(self.data.validation.len())),
        );
        let mut batcher = Batcher::new(train, schedule);
        let mut pending_save: Option<JoinHandle<()>> = None;
        let mut validating: Option<Validation> = None;
        let mut loss_watch = LossWatch::default();
        // The next step's parameters in wire form, written by the last step's SGD pass (the
        // first step after a start or a resume encodes them itself).
        let mut next_params: Option<WireParams> = None;
        // The next step's round, when it was opened before the last step's SGD pass (see below).
        let mut opened: Option<Opened> = None;
        {
            let mut s = self.shared.status();
            s.total_steps = total;
            s.step = state.step;
        }

        // A fresh job waits for --workers; a resumed one is a running job that lost its
        // coordinator for a moment and goes on with whoever is back (--min-workers), as it
        // would after losing workers: results do not depend on how many there are.
        let first_wait = if state.step == 0 {
            self.initial_workers
        } else {
            self.min_workers
        };
        if !self.wait_for_workers(first_wait, &shutdown).await? {
            return self.interrupt(state, pending_save).await;
        }
        self.set_state(JobState::Running);

        while state.step < total {
            if !self.wait_for_workers(self.min_workers, &shutdown).await? {
                return self.interrupt(state, pending_save).await;
            }
            let step = state.step;
            // The batch size comes from here, never from what workers report.
            let (started, examples) = match opened.take() {
                Some(o) => (o.clock, o.examples),
                None => {
                    let params = next_params
                        .take()
                        .unwrap_or_else(|| WireParams::whole(self.job.wire, &state.params));
                    let examples = self.open_round(step, &mut batcher, params, &leaves);
                    (Instant::now(), examples)
                }
            };

            let result = match self.wait_for_round(&shutdown).await? {
                Round::Done(result) => result,
                Round::Interrupted => return self.interrupt(state, pending_save).await,
                Round::Failed(why) => return self.fail(&why, pending_save).await,
                Round::Diverged(why) => {
                    let last = self.shared.status().last_loss;
                    let loss = last.map_or("unknown".into(), |l| {
                        format!("{} at the step before", shown_loss(l))
                    });
                    return self.diverged(step, &loss, &why, pending_save).await;
                }
            };
            let loss = result.loss_sum / f64::from(examples.max(1));
            if !loss.is_finite() {
                // A non-finite step fails the job; the state is not used (nor saved) again.
                let why = "the loss is not finite";
                return self
                    .diverged(step, &format!("{loss}"), why, pending_save)
                    .await;
            }
            // The next step's round opens before this step's SGD pass, its tasks streaming the
            // parameters part by part as the pass writes them: a worker waits for the larger
            // of the pass and the transfer, not for their sum. (Unless workers are missing:
            // the next step then waits for them first, as the first does.)
            let (writer, params) = WireParams::channel(self.job.wire);
            let live = self.shared.core().live_workers();
            if step + 1 < total && live >= self.min_workers && !shutdown.is_cancelled() {
                let examples = self.open_round(step + 1, &mut batcher, params, &leaves);
                opened = Some(Opened {
                    examples,
                    clock: Instant::now(),
                });
            } else {
                next_params = Some(params);
            }
            let lr = cfg.lr_at(step, schedule.steps_per_epoch());
            let clip = cfg.clip_grad_norm;
            // On a blocking thread, so that the runtime's threads send the parts meanwhile.
            let pass = tokio::task::spawn_blocking(move || {
                let mut writer = writer;
                let applied =
                    state.apply_then(&result.gradient, examples, lr, clip, |p| writer.write(p));
                if applied.is_ok() {
                    writer.finish();
                }
                // The workers' node sums (13 MB each) are not needed past the step.
                drop(result);
                (state, applied)
            });
            let (returned, applied) = match pass.await {
                Ok(done) => done,
                Err(panic) => {
                    let why = format!("the SGD step panicked: {panic}");
                    return self.fail(&why, pending_save).await;
                }
            };
            state = returned;
            // A failed pass drops its writer unfinished: the next step's tasks end ABORTED.
            let grad_norm = match applied {
                Ok(norm) => norm,
                Err(e) => {
                    let why = e.to_string();
                    return self
                        .diverged(step, &shown_loss(loss), &why, pending_save)
                        .await;
                }
            };
            loss_watch.step(loss);
            // Steps are timed back to back (their times add up to the wall time): a next step
            // opened before this one's pass starts its clock when this one stops it.
            let stopped = Instant::now();
            let elapsed = (stopped - started).as_secs_f64();
            if let Some(o) = opened.as_mut() {
                o.clock = stopped;
            }

            let (epoch, pos) = schedule.locate(step);
            let epoch_end = pos + 1 == schedule.steps_per_epoch();
            let last = state.step == total;
            let validate = state.step.is_multiple_of(self.job.eval_every) || epoch_end || last;
            // Validation runs beside the next steps, on a copy of these parameters; one at a
            // time (a new one first waits for the last), each reported when it ends.
            if let Some(v) = validating.take_if(|v| validate || v.task.is_finished()) {
                self.report_validation(v).await?;
            }
            if validate {
                validating = Some(self.validate(&state, &validation, epoch, pos, loss));
            }
            let warning = if validate {
                loss_watch.evaluate()
            } else {
                None
            };
            debug!(step = state.step, loss, grad_norm, "step done");
            {
                let mut s = self.shared.status();
                if validate {
                    if let Some(w) = warning.as_ref().filter(|_| s.warning.is_none()) {
                        warn!(step = state.step, "{w}");
                    }
                    s.warning = warning;
                }
                s.last_grad_norm = Some(grad_norm);
                s.learning_rate = f64::from(lr);
                s.step = state.step;
                s.epoch = epoch;
                s.examples_seen += u64::from(examples);
                s.last_loss = Some(loss);
                if s.recent_step_seconds.len() == crate::state::RECENT_STEPS {
                    s.recent_step_seconds.pop_front();
                }
                s.recent_step_seconds.push_back(elapsed);
                self.shared.metrics.step_seconds.observe(elapsed);
                let rate = f64::from(examples) / elapsed.max(1e-9);
                s.images_per_sec = if s.images_per_sec == 0.0 {
                    rate
                } else {
                    0.9 * s.images_per_sec + 0.1 * rate
                };
                s.history.push(HistoryPoint {
                    step: state.step,
                    loss,
                    // Filled in when this step's validation ends.
                    validation_accuracy: None,
                });
            }
            self.shared.notify();

            let periodic =
                self.checkpoint_every > 0 && state.step.is_multiple_of(self.checkpoint_every);
            if (periodic || epoch_end) && !last {
                // Training goes on while the checkpoint is written; one write at a time.
                if pending_save.as_ref().is_none_or(|h| h.is_finished()) {
                    pending_save = Some(self.spawn_save(state.clone()));
                } else {
                    warn!(
                        step = state.step,
                        "previous checkpoint still being written; skipping this one"
                    );
                }
            }
        }

        // The last step's encoded parameters have no next step.
        drop(next_params);
        if let Some(v) = validating.take() {
            self.report_validation(v).await?;
        }
        let test = self
            .data
            .test
            .slice(0..self.job.test_size.min(self.data.test.len()));
        let test_accuracy = self.spawn_accuracy(&state, Arc::new(test)).await??;
        info!("Testing Accuracy: {test_accuracy:.6}");
        self.shared.status().test_accuracy = Some(test_accuracy);
        if let Some(h) = pending_save.take() {
            let _ = h.await;
        }
        self.set_state(JobState::Checkpointing);
        self.save(&state).await;
        self.set_state(JobState::Finished);
        self.finish("training finished");
        Ok(Outcome::Finished { test_accuracy })
    }

    /// Ends a job whose step `step` (0-based) could not be computed with finite numbers: state
    /// FAILED with the reason, workers told to stop, an error for the exit code. No checkpoint
    /// is written: every one already written holds finite parameters.
    async fn diverged(
        &self,
        step: u64,
        loss: &str,
        detail: &str,
        pending: Option<JoinHandle<()>>,
    ) -> anyhow::Result<Outcome> {
        let why = format!(
            "diverged at step {} (loss {loss}); lower --lr or add --clip-grad-norm ({detail})",
            step + 1
        );
        self.fail(&why, pending).await
    }

    /// Ends a failed job: state FAILED with the reason, workers told to stop, an error for the
    /// exit code. No checkpoint is written (the periodic ones stand).
    async fn fail(&self, why: &str, pending: Option<JoinHandle<()>>) -> anyhow::Result<Outcome> {
        tracing::error!("{why}");
        self.set_state(JobState::Failed(why.to_string()));
        // Workers hear it at once, not after the checkpoint write: the next step's round may be
        // open already (with parameters its failed pass abandoned).
        self.finish(why);
        if let Some(h) = pending {
            let _ = h.await;
        }
        anyhow::bail!(why.to_string())
    }

    /// Publishes step `step`'s batch and `params` and opens its round; the batch's size.
    fn open_round(
        &self,
        step: u64,
        batcher: &mut Batcher<'_>,
        params: WireParams,
        leaves: &[std::ops::Range<usize>],
    ) -> u32 {
        let batch = batcher.batch(step);
        let examples = batch.labels.len() as u32;
        let data = StepData {
            step,
            params,
            batch,
            leaves: leaves.to_vec(),
            seed: self.job.train.seed,
        };
        self.shared.set_step_data(Some(Arc::new(data)));
        self.shared.core().begin_round(step, leaves.len() as u32);
        self.shared.notify();
        examples
    }

    /// Waits until `n` workers are live. False when shut down first; an error past the deadline.
    async fn wait_for_workers(
        &self,
        n: usize,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<bool> {
        let deadline = tokio::time::Instant::now() + self.worker_wait;
        let mut changed = self.shared.subscribe();
        let mut said = false;
        loop {
            if let Some(why) = self.shared.failure() {
                return self.fail(&why, None).await.map(|_| false);
            }
            let live = {
                let mut core = self.shared.core();
                for id in core.tick(Instant::now()) {
                    warn!(worker = id, "worker lost (missed its heartbeat deadline)");
                }
                core.live_workers()
            };
            if live >= n {
                if said {
                    self.set_state(JobState::Running);
                }
                return Ok(true);
            }
            if !said {
                let why = format!("waiting for workers: {live} of {n} live");
                info!("{why}");
                self.set_state(JobState::WaitingForWorkers(why));
                said = true;
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(false),
                _ = tokio::time::sleep_until(deadline) => {
                    let why = format!("gave up after {:?}: only {live} of {n} workers live", self.worker_wait);
                    return self.fail(&why, None).await.map(|_| false);
                }
                _ = changed.changed() => {}
                _ = tokio::time::sleep(TICK) => {}
            }
        }
    }

    /// Waits for the current round's gradients, declaring silent workers lost as it goes.
    async fn wait_for_round(&self, shutdown: &CancellationToken) -> anyhow::Result<Round> {
        let mut changed = self.shared.subscribe();
        let mut starved_since: Option<tokio::time::Instant> = None;
        loop {
            let (result, live) = {
                let mut core = self.shared.core();
                let lost = core.tick(Instant::now());
                for id in &lost {
                    warn!(
                        worker = id,
                        "worker lost (missed its heartbeat deadline); its shard goes to another worker"
                    );
                }
                if let Some(why) = core.divergence() {
                    return Ok(Round::Diverged(why.to_string()));
                }
                if let Some(why) = self.shared.failure() {
                    return Ok(Round::Failed(why));
                }
                (core.take_result(), core.live_workers())
            };
            if let Some(r) = result {
                return Ok(Round::Done(r));
            }
            // With no live worker the round cannot finish: wait for one, within the deadline.
            if live == 0 {
                let since = *starved_since.get_or_insert_with(tokio::time::Instant::now);
                self.set_state(JobState::WaitingForWorkers("no live workers".into()));
                if since.elapsed() > self.worker_wait {
                    return Ok(Round::Failed(format!(
                        "no live worker for {:?}",
                        self.worker_wait
                    )));
                }
            } else if starved_since.take().is_some() {
                self.set_state(JobState::Running);
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(Round::Interrupted),
                _ = changed.changed() => {}
                _ = tokio::time::sleep(TICK) => {}
            }
        }
    }

    /// Starts validating the parameters of `state` (the step `pos` of `epoch`, at `loss`).
    fn validate(
        &self,
        state: &TrainState,
        split: &Arc<Split>,
        epoch: u64,
        pos: u64,
        loss: f64,
    ) -> Validation {
        Validation {
            step: state.step,
            epoch,
            pos,
            loss,
            task: self.spawn_accuracy(state, split.clone()),
        }
    }

    /// Waits for a validation and reports it: the lecture's line, status and history.
    async fn report_validation(&self, v: Validation) -> anyhow::Result<()> {
        let acc = v.task.await??;
        info!(
            "Epoch {:>2}, Batch {:>3} - Loss: {:>10.4} Validation Accuracy: {:.6}",
            v.epoch + 1,
            v.pos + 1,
            v.loss,
            acc
        );
        {
            let mut s = self.shared.status();
            s.last_validation_accuracy = Some(acc);
            if let Some(point) = s.history.iter_mut().rev().find(|p| p.step == v.step) {
                point.validation_accuracy = Some(acc);
            }
        }
        self.shared.notify();
        Ok(())
    }

    /// The accuracy of `state`'s parameters on `split`, computed off the async threads on a
    /// copy of the parameters.
    fn spawn_accuracy(
        &self,
        state: &TrainState,
        split: Arc<Split>,
    ) -> JoinHandle<Result<f64, common::Error>> {
        let engine = self.engine.clone();
        let params = state.params.clone();
        tokio::task::spawn_blocking(move || engine.accuracy(&params, &split))
    }

    fn metrics(&self) -> Metrics {
        let s = self.shared.status();
        Metrics {
            loss: s.last_loss,
            validation_accuracy: s.last_validation_accuracy,
            test_accuracy: s.test_accuracy,
        }
    }

    fn spawn_save(&self, state: TrainState) -> JoinHandle<()> {
        let (store, cfg, shared, keep) = (
            self.store.clone(),
            self.job.train.clone(),
            self.shared.clone(),
            self.keep_last,
        );
        let metrics = self.metrics();
        tokio::spawn(async move { save_with(&store, &cfg, &state, metrics, keep, &shared).await })
    }

    async fn save(&self, state: &TrainState) {
        save_with(
            &self.store,
            &self.job.train,
            state,
            self.metrics(),
            self.keep_last,
            &self.shared,
        )
        .await;
    }

    async fn interrupt(
        &self,
        state: TrainState,
        pending: Option<JoinHandle<()>>,
    ) -> anyhow::Result<Outcome> {
        info!(
            step = state.step,
            "shutting down: writing a checkpoint first"
        );
        if let Some(h) = pending {
            let _ = h.await;
        }
        self.save(&state).await;
        if self.release_on_interrupt {
            self.finish("the coordinator is shutting down");
        } else {
            // The workers keep trying to reconnect; the next coordinator adopts them.
            self.shared.set_step_data(None);
        }
        Ok(Outcome::Interrupted { step: state.step })
    }

    /// Tells workers the job is over (they hear it while the server lingers, see `run`).
    fn finish(&self, why: &str) {
        self.shared.core().finish(why);
        self.shared.set_step_data(None);
        self.shared.notify();
    }

    fn set_state(&self, state: JobState) {
        let changed = {
            let mut s = self.shared.status();
            let changed = s.state != state;
            s.state = state;
            changed
        };
        if changed {
            self.shared.notify();
        }
    }
}

/// Writes one checkpoint; a failure is reported in status, never fatal. Retrying is the store's
/// own policy (object_store's `RetryConfig`, see `checkpoint.rs`), one loop, not two: a
/// checkpoint that still fails is left to the next one.
async fn save_with(
    store: &CheckpointStore,
    cfg: &common::train::TrainConfig,
    state: &TrainState,
    metrics: Metrics,
    keep: usize,
    shared: &Shared,
) {
    match store.save(cfg, state, metrics, keep).await {
        Ok(name) => {
            info!(checkpoint = name, url = store.url(), "checkpoint written");
            let mut s = shared.status();
            s.last_checkpoint = Some(name);
            s.checkpoint_error = None;
        }
        Err(e) => {
            warn!(error = %e, "checkpoint write failed");
            shared.status().checkpoint_error = Some(e.to_string());
        }
    }
}
