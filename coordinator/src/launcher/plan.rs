//! The launcher's decisions, with no I/O: the worker pods wanted, the pods observed and the
//! clock go in; the pods to create and delete, what happened to each and, when the job cannot
//! go on, why, come out. [`super::kubernetes`] feeds it what its pod watcher sees and carries
//! out the actions; tests feed it made-up pod lists.
//!
//! Rules (README "Kubernetes"):
//! - **Slots.** Worker `i` of `--workers N` lives in slot `i`; its pod is named
//!   `<job>-worker-<slot>-<attempt>`. Labels, not remembered names, find the pods: a restarted
//!   coordinator adopts the live pods of its job and creates only what is missing.
//! - **Losses.** A pod that failed (any exit, OOM kill, eviction), that ended while the job
//!   runs, or that was deleted by someone else is a failure of its slot: the reason is reported,
//!   the pod is deleted and the slot refilled after an exponential backoff. After
//!   `--max-worker-pod-failures` the job fails with the last reason instead of looping.
//! - **Stuck.** A pod pending past `--worker-pending-timeout` (unschedulable, image missing) is
//!   reported with the scheduler's or kubelet's reason; the job fails unless `--min-workers`
//!   pods run, in which case it goes on with fewer.
//! - Every action is idempotent: a create the watcher has not shown yet is expected for a
//!   while rather than repeated; a delete is asked for once.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

/// A pod's phase, as the API reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Pending,
    Running,
    Succeeded,
    Failed,
    Unknown,
}

/// One worker pod as observed.
#[derive(Debug, Clone, PartialEq)]
pub struct Observed {
    pub name: String,
    pub slot: u32,
    pub attempt: u32,
    pub phase: Phase,
    /// Why it is not running (a waiting, terminated or scheduling reason), when it says.
    pub reason: Option<String>,
    pub restarts: u32,
    /// Deletion has been asked for (by us or anyone).
    pub deleting: bool,
}

/// What the launcher is asked to keep.
#[derive(Debug, Clone)]
pub struct Policy {
    /// The job's id: the prefix of its pod names.
    pub job: String,
    pub workers: u32,
    pub min_workers: u32,
    pub max_failures: u32,
    pub pending_timeout: Duration,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// A pod running this long ends the backoff: the next loss waits `backoff_base` again.
    pub stable_after: Duration,
}

/// Something to do against the API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Create {
        slot: u32,
        attempt: u32,
    },
    /// Delete a pod; `lost` says its logs are worth reading first.
    Delete {
        name: String,
        lost: bool,
    },
}

/// A worker pod as status shows it, one per slot.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerPod {
    pub slot: u32,
    pub name: String,
    pub phase: String,
    pub restarts: u32,
    /// The last reason a pod of this slot failed, or why this one is not running.
    pub last_reason: String,
}

/// The outcome of one observation.
#[derive(Debug, Default, PartialEq)]
pub struct Decision {
    pub actions: Vec<Action>,
    /// Pods lost this time, with why (for the log).
    pub lost: Vec<(String, String)>,
    /// Pods newly reported stuck, with why.
    pub stuck: Vec<(String, String)>,
    /// The job cannot go on: why.
    pub fail: Option<String>,
}

/// The launcher's memory between observations.
#[derive(Debug)]
pub struct Supervisor {
    policy: Policy,
    failures: u32,
    /// Failures since a pod last ran for `stable_after`: the exponent of the backoff.
    recent_failures: u32,
    /// No pod is created before this.
    backoff_until: Option<Instant>,
    /// Pods counted as lost already (a failed pod stays listed until its delete lands).
    counted: HashSet<String>,
    /// Pods we asked to delete; their disappearance is no loss.
    deleted_by_us: HashSet<String>,
    /// Pods created but not seen yet, by (slot, attempt), with when.
    expected: HashMap<(u32, u32), Instant>,
    /// Pods seen at the last observation, to notice one that vanished.
    last_seen: HashMap<String, Observed>,
    pending_since: HashMap<String, Instant>,
    running_since: HashMap<String, Instant>,
    reported_stuck: HashSet<String>,
    /// The highest attempt seen or created per slot.
    attempts: BTreeMap<u32, u32>,
    last_reason: BTreeMap<u32, String>,
    failed: Option<String>,
}

/// How long a created pod is expected before the watcher shows it.
const EXPECT_FOR: Duration = Duration::from_secs(30);

