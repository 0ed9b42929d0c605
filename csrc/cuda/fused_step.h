// momentum_fused CUDA kernels: the torch-free entry point (raw pointers + cudaStream_t).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace mf {
namespace cuda {

// One bucket of n tensors of one dtype (0 fp32, 1 fp64, 2 bf16, 3 fp16; as mf::cpu::Dtype), all
// contiguous, on the current device. states: n * num_states pointers, tensor-major. packs: DEVICE pointer
// to the float64 [n, k] scalar packs (spec.scalar_names order; k = rule_num_scalars(rule)).
// Optional device scalars (nullptr: unused), read by every block, so nothing syncs with the host:
//   found_inf   (float): nonzero -> no write at all (GradScaler protocol);
//   grad_scale  (float): the pack's grad_mult is divided by it;
//   lr          (double): replaces the pack's lr; only for rules whose pack uses lr through entry 0
//               alone (sgd, qhm, rmsprop, signum, lion, fsgdm); other rules return cudaErrorInvalidValue.
// Returns cudaSuccess, cudaErrorInvalidValue for an unknown rule/flags/dtype, or a launch error.
cudaError_t step(int rule, int flags, int dtype, int64_t n, void* const* params, const void* const* grads,
                 void* const* states, const int64_t* numel, const double* packs, const float* found_inf,
                 const float* grad_scale, const double* lr, cudaStream_t stream);

bool lr_pointer_supported(int rule);

}  // namespace cuda
}  // namespace mf
