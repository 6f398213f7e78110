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
        let m = self.momentum;
        let mut finite = true;
        for ((p, v), g) in params.iter_mut().zip(&mut self.velocity).zip(sum) {
            *v = m * *v + g * scale;
            *p -= lr * *v;
            finite &= p.is_finite();
        }
        finite
    }
}

/// The L2 norm of `values`, accumulated in f64 (NaN or infinite when a value is). Eight
/// independent sums let the compiler vectorise the pass; the result depends only on the values.
pub fn l2_norm(values: &[f32]) -> f64 {
    const LANES: usize = 8;
    let mut sums = [0.0f64; LANES];
    let chunks = values.chunks_exact(LANES);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (s, &v) in sums.iter_mut().zip(chunk) {
            *s += f64::from(v) * f64::from(v);
        }
    }
    let tail: f64 = rest.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
    (sums.iter().sum::<f64>() + tail).sqrt()
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
    }
}
