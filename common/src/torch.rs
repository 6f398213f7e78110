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

/// Turns deterministic mode's fill of new tensors with NaN on or off (`set_deterministic`
/// turns it off); for the test that holds the fill to change no result.
#[cfg(test)]
pub(crate) fn set_fill_uninitialized(on: bool) {
    unsafe extern "C" {
        fn dtrain_torch_set_fill_uninitialized(on: i32);
    }
    // SAFETY: sets one flag of libtorch's process-wide context.
    unsafe { dtrain_torch_set_fill_uninitialized(i32::from(on)) }
}

#[cfg(test)]
mod tests {
    #[test]
    fn libtorch_deterministic_algorithms_switch_on_and_off() {
        super::set_deterministic(true);
        assert!(super::deterministic());
        super::set_deterministic(false);
        assert!(!super::deterministic());
    }
}
