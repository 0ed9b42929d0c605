// momentum_fused CUDA kernels: the torch-free entry point (raw pointers + cudaStream_t).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace mf {
namespace cuda {

// Dtype layouts (momentum_fused/layouts.py; the codes of mf::cpu::Layout and _backend_cpu.LAYOUT_CODES):
//   0 native (params, grads, state in one dtype), 1 bf16_state (fp32 params, bf16 state), 2 master (bf16/fp16
//   params, fp32 state + an fp32 master copy the rule reads and writes; the param is written with RNE from
//   it), 3 bf16_sr (bf16 everything, every store stochastically rounded: storage.h store_sr).
enum Layout : int { LAYOUT_NATIVE = 0, LAYOUT_BF16_STATE = 1, LAYOUT_MASTER = 2, LAYOUT_BF16_SR = 3 };

// One bucket of n tensors of one param dtype (0 fp32, 1 fp64, 2 bf16, 3 fp16; as mf::cpu::Dtype) and one
// layout, all contiguous, on the current device. states: n * (num_states + (layout == master)) pointers,
// tensor-major, in the layout's state dtype, the fp32 master last. packs: DEVICE pointer to the float64
// [n, k] scalar packs (spec.scalar_names order; k = rule_num_scalars(rule)). sr_keys: DEVICE pointer to n
// int64 values holding the uint32 per-tensor keys (layout bf16_sr; nullptr otherwise).
// Optional device scalars (nullptr: unused), read by every block, so nothing syncs with the host:
//   found_inf   (float): nonzero -> no write at all (GradScaler protocol);
//   grad_scale  (float): the pack's grad_mult is divided by it;
//   lr          (double): replaces the pack's lr; only for rules whose pack uses lr through entry 0
//               alone (sgd, qhm, rmsprop, signum, lion, fsgdm); other rules return cudaErrorInvalidValue.
// Returns cudaSuccess, cudaErrorInvalidValue for an unknown rule/flags/layout/dtype (or bf16_sr without
// sr_keys), or a launch error.
cudaError_t step(int rule, int flags, int layout, int dtype, int64_t n, void* const* params,
                 const void* const* grads, void* const* states, const int64_t* numel, const double* packs,
                 const float* found_inf, const float* grad_scale, const double* lr, const int64_t* sr_keys,
                 cudaStream_t stream);

bool lr_pointer_supported(int rule);

}  // namespace cuda
}  // namespace mf
