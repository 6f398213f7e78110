//! libtorch settings that tch 0.22 does not expose, through the C++ shim built by `build.rs`.
#![allow(unsafe_code)]

unsafe extern "C" {
    fn dtrain_torch_set_deterministic(on: i32);
    fn dtrain_torch_deterministic() -> i32;
}

/// Turns libtorch's deterministic algorithms on or off (cuDNN's too; cuDNN autotuning off).
/// An op that has no deterministic implementation warns instead of failing.
pub fn set_deterministic(on: bool) {
    // SAFETY: sets three flags of libtorch's process-wide context; takes and keeps no pointers.
    unsafe { dtrain_torch_set_deterministic(i32::from(on)) }
}

/// Whether libtorch's deterministic algorithms are on.
pub fn deterministic() -> bool {
    // SAFETY: reads one flag of libtorch's process-wide context.
    unsafe { dtrain_torch_deterministic() != 0 }
}

#[cfg(test)]
mod tests {
    use crate::engine::{BackendKind, Engine, MicroBatch};
    use crate::model::ModelSpec;

    unsafe extern "C" {
        fn dtrain_torch_set_fill_uninitialized(on: i32);
    }

    #[test]
    fn libtorch_deterministic_algorithms_switch_on_and_off() {
        super::set_deterministic(true);
        assert!(super::deterministic());
        super::set_deterministic(false);
        assert!(!super::deterministic());
    }

    /// `set_deterministic` turns off the fill of new tensors with NaN; this holds that no op of
    /// the engine reads memory it did not write: with the fill on (any such read would give NaN
    /// or other bits), a step's gradients and losses are the same bits. The switch is
    /// process-wide, so the test holds the engines of both runs in one function.
    #[test]
    fn libtorch_gradients_do_not_change_with_the_fill_of_new_tensors() {
        let engine = Engine::new(ModelSpec::SEED, BackendKind::Tch, "cpu", 0.75).unwrap();
        let params = ModelSpec::SEED.init(9);
        let images: Vec<u8> = (0..6 * crate::mnist::PIXELS)
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        let labels = [3u8, 1, 4, 1, 5, 9];
        let batches = [
            MicroBatch {
                images: &images[..4 * crate::mnist::PIXELS],
                labels: &labels[..4],
                dropout_seed: 1,
            },
            MicroBatch {
                images: &images[4 * crate::mnist::PIXELS..],
                labels: &labels[4..],
                dropout_seed: 2,
            },
        ];
        // SAFETY: sets one flag of libtorch's process-wide context.
        unsafe { dtrain_torch_set_fill_uninitialized(1) };
        let filled = engine.gradients(&params, &batches);
        // SAFETY: as above.
        unsafe { dtrain_torch_set_fill_uninitialized(0) };
        let (filled, plain) = (
            filled.unwrap(),
            engine.gradients(&params, &batches).unwrap(),
        );
        for (a, b) in filled.iter().zip(&plain) {
            assert_eq!(a.loss_sum.to_bits(), b.loss_sum.to_bits());
            let same = a
                .values
                .iter()
                .zip(&b.values)
                .all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(same, "a gradient changed with the fill of new tensors");
        }
    }
}
