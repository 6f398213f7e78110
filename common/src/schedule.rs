//! The deterministic data order: which examples each step trains on, how a batch is cut into
//! micro-batches, and the dropout seed of each micro-batch. Everything is a pure function of
//! the seed and the step number, so a resumed or re-sharded run sees exactly the same data.

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use std::ops::Range;

/// splitmix64's finaliser: spreads a counter into an independent-looking seed.
pub fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The data order of one training job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schedule {
    pub train_len: usize,
    pub batch_size: usize,
    pub micro_batch: usize,
    pub seed: u64,
}

impl Schedule {
    /// Full batches per epoch; the remainder of an epoch's shuffle is dropped.
    pub fn steps_per_epoch(&self) -> u64 {
        (self.train_len / self.batch_size.max(1)) as u64
    }

    /// The (0-based) epoch of `step` and the batch's position within it.
    pub fn locate(&self, step: u64) -> (u64, u64) {
        let per = self.steps_per_epoch().max(1);
        (step / per, step % per)
    }

    /// The shuffled example order of `epoch`.
    pub fn epoch_order(&self, epoch: u64) -> Vec<u32> {
        let mut order: Vec<u32> = (0..self.train_len as u32).collect();
        order.shuffle(&mut ChaCha8Rng::seed_from_u64(mix(self.seed ^ mix(epoch))));
        order
    }

    /// Batch positions of each micro-batch ("leaf"); the last may be shorter.
    pub fn leaves(&self) -> Vec<Range<usize>> {
        let m = self.micro_batch.max(1);
        (0..self.batch_size.div_ceil(m))
            .map(|i| i * m..((i + 1) * m).min(self.batch_size))
            .collect()
    }

    /// The dropout seed of micro-batch `leaf` of `step`.
    pub fn dropout_seed(seed: u64, step: u64, leaf: u32) -> u64 {
        mix(mix(mix(seed) ^ step) ^ u64::from(leaf))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Schedule = Schedule {
        train_len: 1000,
        batch_size: 128,
        micro_batch: 32,
        seed: 1,
    };

    #[test]
    fn each_epoch_is_a_permutation_and_epochs_differ() {
        let mut a = S.epoch_order(0);
        assert_ne!(a, S.epoch_order(1));
        a.sort();
        assert_eq!(a, (0..1000).collect::<Vec<_>>());
    }

    #[test]
    fn a_batch_of_128_cuts_into_four_leaves_of_32() {
        assert_eq!(S.leaves(), vec![0..32, 32..64, 64..96, 96..128]);
        let odd = Schedule {
            batch_size: 100,
            ..S
        };
        assert_eq!(odd.leaves().last(), Some(&(96..100)));
    }

    #[test]
    fn steps_map_to_epochs_dropping_the_partial_batch() {
        assert_eq!(S.steps_per_epoch(), 7);
        assert_eq!(S.locate(7), (1, 0));
    }
}
