//! Stochastic gradient descent with momentum on the flat parameter vector (PyTorch's form:
//! `v = momentum * v + g; p -= lr * v`, with `g` the example-weighted mean gradient).

use serde::{Deserialize, Serialize};

/// Momentum SGD state: the velocity buffer. The learning rate is not state: each step is given
/// its own (see `TrainConfig::lr_at`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sgd {
    pub momentum: f32,
    pub velocity: Vec<f32>,
}

impl Sgd {
    pub fn new(momentum: f32, params: usize) -> Self {
        Sgd {
            momentum,
            velocity: vec![0.0; params],
        }
    }

    /// Applies the gradient `sum` times `scale` (1 / examples for the mean, times the clipping
    /// factor when clipped) to `params` at rate `lr`. Returns false when a parameter came out
    /// NaN or infinite (checked in the same pass): the model diverged and `params` must not be
    /// used.
    pub fn step(&mut self, params: &mut [f32], sum: &[f32], lr: f32, scale: f32) -> bool {
        momentum_step(params, &mut self.velocity, sum, self.momentum, lr, scale)
    }

    /// [`Sgd::step`] block by block ([`CACHE_BLOCK`] values) with the gradient read from
    /// `gradient` (a vector, or a tree of node sums added block by block), calling
    /// `each(new_params, gradient)` on every block right after stepping it, while both are in
    /// cache. A pass that needs the gradient (its norm) or the new parameters (their wire form)
    /// rides on the step instead of reading 13 MB again: the coordinator's step reads its
    /// memory once (`TrainState::apply_then`; `step_checks` measures it against
    /// separate passes).
    pub fn step_blocks(
        &mut self,
        params: &mut [f32],
        gradient: &(impl Gradient + ?Sized),
        lr: f32,
        scale: f32,
        mut each: impl FnMut(&[f32], &[f32]),
    ) -> bool {
        assert_eq!(
            gradient.len(),
            params.len(),
            "one gradient value a parameter"
        );
        let mut finite = true;
        let momentum = self.momentum;
        gradient.blocks(CACHE_BLOCK, &mut |start, g| {
            let at = start..start + g.len();
            let p = &mut params[at.clone()];
            finite &= momentum_step(p, &mut self.velocity[at], g, momentum, lr, scale);
            each(p, g);
        });
        finite
    }
}

/// A gradient read in blocks: a vector, or a [`crate::tree::TreeSum`] that adds its nodes block
/// by block. [`Gradient::blocks`] must give contiguous blocks in order, covering `0..len()`
/// exactly ([`Sgd::step_blocks`] steps the parameters at those positions).
pub trait Gradient {
    /// The number of values.
    fn len(&self) -> usize;

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Calls `each(start, values)` for the values from `start`, `block` at a time (the last
    /// block may be shorter).
    fn blocks(&self, block: usize, each: &mut dyn FnMut(usize, &[f32]));
}

impl Gradient for [f32] {
    fn len(&self) -> usize {
        <[f32]>::len(self)
    }

    fn blocks(&self, block: usize, each: &mut dyn FnMut(usize, &[f32])) {
        for (i, values) in self.chunks(block).enumerate() {
            each(i * block, values);
        }
    }
}

/// `v = momentum * v + g * scale; p -= lr * v` over the slices; false when a parameter came out
/// NaN or infinite.
fn momentum_step(
    params: &mut [f32],
    velocity: &mut [f32],
    sum: &[f32],
    momentum: f32,
    lr: f32,
    scale: f32,
) -> bool {
    let mut finite = true;
    for ((p, v), g) in params.iter_mut().zip(velocity).zip(sum) {
        *v = momentum * *v + g * scale;
        *p -= lr * *v;
        finite &= p.is_finite();
    }
    finite
}

/// Values per block of the passes that use a block right after another use of it
/// ([`Sgd::step_blocks`], `codec::PartsDecoder`): 16 KiB of f32, still in L1 when summed. A
/// multiple of [`SquareSum::LANES`], so the sums have the same bits as one pass.
pub const CACHE_BLOCK: usize = 4096;

/// The L2 norm of `values`, accumulated in f64 (NaN or infinite when a value is).
pub fn l2_norm(values: &[f32]) -> f64 {
    let mut squares = SquareSum::default();
    squares.add(values);
    squares.norm()
}

/// The sum of squares behind [`l2_norm`], fed in order: eight independent f64 sums let the
/// compiler vectorise the pass, and the result depends only on the values. Fed block by block,
/// every block but the last a multiple of [`SquareSum::LANES`] values, it gives the same bits
/// as `l2_norm` of the whole (so a decode can sum each block while it is in cache).
#[derive(Debug, Default, Clone)]
pub struct SquareSum {
    lanes: [f64; SquareSum::LANES],
    tail: f64,
}

impl SquareSum {
    pub const LANES: usize = 8;

