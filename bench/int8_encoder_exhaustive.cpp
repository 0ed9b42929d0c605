// Exhaustive check of the int8_state encoders (csrc/compressed.h's int8_index_signed / _unsigned, the portable
// form, cpu/cpu_simd_avx512.inc's int8_encode_block_avx512 and cpu/cpu_simd_avx2_int8.inc's int8_encode_block_avx2)
// against the definition, int8_count_below (a binary
// search over the generated midpoints) of the fp32 quotient x / div: every one of the 2^32 fp32 bit patterns as
// x for the divisor given (default 1; the unsigned map over the patterns with the sign bit clear and the NaNs).
// A divisor other than 1 exercises the AVX-512 form's multiply-by-reciprocal and its exact fallback near a
// midpoint; one below 2^-100 its plain-division path. The AVX-512 form for a block of known absmax
// (int8_encode_block_avx512_of_absmax, its integer-space compare for a scale in [2^-90, 2^100], the general form
// outside; and int8_encode_block_avx2_of_absmax, what the kernels call) are checked on every pattern x with
// |x| <= div, in blocks whose absmax is div ("absmax" below: both forms' mismatches), and so is
// compressed.h's scalar block form int8_index_block, the CUDA functor's ("block"; built with
// -DMF_INT8_ROOT_GUESS_SKEW=1e-4f or -1e-4f its guesses take a root off by that relative error, hundreds of
// times the device's approximate square root's). Needs an AVX-512 CPU; ~2 minutes per divisor on 2 cores.
//
//   g++ -O2 -fopenmp -ffp-contract=off -fno-math-errno -Icsrc -Wno-maybe-uninitialized \
//       bench/int8_encoder_exhaustive.cpp -o /tmp/int8_ex
//   for d in 1 3 0.7 1e-35; do /tmp/int8_ex $d; done   (prints "div ...: bad scalar 0 vector 0 avx2 0 absmax 0
//   block 0 (of ...)"; 2026-12-04, the integer-space form: 0 mismatches of every kind for 1, 3, 0.7, 1e-35,
//   1e-27, 0x1p-90, 0.0012345, 1e30, 0x1.fffffep+99)
#include <cstdio>
#include <cstdlib>
#include <cstdint>
#include <immintrin.h>
#include "mf_common.h"
#include "compressed.h"
namespace mf { namespace cpu { namespace t {
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c,bmi2")
#include "cpu/cpu_simd_avx512.inc"
#include "cpu/cpu_simd_avx2_int8.inc"
#pragma GCC pop_options
}}}
using namespace mf;
__attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c,bmi2")))
int main(int argc, char** argv) {
  const float div = argc > 1 ? strtof(argv[1], nullptr) : 1.0f;
  long long bad_s = 0, bad_v = 0, bad_2 = 0, bad_a = 0, bad_b = 0, checked_a = 0;
  // every fp32 pattern, 256 at a time (a chunk shares its sign bit)
  #pragma omp parallel for reduction(+:bad_s,bad_v,bad_2,bad_a,bad_b,checked_a) schedule(dynamic, 64)
  for (long long base = 0; base < (1LL << 32); base += 256) {
    alignas(64) float x[256];
    for (int l = 0; l < 256; ++l) x[l] = f32_from_bits((uint32_t)(base + l));
    for (int sgn = 0; sgn < 2; ++sgn) {
      alignas(64) int8_t codes[256], codes2[256];
      if (!sgn) { bool allneg = (x[0] < 0); if (allneg) continue; }
      const float* mid = sgn ? INT8_SIGNED_MID : INT8_UNSIGNED_MID;
      int nmid = sgn ? 254 : 255;
      mf::cpu::t::int8_encode_block_avx512(x, sgn, div, codes);
      mf::cpu::t::int8_encode_block_avx2(x, sgn, div, codes2);
      for (int l = 0; l < 256; ++l) {
        int want = int8_count_below(x[l] / div, mid, nmid);
        int s = sgn ? int8_encode_signed(x[l], div, mid) : int8_encode_unsigned(x[l], div, mid);
        int v = sgn ? (int)codes[l] + 127 : (int)(uint8_t)codes[l];
        if (s != want) { if (bad_s < 5) printf("scalar sgn=%d x=%a got %d want %d\n", sgn, x[l], s, want); ++bad_s; }
        if (v != want) { if (bad_v < 5) printf("vector sgn=%d x=%a got %d want %d\n", sgn, x[l], v, want); ++bad_v; }
        int v2 = sgn ? (int)codes2[l] + 127 : (int)(uint8_t)codes2[l];
        if (v2 != want) { if (bad_2 < 5) printf("avx2 sgn=%d x=%a got %d want %d\n", sgn, x[l], v2, want); ++bad_2; }
      }
      // the block form of known absmax: element 0 is the block's absmax div, the patterns with |x| <= div follow
      alignas(64) float xb[256];
      xb[0] = div;
      for (int l = 1; l < 256; ++l) xb[l] = fabsf(x[l]) <= div ? x[l] : 0.0f;
      mf::cpu::t::int8_encode_block_avx512_of_absmax(xb, sgn, div, codes);
      mf::cpu::t::int8_encode_block_avx2_of_absmax(xb, sgn, div, codes2);
      for (int l = 0; l < 256; ++l) {
        if (l > 0 && !(fabsf(x[l]) <= div)) continue;
        int want = int8_count_below(xb[l] / div, mid, nmid);
        int v = sgn ? (int)codes[l] + 127 : (int)(uint8_t)codes[l];
        int v2 = sgn ? (int)codes2[l] + 127 : (int)(uint8_t)codes2[l];
        int vb = int8_index_block(xb[l], div, sgn);  // the CUDA functor's scalar block form
        ++checked_a;
        if (vb != want) { if (bad_b < 5) printf("block sgn=%d x=%a got %d want %d\n", sgn, xb[l], vb, want); ++bad_b; }
        if (v != want) { if (bad_a < 5) printf("absmax sgn=%d x=%a got %d want %d\n", sgn, xb[l], v, want); ++bad_a; }
        if (v2 != want) { if (bad_a < 5) printf("absmax avx2 sgn=%d x=%a got %d want %d\n", sgn, xb[l], v2, want); ++bad_a; }
      }
    }
  }
  printf("div %a: bad scalar %lld vector %lld avx2 %lld absmax %lld block %lld (of %lld)\n", div, bad_s, bad_v,
         bad_2, bad_a, bad_b, checked_a);
  return bad_s + bad_v + bad_2 + bad_a + bad_b == 0 ? 0 : 1;
}