impl Supervisor {
    pub fn new(policy: Policy) -> Self {
        Supervisor {
            policy,
            failures: 0,
            recent_failures: 0,
            backoff_until: None,
            counted: HashSet::new(),
            deleted_by_us: HashSet::new(),
            expected: HashMap::new(),
            last_seen: HashMap::new(),
            pending_since: HashMap::new(),
            running_since: HashMap::new(),
            reported_stuck: HashSet::new(),
            attempts: BTreeMap::new(),
            last_reason: BTreeMap::new(),
            failed: None,
        }
    }

    /// Pod failures counted so far.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// Compares the pods observed with the pods wanted and says what to do.
    pub fn observe(&mut self, pods: &[Observed], now: Instant) -> Decision {
        let mut d = Decision::default();
        if let Some(why) = &self.failed {
            d.fail = Some(why.clone());
            return d;
        }
        let seen: HashMap<&str, &Observed> = pods.iter().map(|p| (p.name.as_str(), p)).collect();
        for p in pods {
            let a = self.attempts.entry(p.slot).or_insert(0);
            *a = (*a).max(p.attempt);
            self.expected.remove(&(p.slot, p.attempt));
        }
        self.expected
            .retain(|_, at| now.duration_since(*at) < EXPECT_FOR);

        // Losses: failed or ended pods, and pods that vanished or are being deleted by others.
        for p in pods {
            let why = match p.phase {
                Phase::Failed => Some(p.reason.clone().unwrap_or_else(|| "failed".into())),
                Phase::Succeeded => Some(format!(
                    "ended before the job did ({})",
                    p.reason.as_deref().unwrap_or("exit code 0")
                )),
                _ if p.deleting && !self.deleted_by_us.contains(&p.name) => {
                    Some("deleted (by a user, an eviction or a node drain)".into())
                }
                _ => None,
            };
            if let Some(why) = why {
                let lost = self.lose(p.slot, &p.name, why, now, &mut d);
                if !p.deleting && !self.deleted_by_us.contains(&p.name) {
                    self.deleted_by_us.insert(p.name.clone());
                    d.actions.push(Action::Delete {
                        name: p.name.clone(),
                        lost,
                    });
                }
            }
        }
        let vanished: Vec<Observed> = self
            .last_seen
            .values()
            .filter(|p| !seen.contains_key(p.name.as_str()))
            .cloned()
            .collect();
        for p in vanished {
            if !self.deleted_by_us.contains(&p.name) {
                self.lose(p.slot, &p.name, "deleted".into(), now, &mut d);
            }
            self.deleted_by_us.remove(&p.name);
            self.counted.remove(&p.name);
            self.pending_since.remove(&p.name);
            self.running_since.remove(&p.name);
            self.reported_stuck.remove(&p.name);
        }
        self.last_seen = pods.iter().map(|p| (p.name.clone(), p.clone())).collect();
        if self.failures > self.policy.max_failures {
            let last = d
                .lost
                .last()
                .map(|(name, why)| format!("; the last, {name}: {why}"))
                .unwrap_or_default();
            return self.fail(
                format!(
                    "worker pods failed {} times, over --max-worker-pod-failures {}{last}",
                    self.failures, self.policy.max_failures
                ),
                d,
            );
        }

        // The pods that count for their slot: alive and not on their way out.
        let alive: Vec<&Observed> = pods
            .iter()
            .filter(|p| {
                !p.deleting
                    && !self.deleted_by_us.contains(&p.name)
                    && matches!(p.phase, Phase::Pending | Phase::Running | Phase::Unknown)
            })
            .collect();
        let mut by_slot: BTreeMap<u32, Vec<&Observed>> = BTreeMap::new();
        for p in &alive {
            by_slot.entry(p.slot).or_default().push(p);
        }

        // Running and pending clocks; a pod that ran long enough ends the backoff.
        for p in &alive {
            match p.phase {
                Phase::Running => {
                    self.pending_since.remove(&p.name);
                    let since = *self.running_since.entry(p.name.clone()).or_insert(now);
                    if now.duration_since(since) >= self.policy.stable_after {
                        self.recent_failures = 0;
                    }
                }
                _ => {
                    self.pending_since.entry(p.name.clone()).or_insert(now);
                }
            }
        }

        // Extra pods (a slot beyond --workers, or two in one slot): the newest go.
        for (slot, ps) in &by_slot {
            let keep = if *slot < self.policy.workers { 1 } else { 0 };
            let mut ps = ps.clone();
            ps.sort_by_key(|p| (p.phase != Phase::Running, p.attempt));
            for p in ps.iter().skip(keep) {
                self.deleted_by_us.insert(p.name.clone());
                d.actions.push(Action::Delete {
                    name: p.name.clone(),
                    lost: false,
                });
            }
        }

        // Stuck pods: reported once; past the deadline the job fails unless enough run.
        let running = alive.iter().filter(|p| p.phase == Phase::Running).count() as u32;
        for p in alive.iter().filter(|p| p.phase != Phase::Running) {
            let Some(since) = self.pending_since.get(&p.name) else {
                continue;
            };
            if now.duration_since(*since) < self.policy.pending_timeout {
                continue;
            }
            let why = format!(
                "pending for {:?}: {}",
                self.policy.pending_timeout,
                p.reason.as_deref().unwrap_or("no reason given")
            );
            if running < self.policy.min_workers {
                return self.fail(
                    format!(
                        "worker pod {} {why}; {running} running, under --min-workers {}",
                        p.name, self.policy.min_workers
                    ),
                    d,
                );
            }
            if self.reported_stuck.insert(p.name.clone()) {
                self.last_reason.insert(p.slot, why.clone());
                d.stuck.push((p.name.clone(), why));
            }
        }

        // Empty slots are refilled, once the backoff allows.
        let waiting = self.backoff_until.is_some_and(|t| now < t);
        if !waiting {
            for slot in 0..self.policy.workers {
                let filled =
                    by_slot.contains_key(&slot) || self.expected.keys().any(|(s, _)| *s == slot);
                if filled {
                    continue;
                }
                let attempt = self.attempts.get(&slot).map_or(0, |a| a + 1);
                self.attempts.insert(slot, attempt);
                self.expected.insert((slot, attempt), now);
                d.actions.push(Action::Create { slot, attempt });
            }
        }
        d
    }

