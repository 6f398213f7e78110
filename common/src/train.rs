//! The training configuration and state, and the single-process training loop that is the
//! reference for the distributed one: same data order, same micro-batches, same reduction tree,
//! same SGD, so the cluster must reproduce it bit for bit on one backend.

use crate::Error;
use crate::engine::{Engine, MicroBatch};
use crate::mnist::Split;
use crate::model::ModelSpec;
use crate::schedule::Schedule;
use crate::sgd::Sgd;
use crate::tree::{Node, combine};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Everything that determines a training run's result (saved in every checkpoint).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub model: ModelSpec,
    pub batch_size: usize,
    /// Images per micro-batch, the unit of work whose gradients are reduced in a fixed tree.
    pub micro_batch: usize,
    pub lr: f32,
    pub momentum: f32,
    pub keep_prob: f32,
    pub seed: u64,
    pub epochs: u64,
    /// Stop after this many steps even if epochs remain.
    pub max_steps: Option<u64>,
    /// Clip the step's mean gradient to this global L2 norm, as PyTorch's `clip_grad_norm_`.
    #[serde(default)]
    pub clip_grad_norm: Option<f32>,
}

impl TrainConfig {
    /// The default job: momentum SGD tuned to reach 99% test accuracy in 3 epochs (the
    /// coordinator's `--preset default` with no other flags).
    pub const DEFAULT: TrainConfig = TrainConfig {
        model: ModelSpec::SEED,
        batch_size: 128,
        micro_batch: 32,
        lr: 0.05,
        momentum: 0.9,
        keep_prob: 0.75,
        seed: 1,
        epochs: 3,
        max_steps: None,
        clip_grad_norm: None,
    };

    pub fn schedule(&self, train_len: usize) -> Schedule {
        Schedule {
            train_len,
            batch_size: self.batch_size,
            micro_batch: self.micro_batch,
            seed: self.seed,
        }
    }

    /// Steps the job runs: `epochs` full epochs, capped by `max_steps`.
    pub fn total_steps(&self, train_len: usize) -> u64 {
        let by_epochs = self.epochs * self.schedule(train_len).steps_per_epoch();
        self.max_steps.map_or(by_epochs, |m| m.min(by_epochs))
    }

    /// What a resumed run must share with the checkpoint it resumes: everything but how long
    /// to train, the learning rate and clipping (those may change on resume: to extend a run,
    /// or to go on from a diverged one with a lower rate).
    pub fn identity(&self) -> TrainConfig {
        TrainConfig {
            epochs: 0,
            max_steps: None,
            lr: 0.0,
            clip_grad_norm: None,
            ..self.clone()
        }
    }

    /// The job's default name, its checkpoint folder: the model and a digest of its
    /// [`identity`](Self::identity), e.g. `seed-3f2a9c1e`. Jobs that could resume each other's
    /// checkpoints share it; others do not collide.
    pub fn job_name(&self) -> String {
        use sha2::Digest;
        let json = serde_json::to_vec(&self.identity()).expect("a config serializes");
        let digest = hex::encode(sha2::Sha256::digest(json));
        format!("{}-{}", self.model.kind, &digest[..8])
    }
}

/// Parameters, optimizer state and the number of steps applied so far.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainState {
    pub step: u64,
    pub params: Vec<f32>,
    pub sgd: Sgd,
}

impl TrainState {
    /// Fresh parameters drawn from the config's seed.
    pub fn new(cfg: &TrainConfig) -> Self {
        let params = cfg.model.init(cfg.seed);
        TrainState {
            step: 0,
            sgd: Sgd::new(cfg.lr, cfg.momentum, params.len()),
            params,
        }
    }

    /// Applies one step's summed gradient, clipped to `clip` (see [`TrainConfig`]). Returns the
    /// L2 norm of the mean gradient before clipping. A non-finite gradient leaves the state as it
    /// was; a step whose parameters come out non-finite leaves it unusable. Both are
    /// [`Error::Diverged`].
    pub fn apply(&mut self, sum: &[f32], examples: u32, clip: Option<f32>) -> Result<f64, Error> {
        let mean = 1.0 / examples.max(1) as f32;
        let norm = crate::sgd::l2_norm(sum) * f64::from(mean);
        if !norm.is_finite() {
            return Err(Error::Diverged(format!("the gradient norm is {norm}")));
        }
        let scale = if clip.is_some() {
            mean * crate::sgd::clip_factor(norm, clip)
        } else {
            mean
        };
        if !self.sgd.step(&mut self.params, sum, scale) {
            return Err(Error::Diverged("a parameter became NaN or infinite".into()));
        }
        self.step += 1;
        Ok(norm)
    }
}

