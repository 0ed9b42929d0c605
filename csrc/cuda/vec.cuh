// momentum_fused CUDA kernels: vectors of N stored values for 128-bit (or narrower) accesses. Device code, or host
// code under csrc/cuda/host_emulation.h (the tests run the int8_state functor on the host).
#pragma once

#include <cstdint>

namespace mf {
namespace cuda {

// N values of S, aligned to at most 16 bytes (a 32-byte vector is two 128-bit accesses, each 16-byte aligned).
template <typename S, int N>
struct alignas(sizeof(S) * N < 16 ? sizeof(S) * N : 16) Vec {
  S v[N];
};

template <typename S, int N>
__device__ __forceinline__ bool vec_aligned(const S* ptr) {
  return (reinterpret_cast<uintptr_t>(ptr) & (alignof(Vec<S, N>) - 1)) == 0;
}

// The scalar pack of one tensor as its rule reads it: row `row` of the [n, K] float64 table, the last entry
// (grad_mult) divided by GradScaler's scale when one is given.
template <class Sc, int K>
__device__ __forceinline__ Sc load_pack(const double* packs, int64_t row, const float* grad_scale) {
  double pk[K];
  const double* r = packs + row * K;
#pragma unroll
  for (int i = 0; i < K; ++i) pk[i] = r[i];
  if (grad_scale != nullptr) pk[K - 1] = pk[K - 1] / static_cast<double>(*grad_scale);
  return Sc::make(pk);
}

}  // namespace cuda
}  // namespace mf
