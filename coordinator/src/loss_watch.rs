//! Spots a finite blow-up of the training loss: a learning rate too high for the model makes the
//! loss climb far above where it started and stay there, without ever becoming NaN (the job
//! would otherwise run to its end at chance accuracy and say nothing).

/// How far above its starting value the loss must be to count as blown up.
const FACTOR: f64 = 3.0;
/// For this many evaluations in a row.
const EVALUATIONS: u32 = 3;

/// Watches the training loss between evaluations.
#[derive(Debug, Default)]
pub struct LossWatch {
    /// The loss at the first step of this run, at least the loss of a uniform guess over the ten
    /// classes (so a resumed, well-trained job is not held to its tiny loss).
    reference: Option<f64>,
    sum: f64,
    steps: u32,
    high: u32,
}

impl LossWatch {
    /// Records one step's mean training loss.
    pub fn step(&mut self, loss: f64) {
        self.reference
            .get_or_insert(loss.max(std::f64::consts::LN_10));
        self.sum += loss;
        self.steps += 1;
    }

    /// At an evaluation: the warning to show while the mean loss since the last evaluation has
    /// been over `FACTOR` times its starting value for `EVALUATIONS` evaluations in a row.
    pub fn evaluate(&mut self) -> Option<String> {
        let (sum, steps) = (self.sum, self.steps);
        (self.sum, self.steps) = (0.0, 0);
        let reference = self.reference?;
        if steps == 0 {
            return None;
        }
        let mean = sum / f64::from(steps);
        if mean > FACTOR * reference {
            self.high += 1;
        } else {
            self.high = 0;
        }
        (self.high >= EVALUATIONS).then(|| {
            format!(
                "the training loss ({mean:.2}) has been over {FACTOR}x its starting value ({reference:.2}) for {} evaluations: the learning rate is likely too high (lower --lr or add --clip-grad-norm)",
                self.high
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_falling_loss_raises_nothing() {
        let mut w = LossWatch::default();
        for loss in [2.3, 1.0, 0.5, 0.3, 0.2, 0.1] {
            w.step(loss);
            assert_eq!(w.evaluate(), None);
        }
    }

    #[test]
    fn a_loss_far_above_its_start_for_three_evaluations_is_flagged_and_clears() {
        let mut w = LossWatch::default();
        w.step(2.3);
        assert_eq!(w.evaluate(), None);
        for _ in 0..2 {
            w.step(60.0);
            assert_eq!(w.evaluate(), None);
        }
        w.step(80.0);
        let warning = w.evaluate().unwrap_or_default();
        assert!(warning.contains("learning rate"), "{warning}");
        w.step(1.0);
        assert_eq!(
            w.evaluate(),
            None,
            "the warning clears when the loss comes back"
        );
    }

    #[test]
    fn a_resumed_job_is_measured_against_chance_not_its_small_loss() {
        let mut w = LossWatch::default();
        for _ in 0..5 {
            w.step(0.5);
            assert_eq!(w.evaluate(), None);
        }
    }
}
