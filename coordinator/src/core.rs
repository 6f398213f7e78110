//! The coordinator's round logic as a pure state machine: no sockets, no clocks, no tasks.
//! The caller passes `now` into every call and owns time, the network and the disk, so
//! membership, failures, backup shards and late answers are unit-tested with a simulated clock.
//!
//! A round is one SGD step. It cuts the batch's micro-batches ("leaves") into one contiguous
//! shard per live worker. Workers pull shards ([`Core::next_task`]); a worker that stops
//! heartbeating is declared lost by [`Core::tick`] and its shard goes back to the queue; a
//! shard running much longer than its peers is also handed to an idle worker (a backup), and
//! the first answer wins. Because gradients are reduced along the fixed tree of
//! [`common::tree`], who computed a shard never changes the result.

use common::tree::{Node, TreeSum, decompose, partition};
use std::collections::BTreeMap;
use std::ops::Range;
use std::time::{Duration, Instant};

pub type WorkerId = u64;
pub type TaskId = u64;

/// Tunables of the state machine.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    /// A worker not heard from for this long is lost.
    pub heartbeat_timeout: Duration,
    /// A shard running longer than this multiple of the round's typical shard time gets a
    /// backup copy on an idle worker.
    pub straggler_factor: f64,
    /// Bad submissions after which a worker is quarantined.
    pub max_bad_inputs: u32,
    /// Live workers at most; more registrations are refused.
    pub max_workers: usize,
}

/// Records of gone (lost or quarantined) workers kept for status; older ones are pruned, so
/// memory stays flat over a long job whose workers come and go.
pub const KEPT_GONE_WORKERS: usize = 64;

/// What a worker told us about itself at registration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorkerInfo {
    pub name: String,
    pub address: String,
    pub backend: String,
    pub device: String,
    pub threads: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerState {
    Live,
    /// Missed its heartbeat deadline. Comes back to life when heard from again.
    Lost,
    /// Sent bad data too often; refused from then on.
    Quarantined,
}

impl WorkerState {
    pub fn as_str(self) -> &'static str {
        match self {
            WorkerState::Live => "live",
            WorkerState::Lost => "lost",
            WorkerState::Quarantined => "quarantined",
        }
    }
}

/// One worker's record.
#[derive(Debug, Clone)]
pub struct Worker {
    pub id: WorkerId,
    pub info: WorkerInfo,
    pub state: WorkerState,
    pub last_seen: Instant,
    /// Shards whose answer was used.
    pub shards_done: u64,
    pub busy: Duration,
    /// Times declared lost.
    pub failures: u64,
    pub bad_inputs: u32,
    pub last_bad_input: Option<String>,
    /// Shards the worker reported it could not compute, and the last reason.
    pub shard_failures: u64,
    pub last_failure: Option<String>,
}

/// A shard handed to a worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    pub task_id: TaskId,
    pub step: u64,
    pub leaves: Range<u32>,
    /// The tree nodes to return, one gradient each, in this order.
    pub nodes: Vec<Node>,
    pub backup: bool,
}

/// A worker's answer, already decoded and checked for length and finiteness by the caller.
#[derive(Debug, Clone)]
pub struct Submission {
    pub worker: WorkerId,
    pub task_id: TaskId,
    pub step: u64,
    pub nodes: Vec<(Node, Vec<f32>)>,
    pub loss_sum: f64,
}

/// What became of a submission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accepted {
    /// Used for the step.
    Used,
    /// Another copy of the shard (a backup or the original) answered first; dropped.
    Late,
}

/// Why a call was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CoreError {
    #[error("the cluster is full: {0} live workers (--max-workers); retry later")]
    Full(usize),
    #[error("unknown worker id {0} (re-register)")]
    UnknownWorker(WorkerId),
    #[error("worker {0} is quarantined after repeated bad submissions")]
    Quarantined(WorkerId),
    #[error("submission for step {got}, but the current step is {current:?}")]
    StaleStep { got: u64, current: Option<u64> },
    #[error("task {0} was never issued in this step")]
    UnknownTask(TaskId),
    #[error("task {task} belongs to worker {owner}, not {worker}")]
    NotYourTask {
        task: TaskId,
        owner: WorkerId,
        worker: WorkerId,
    },
    #[error("task {0} was already answered by this worker")]
    Duplicate(TaskId),
    /// The worker reported it could not compute the task. Parts of an answer it cancelled may
    /// still reach us after the report (its call's first message can trail the report on the
    /// wire): a race, not bad input.
    #[error("task {0} was given up by this worker (it reported a failure)")]
    GivenUp(TaskId),
    #[error("gradient nodes {got:?} do not match the task's {want:?}")]
    WrongNodes { got: Vec<Node>, want: Vec<Node> },
}

