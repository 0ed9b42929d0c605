// Compressed optimizer state (docs/layouts.md, momentum_fused/layouts.py is the spec): the element-level
// encodings of the layouts master16 and int8_state, shared by the host (CPU kernels) and the device (CUDA
// kernels): integer arithmetic and correctly rounded fp32 operations, so every backend gives the same bits (the
// one approximation, int8_root_guess, only guesses a code that an exact comparison then settles). The vector
// forms of the CPU kernels (cpu/cpu_simd_avx2.inc) must give the same bits as these.
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
// The index is found from a guess from the map's shape and ONE comparison with a midpoint. The magnitude code
// c* of y and r = sqrt(|y|) * 127 (signed) or sqrt(sqrt(y)) * 255 (unsigned) satisfy c* - 0.5 < r < c* + 1: the
// preimage under the map of the midpoint between codes c and c + 1 lies strictly between c + 0.5 and c + 1 (a
// power mean of c and c + 1 above their arithmetic mean), by more than 9e-4 (far more than the fp32 rounding of
// the midpoints moves it) above c + 0.5 and 0.15 below c + 1. So the guess
// floor(r + 0.5 + INT8_GUESS_BIAS) is c* or c* + 1 for any error |e| < INT8_GUESS_BIAS in r (fp32 rounding
// here, the 2^-14 approximations of the AVX-512 form): a magnitude one too large is corrected by comparing y
// with the one midpoint below it in magnitude.
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

constexpr float INT8_GUESS_BIAS = 0.125f;

// The guessed magnitude code (c* or c* + 1, above): min(floor(r + 0.5 + bias), top); |y| > 1, the infinities
// and NaN give top.
MF_HD MF_INLINE int int8_guess_code(float r, int top) {
  const float t = r + (0.5f + INT8_GUESS_BIAS);
  return t < static_cast<float>(top) ? static_cast<int>(t) : top;
}

// The index of y (signed map): the count of midpoints m with !(y <= m). y >= 0 (and NaN): index 127 + c, one
// too large if y <= the midpoint below; y < 0: index 127 - c, one too small if !(y <= the midpoint above).
MF_HD MF_INLINE int int8_index_signed(float y, const float* mid) {
  const int c = int8_guess_code(sqrtf(fabsf(y)) * 127.0f, 127);
  if (y < 0.0f) {
    const int k = 127 - c;  // <= 127 < 254 midpoints: mid[k] exists
    return !(y <= mid[k]) ? k + 1 : k;
  }
  const int k = 127 + c;  // >= 127: mid[k - 1] exists
  return y <= mid[k - 1] ? k - 1 : k;
}

// The index of y (unsigned map, y >= 0 in use; y <= 0 guesses 0, NaN 255).
MF_HD MF_INLINE int int8_index_unsigned(float y, const float* mid) {
  const int k = int8_guess_code(sqrtf(sqrtf(y <= 0.0f ? 0.0f : y)) * 255.0f, 255);
  return k > 0 && y <= mid[k - 1] ? k - 1 : k;
}

// The exact count by a binary search (the definition; for checks of the guess-based forms).
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
MF_HD MF_INLINE int int8_encode_signed(float x, float div, const float* mid) { return int8_index_signed(x / div, mid); }

MF_HD MF_INLINE int int8_encode_unsigned(float x, float div, const float* mid) {
  return int8_index_unsigned(x / div, mid);
}

// ------------------------------------------------------------------------- the encode of a block
// The kernels' form (the CUDA functor; the AVX-512 block form of cpu/cpu_simd_avx512.inc is the same method in
// vectors). Its common case is a block whose scale s is its own absmax (no NaN, no inf in it) with s in
// [2^-100, 2^100] (int8_fast_scale): then no division and no table read per element. y' = x * inv (inv = 1 / s,
// one fp32 division per block) is within 2^-23 |y| of the quotient y = x / s, and the midpoint m' from the map's
// formula in fp32 (integers exact, then one fma and one product) within 2^-21 |m| of the table's midpoint m.
// A root approximated to far better than INT8_GUESS_BIAS (int8_root_guess) guesses as well as the exact one.
// The decisions y <= m and y' <= m' can differ only where |y - m| < 2^-20.4 max(y, m), within 12 units in the
// last place (24 across a binade edge); the bit patterns of nonnegative floats are ordered as their values, so
// outside 32 units the sign of bits(y') - bits(m') decides, and the rare elements inside (~1e-4 of them) are
// redone by the general form above (the exact quotient, the table's midpoint). A y' that is subnormal is 2^-100
// below the smallest midpoint, far outside. A zero block qualifies too (every element is +-0, whose guess, the
// code 0, is exact); every other block (NaN or inf in it, a scale outside the range) takes the general form for
// every element. int8_index_block composes the two for the host's checks: over every fp32 pattern |x| <= s, for
// several s, against the definition (bench/int8_encoder_exhaustive.cpp).
MF_HD MF_INLINE bool int8_fast_scale(float scale) {
  return (scale >= 0x1p-100f && scale <= 0x1p100f) || scale == 0.0f;
}