    pub fn add(&mut self, values: &[f32]) {
        let chunks = values.chunks_exact(Self::LANES);
        let rest = chunks.remainder();
        for chunk in chunks {
            for (s, &v) in self.lanes.iter_mut().zip(chunk) {
                *s += f64::from(v) * f64::from(v);
            }
        }
        for &v in rest {
            self.tail += f64::from(v) * f64::from(v);
        }
    }

    /// The L2 norm of everything added.
    pub fn norm(&self) -> f64 {
        (self.lanes.iter().sum::<f64>() + self.tail).sqrt()
    }
}

/// The factor PyTorch's `clip_grad_norm_` scales gradients by: `max / (norm + 1e-6)` when that
/// is below 1, else 1.
pub fn clip_factor(norm: f64, max: Option<f32>) -> f32 {
    match max {
        Some(max) if norm > f64::from(max) => (f64::from(max) / (norm + 1e-6)) as f32,
        _ => 1.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_momentum_a_step_moves_against_the_mean_gradient() {
        let mut p = vec![1.0, 2.0];
        assert!(Sgd::new(0.0, 2).step(&mut p, &[4.0, -4.0], 0.5, 0.5));
        assert_eq!(p, vec![0.0, 3.0]);
    }

    #[test]
    fn momentum_accumulates_velocity() {
        let mut p = vec![0.0];
        let mut sgd = Sgd::new(0.5, 1);
        sgd.step(&mut p, &[1.0], 1.0, 1.0);
        sgd.step(&mut p, &[1.0], 1.0, 1.0);
        assert_eq!(p, vec![-2.5]);
    }

    #[test]
    fn the_step_in_blocks_is_the_step_and_sees_every_block_once() {
        let n = 10_007;
        let g: Vec<f32> = (0..n).map(|i| (i as f32 - 5000.0) * 1e-3).collect();
        let (mut p1, mut a) = (vec![0.5f32; n], Sgd::new(0.9, n));
        let (mut p2, mut b) = (p1.clone(), a.clone());
        for _ in 0..2 {
            assert!(a.step(&mut p1, &g, 0.1, 0.25));
            let (mut squares, mut seen) = (SquareSum::default(), Vec::new());
            let finite = b.step_blocks(&mut p2, &g[..], 0.1, 0.25, |p, g| {
                squares.add(g);
                seen.extend_from_slice(p);
            });
            assert!(finite);
            assert_eq!(squares.norm().to_bits(), l2_norm(&g).to_bits());
            assert_eq!(seen, p2);
        }
        assert_eq!((p1, a), (p2, b));
    }

    #[test]
    fn an_overflowing_step_is_reported() {
        let mut p = vec![1.0, f32::MAX];
        assert!(!Sgd::new(0.0, 2).step(&mut p, &[0.0, -f32::MAX], 1.0, 1.0));
    }

    #[test]
    fn clipping_follows_pytorch() {
        assert_eq!(clip_factor(0.5, Some(1.0)), 1.0);
        assert_eq!(clip_factor(10.0, None), 1.0);
        let f = clip_factor(4.0, Some(1.0));
        assert!((f - 0.25).abs() < 1e-6, "{f}");
        assert_eq!(l2_norm(&[3.0, 4.0]), 5.0);
        let many: Vec<f32> = (0..1001).map(|i| i as f32).collect();
        let exact = (0..1001u64).map(|i| i * i).sum::<u64>() as f64;
        assert_eq!(l2_norm(&many), exact.sqrt());
        assert!(l2_norm(&[f32::NAN]).is_nan());
        // Block by block (multiples of the lanes, then the rest): the same bits.
        let mut squares = SquareSum::default();
        for block in many.chunks(64) {
            squares.add(block);
        }
        assert_eq!(squares.norm().to_bits(), l2_norm(&many).to_bits());
    }
}