impl CoreError {
    /// Whether this error means the sender sent bad data (counts toward quarantine), as
    /// opposed to an honest race such as a stale step after a restart.
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            CoreError::UnknownTask(_)
                | CoreError::NotYourTask { .. }
                | CoreError::Duplicate(_)
                | CoreError::WrongNodes { .. }
        )
    }
}

#[derive(Debug, Clone)]
struct Shard {
    leaves: Range<u32>,
    nodes: Vec<Node>,
    done: bool,
    /// Copies in flight: (task, worker, started).
    running: Vec<(TaskId, WorkerId, Instant)>,
    /// Workers that reported they could not compute this shard; it goes to others first.
    failed_by: Vec<WorkerId>,
}

#[derive(Debug, Clone, Copy)]
struct Issued {
    shard: usize,
    worker: WorkerId,
    answer: Option<Answer>,
}

/// How a worker answered a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    Gradients,
    /// A failure report: the worker gave the task up.
    GivenUp,
}

#[derive(Debug)]
struct Round {
    step: u64,
    leaves: u32,
    shards: Vec<Shard>,
    issued: BTreeMap<TaskId, Issued>,
    results: BTreeMap<Node, Vec<f32>>,
    loss_sum: f64,
    shard_times: Vec<Duration>,
    /// Workers whose numbers for this step were non-finite or over the norm bound, one entry
    /// per report.
    troubled: Vec<WorkerId>,
    /// Why the step diverged, once numeric trouble is settled.
    diverged: Option<String>,
}

/// A finished step's reduced gradient.
#[derive(Debug, Clone, PartialEq)]
pub struct RoundResult {
    pub step: u64,
    /// Sum over the batch of per-example gradients: the workers' node sums, added along the
    /// tree as the SGD step reads them.
    pub gradient: TreeSum,
    pub loss_sum: f64,
}

/// The state machine.
#[derive(Debug)]
pub struct Core {
    cfg: CoreConfig,
    workers: BTreeMap<WorkerId, Worker>,
    next_worker: WorkerId,
    next_task: TaskId,
    round: Option<Round>,
    /// Typical shard time of the last finished round, the straggler reference before any
    /// shard of the current round has finished.
    typical_shard_time: Option<Duration>,
    /// Set when the job is over: why, as told to workers asking for work.
    finished: Option<String>,
    /// Workers declared lost since the start (a total: records of gone workers are pruned).
    lost_total: u64,
}

impl Core {
    pub fn new(cfg: CoreConfig) -> Self {
        Core {
            cfg,
            workers: BTreeMap::new(),
            next_worker: 1,
            next_task: 1,
            round: None,
            typical_shard_time: None,
            lost_total: 0,
            finished: None,
        }
    }

    /// Adds a live worker, unless `max_workers` are live already.
    pub fn register(&mut self, info: WorkerInfo, now: Instant) -> Result<WorkerId, CoreError> {
        let live = self.live_workers();
        if live >= self.cfg.max_workers {
            return Err(CoreError::Full(live));
        }
        let id = self.next_worker;
        self.next_worker += 1;
        self.workers.insert(
            id,
            Worker {
                id,
                info,
                state: WorkerState::Live,
                last_seen: now,
                shards_done: 0,
                busy: Duration::ZERO,
                failures: 0,
                bad_inputs: 0,
                last_bad_input: None,
                shard_failures: 0,
                last_failure: None,
            },
        );
        Ok(id)
    }

    /// Forgets the oldest gone workers beyond [`KEPT_GONE_WORKERS`].
    fn prune_gone(&mut self) {
        let mut gone: Vec<(Instant, WorkerId)> = self
            .workers
            .values()
            .filter(|w| w.state != WorkerState::Live)
            .map(|w| (w.last_seen, w.id))
            .collect();
        if gone.len() <= KEPT_GONE_WORKERS {
            return;
        }
        gone.sort();
        for (_, id) in &gone[..gone.len() - KEPT_GONE_WORKERS] {
            self.workers.remove(id);
        }
    }

    /// Records that `id` was heard from; a lost worker is live again. Returns true when this
    /// revived a lost worker.
    pub fn touch(&mut self, id: WorkerId, now: Instant) -> Result<bool, CoreError> {
        let w = self
            .workers
            .get_mut(&id)
            .ok_or(CoreError::UnknownWorker(id))?;
        if w.state == WorkerState::Quarantined {
            return Err(CoreError::Quarantined(id));
        }
        let revived = w.state == WorkerState::Lost;
        w.state = WorkerState::Live;
        w.last_seen = now;
        Ok(revived)
    }