// A square root for the guesses only: the device's approximate one (sqrt.approx.ftz.f32, off by a few units in
// the last place, far below what the guess tolerates: ~5e-4 relative at the top code; a subnormal input is taken
// as 0, which guesses the code 0 as the exact root does), the host's sqrtf.
MF_HD MF_INLINE float int8_root_guess(float a) {
#if defined(__CUDA_ARCH__)
  float r;
  asm("sqrt.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(a));
  return r;
#elif defined(MF_INT8_ROOT_GUESS_SKEW)  // bench/int8_encoder_exhaustive.cpp: a root off by this relative error
  return sqrtf(a) * (1.0f + (MF_INT8_ROOT_GUESS_SKEW));
#else
  return sqrtf(a);
#endif
}

// The block form's common case: the index of x from y' = x * inv (mid-free); returns whether it must be redone
// exactly (bits(|y'|) within 32 of bits(m')), in which case `index` is not the answer. Signed map: the magnitude
// code c (c* or c* + 1; min(c, 127)) is lowered when |y| is at most the magnitude midpoint between c - 1 and c,
// ((c - 1)^2 + c^2) / (2 127^2) (the map and the midpoint table are odd), strictly below it for y < 0 (a tie
// takes the lower index: the larger magnitude). Any x and inv give an index in range (the guess is clamped).
MF_HD MF_INLINE bool int8_index_signed_fast(float x, float inv, int& index) {
  const float y = x * inv;
  const float a = fabsf(y);
  const int c = static_cast<int>(fminf(fmaf(int8_root_guess(a), 127.0f, 0.5f + INT8_GUESS_BIAS), 127.5f));
  const float cf = static_cast<float>(c);
  const float m = fmaf(cf, cf - 1.0f, 0.5f) * (1.0f / 16129.0f);  // (c (c - 1) + 1/2) / 127^2
  const int d = static_cast<int>(f32_bits(a)) - static_cast<int>(f32_bits(m));
  const int mag = c - (c > 0 && d < -32 ? 1 : 0);
  index = y < 0.0f ? 127 - mag : 127 + mag;
  return c > 0 && static_cast<unsigned>(d + 32) <= 64u;
}

// The same for an unsigned state (y <= 0 as 0): the midpoint between codes c - 1 and c,
// ((c - 1)^4 + c^4) / (2 255^4) = (e^2 (e^2 + 3/2) + 1/16) / 255^4 with e = c - 1/2 (e^2, e^2 + 3/2 exact).
MF_HD MF_INLINE bool int8_index_unsigned_fast(float x, float inv, int& index) {
  const float q = x * inv;
  const float y = q > 0.0f ? q : 0.0f;
  const int k = static_cast<int>(fminf(fmaf(int8_root_guess(int8_root_guess(y)), 255.0f, 0.5f + INT8_GUESS_BIAS),
                                       255.5f));
  const float e = static_cast<float>(k) - 0.5f;
  const float e2 = e * e;
  const float m = fmaf(e2, e2 + 1.5f, 0.0625f) * static_cast<float>(1.0 / (255.0 * 255.0 * 255.0 * 255.0));
  const int d = static_cast<int>(f32_bits(y)) - static_cast<int>(f32_bits(m));
  index = k - (k > 0 && d < -32 ? 1 : 0);
  return k > 0 && static_cast<unsigned>(d + 32) <= 64u;
}

#if !defined(__CUDACC__)
// The block form element by element (what the kernels compute; for the host's checks): the common case, else the
// general form. scale: the block's scale (its absmax, NaN propagated).
inline int int8_index_block(float x, float scale, bool sgn) {
  const float div = int8_divisor(scale), inv = 1.0f / div;
  int index = 0;
  const bool redo = sgn ? int8_index_signed_fast(x, inv, index) : int8_index_unsigned_fast(x, inv, index);
  if (!int8_fast_scale(scale) || redo)
    index = sgn ? int8_encode_signed(x, div, INT8_SIGNED_MID) : int8_encode_unsigned(x, div, INT8_UNSIGNED_MID);
  return index;
}
#endif

// torch.amax's absmax step: NaN propagates.
MF_HD MF_INLINE float int8_absmax(float acc, float x) {
  const float a = fabsf(x);
  return (acc != acc || a != a) ? acc + a : (a > acc ? a : acc);
}

}  // namespace mf
