// momentum_fused csrc: portability macros shared by the host (gcc/clang) and CUDA (nvcc) builds.
// No torch headers: this file and everything it includes compile with a plain C++17 compiler.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define MF_HD __host__ __device__
#define MF_INLINE __forceinline__
#else
#define MF_HD
#if defined(__GNUC__) || defined(__clang__)
#define MF_INLINE inline __attribute__((always_inline))
#else
#define MF_INLINE inline
#endif
#endif

namespace mf {

// Param dtype codes (enum Dtype), rule ids, flag bits, scalar-pack columns and the dtype-layout table (enum
// Layout and its properties), generated from momentum_fused/specs.py and layouts.py. The layouts:
//   NATIVE      params, grads, state: one dtype (fp32, fp64, bf16, fp16), RNE stores
//   BF16_STATE  params/grads fp32, state bf16 (RNE)
//   MASTER      params/grads bf16 or fp16, state fp32, plus an fp32 master copy per param: the rule reads
//               the master, writes the master and the param (RNE from the new fp32 value)
//   BF16_SR     everything bf16, every store stochastically rounded (storage.h store_sr)
}  // namespace mf
#include "generated/tables.h"
namespace mf {

// Bit casts usable on host and device (memcpy is understood by both compilers and vectorizes).
MF_HD MF_INLINE uint32_t f32_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#elif defined(__GNUC__) || defined(__clang__)
  return __builtin_bit_cast(uint32_t, f);  // vectorizes (memcpy does not, with gcc 12)
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

MF_HD MF_INLINE float f32_from_bits(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#elif defined(__GNUC__) || defined(__clang__)
  return __builtin_bit_cast(float, u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

}  // namespace mf
