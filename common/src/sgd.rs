//! Stochastic gradient descent with momentum on the flat parameter vector (PyTorch's form:
//! `v = momentum * v + g; p -= lr * v`, with `g` the example-weighted mean gradient).

use serde::{Deserialize, Serialize};

/// Momentum SGD state: the velocity buffer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sgd {
    pub lr: f32,
    pub momentum: f32,
    pub velocity: Vec<f32>,
}

impl Sgd {
    pub fn new(lr: f32, momentum: f32, params: usize) -> Self {
        Sgd {
            lr,
            momentum,
            velocity: vec![0.0; params],
        }
    }

    /// Applies the gradient `sum` (summed over `examples` examples) to `params`.
    pub fn step(&mut self, params: &mut [f32], sum: &[f32], examples: u32) {
        let scale = 1.0 / examples.max(1) as f32;
        let (lr, m) = (self.lr, self.momentum);
        for ((p, v), g) in params.iter_mut().zip(&mut self.velocity).zip(sum) {
            *v = m * *v + g * scale;
            *p -= lr * *v;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_momentum_a_step_moves_against_the_mean_gradient() {
        let mut p = vec![1.0, 2.0];
        Sgd::new(0.5, 0.0, 2).step(&mut p, &[4.0, -4.0], 2);
        assert_eq!(p, vec![0.0, 3.0]);
    }

    #[test]
    fn momentum_accumulates_velocity() {
        let mut p = vec![0.0];
        let mut sgd = Sgd::new(1.0, 0.5, 1);
        sgd.step(&mut p, &[1.0], 1);
        sgd.step(&mut p, &[1.0], 1);
        assert_eq!(p, vec![-2.5]);
    }
}
