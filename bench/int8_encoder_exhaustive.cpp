// Exhaustive check of the int8_state encoders against the definition (layouts.int8_encode; csrc/compressed.h):
// per block of absmax s, y' = (x u) k with k = K / (s u), and the magnitude code is the count of integer-space
// midpoints m with !(|y'| <= m), found here by int8_count_below (a binary search over midpoints computed in
// float64). Every fp32 pattern x with |x| <= s (and the NaNs; the unsigned map over the patterns with the sign
// bit clear) is encoded in blocks whose element 0 is s, for the scale s given (default 1), by: compressed.h's
// element form (int8_encode_code: the CUDA functor's and the portable CPU kernel's, "scalar"; built with
// -DMF_INT8_ROOT_GUESS_SKEW=1e-4f or -1e-4f its guesses take a root off by that relative error, hundreds of times
// the device's approximate square root's), cpu/cpu_simd_avx512.inc's int8_encode_block_avx512_of_absmax
// ("avx512") and cpu/cpu_simd_avx2_int8.inc's int8_encode_block_avx2_of_absmax ("avx2"), what the CPU kernels
// call. A scale below 2^-64 exercises the u = 2^64 form; a NaN or inf scale the element form inside the SIMD
// ones. Needs an AVX-512 CPU; ~1 minute per scale on 2 cores.
//
//   g++ -O2 -fopenmp -ffp-contract=off -fno-math-errno -Icsrc -Wno-maybe-uninitialized \
//       bench/int8_encoder_exhaustive.cpp -o /tmp/int8_ex
//   for s in 1 3 0.7 1e-35; do /tmp/int8_ex $s; done   (prints "scale ...: bad scalar 0 avx512 0 avx2 0 (of ...)";
//   2026-12-04, the integer-space definition: 0 mismatches of every form for 1, 3, 0.7, 1e-35, 1e-27, 0x1p-64,
//   0x1p-65, 1e-40, 0.0012345, 1e30, 0x1.fffffep+127 and inf, and with -DMF_INT8_ROOT_GUESS_SKEW=+-1e-4f for 0.7
//   and 1e-35; with a skew of 1e-2f the scalar form fails, 54,521,469 mismatches for 1). 2026-12-06, with the
//   unsigned floor (y' > 0 takes code 1 at least): see bench/results/README.md)
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
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

// the definition, from y' computed as layouts.int8_encode does
static int definition(float x, float s, bool sgn) {
  const float u = s > 0.0f && s < 0x1p-64f ? 0x1p64f : 1.0f;
  const float big_k = sgn ? 16129.0f : 4228250624.0f;
  const float k = s == 0.0f ? 0.0f : big_k / (s * u);
  const float y = (x * u) * k;
  const int c = int8_count_below(sgn ? std::fabs(y) : y, sgn);
  if (!sgn) return c == 0 && y > 0.0f ? 1 : c;  // the floor (since 2026-12-06): a positive y' takes code 1 at least
  return y < 0.0f ? -c : c;
}

__attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c,bmi2")))
int main(int argc, char** argv) {
  const float s = argc > 1 ? strtof(argv[1], nullptr) : 1.0f;
  long long bad_s = 0, bad_v = 0, bad_2 = 0, checked = 0;
  const bool finite = std::isfinite(s);
  // every fp32 pattern, 255 at a time after the block's absmax (a chunk shares its sign bit)
  #pragma omp parallel for reduction(+:bad_s,bad_v,bad_2,checked) schedule(dynamic, 64)
  for (long long base = 0; base < (1LL << 32); base += 255) {
    alignas(64) float xb[256];
    alignas(64) int8_t c5[256], c2[256];
    for (int sgn = 0; sgn < 2; ++sgn) {
      xb[0] = s;
      int live = 0;
      for (int l = 1; l < 256; ++l) {
        const long long b = base + l - 1;
        const float x = b < (1LL << 32) ? f32_from_bits(static_cast<uint32_t>(b)) : 0.0f;
        const bool ok = (std::fabs(x) <= s || (x != x && !finite)) && (sgn || !(x < 0.0f));
        xb[l] = ok ? x : 0.0f;
        live += ok;
      }
      if (!live) continue;
      mf::cpu::t::int8_encode_block_avx512_of_absmax(xb, sgn, s, c5);
      mf::cpu::t::int8_encode_block_avx2_of_absmax(xb, sgn, s, c2);
      const Int8Factor f = int8_factor(s, sgn);
      for (int l = 0; l < 256; ++l) {
        const int want = definition(xb[l], s, sgn);
        const int sc = int8_encode_code(xb[l], f, sgn);
        const int v5 = sgn ? static_cast<int>(c5[l]) : static_cast<int>(static_cast<uint8_t>(c5[l]));
        const int v2 = sgn ? static_cast<int>(c2[l]) : static_cast<int>(static_cast<uint8_t>(c2[l]));
        ++checked;
        if (sc != want && bad_s++ < 5) printf("scalar sgn=%d x=%a got %d want %d\n", sgn, xb[l], sc, want);
        if (v5 != want && bad_v++ < 5) printf("avx512 sgn=%d x=%a got %d want %d\n", sgn, xb[l], v5, want);
        if (v2 != want && bad_2++ < 5) printf("avx2 sgn=%d x=%a got %d want %d\n", sgn, xb[l], v2, want);
      }
    }
  }
  printf("scale %a: bad scalar %lld avx512 %lld avx2 %lld (of %lld)\n", s, bad_s, bad_v, bad_2, checked);
  return bad_s + bad_v + bad_2 == 0 ? 0 : 1;
}