    /// Declares silent workers lost and requeues their shards. Returns the newly lost.
    pub fn tick(&mut self, now: Instant) -> Vec<WorkerId> {
        let timeout = self.cfg.heartbeat_timeout;
        let lost: Vec<WorkerId> = self
            .workers
            .values()
            .filter(|w| w.state == WorkerState::Live && now.duration_since(w.last_seen) > timeout)
            .map(|w| w.id)
            .collect();
        for id in &lost {
            if let Some(w) = self.workers.get_mut(id) {
                w.state = WorkerState::Lost;
                w.failures += 1;
            }
            self.abandon_tasks_of(*id);
        }
        self.lost_total += lost.len() as u64;
        if !lost.is_empty() {
            self.prune_gone();
        }
        lost
    }

    /// Marks bad input from `id`; returns true when this quarantined it.
    pub fn record_bad_input(&mut self, id: WorkerId, reason: &str) -> bool {
        let max = self.cfg.max_bad_inputs;
        let Some(w) = self.workers.get_mut(&id) else {
            return false;
        };
        w.bad_inputs += 1;
        w.last_bad_input = Some(reason.to_string());
        if w.bad_inputs >= max && w.state != WorkerState::Quarantined {
            w.state = WorkerState::Quarantined;
            self.abandon_tasks_of(id);
            self.prune_gone();
            return true;
        }
        false
    }

    /// Workers declared lost since the start.
    pub fn lost_total(&self) -> u64 {
        self.lost_total
    }

    pub fn live_workers(&self) -> usize {
        self.workers
            .values()
            .filter(|w| w.state == WorkerState::Live)
            .count()
    }

    pub fn workers(&self) -> impl Iterator<Item = &Worker> {
        self.workers.values()
    }

    /// Starts the round of `step` over `leaves` micro-batches, one shard per live worker.
    pub fn begin_round(&mut self, step: u64, leaves: u32) {
        let root = Node::root(leaves);
        let parts = self.live_workers().max(1) as u32;
        let shards = partition(leaves, parts)
            .into_iter()
            .map(|r| Shard {
                nodes: decompose(root, r.clone()),
                leaves: r,
                done: false,
                running: Vec::new(),
                failed_by: Vec::new(),
            })
            .collect();
        self.round = Some(Round {
            step,
            leaves,
            shards,
            issued: BTreeMap::new(),
            results: BTreeMap::new(),
            loss_sum: 0.0,
            shard_times: Vec::new(),
            troubled: Vec::new(),
            diverged: None,
        });
    }

    pub fn current_step(&self) -> Option<u64> {
        self.round.as_ref().map(|r| r.step)
    }

    /// Tells every later `next_task` that the job is over, and why.
    pub fn finish(&mut self, why: impl Into<String>) {
        self.finished = Some(why.into());
        self.round = None;
    }

    /// Why the job is over, once it is.
    pub fn finished(&self) -> Option<&str> {
        self.finished.as_deref()
    }

    /// Set when workers established that the current step cannot be computed with usable
    /// numbers (see [`Core::numeric_trouble`]): why.
    pub fn divergence(&self) -> Option<&str> {
        self.round.as_ref()?.diverged.as_deref()
    }

    /// The next shard for an idle worker: a pending one, else a backup of a straggler.
    pub fn next_task(
        &mut self,
        id: WorkerId,
        now: Instant,
    ) -> Result<Option<Assignment>, CoreError> {
        self.touch(id, now)?;
        // A worker asking for work holds none: anything still booked to it was abandoned
        // (its submission failed in transit, say).
        self.abandon_tasks_of(id);
        let reference = self.straggler_reference();
        let factor = self.cfg.straggler_factor;
        let live: Vec<WorkerId> = self
            .workers
            .values()
            .filter(|w| w.state == WorkerState::Live)
            .map(|w| w.id)
            .collect();
        let Some(round) = self.round.as_mut() else {
            return Ok(None);
        };
        // A shard a worker could not compute goes to another worker; back to it only when
        // every live worker has failed it.
        let may_take =
            |s: &Shard| !s.failed_by.contains(&id) || live.iter().all(|w| s.failed_by.contains(w));
        let pending = round
            .shards
            .iter()
            .position(|s| !s.done && s.running.is_empty() && may_take(s));
        let backup = || {
            let limit = reference?.mul_f64(factor);
            round.shards.iter().position(|s| {
                !s.done
                    && s.running.len() == 1
                    && s.running
                        .iter()
                        .all(|(_, _, started)| now.duration_since(*started) > limit)
            })
        };
        let (index, is_backup) = match pending {
            Some(i) => (i, false),
            None => match backup() {
                Some(i) => (i, true),
                None => return Ok(None),
            },
        };
        let task_id = self.next_task;
        self.next_task += 1;
        let shard = &mut round.shards[index];
        shard.running.push((task_id, id, now));
        round.issued.insert(
            task_id,
            Issued {
                shard: index,
                worker: id,
                answer: None,
            },
        );
        Ok(Some(Assignment {
            task_id,
            step: round.step,
            leaves: shard.leaves.clone(),
            nodes: shard.nodes.clone(),
            backup: is_backup,
        }))
    }

