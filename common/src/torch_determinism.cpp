// libtorch's global switches for reproducible results (torch.use_deterministic_algorithms,
// torch.backends.cudnn.deterministic / benchmark), which tch 0.22's C API does not expose.
#include <ATen/Context.h>

extern "C" {

// warn_only: an op without a deterministic implementation (on CUDA: max-pool backward, which
// uses atomics) warns once instead of failing the step.
//
// Deterministic mode also fills every new tensor with NaN by default (a debugging aid that
// catches reads of memory no op wrote; torch.utils.deterministic.fill_uninitialized_memory).
// Every op we run writes all of its output before anything reads it, so the fill changes no
// result and is turned off: it was a memset of each new tensor (on a GPU, one more kernel per
// tensor), 4% of a CPU worker's time in a profile.
void dtrain_torch_set_deterministic(int on) {
    at::globalContext().setDeterministicAlgorithms(on != 0, /*warn_only=*/true);
    at::globalContext().setDeterministicFillUninitializedMemory(false);
    at::globalContext().setDeterministicCuDNN(on != 0);
    at::globalContext().setBenchmarkCuDNN(false);
}

// For the test that holds the fill to change nothing (common/src/torch.rs).
void dtrain_torch_set_fill_uninitialized(int on) {
    at::globalContext().setDeterministicFillUninitializedMemory(on != 0);
}

int dtrain_torch_deterministic(void) {
    return at::globalContext().deterministicAlgorithms() ? 1 : 0;
}

}
