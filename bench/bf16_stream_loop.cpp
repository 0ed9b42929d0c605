// The floor for the cpu kernels' bf16 SGD on one thread: plain SGD (p <- p - lr g, bf16 p and g, fp32 math,
// the kernels' RNE store) over 16M elements streamed from memory, side by side in one process: the kernel's own
// block loop (run_piece_blocked of cpu/cpu_kernels_impl.inc, compiled here as the avx512 variant compiles it);
// hand-written loops in registers (load, convert, compute, convert, store; 256 bits, and 512 on an AVX-512 CPU);
// the blocked form by hand (the block's bf16 into fp32 buffers, the rule over them, stored back, 32 elements a
// block), and that form with the kernel's software prefetch 512 elements ahead. Compare with a step of
// momentum_fused.SGD / torch.optim.SGD(fused=True) on the same sizes (docs/csrc.md, "Open"). On the Zen 5 EPYC
// of 2026-12-07 (bench/results/bf16_stream_loop-20261207-zen5.txt): the kernel's loop 2.5-2.9 ms, the 256-bit
// loops ~2.0 ms (+25 % with the prefetch), the 512-bit one ~1.5 ms like torch's fused step (which, it turned out,
// never stores bf16 params: docs/csrc.md); the kernel's loop without
// its prefetch and with 512-bit blocks (a patched copy of csrc) 1.55 ms: that form became the avx512w variant
// (-DMF_CPU_WIDE=1 below: 1.51-1.63 ms). Not a test: times move with the machine.
//
//   g++ -O3 -fopenmp -fno-math-errno -fno-trapping-math -ffp-contract=off -Icsrc bench/bf16_stream_loop.cpp -o /tmp/l
//   OMP_NUM_THREADS=1 /tmp/l [Melements=16] [rounds=3]
// With -DMF_CPU_WIDE=1 the kernel's row is the loop as cpu_kernels_avx512w.cpp compiles it (the variant picked on
// Zen 5 since 2026-12-07: no prefetch, 16 lanes, 512-bit buffer fills).
#include "cpu/cpu_kernels_variant.h"

#if !MF_X86_VARIANTS
#error "bench/bf16_stream_loop.cpp needs x86-64 with gcc or clang"
#endif

// the kernel's block loop, compiled as cpu_kernels_avx512.cpp (or with MF_CPU_WIDE, cpu_kernels_avx512w.cpp) compiles it
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wunused-function"  // the int8 helpers of the included kernel body
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c,bmi2")
namespace mf {
namespace cpu {
namespace avx512 {
#define MF_CPU_SIMD_AVX2 1
#define MF_CPU_SIMD_AVX512 1
#include "cpu/cpu_kernels_impl.inc"
__attribute__((noinline)) void kernel_sgd(bf16* p, const bf16* g, long n, const SgdScalars<float>& sc) {
  run_piece_blocked<RuleOp<RULE_SGD, 0>, bf16, bf16, false, false, float, float>(p, g, nullptr, nullptr, nullptr,
                                                                                   nullptr, 0, 0, n, sc);
}
}  // namespace avx512
}  // namespace cpu
}  // namespace mf
#pragma GCC pop_options

#include <immintrin.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>

using u16 = uint16_t;

// the kernels' float -> bf16 (cpu_simd_avx2.inc: round to nearest even, a NaN quieted with its sign kept)
__attribute__((target("avx2,fma"))) static inline __m256i rne(__m256 v) {
  const __m256i u = _mm256_castps_si256(v), top = _mm256_srli_epi32(u, 16);
  const __m256i lsb = _mm256_and_si256(top, _mm256_set1_epi32(1));
  const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), lsb), 16);
  const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
  const __m256i q = _mm256_or_si256(top, _mm256_set1_epi32(0x40));
  return _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(r), _mm256_castsi256_ps(q), nan));
}

__attribute__((target("avx2,fma"), noinline)) void in_registers(u16* p, const u16* g, long n, float lr) {
  const __m256 l = _mm256_set1_ps(lr);
  const __m256i z = _mm256_setzero_si256();
  for (long i = 0; i < n; i += 16) {
    const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i));
    const __m256i y = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(g + i));
    __m256 a = _mm256_castsi256_ps(_mm256_unpacklo_epi16(z, x)), b = _mm256_castsi256_ps(_mm256_unpackhi_epi16(z, x));
    a = _mm256_sub_ps(a, _mm256_mul_ps(l, _mm256_castsi256_ps(_mm256_unpacklo_epi16(z, y))));
    b = _mm256_sub_ps(b, _mm256_mul_ps(l, _mm256_castsi256_ps(_mm256_unpackhi_epi16(z, y))));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + i), _mm256_packus_epi32(rne(a), rne(b)));
  }
}