    /// The cheap checks of an answer, run before any gradient is decoded: the sender is a
    /// live worker, the step is current, the task was issued to it and not yet answered.
    /// Returns the tree nodes the answer must hold, in order.
    pub fn expected_nodes(
        &mut self,
        worker: WorkerId,
        task_id: TaskId,
        step: u64,
        now: Instant,
    ) -> Result<Vec<Node>, CoreError> {
        self.touch(worker, now)?;
        let (round, shard) = open_task(self.round.as_mut(), worker, task_id, step)?;
        Ok(round.shards[shard].nodes.clone())
    }

    /// Records that `worker` could not compute task `task_id`: the shard goes back to the queue,
    /// to another worker first.
    pub fn fail_task(
        &mut self,
        worker: WorkerId,
        task_id: TaskId,
        step: u64,
        reason: &str,
        now: Instant,
    ) -> Result<(), CoreError> {
        self.touch(worker, now)?;
        let (round, index) = open_task(self.round.as_mut(), worker, task_id, step)?;
        round.answered(task_id, Answer::GivenUp);
        let shard = &mut round.shards[index];
        shard.running.retain(|(t, _, _)| *t != task_id);
        if !shard.failed_by.contains(&worker) {
            shard.failed_by.push(worker);
        }
        if let Some(w) = self.workers.get_mut(&worker) {
            w.shard_failures += 1;
            w.last_failure = Some(reason.to_string());
        }
        Ok(())
    }

    /// Records that `worker`'s numbers for the current step were unusable (non-finite, or a
    /// gradient over the norm bound). From one worker that may be a sick device or a poisoner;
    /// from two workers in the same step, or twice from the only live worker, it is the model:
    /// the step diverged (see [`Core::divergence`]).
    pub fn numeric_trouble(&mut self, worker: WorkerId, step: u64, reason: &str) {
        let live = self.live_workers();
        if let Some(round) = self.round.as_mut().filter(|r| r.step == step) {
            round.note_trouble(worker, live, reason);
        }
    }

    /// Accepts a worker's answer for a shard.
    pub fn submit(&mut self, sub: Submission, now: Instant) -> Result<Accepted, CoreError> {
        self.touch(sub.worker, now)?;
        let (round, index) = open_task(self.round.as_mut(), sub.worker, sub.task_id, sub.step)?;
        let shard = &mut round.shards[index];
        let got: Vec<Node> = sub.nodes.iter().map(|(n, _)| *n).collect();
        if got != shard.nodes {
            return Err(CoreError::WrongNodes {
                got,
                want: shard.nodes.clone(),
            });
        }
        round.answered(sub.task_id, Answer::Gradients);
        let shard = &mut round.shards[index];
        let started = shard
            .running
            .iter()
            .find(|(t, _, _)| *t == sub.task_id)
            .map(|(_, _, s)| *s);
        shard.running.retain(|(t, _, _)| *t != sub.task_id);
        if shard.done {
            return Ok(Accepted::Late);
        }
        shard.done = true;
        // The other copy, if any, will arrive late and be dropped.
        shard.running.clear();
        let elapsed = started.map_or(Duration::ZERO, |s| now.duration_since(s));
        round.shard_times.push(elapsed);
        round.results.extend(sub.nodes);
        round.loss_sum += sub.loss_sum;
        if let Some(w) = self.workers.get_mut(&sub.worker) {
            w.shards_done += 1;
            w.busy += elapsed;
        }
        Ok(Accepted::Used)
    }

    /// Whether every shard of the current round has an answer.
    pub fn round_complete(&self) -> bool {
        self.round
            .as_ref()
            .is_some_and(|r| r.shards.iter().all(|s| s.done))
    }

