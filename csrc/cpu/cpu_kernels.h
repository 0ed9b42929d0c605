// CPU kernels of momentum_fused: interface between the torch binding (cpu_ops.cpp) and the kernel
// translation unit (cpu_kernels.cpp). No torch headers on either side of this interface.
#pragma once

#include <cstdint>
#include <string>

#include "../mf_common.h"

namespace mf {
namespace cpu {

// Param dtype codes (mf::Dtype) and layouts (mf::Layout): ../mf_common.h.

// One bucket: n tensors of one param dtype and one layout, all contiguous. states holds n * num_states
// pointers, tensor-major (states[i * ns + j] is state j of tensor i), in the layout's state dtype.
// scalars is a row-major [n, k] float64 pack. masters: n fp32 pointers (MASTER only); remainders: n int16
// pointers (MASTER16 only); sr_keys: n uint32 keys (BF16_SR only). INT8_STATE: a quantized param
// (its first state is codes: the binding, ../step_args.h, decides) has its codes in states[i * ns + j] (int8 when
// code_signed[i * ns + j], else uint8) and their fp32 block scales in scales[i * ns + j]; the others have fp32
// states (scales[i * ns + j] null).
struct Bucket {
  int64_t n = 0;
  void* const* params = nullptr;
  const void* const* grads = nullptr;
  void* const* states = nullptr;
  void* const* masters = nullptr;
  void* const* remainders = nullptr;
  void* const* scales = nullptr;
  const uint8_t* code_signed = nullptr;
  const uint32_t* sr_keys = nullptr;
  const int64_t* numel = nullptr;
  const double* scalars = nullptr;
  int64_t k = 0;
  int nthreads = 1;
};

// Runs rule `rule` with flags `flags` on the bucket (param dtype `dtype`, layout `layout`). Arguments are
// validated by the caller; a (layout, dtype) pair without a kernel throws std::invalid_argument.
void step(int rule, int flags, int layout, int dtype, const Bucket& b);

// "avx512w", "avx512", "avx2" or "baseline": which variant step() dispatches to on this CPU.
const char* isa();

}  // namespace cpu
}  // namespace mf
