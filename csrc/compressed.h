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
// int8_state: per block of INT8_BLOCK elements one fp32 scale (the block's absmax, NaN if one is); an element's
// value is table[index] * scale (fp32 product). Signed states: int8 code c in -127..127, index c + 127 into
// INT8_SIGNED_TABLE (sign(c) c^2 / 127^2); unsigned: uint8 code = index into INT8_UNSIGNED_TABLE (c^4 / 255^4).
// The encode runs in the map's integer space (layouts.int8_encode is the definition): per block, u = 2^64 if
// 0 < s < 2^-64 else 1, k = K / (s u) (one fp32 division per block; 0 for s = 0), K = 127^2 or fl32(255^4); per
// element y' = (x u) k (two fp32 products, the first exact), and the magnitude code is the count of midpoints
// m_j = ((j - 1)^2 + j^2) / 2 = j (j - 1) + 1/2 (exact) or ((j - 1)^4 + j^4) / 2 (rounded once) with
// !(|y'| <= m_j): a value on a midpoint takes the smaller magnitude, a NaN the top code; the sign is y' < 0's.
// The count is found from a guess and ONE comparison. The magnitude code c* of a = |y'| and r = sqrt(a) (signed)
// or a^(1/4) (unsigned) satisfy c* - 0.5 < r < c* + 1: the root of the midpoint between codes c and c + 1 lies
// strictly between c + 0.5 and c + 1 (a power mean of c and c + 1 above their arithmetic mean), by more than 9e-4
// (far more than the fp32 rounding of the unsigned midpoints moves it) above c + 0.5 and 0.15 below c + 1. So the
// guess floor(r + 0.5 + INT8_GUESS_BIAS) is c* or c* + 1 for any error |e| < INT8_GUESS_BIAS in r (the device's
// approximate square root, the 2^-14 and 2^-12 approximations of the AVX-512 and AVX2 forms): a magnitude one too
// large is corrected by comparing a with the midpoint below it, computed exactly from the code (no table).
#pragma once

#include "mf_common.h"

#if !defined(__CUDACC__)
#include <cmath>
#endif