    /// Shards of the current round still without an answer.
    pub fn pending_shards(&self) -> usize {
        self.round
            .as_ref()
            .map_or(0, |r| r.shards.iter().filter(|s| !s.done).count())
    }

    /// Ends a complete round, reducing its gradients along the tree.
    pub fn take_result(&mut self) -> Option<RoundResult> {
        if !self.round_complete() {
            return None;
        }
        let mut round = self.round.take()?;
        round.shard_times.sort();
        self.typical_shard_time = round.shard_times.get(round.shard_times.len() / 2).copied();
        let gradient = TreeSum::new(Node::root(round.leaves), std::mem::take(&mut round.results))?;
        Some(RoundResult {
            step: round.step,
            gradient,
            loss_sum: round.loss_sum,
        })
    }

    fn straggler_reference(&self) -> Option<Duration> {
        let round = self.round.as_ref()?;
        let mut times = round.shard_times.clone();
        times.sort();
        times
            .get(times.len() / 2)
            .copied()
            .or(self.typical_shard_time)
    }

    fn abandon_tasks_of(&mut self, id: WorkerId) {
        if let Some(round) = self.round.as_mut() {
            for shard in &mut round.shards {
                shard.running.retain(|(_, w, _)| *w != id);
            }
        }
    }
}

impl Round {
    fn note_trouble(&mut self, worker: WorkerId, live: usize, reason: &str) {
        self.troubled.push(worker);
        let mut distinct = self.troubled.clone();
        distinct.sort_unstable();
        distinct.dedup();
        let settled = distinct.len() >= 2 || (self.troubled.len() >= 2 && live <= 1);
        if settled && self.diverged.is_none() {
            let who = match distinct.len() {
                1 => "the only live worker, twice".to_string(),
                n => format!("{n} workers"),
            };
            self.diverged = Some(format!("{who}: {reason}"));
        }
    }

    fn answered(&mut self, task: TaskId, answer: Answer) {
        if let Some(issued) = self.issued.get_mut(&task) {
            issued.answer = Some(answer);
        }
    }
}