/// Produces the batch of each step, caching the current epoch's shuffle.
#[derive(Debug)]
pub struct Batcher<'a> {
    data: &'a Split,
    schedule: Schedule,
    cached: Option<(u64, Vec<u32>)>,
}

impl<'a> Batcher<'a> {
    pub fn new(data: &'a Split, schedule: Schedule) -> Self {
        Batcher {
            data,
            schedule,
            cached: None,
        }
    }

    /// The examples of `step`, in batch order.
    pub fn batch(&mut self, step: u64) -> Split {
        let (epoch, pos) = self.schedule.locate(step);
        if self.cached.as_ref().is_none_or(|(e, _)| *e != epoch) {
            self.cached = Some((epoch, self.schedule.epoch_order(epoch)));
        }
        let order = self
            .cached
            .as_ref()
            .map(|(_, o)| o.as_slice())
            .unwrap_or_default();
        let b = self.schedule.batch_size;
        let start = pos as usize * b;
        self.data.gather(&order[start..start + b])
    }
}

/// The micro-batches `leaves` of a step's `batch`.
pub fn micro_batches<'b>(
    batch: &'b Split,
    schedule: &Schedule,
    step: u64,
    leaves: std::ops::Range<u32>,
) -> Vec<MicroBatch<'b>> {
    let all = schedule.leaves();
    leaves
        .map(|leaf| {
            let r = all[leaf as usize].clone();
            MicroBatch {
                images: &batch.images[r.start * crate::mnist::PIXELS..r.end * crate::mnist::PIXELS],
                labels: &batch.labels[r],
                dropout_seed: Schedule::dropout_seed(schedule.seed, step, leaf),
            }
        })
        .collect()
}

/// Sums per-leaf gradients starting at leaf `first` into the sums of `nodes`, along the tree.
pub fn node_sums(first: u32, leaf_grads: Vec<Vec<f32>>, nodes: &[Node]) -> Option<Vec<Vec<f32>>> {
    let mut have: BTreeMap<Node, Vec<f32>> = leaf_grads
        .into_iter()
        .enumerate()
        .map(|(i, g)| (Node::new(first + i as u32, first + i as u32 + 1), g))
        .collect();
    nodes.iter().map(|&n| combine(n, &mut have)).collect()
}

/// One step of the reference loop: returns the mean loss.
pub fn local_step(
    cfg: &TrainConfig,
    engine: &Engine,
    batcher: &mut Batcher<'_>,
    state: &mut TrainState,
) -> Result<f64, Error> {
    let schedule = batcher.schedule;
    let batch = batcher.batch(state.step);
    let leaves = schedule.leaves().len() as u32;
    let grads = engine.gradients(
        &state.params,
        &micro_batches(&batch, &schedule, state.step, 0..leaves),
    )?;
    let loss: f64 = grads.iter().map(|g| g.loss_sum).sum();
    let examples: u32 = grads.iter().map(|g| g.examples).sum();
    let root = Node::root(leaves);
    let sum = node_sums(0, grads.into_iter().map(|g| g.values).collect(), &[root])
        .and_then(|mut v| v.pop())
        .ok_or_else(|| Error::BadBatch("reduction tree incomplete".into()))?;
    state.apply(&sum, examples, cfg.clip_grad_norm)?;
    debug_assert!(cfg.batch_size as u32 == examples);
    Ok(loss / f64::from(examples.max(1)))
}

/// Trains `steps` steps in this process, the way the cluster would.
pub fn train_local(
    cfg: &TrainConfig,
    engine: &Engine,
    data: &Split,
    steps: u64,
) -> Result<TrainState, Error> {
    let mut state = TrainState::new(cfg);
    let mut batcher = Batcher::new(data, cfg.schedule(data.len()));
    for _ in 0..steps {
        local_step(cfg, engine, &mut batcher, &mut state)?;
    }
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_that_can_resume_each_other_share_a_name_and_others_do_not() {
        let base = TrainConfig::DEFAULT;
        let name = base.job_name();
        assert!(
            name.starts_with("seed-") && name.len() == "seed-".len() + 8,
            "{name}"
        );
        let longer = TrainConfig {
            epochs: 10,
            max_steps: Some(5),
            lr: 0.01,
            ..base.clone()
        };
        assert_eq!(longer.job_name(), name);
        let other = TrainConfig { seed: 2, ..base };
        assert_ne!(other.job_name(), name);
    }
}
