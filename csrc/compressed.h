// Compressed optimizer state (docs/layouts.md, momentum_fused/layouts.py is the spec): the element-level
// encodings of the layouts master16 and int8_state, shared by the host (CPU kernels) and the device (CUDA
// kernels): integer arithmetic and one fp32 division / multiply, no intrinsics, so every backend gives the
// same bits. The vector forms of the CPU kernels (cpu/cpu_simd_avx2.inc) must give the same bits as these.
//
// master16: the fp32 master as the bf16 param (its high half rounded to nearest, ties away from zero) and an
// int16 remainder (its low 16 bits). On the fp32 bit pattern u:
//   encode: param = (u + 0x8000) >> 16  (NaN: (u >> 16) | 0x40, a quiet NaN, sign kept)   remainder = u & 0xFFFF
//   decode: u = ((param - (remainder >> 15)) << 16) | remainder                            (16-bit halves)
//
// int8_state: per block of INT8_BLOCK elements one fp32 scale (the block's absmax); an element's value is
// table[index] * scale (fp32 product). Signed states: int8 code c in -127..127, index c + 127 into
// INT8_SIGNED_TABLE (sign(c) c^2 / 127^2); unsigned: uint8 code = index into INT8_UNSIGNED_TABLE (c^4 / 255^4).
// Encoding x with the block scale s: y = x / (s > 0 ? s : 1) (fp32 division), index = the count of midpoints
// (INT8_*_MID, generated/tables.h) strictly below y (a tie goes to the lower code), as torch.bucketize counts
// them: the midpoints m with !(y <= m), so a NaN y counts all of them (the top code).
// The index is found from a guess from the map's shape (sqrt(|y|) * 127, or sqrt(sqrt(y)) * 255, rounded),
// which is within one of the count (each midpoint's preimage lies between its two codes), then one comparison
// with the midpoint on each side.
#pragma once

#include "mf_common.h"

#if !defined(__CUDACC__)
#include <cmath>
#endif

namespace mf {

// ------------------------------------------------------------------------------------------- master16
// (bf16 param bits, int16 remainder bits) -> fp32 master
MF_HD MF_INLINE float master16_decode(uint16_t param, uint16_t remainder) {
  const uint32_t hi = static_cast<uint32_t>(param), lo = static_cast<uint32_t>(remainder);
  return f32_from_bits(((hi - (lo >> 15)) << 16) | lo);
}

// fp32 master -> bf16 param bits (to nearest, ties away from zero; NaN: a quiet NaN, sign kept)
MF_HD MF_INLINE uint16_t master16_param_bits(float master) {
  const uint32_t u = f32_bits(master);
  const bool nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
  return static_cast<uint16_t>(nan ? ((u >> 16) | 0x0040u) : ((u + 0x8000u) >> 16));
}

// fp32 master -> int16 remainder bits (the low half)
MF_HD MF_INLINE uint16_t master16_remainder_bits(float master) {
  return static_cast<uint16_t>(f32_bits(master) & 0xFFFFu);
}

// --------------------------------------------------------------------------------------- int8_state
constexpr int INT8_SIGNED_COUNT = 255;    // codes of a signed state (-127..127)
constexpr int INT8_UNSIGNED_COUNT = 256;  // codes of an unsigned state (0..255)

// The table index of a signed code / of an unsigned code.
MF_HD MF_INLINE int int8_signed_index(int8_t code) { return static_cast<int>(code) + 127; }
MF_HD MF_INLINE int int8_unsigned_index(uint8_t code) { return static_cast<int>(code); }

// The divisor of a block: its scale, or 1 for a scale that is not > 0 (a zero block: y = 0).
MF_HD MF_INLINE float int8_divisor(float scale) { return scale > 0.0f ? scale : 1.0f; }

// The decoded value of table index `index` in a block of scale `scale` (table: INT8_SIGNED_TABLE or
// INT8_UNSIGNED_TABLE, or the device's copy of it).
MF_HD MF_INLINE float int8_decode(const float* table, int index, float scale) { return table[index] * scale; }

// The first guess of the index of y: within one of the exact count for every y (each midpoint's preimage under
// the map lies strictly between its two codes; |y| > 1, the infinities and NaN guess the end code).
MF_HD MF_INLINE int int8_guess_signed(float y) {
  const float r = sqrtf(fabsf(y)) * 127.0f + 0.5f;
  const int c = r < 127.0f ? static_cast<int>(r) : 127;  // (NaN: 127, fixed up below)
  return y < 0.0f ? 127 - c : 127 + c;
}

MF_HD MF_INLINE int int8_guess_unsigned(float y) {
  const float r = sqrtf(sqrtf(y <= 0.0f ? 0.0f : y)) * 255.0f + 0.5f;  // (NaN: 255)
  return r < 255.0f ? static_cast<int>(r) : 255;
}

// The count of m in mid[0 .. nmid) with !(y <= m) (mid ascending), given a guess within one of it.
MF_HD MF_INLINE int int8_fixup(float y, int k, const float* mid, int nmid) {
  k = k < 0 ? 0 : (k > nmid ? nmid : k);
  if (k < nmid && !(y <= mid[k])) ++k;
  if (k > 0 && y <= mid[k - 1]) --k;
  return k;
}

// The exact count by a search (the definition; for checks of the guess-based form).
MF_HD MF_INLINE int int8_count_below(float y, const float* mid, int nmid) {
  int lo = 0, hi = nmid;  // the count is in [lo, hi]
  while (lo < hi) {
    const int m = (lo + hi) / 2;
    if (!(y <= mid[m]))
      lo = m + 1;
    else
      hi = m;
  }
  return lo;
}

// numel of a param whose state int8_state quantizes (layouts.int8_quantized)
MF_HD MF_INLINE bool int8_quantized(long long numel) { return numel >= INT8_MIN_NUMEL && numel % INT8_BLOCK == 0; }

// The table index of x in a block of divisor `div` (int8_divisor(scale)).
MF_HD MF_INLINE int int8_encode_signed(float x, float div, const float* mid) {
  const float y = x / div;
  return int8_fixup(y, int8_guess_signed(y), mid, INT8_SIGNED_COUNT - 1);
}

MF_HD MF_INLINE int int8_encode_unsigned(float x, float div, const float* mid) {
  const float y = x / div;
  return int8_fixup(y, int8_guess_unsigned(y), mid, INT8_UNSIGNED_COUNT - 1);
}

// torch.amax's absmax step: NaN propagates.
MF_HD MF_INLINE float int8_absmax(float acc, float x) {
  const float a = fabsf(x);
  return (acc != acc || a != a) ? acc + a : (a > acc ? a : acc);
}

}  // namespace mf