    /// The rows status shows, one per slot: its newest pod seen, else the one being created,
    /// else an empty slot waiting out the backoff.
    pub fn rows(&self) -> Vec<WorkerPod> {
        let mut rows: BTreeMap<u32, WorkerPod> = (0..self.policy.workers)
            .map(|slot| {
                let created = self.expected.keys().find(|(s, _)| *s == slot);
                let row = WorkerPod {
                    slot,
                    name: created
                        .map(|(s, a)| pod_name(&self.policy.job, *s, *a))
                        .unwrap_or_default(),
                    phase: if created.is_some() {
                        "Creating"
                    } else {
                        "Waiting"
                    }
                    .into(),
                    restarts: 0,
                    last_reason: self.last_reason.get(&slot).cloned().unwrap_or_default(),
                };
                (slot, row)
            })
            .collect();
        for p in self.last_seen.values() {
            let better = rows.get(&p.slot).is_none_or(|r| {
                self.last_seen
                    .get(&r.name)
                    .is_none_or(|o| p.attempt > o.attempt)
            });
            if better {
                let phase = if p.deleting {
                    "Terminating".to_string()
                } else {
                    format!("{:?}", p.phase)
                };
                let reason = self
                    .last_reason
                    .get(&p.slot)
                    .cloned()
                    .or_else(|| p.reason.clone())
                    .unwrap_or_default();
                rows.insert(
                    p.slot,
                    WorkerPod {
                        slot: p.slot,
                        name: p.name.clone(),
                        phase,
                        restarts: p.restarts,
                        last_reason: reason,
                    },
                );
            }
        }
        rows.into_values().collect()
    }

    /// Counts one loss (once per pod) and starts the backoff; true when it was new.
    fn lose(&mut self, slot: u32, name: &str, why: String, now: Instant, d: &mut Decision) -> bool {
        if !self.counted.insert(name.to_string()) {
            return false;
        }
        self.failures += 1;
        self.recent_failures += 1;
        let exp = self.recent_failures.saturating_sub(1).min(16);
        let delay = self
            .policy
            .backoff_base
            .saturating_mul(1u32 << exp)
            .min(self.policy.backoff_max);
        self.backoff_until = Some(now + delay);
        self.last_reason.insert(slot, why.clone());
        d.lost.push((name.to_string(), why));
        true
    }

    fn fail(&mut self, why: String, mut d: Decision) -> Decision {
        self.failed = Some(why.clone());
        d.fail = Some(why);
        d
    }
}