/// Checks that `task` of `step` is open for an answer from `worker`: the round is that step's,
/// the task was issued to that worker and not answered yet. Returns the round and the shard.
fn open_task(
    round: Option<&mut Round>,
    worker: WorkerId,
    task: TaskId,
    step: u64,
) -> Result<(&mut Round, usize), CoreError> {
    let round = match round {
        Some(r) if r.step == step => r,
        other => {
            return Err(CoreError::StaleStep {
                got: step,
                current: other.map(|r| r.step),
            });
        }
    };
    let issued = round
        .issued
        .get(&task)
        .ok_or(CoreError::UnknownTask(task))?;
    if issued.worker != worker {
        return Err(CoreError::NotYourTask {
            task,
            owner: issued.worker,
            worker,
        });
    }
    match issued.answer {
        Some(Answer::GivenUp) => return Err(CoreError::GivenUp(task)),
        Some(Answer::Gradients) => return Err(CoreError::Duplicate(task)),
        None => {}
    }
    let shard = issued.shard;
    Ok((round, shard))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    fn core() -> Core {
        Core::new(CoreConfig {
            heartbeat_timeout: 3 * SECOND,
            straggler_factor: 3.0,
            max_bad_inputs: 3,
            max_workers: 8,
        })
    }

    #[test]
    fn a_full_cluster_refuses_registrations_until_a_worker_is_lost() {
        let mut c = core();
        let t0 = Instant::now();
        for _ in 0..8 {
            c.register(WorkerInfo::default(), t0).unwrap();
        }
        assert!(matches!(
            c.register(WorkerInfo::default(), t0),
            Err(CoreError::Full(8))
        ));
        assert_eq!(c.tick(t0 + 4 * SECOND).len(), 8);
        assert!(c.register(WorkerInfo::default(), t0 + 4 * SECOND).is_ok());
    }

    #[test]
    fn records_of_gone_workers_stay_bounded() {
        let mut c = core();
        let mut t = Instant::now();
        // 1,000 workers that register and vanish, eight at a time.
        for _ in 0..125 {
            for _ in 0..8 {
                c.register(WorkerInfo::default(), t).unwrap();
            }
            t += 4 * SECOND;
            c.tick(t);
        }
        assert_eq!(c.workers().count(), KEPT_GONE_WORKERS);
        // The newest are kept.
        let newest = c.workers().map(|w| w.id).max().unwrap();
        assert_eq!(newest, 1000);
        assert_eq!(c.live_workers(), 0);
    }

    fn answer(a: &Assignment, worker: WorkerId) -> Submission {
        Submission {
            worker,
            task_id: a.task_id,
            step: a.step,
            nodes: a
                .nodes
                .iter()
                .map(|&n| (n, vec![(n.hi - n.lo) as f32]))
                .collect(),
            loss_sum: 1.0,
        }
    }

    fn cluster(n: usize, t0: Instant) -> (Core, Vec<WorkerId>) {
        let mut c = core();
        let ids = (0..n)
            .map(|_| c.register(WorkerInfo::default(), t0).unwrap())
            .collect();
        (c, ids)
    }

    #[test]
    fn a_round_splits_the_batch_across_live_workers_and_sums_it() {
        let t0 = Instant::now();
        let (mut c, ids) = cluster(2, t0);
        c.begin_round(0, 4);
        let a = c.next_task(ids[0], t0).unwrap().unwrap();
        let b = c.next_task(ids[1], t0).unwrap().unwrap();
        assert_eq!((a.leaves.clone(), b.leaves.clone()), (0..2, 2..4));
        assert_eq!(c.submit(answer(&a, ids[0]), t0), Ok(Accepted::Used));
        assert!(!c.round_complete());
        assert_eq!(c.submit(answer(&b, ids[1]), t0), Ok(Accepted::Used));
        let r = c.take_result().unwrap();
        assert_eq!(r.gradient.to_vec(), vec![4.0]);
    }

    #[test]
    fn a_silent_worker_is_lost_right_after_its_deadline_and_not_before() {
        let t0 = Instant::now();
        let (mut c, ids) = cluster(1, t0);
        assert!(c.tick(t0 + 3 * SECOND).is_empty());
        assert_eq!(c.tick(t0 + 3 * SECOND + SECOND / 1000), vec![ids[0]]);
        assert_eq!(c.lost_total(), 1);
    }

    #[test]
    fn a_worker_lost_during_a_step_has_its_shard_redone_by_another() {
        let t0 = Instant::now();
        let (mut c, ids) = cluster(2, t0);
        c.begin_round(0, 4);
        let a = c.next_task(ids[0], t0).unwrap().unwrap();
        let b = c.next_task(ids[1], t0).unwrap().unwrap();
        c.submit(answer(&a, ids[0]), t0 + SECOND).unwrap();
        // Worker 1 keeps heartbeating; worker 2 goes silent.
        c.touch(ids[0], t0 + 3 * SECOND).unwrap();
        assert_eq!(c.tick(t0 + 4 * SECOND), vec![ids[1]]);
        let redo = c.next_task(ids[0], t0 + 4 * SECOND).unwrap().unwrap();
        assert_eq!(redo.leaves, b.leaves);
        c.submit(answer(&redo, ids[0]), t0 + 5 * SECOND).unwrap();
        assert_eq!(c.take_result().unwrap().gradient.to_vec(), vec![4.0]);
        // The lost worker's late answer is refused as stale; no step is applied twice.
        assert!(matches!(
            c.submit(answer(&b, ids[1]), t0 + 6 * SECOND),
            Err(CoreError::StaleStep { .. })
        ));
    }

    #[test]
    fn losing_the_last_worker_keeps_the_shard_until_someone_joins() {
        let t0 = Instant::now();
        let (mut c, ids) = cluster(1, t0);
        c.begin_round(0, 4);
        let _ = c.next_task(ids[0], t0).unwrap().unwrap();
        c.tick(t0 + 4 * SECOND);
        assert_eq!(c.live_workers(), 0);
        assert_eq!(c.pending_shards(), 1);
        let newcomer = c.register(WorkerInfo::default(), t0 + 5 * SECOND).unwrap();
        let a = c.next_task(newcomer, t0 + 5 * SECOND).unwrap().unwrap();
        assert_eq!(a.leaves, 0..4);
        c.submit(answer(&a, newcomer), t0 + 6 * SECOND).unwrap();
        assert!(c.round_complete());
    }

    #[test]
    fn a_worker_joining_mid_step_gets_work_once_some_is_free() {
        let t0 = Instant::now();
        let (mut c, ids) = cluster(1, t0);
        c.begin_round(0, 4);
        let a = c.next_task(ids[0], t0).unwrap().unwrap();
        let late = c.register(WorkerInfo::default(), t0).unwrap();
        // Nothing pending and no straggler reference yet: the newcomer waits.
        assert_eq!(c.next_task(late, t0).unwrap(), None);
        c.submit(answer(&a, ids[0]), t0 + SECOND).unwrap();
        c.take_result().unwrap();
        // Next step is cut for both.
        c.begin_round(1, 4);
        assert!(c.next_task(ids[0], t0).unwrap().is_some());
        assert!(c.next_task(late, t0).unwrap().is_some());
    }

    #[test]
    fn a_backup_shard_wins_and_the_late_original_is_dropped() {
        let t0 = Instant::now();
        let (mut c, ids) = cluster(2, t0);
        c.begin_round(0, 4);
        let fast = c.next_task(ids[0], t0).unwrap().unwrap();
        let slow = c.next_task(ids[1], t0).unwrap().unwrap();
        c.submit(answer(&fast, ids[0]), t0 + SECOND).unwrap();
        // Below 3x the typical 1 s: no backup yet.
        c.touch(ids[1], t0 + 2 * SECOND).unwrap();
        assert_eq!(c.next_task(ids[0], t0 + 2 * SECOND).unwrap(), None);
        c.touch(ids[1], t0 + 4 * SECOND).unwrap();
        let backup = c.next_task(ids[0], t0 + 4 * SECOND).unwrap().unwrap();
        assert!(backup.backup);
        assert_eq!(backup.leaves, slow.leaves);
        assert_eq!(
            c.submit(answer(&backup, ids[0]), t0 + 5 * SECOND),
            Ok(Accepted::Used)
        );
        assert_eq!(
            c.submit(answer(&slow, ids[1]), t0 + 5 * SECOND),
            Ok(Accepted::Late)
        );
        assert_eq!(c.take_result().unwrap().gradient.to_vec(), vec![4.0]);
    }

    #[test]
    fn a_duplicate_answer_is_refused_and_counted() {
        let t0 = Instant::now();
        let (mut c, ids) = cluster(2, t0);
        c.begin_round(0, 4);
        let a = c.next_task(ids[0], t0).unwrap().unwrap();
        c.submit(answer(&a, ids[0]), t0).unwrap();
        let err = c.submit(answer(&a, ids[0]), t0).unwrap_err();
        assert_eq!(err, CoreError::Duplicate(a.task_id));
        assert!(err.is_bad_input());
    }

    #[test]
    fn answers_for_unknown_tasks_workers_and_steps_are_refused() {
        let t0 = Instant::now();
        let (mut c, ids) = cluster(2, t0);
        c.begin_round(5, 4);
        let a = c.next_task(ids[0], t0).unwrap().unwrap();
        let mut s = answer(&a, ids[0]);
        s.worker = 99;
        assert_eq!(c.submit(s, t0), Err(CoreError::UnknownWorker(99)));
        let mut s = answer(&a, ids[0]);
        s.step = 4;
        assert!(matches!(
            c.submit(s, t0),
            Err(CoreError::StaleStep { got: 4, .. })
        ));
        let mut s = answer(&a, ids[1]);
        s.worker = ids[1];
        assert!(matches!(
            c.submit(s, t0),
            Err(CoreError::NotYourTask { .. })
        ));
        let mut s = answer(&a, ids[0]);
        s.nodes.pop();
        assert!(matches!(c.submit(s, t0), Err(CoreError::WrongNodes { .. })));
    }

    #[test]
    fn a_worker_that_keeps_sending_bad_data_is_quarantined() {
        let t0 = Instant::now();
        let (mut c, ids) = cluster(1, t0);
        assert!(!c.record_bad_input(ids[0], "NaN"));
        assert!(!c.record_bad_input(ids[0], "NaN"));
        assert!(c.record_bad_input(ids[0], "NaN"));
        assert_eq!(c.next_task(ids[0], t0), Err(CoreError::Quarantined(ids[0])));
        assert_eq!(c.live_workers(), 0);
    }

    #[test]
    fn a_lost_worker_heard_from_again_is_live() {
        let t0 = Instant::now();
        let (mut c, ids) = cluster(1, t0);
        c.tick(t0 + 10 * SECOND);
        assert_eq!(c.live_workers(), 0);
        c.touch(ids[0], t0 + 11 * SECOND).unwrap();
        assert_eq!(c.live_workers(), 1);
    }

    #[test]
    fn a_shard_a_worker_could_not_compute_goes_to_another_in_the_same_step() {
        let t0 = Instant::now();
        let (mut c, ids) = cluster(2, t0);
        c.begin_round(0, 4);
        let a = c.next_task(ids[0], t0).unwrap().unwrap();
        let b = c.next_task(ids[1], t0).unwrap().unwrap();
        c.fail_task(ids[0], a.task_id, 0, "out of memory", t0)
            .unwrap();
        // The failing worker is not handed the same shard while another can take it...
        assert_eq!(c.next_task(ids[0], t0).unwrap(), None);
        c.submit(answer(&b, ids[1]), t0).unwrap();
        let redo = c.next_task(ids[1], t0).unwrap().unwrap();
        assert_eq!(redo.leaves, a.leaves);
        // ...and an answer to the failed task is refused as given up, which is no bad input
        // (the parts of a cancelled answer can trail the report on the wire).
        let late = c.submit(answer(&a, ids[0]), t0);
        assert_eq!(late, Err(CoreError::GivenUp(a.task_id)));
        assert!(!late.unwrap_err().is_bad_input());
        c.submit(answer(&redo, ids[1]), t0).unwrap();
        assert_eq!(c.take_result().unwrap().gradient.to_vec(), vec![4.0]);
        let w = c.workers().find(|w| w.id == ids[0]).unwrap();
        assert_eq!(w.shard_failures, 1);
        assert_eq!(w.last_failure.as_deref(), Some("out of memory"));
        assert_eq!(c.divergence(), None);
    }

    #[test]
    fn the_only_worker_gets_back_a_shard_it_failed() {
        let t0 = Instant::now();
        let (mut c, ids) = cluster(1, t0);
        c.begin_round(0, 4);
        let a = c.next_task(ids[0], t0).unwrap().unwrap();
        c.fail_task(ids[0], a.task_id, 0, "oops", t0).unwrap();
        assert_eq!(c.next_task(ids[0], t0).unwrap().unwrap().leaves, a.leaves);
    }

    /// A worker's report of a non-finite loss, as the service records it.
    fn non_finite(c: &mut Core, worker: WorkerId, a: &Assignment, t0: Instant) {
        c.fail_task(worker, a.task_id, a.step, "NaN loss", t0)
            .unwrap();
        c.numeric_trouble(worker, a.step, "NaN loss");
    }

    #[test]
    fn non_finite_numbers_from_two_workers_mean_the_model_diverged() {
        let t0 = Instant::now();
        let (mut c, ids) = cluster(2, t0);
        c.begin_round(7, 4);
        let a = c.next_task(ids[0], t0).unwrap().unwrap();
        let b = c.next_task(ids[1], t0).unwrap().unwrap();
        non_finite(&mut c, ids[0], &a, t0);
        // One sick device is not a verdict on the model.
        assert_eq!(c.divergence(), None);
        non_finite(&mut c, ids[1], &b, t0);
        let d = c.divergence().unwrap_or_default();
        assert!(d.contains("2 workers: NaN loss"), "{d}");
    }

    #[test]
    fn non_finite_numbers_twice_from_the_only_worker_mean_the_model_diverged() {
        let t0 = Instant::now();
        let (mut c, ids) = cluster(1, t0);
        c.begin_round(0, 4);
        let a = c.next_task(ids[0], t0).unwrap().unwrap();
        non_finite(&mut c, ids[0], &a, t0);
        assert_eq!(c.divergence(), None);
        let b = c.next_task(ids[0], t0).unwrap().unwrap();
        non_finite(&mut c, ids[0], &b, t0);
        assert!(c.divergence().is_some());
    }

    #[test]
    fn gradients_over_the_bound_from_two_workers_mean_the_model_diverged() {
        let t0 = Instant::now();
        let (mut c, ids) = cluster(3, t0);
        c.begin_round(0, 4);
        c.numeric_trouble(ids[0], 0, "norm 1e7");
        c.numeric_trouble(ids[0], 0, "norm 1e7");
        // One worker of three, even twice: maybe a poisoner, not a verdict on the model.
        assert_eq!(c.divergence(), None);
        // A report about another step changes nothing.
        c.numeric_trouble(ids[1], 5, "norm 1e7");
        assert_eq!(c.divergence(), None);
        c.numeric_trouble(ids[1], 0, "norm 1e7");
        assert!(c.divergence().is_some());
    }

    #[test]
    fn a_failure_report_for_an_old_step_is_a_race() {
        let t0 = Instant::now();
        let (mut c, ids) = cluster(1, t0);
        c.begin_round(3, 4);
        assert!(matches!(
            c.fail_task(ids[0], 1, 2, "x", t0),
            Err(CoreError::StaleStep { .. })
        ));
        assert_eq!(
            c.expected_nodes(ids[0], 99, 3, t0),
            Err(CoreError::UnknownTask(99))
        );
    }
}