namespace mf {

// ------------------------------------------------------------------------------------------- master16
// (bf16 param bits, int16 remainder bits) -> fp32 master. A pair that decodes to a NaN while the param is not one
// is one no encode makes: a +-0 or +-inf written into the param between steps, beside a stale remainder (the
// borrow of a zero param wraps to a NaN's exponent). It decodes to the param itself, as the `master` layout
// restarts a written element from its param (layouts.master16_decode).
MF_HD MF_INLINE float master16_decode(uint16_t param, uint16_t remainder) {
  const uint32_t hi = static_cast<uint32_t>(param), lo = static_cast<uint32_t>(remainder);
  const uint32_t u = ((hi - (lo >> 15)) << 16) | lo;
  const bool stale = (u & 0x7FFFFFFFu) > 0x7F800000u && (hi & 0x7FFFu) <= 0x7F80u;
  return f32_from_bits(stale ? hi << 16 : u);
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
// (-128, outside the map: no encoder writes it, a load refuses it; written into the codes by hand it decodes as -127
// on every backend, not an index before the table)
MF_HD MF_INLINE int int8_signed_index(int8_t code) { return (code < -127 ? -127 : static_cast<int>(code)) + 127; }
MF_HD MF_INLINE int int8_unsigned_index(uint8_t code) { return static_cast<int>(code); }

// The decoded value of table index `index` in a block of scale `scale` (table: INT8_SIGNED_TABLE or
// INT8_UNSIGNED_TABLE, or the device's copy of it).
MF_HD MF_INLINE float int8_decode(const float* table, int index, float scale) { return table[index] * scale; }

constexpr float INT8_GUESS_BIAS = 0.125f;

// The CPU vector decodes compute the table values in fp32 (cpu/cpu_simd_avx2_int8.inc, cpu/cpu_simd_avx512.inc; each
// equal to the generated table for every code, tested): signed n / 16129 (n = c |c|) as q = n r, q + (n - 16129 q) r
// with r = fl(1 / 16129) (a correctly rounded division for these n); unsigned c^4 / 255^4 as p + (h k_lo + l k_hi + e)
// with c^4 = h + l (h = fl(c^4), l its exact error), 1 / 255^4 ~ k_hi + k_lo, p = fl(h k_hi) and e its exact error.
constexpr float INT8_DECODE_SIGNED_RCP = 0x1.040c2p-14f;     // fl(1 / 16129)
constexpr float INT8_DECODE_UNSIGNED_K_HI = 0x1.040a14p-32f;  // fl(1 / 255^4)
constexpr float INT8_DECODE_UNSIGNED_K_LO = 0x1.19c2a4p-59f;  // fl(1 / 255^4 - k_hi)
// INT8_K_SIGNED (127^2), INT8_K_UNSIGNED (255^4 rounded to fp32), INT8_TINY (2^-64): generated/tables.h

// A block's factors: y' = (x * u) * k (layouts.int8_factors)
struct Int8Factor {
  float u, k;
};

MF_HD MF_INLINE float int8_div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

MF_HD MF_INLINE Int8Factor int8_factor(float scale, bool sgn) {
  const float u = scale > 0.0f && scale < INT8_TINY ? 1.0f / INT8_TINY : 1.0f;
  return {u, scale == 0.0f ? 0.0f : int8_div_rn(sgn ? INT8_K_SIGNED : INT8_K_UNSIGNED, scale * u)};
}

// A block whose scale s is its own absmax and either 0 or finite and >= INT8_TINY: u = 1, k finite, and every
// |y'| <= K (1 + 2^-23), so that the guesses need no clamp and no NaN handling (the vector forms' common case).
MF_HD MF_INLINE bool int8_fast_scale(float scale) {
  return scale == 0.0f || (scale >= INT8_TINY && scale <= 0x1.fffffep127f);
}

// The midpoint between the magnitude codes c - 1 and c (c >= 1), in the integer space: ((c - 1)^2 + c^2) / 2 =
// c (c - 1) + 1/2 (exact), or ((c - 1)^4 + c^4) / 2 = w^2 - 1/2 with w = c (c - 1) + 1 (exact; one rounding in
// the fma: the correctly rounded midpoint).
MF_HD MF_INLINE float int8_mid_signed(float c) { return fmaf(c, c - 1.0f, 0.5f); }
MF_HD MF_INLINE float int8_mid_unsigned(float c) {
  const float w = fmaf(c, c - 1.0f, 1.0f);
  return fmaf(w, w, -0.5f);
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

// The guessed magnitude code (c* or c* + 1): min(floor(r + 0.5 + bias), top); NaN gives top.
MF_HD MF_INLINE int int8_guess_code(float r, int top) {
  const float t = r + (0.5f + INT8_GUESS_BIAS);
  return t < static_cast<float>(top) ? static_cast<int>(t) : top;
}

// The code of an integer-space value y' (signed: -127..127; unsigned: 0..255, y' <= 0 gives 0).
MF_HD MF_INLINE int int8_code_signed(float y) {
  const float a = fabsf(y);
  int c = int8_guess_code(int8_root_guess(a), 127);
  if (c > 0 && a <= int8_mid_signed(static_cast<float>(c))) --c;
  return y < 0.0f ? -c : c;
}

// Unsigned, a y' > 0 takes code 1 at least (layouts.int8_codes_of's floor: a positive second moment never
// decodes to 0).
MF_HD MF_INLINE int int8_code_unsigned(float y) {
  int c = int8_guess_code(int8_root_guess(int8_root_guess(y <= 0.0f ? 0.0f : y)), 255);  // NaN stays NaN: top
  if (c > 0 && y <= int8_mid_unsigned(static_cast<float>(c))) --c;
  return c == 0 && y > 0.0f ? 1 : c;
}

// The stochastic code of an integer-space value y' with 16 random bits r (layouts int8_sr, master16_int8_sr;
// layouts.int8_codes_sr_of is the definition): with p(c) = c^2 (signed) or c^4 (unsigned), a = |y'| (unsigned:
// max(y', 0)) and f the largest code with p(f) <= a (the top code at or above it), the magnitude is f + 1 when
// r (p(f + 1) - p(f)) < (a - p(f)) 2^16, else f; NaN: the top code. f from a guess of the root t (int8_root_guess:
// off by far less than 1/2, so n = round(guess) is floor(t) or floor(t) + 1): f = n - (a < p(n)); unsigned, f = 0
// with a > 0 always goes up (the floor: layouts.int8_codes_sr_of).
// Signed in fp32, where every step is exact (f <= 127: f^2 and 2f + 1 exact, a - f^2 exact for f^2 <= a,
// r (2f + 1) < 2^24; no FMA needed; NaN: n = 127, so f = 127).
MF_HD MF_INLINE int int8_code_sr_signed(float y, uint32_t r) {
  const float a = fabsf(y);
  const float n = rintf(fminf(int8_root_guess(a), 127.0f));
  const float f = a < n * n ? n - 1.0f : n;
  const bool up = f < 127.0f && static_cast<float>(r) * (2.0f * f + 1.0f) < (a - f * f) * 65536.0f;
  const int c = static_cast<int>(f) + (up ? 1 : 0);
  return y < 0.0f ? -c : c;
}

// Unsigned in float64 (r G reaches 2^42): the bracket's other end p(n - 1) or p(n + 1); every product and
// difference is exact (integers below 2^49, fp32 values below 2^33), so the comparison is the exact one whatever
// the compiler contracts. (The CPU vector forms settle most values in fp32 with a proven error bound and an FMA,
// cpu/cpu_simd_avx512.inc int8_sr_codes16_unsigned_f32; an element form of it beside this one raised the CUDA
// kernels' static instructions and spills, bench.kernel_report 2026-12-07, and no GPU could time either.)
MF_HD MF_INLINE double int8_sr_pow4(double c) { return (c * c) * (c * c); }
MF_HD MF_INLINE int int8_code_sr(float y, uint32_t r, bool sgn) {
  if (sgn) return int8_code_sr_signed(y, r);
  if (y != y) return 255;
  const float a32 = y > 0.0f ? y : 0.0f;
  const double n = static_cast<double>(rintf(fminf(int8_root_guess(int8_root_guess(a32)), 255.0f)));
  const double a = static_cast<double>(a32);
  const double pn = int8_sr_pow4(n);
  const bool below = a < pn;
  const double f = below ? n - 1.0 : n;
  const double q = int8_sr_pow4(below ? f : n + 1.0);
  const double lo = below ? q : pn, hi = below ? pn : q;
  const bool up = f < 255.0 && (static_cast<double>(r) * (hi - lo) < (a - lo) * 65536.0 || (f == 0.0 && a > 0.0));
  return static_cast<int>(f) + (up ? 1 : 0);
}

// The code of x in a block of factors f (int8_factor of its scale).
MF_HD MF_INLINE int int8_encode_code(float x, Int8Factor f, bool sgn) {
  const float y = (x * f.u) * f.k;
  return sgn ? int8_code_signed(y) : int8_code_unsigned(y);
}

#if !defined(__CUDACC__)
// A block of INT8_BLOCK values x of any scale (their absmax, NaN if one is), element by element: the CPU kernels'
// portable form, and the SIMD forms' for the blocks of a NaN or inf scale.
inline void int8_encode_block_elementwise(const float* __restrict x, bool sgn, float scale, void* codes) {
  const Int8Factor f = int8_factor(scale, sgn);
  if (sgn) {
    int8_t* c = static_cast<int8_t*>(codes);
#pragma omp simd
    for (int l = 0; l < INT8_BLOCK; ++l) c[l] = static_cast<int8_t>(int8_encode_code(x[l], f, true));
  } else {
    uint8_t* c = static_cast<uint8_t*>(codes);
#pragma omp simd
    for (int l = 0; l < INT8_BLOCK; ++l) c[l] = static_cast<uint8_t>(int8_encode_code(x[l], f, false));
  }
}

// The definition's count by a binary search over the midpoints computed independently (in float64, rounded once),
// for the checks of the guess-based forms: the magnitude code of a = |y'| (signed) or of y' (unsigned).
inline int int8_count_below(float a, bool sgn) {
  int lo = 0, hi = sgn ? 127 : 255;  // the count is in [lo, hi]
  while (lo < hi) {
    const int j = (lo + hi) / 2 + 1;  // midpoint j, between codes j - 1 and j
    const double d = j;
    const float m = sgn ? static_cast<float>(d * (d - 1.0) + 0.5)
                        : static_cast<float>(((d - 1.0) * (d - 1.0) * (d - 1.0) * (d - 1.0) + d * d * d * d) / 2.0);
    if (!(a <= m))
      lo = j;
    else
      hi = j - 1;
  }
  return lo;
}
#endif

// numel of a param whose state int8_state quantizes (layouts.int8_quantized)
MF_HD MF_INLINE bool int8_quantized(long long numel) { return numel >= INT8_MIN_NUMEL && numel % INT8_BLOCK == 0; }

// torch.amax's absmax step: NaN propagates.
MF_HD MF_INLINE float int8_absmax(float acc, float x) {
  const float a = fabsf(x);
  return (acc != acc || a != a) ? acc + a : (a > acc ? a : acc);
}

}  // namespace mf