/// The name of the worker pod of `job`'s `slot`, attempt `attempt`.
pub fn pod_name(job: &str, slot: u32, attempt: u32) -> String {
    format!("{job}-worker-{slot}-{attempt}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy {
            job: "j".into(),
            workers: 4,
            min_workers: 1,
            max_failures: 3,
            pending_timeout: Duration::from_secs(60),
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(8),
            stable_after: Duration::from_secs(30),
        }
    }

    fn pod(slot: u32, attempt: u32, phase: Phase) -> Observed {
        Observed {
            name: pod_name("j", slot, attempt),
            slot,
            attempt,
            phase,
            reason: None,
            restarts: 0,
            deleting: false,
        }
    }

    fn creates(d: &Decision) -> Vec<(u32, u32)> {
        d.actions
            .iter()
            .filter_map(|a| match a {
                Action::Create { slot, attempt } => Some((*slot, *attempt)),
                _ => None,
            })
            .collect()
    }

    fn deletes(d: &Decision) -> Vec<String> {
        d.actions
            .iter()
            .filter_map(|a| match a {
                Action::Delete { name, .. } => Some(name.clone()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn an_empty_job_creates_one_pod_per_slot_once() {
        let mut s = Supervisor::new(policy());
        let t = Instant::now();
        let d = s.observe(&[], t);
        assert_eq!(creates(&d), vec![(0, 0), (1, 0), (2, 0), (3, 0)]);
        // The watcher has not shown them yet: they are expected, not created again.
        let d = s.observe(&[], t + Duration::from_secs(1));
        assert!(d.actions.is_empty(), "{d:?}");
        let seen: Vec<_> = (0..4).map(|i| pod(i, 0, Phase::Pending)).collect();
        assert!(
            s.observe(&seen, t + Duration::from_secs(2))
                .actions
                .is_empty()
        );
    }

    #[test]
    fn a_restarted_coordinator_adopts_live_pods_and_fills_only_the_gaps() {
        let mut s = Supervisor::new(policy());
        let pods = [
            pod(0, 2, Phase::Running),
            pod(1, 0, Phase::Running),
            pod(3, 5, Phase::Pending),
        ];
        let d = s.observe(&pods, Instant::now());
        assert_eq!(creates(&d), vec![(2, 0)]);
        assert!(d.lost.is_empty());
    }

    #[test]
    fn a_failed_pod_is_reported_deleted_and_replaced_after_a_growing_backoff() {
        let mut s = Supervisor::new(policy());
        let t = Instant::now();
        let mut pods: Vec<_> = (0..4).map(|i| pod(i, 0, Phase::Running)).collect();
        s.observe(&pods, t);
        pods[1].phase = Phase::Failed;
        pods[1].reason = Some("OOMKilled (exit code 137)".into());
        let d = s.observe(&pods, t);
        assert_eq!(
            d.lost,
            vec![("j-worker-1-0".into(), "OOMKilled (exit code 137)".into())]
        );
        assert_eq!(
            d.actions,
            vec![Action::Delete {
                name: "j-worker-1-0".into(),
                lost: true
            }]
        );
        // Still listed while its delete lands: not counted twice, not replaced yet.
        let d = s.observe(&pods, t + Duration::from_millis(500));
        assert!(d.actions.is_empty() && d.lost.is_empty(), "{d:?}");
        pods.remove(1);
        let d = s.observe(&pods, t + Duration::from_secs(1));
        assert_eq!(creates(&d), vec![(1, 1)]);
        assert_eq!(s.failures(), 1);
        assert_eq!(s.rows()[1].last_reason, "OOMKilled (exit code 137)");

        // A second loss right after waits twice as long.
        pods.insert(1, pod(1, 1, Phase::Failed));
        let t2 = t + Duration::from_secs(2);
        s.observe(&pods, t2);
        pods.remove(1);
        assert!(creates(&s.observe(&pods, t2 + Duration::from_secs(1))).is_empty());
        assert_eq!(
            creates(&s.observe(&pods, t2 + Duration::from_secs(2))),
            vec![(1, 2)]
        );
    }

    #[test]
    fn a_pod_deleted_by_someone_else_is_a_loss_and_is_replaced() {
        let mut s = Supervisor::new(policy());
        let t = Instant::now();
        let mut pods: Vec<_> = (0..4).map(|i| pod(i, 0, Phase::Running)).collect();
        s.observe(&pods, t);
        pods[2].deleting = true;
        let d = s.observe(&pods, t);
        assert_eq!(d.lost.len(), 1, "{d:?}");
        assert!(deletes(&d).is_empty(), "already being deleted");
        pods.remove(2);
        let d = s.observe(&pods, t + Duration::from_secs(1));
        assert!(d.lost.is_empty(), "counted once: {d:?}");
        assert_eq!(creates(&d), vec![(2, 1)]);
    }

    #[test]
    fn pods_that_keep_failing_fail_the_job_after_the_cap_without_more_pods() {
        let mut s = Supervisor::new(policy());
        let mut t = Instant::now();
        let mut attempt = 0;
        let mut fail = None;
        for _ in 0..10 {
            let mut p = pod(0, attempt, Phase::Failed);
            p.reason = Some("exit code 2: error: unexpected argument '--bogus'".into());
            let others: Vec<_> = (1..4).map(|i| pod(i, 0, Phase::Running)).collect();
            let mut pods = others.clone();
            pods.push(p);
            let d = s.observe(&pods, t);
            if d.fail.is_some() {
                fail = d.fail;
                break;
            }
            t += Duration::from_secs(60);
            let d = s.observe(&others, t);
            attempt = creates(&d)[0].1;
        }
        let why = fail.expect("the job fails");
        assert!(why.contains("4 times") && why.contains("--bogus"), "{why}");
        assert_eq!(s.failures(), 4);
        // Failed for good: nothing more is created.
        assert!(s.observe(&[], t).actions.is_empty());
    }

    #[test]
    fn a_pod_stuck_pending_is_reported_and_fails_the_job_only_under_min_workers() {
        let t = Instant::now();
        let mut stuck = pod(3, 0, Phase::Pending);
        stuck.reason = Some("Unschedulable: 0/1 nodes are available: 1 Insufficient cpu".into());
        let mut pods: Vec<_> = (0..3).map(|i| pod(i, 0, Phase::Running)).collect();
        pods.push(stuck.clone());
        let mut s = Supervisor::new(policy());
        assert!(s.observe(&pods, t).stuck.is_empty());
        let d = s.observe(&pods, t + Duration::from_secs(61));
        assert_eq!(d.stuck.len(), 1);
        assert!(d.stuck[0].1.contains("Insufficient cpu"));
        assert!(d.fail.is_none(), "three run, --min-workers 1");
        assert!(
            s.observe(&pods, t + Duration::from_secs(62))
                .stuck
                .is_empty()
        );

        let mut s = Supervisor::new(Policy {
            min_workers: 4,
            ..policy()
        });
        s.observe(&pods, t);
        let d = s.observe(&pods, t + Duration::from_secs(61));
        assert!(d.fail.expect("fails").contains("Insufficient cpu"));
    }

    #[test]
    fn extra_pods_are_deleted_keeping_the_running_one() {
        let mut s = Supervisor::new(policy());
        let pods = [
            pod(0, 0, Phase::Running),
            pod(0, 1, Phase::Pending),
            pod(1, 0, Phase::Running),
            pod(2, 0, Phase::Running),
            pod(3, 0, Phase::Running),
            pod(4, 0, Phase::Running),
        ];
        let d = s.observe(&pods, Instant::now());
        assert_eq!(deletes(&d), vec!["j-worker-0-1", "j-worker-4-0"]);
        assert!(creates(&d).is_empty() && d.lost.is_empty());
    }

    #[test]
    fn a_pod_that_ran_long_enough_resets_the_backoff() {
        let mut s = Supervisor::new(Policy {
            max_failures: 10,
            ..policy()
        });
        let t = Instant::now();
        let mut pods: Vec<_> = (0..4).map(|i| pod(i, 0, Phase::Running)).collect();
        s.observe(&pods, t);
        for k in 0..3u32 {
            pods[0] = pod(0, k, Phase::Failed);
            s.observe(&pods, t);
        }
        // Three recent failures: an 8 s wait (capped). A pod stable for 30 s resets it.
        pods[0] = pod(0, 3, Phase::Running);
        s.observe(&pods, t);
        s.observe(&pods, t + Duration::from_secs(31));
        pods[0] = pod(0, 3, Phase::Failed);
        let t2 = t + Duration::from_secs(32);
        s.observe(&pods, t2);
        pods.remove(0);
        assert_eq!(
            creates(&s.observe(&pods, t2 + Duration::from_secs(1))),
            vec![(0, 4)]
        );
    }
}