// the same at 512 bits (AVX-512 F/BW: 16 lanes, a masked OR for the NaNs)
__attribute__((target("avx512f,avx512bw"), noinline)) void in_registers_512(u16* p, const u16* g, long n, float lr) {
  const __m512 l = _mm512_set1_ps(lr);
  for (long i = 0; i < n; i += 16) {
    __m512 a = _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i))), 16));
    const __m512 b = _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(g + i))), 16));
    a = _mm512_sub_ps(a, _mm512_mul_ps(l, b));
    const __m512i u = _mm512_castps_si512(a), top = _mm512_srli_epi32(u, 16);
    const __m512i lsb = _mm512_and_si512(top, _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb), 16);
    r = _mm512_mask_or_epi32(r, _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q), top, _mm512_set1_epi32(0x40));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + i), _mm512_cvtepi32_epi16(r));
  }
}

template <bool PREFETCH>
__attribute__((target("avx2,fma"), noinline)) void blocked(u16* p, const u16* g, long n, float lr) {
  const __m256i z = _mm256_setzero_si256();
  for (long i = 0; i < n; i += 32) {
    alignas(32) float bp[32], bg[32];
    if (PREFETCH) {
      __builtin_prefetch(p + i + 512);
      __builtin_prefetch(g + i + 512);
    }
    for (int v = 0; v < 32; v += 16) {
      const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i + v));
      const __m256i y = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(g + i + v));
      _mm256_store_si256(reinterpret_cast<__m256i*>(bp + v), _mm256_unpacklo_epi16(z, x));
      _mm256_store_si256(reinterpret_cast<__m256i*>(bp + v + 8), _mm256_unpackhi_epi16(z, x));
      _mm256_store_si256(reinterpret_cast<__m256i*>(bg + v), _mm256_unpacklo_epi16(z, y));
      _mm256_store_si256(reinterpret_cast<__m256i*>(bg + v + 8), _mm256_unpackhi_epi16(z, y));
    }
#pragma omp simd simdlen(8)
    for (int l = 0; l < 32; ++l) bp[l] = bp[l] - lr * bg[l];
    for (int v = 0; v < 32; v += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + i + v),
                          _mm256_packus_epi32(rne(_mm256_load_ps(bp + v)), rne(_mm256_load_ps(bp + v + 8))));
  }
}

int main(int argc, char** argv) {
  const long n = (argc > 1 ? atol(argv[1]) : 16) * 1000000L / 32 * 32;
  const int rounds = argc > 2 ? atoi(argv[2]) : 3;
  u16* p = static_cast<u16*>(aligned_alloc(64, n * 2));
  u16* g = static_cast<u16*>(aligned_alloc(64, n * 2));
  for (long i = 0; i < n; ++i) {
    p[i] = static_cast<u16>(0x3f80 + (i & 7));  // ~1, ~0.5: normal values throughout
    g[i] = static_cast<u16>(0x3f00 + (i & 3));
  }
  const char* names[5] = {"in registers", "blocked", "blocked + prefetch 512 ahead", "in registers, 512 bits",
                          MF_CPU_WIDE ? "the kernel's loop (avx512w)" : "the kernel's loop (avx512)"};
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  double pack[mf::pack::sgd::size] = {};  // SGD(lr=1e-3), no momentum or decay
  pack[mf::pack::sgd::lr] = 1e-3;
  pack[mf::pack::sgd::grad_mult] = 1.0;
  const auto sc = mf::SgdScalars<float>::make(pack);
  for (int r = 0; r < rounds; ++r)
    for (int w = 0; w < (avx512 ? 5 : 3); ++w) {
      const auto t0 = std::chrono::steady_clock::now();
      for (int it = 0; it < 50; ++it) {
        if (w == 0) in_registers(p, g, n, 1e-3f);
        else if (w == 1) blocked<false>(p, g, n, 1e-3f);
        else if (w == 2) blocked<true>(p, g, n, 1e-3f);
        else if (w == 3) in_registers_512(p, g, n, 1e-3f);
        else mf::cpu::avx512::kernel_sgd(reinterpret_cast<mf::bf16*>(p), reinterpret_cast<const mf::bf16*>(g), n, sc);
      }
      const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count() / 50;
      printf("%-30s %.3f ms  (%.1f GB/s of 6 bytes per element)\n", names[w], ms, n * 6 / ms / 1e6);
    }
  free(p);
  free(g);
  return 0;
}
