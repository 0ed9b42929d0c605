// momentum_fused CUDA kernels: the torch-free entry point (raw pointers + cudaStream_t).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../mf_common.h"

namespace mf {
namespace cuda {

// One bucket of n tensors of one param dtype (mf::Dtype) and one layout (mf::Layout), all contiguous, on the
// current device. states: n * num_states pointers, tensor-major (states[i * ns + j] is state j of tensor i),
// in the layout's state dtype; masters: n fp32 master pointers (layout master only, else nullptr). These are
// the tables the bindings' shared argument checks build (csrc/step_args.h), as for the CPU kernels' Bucket.
// packs: DEVICE pointer to the float64 [n, k] scalar packs (spec.scalar_names order; k =
// rule_num_scalars(rule)). sr_keys: DEVICE pointer to n int64 values holding the uint32 per-tensor keys
// (layout bf16_sr; nullptr otherwise).
// Optional device scalars (nullptr: unused), read by every block, so nothing syncs with the host:
//   found_inf   (float): nonzero -> no write at all (GradScaler protocol);
//   grad_scale  (float): the pack's grad_mult is divided by it.
// (A tensor lr reaches the kernels through the packs: capturable groups compute them on the device.)
// master16 and master16_int8: `masters` holds the n int16 remainders (the master is the bf16 param and its remainder).
// int8_state and master16_int8: states[i * ns + j] are the codes (int8, or uint8 where bit j of code_unsigned is set) of a quantized
// tensor (the binding decides: step_args.h), scales[i * ns + j] their fp32 block scales (its size a multiple of
// INT8_BLOCK); the other tensors have fp32 states and nullptr scales. Schedule-free rules have no int8_state
// (or master16_int8) kernel.
// Returns cudaSuccess, cudaErrorInvalidValue for an unknown rule/flags/layout/dtype (or bf16_sr without
// sr_keys, master / master16 / master16_int8 without masters, int8_state / master16_int8 without scales), or a
// launch error.
cudaError_t step(int rule, int flags, int layout, int dtype, int64_t n, void* const* params,
                 const void* const* grads, void* const* states, void* const* masters, const int64_t* numel,
                 const double* packs, const float* found_inf, const float* grad_scale, const int64_t* sr_keys,
                 cudaStream_t stream, void* const* scales = nullptr, int code_unsigned = 0);

}  // namespace cuda
}  // namespace mf
