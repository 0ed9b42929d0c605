// Storage types and conversions: bf16 / fp16 <-> float by bit arithmetic, round-to-nearest-even,
// identical on the host and on the device (no compiler intrinsics, so the CPU and CUDA builds give the
// same bits). fp32 and fp64 are stored as themselves.
//
// load<T>(S) widens a stored value to the math type T; store(S&, T) narrows with RNE; store_sr(bf16&, float,
// key_b, i) narrows with the stochastic rounding of momentum_fused/layouts.py.
#pragma once

#include "mf_common.h"

namespace mf {

struct bf16 {
  uint16_t bits;
};
struct fp16 {
  uint16_t bits;
};

// ----------------------------------------------------------------------------------------------- bf16
MF_HD MF_INLINE float bf16_to_float(uint16_t h) { return f32_from_bits(static_cast<uint32_t>(h) << 16); }

MF_HD MF_INLINE uint16_t float_to_bf16(float f) {
  uint32_t u = f32_bits(f);
  // NaN -> a quiet NaN with the sign and top payload bits kept (the CPU kernels' choice; torch's vectorized
  // conversion gives 0xFFFF). The NaN rule of every backend: a NaN stays a quiet NaN, sign and payload
  // unspecified (docs/csrc.md); every non-NaN value rounds to nearest even, bit-identical across backends.
  const bool nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;  // RNE; carries into the exponent
  return static_cast<uint16_t>(nan ? ((u >> 16) | 0x0040u) : rounded);
}

// ----------------------------------------------------------------------------------------------- fp16
// fp16 -> fp32, exact (branch-free form of FP16's fp16_ieee_to_fp32_value, also used by c10::Half).
MF_HD MF_INLINE float fp16_to_float(uint16_t h) {
  const uint32_t w = static_cast<uint32_t>(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const uint32_t exp_offset = 0xE0u << 23;
  const float exp_scale = 0x1.0p-112f;
  const float normalized = f32_from_bits((two_w >> 4) + exp_offset) * exp_scale;  // exact
  const uint32_t magic_mask = 126u << 23;
  const float magic_bias = 0.5f;
  const float denormalized = f32_from_bits((two_w >> 17) | magic_mask) - magic_bias;  // exact
  const uint32_t denormalized_cutoff = 1u << 27;
  const uint32_t result =
      sign | (two_w < denormalized_cutoff ? f32_bits(denormalized) : f32_bits(normalized));
  return f32_from_bits(result);
}

// fp32 -> fp16 with round-to-nearest-even, overflow to inf, subnormals, NaN -> 0x7E00 (sign kept).
// FP16's fp16_ieee_from_fp32_value (also c10::Half's): the rounding is done by one fp32 addition, which
// is IEEE round-to-nearest-even on every host and device. The scalings by powers of two are exact, so
// an FMA contraction of the last multiply and the add gives the same bits. Branch-free: vectorizes.
MF_HD MF_INLINE uint16_t float_to_fp16(float f) {
  const float scale_to_inf = 0x1.0p+112f;
  const float scale_to_zero = 0x1.0p-110f;
  const uint32_t w = f32_bits(f);
  const float abs_f = f32_from_bits(w & 0x7FFFFFFFu);
  float base = (abs_f * scale_to_inf) * scale_to_zero;
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  bias = bias < 0x71000000u ? 0x71000000u : bias;
  base = f32_from_bits((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = f32_bits(base);
  const uint32_t exp_bits = (bits >> 13) & 0x00007C00u;
  const uint32_t mantissa_bits = bits & 0x00000FFFu;
  const uint32_t nonsign = exp_bits + mantissa_bits;
  return static_cast<uint16_t>((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

// --------------------------------------------------------------------------------------- load / store
template <typename T>
MF_HD MF_INLINE T load(float v) { return static_cast<T>(v); }
template <typename T>
MF_HD MF_INLINE T load(double v) { return static_cast<T>(v); }
template <typename T>
MF_HD MF_INLINE T load(bf16 v) { return static_cast<T>(bf16_to_float(v.bits)); }
template <typename T>
MF_HD MF_INLINE T load(fp16 v) { return static_cast<T>(fp16_to_float(v.bits)); }

template <typename T>
MF_HD MF_INLINE void store(float& d, T v) { d = static_cast<float>(v); }
template <typename T>
MF_HD MF_INLINE void store(double& d, T v) { d = static_cast<double>(v); }
template <typename T>
MF_HD MF_INLINE void store(bf16& d, T v) { d.bits = float_to_bf16(static_cast<float>(v)); }
template <typename T>
MF_HD MF_INLINE void store(fp16& d, T v) { d.bits = float_to_fp16(static_cast<float>(v)); }

// ----------------------------------------------------------------------------- stochastic rounding
// momentum_fused/layouts.py is the spec (and the torch reference, sr_round_bf16). Integer arithmetic
// only: the same bits on every host and device.
//   key_b = key + b * 0x9E3779B9  (b = 0 for the param, 1 + j for state j)
//   r     = lowbias32(lo32(i) ^ key_b ^ lo32(hi32(i) * 0x85EBCA6B)) & 0xFFFF   (i: element index in its tensor)
//   bits  = (u + r) >> 16 for finite u (u = fp32 bits; cannot overflow: u + r < 2^32), RNE for inf/NaN.
MF_HD MF_INLINE uint32_t lowbias32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

MF_HD MF_INLINE uint32_t sr_key_b(uint32_t key, uint32_t buffer) { return key + buffer * 0x9E3779B9u; }

MF_HD MF_INLINE uint32_t sr_bits(uint32_t key_b, int64_t i) {
  const uint64_t ui = static_cast<uint64_t>(i);
  const uint32_t lo = static_cast<uint32_t>(ui), hi = static_cast<uint32_t>(ui >> 32);
  return lowbias32(lo ^ key_b ^ (hi * 0x85EBCA6Bu)) & 0xFFFFu;
}

MF_HD MF_INLINE uint16_t float_to_bf16_sr(float f, uint32_t r) {
  const uint32_t u = f32_bits(f);
  const bool finite = (u & 0x7F800000u) != 0x7F800000u;
  return finite ? static_cast<uint16_t>((u + r) >> 16) : float_to_bf16(f);
}

MF_HD MF_INLINE void store_sr(bf16& d, float v, uint32_t key_b, int64_t i) {
  d.bits = float_to_bf16_sr(v, sr_bits(key_b, i));
}

// Math type for a storage type: double for fp64, float otherwise.
template <typename S>
struct MathType {
  using type = float;
};
template <>
struct MathType<double> {
  using type = double;
};

}  // namespace mf
