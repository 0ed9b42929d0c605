// Symmetric bf16 products for the Newton-Schulz phase of Muon (no torch headers): out = alpha * Y Z^T + beta * C0
// for [n, m, k] bf16 stacks Y, Z whose product is known to be symmetric (Y = Z, or Y and Z symmetric and
// commuting: every m x m product of the Gram form, momentum_fused/specs_muon.py). Only the tiles on or above the
// diagonal are computed (~55% of the multiply-adds at m = 384); the lower triangle is their mirror image, so
// the result is exactly symmetric. fp32 accumulation, one rounding to bf16 (round to nearest even) at the end,
// as a bf16 GEMM with an fp32 accumulator does. AVX-512-BF16 (VDPBF16PS) only: sym_mm_bf16_available() says
// whether this CPU has it, has no AMX, and MOMENTUM_FUSED_CPU_ISA does not cap it off; the caller uses torch
// otherwise.
#include "cpu_symmm.h"

#include <omp.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_kernels.h"
#include "cpu_kernels_variant.h"

namespace mf {
namespace cpu {

#if MF_X86_VARIANTS
namespace {

constexpr int MR = 12;  // rows of Y per register tile (12 x 2 zmm accumulators)
constexpr int NR = 32;  // columns per panel (2 zmm of 16 fp32)

// gcc 12 flags its own AVX-512 intrinsics (their _mm512_undefined_* operands) as "may be used uninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx512bf16,avx2,fma")

// Z rows [j0, j0 + NR) as a panel of bf16 pairs: panel[kk * NR + l] = (Z[j0 + l, 2kk], Z[j0 + l, 2kk + 1]), rows
// past m zero. 16 x 16 dword blocks are transposed in registers.
void pack_panel(const uint16_t* Z, int64_t m, int64_t k, int64_t j0, uint32_t* panel) {
  const int64_t kp = k / 2;
  const int rows = (int)std::min<int64_t>(NR, m - j0);
  const uint32_t* z32 = reinterpret_cast<const uint32_t*>(Z);
  for (int64_t kk0 = 0; kk0 < kp; kk0 += 16) {
    const int w = (int)std::min<int64_t>(16, kp - kk0);
    const __mmask16 lm = (__mmask16)((1u << w) - 1u);
    for (int half = 0; half < 2; ++half) {
      __m512i r[16];
      for (int l = 0; l < 16; ++l) {
        const int row = half * 16 + l;
        r[l] = row < rows ? _mm512_maskz_loadu_epi32(lm, z32 + (j0 + row) * kp + kk0) : _mm512_setzero_si512();
      }
      // transpose the 16 x 16 dword block r (row l = Z row, lane = kk) into t (row = kk, lane = Z row)
      __m512i t[16];
      for (int l = 0; l < 16; l += 2) {
        t[l] = _mm512_unpacklo_epi32(r[l], r[l + 1]);
        t[l + 1] = _mm512_unpackhi_epi32(r[l], r[l + 1]);
      }
      for (int l = 0; l < 16; l += 4) {
        r[l] = _mm512_unpacklo_epi64(t[l], t[l + 2]);
        r[l + 1] = _mm512_unpackhi_epi64(t[l], t[l + 2]);
        r[l + 2] = _mm512_unpacklo_epi64(t[l + 1], t[l + 3]);
        r[l + 3] = _mm512_unpackhi_epi64(t[l + 1], t[l + 3]);
      }
      for (int l = 0; l < 4; ++l) {
        t[l] = _mm512_shuffle_i32x4(r[l], r[l + 4], 0x88);
        t[l + 4] = _mm512_shuffle_i32x4(r[l], r[l + 4], 0xdd);
        t[l + 8] = _mm512_shuffle_i32x4(r[l + 8], r[l + 12], 0x88);
        t[l + 12] = _mm512_shuffle_i32x4(r[l + 8], r[l + 12], 0xdd);
      }
      for (int l = 0; l < 8; ++l) {
        r[l] = _mm512_shuffle_i32x4(t[l], t[l + 8], 0x88);
        r[l + 8] = _mm512_shuffle_i32x4(t[l], t[l + 8], 0xdd);
      }
      // r[q] now holds kk = kk0 + q for the Z rows half * 16 .. half * 16 + 15
      for (int q = 0; q < w; ++q) _mm512_storeu_si512(panel + (kk0 + q) * NR + half * 16, r[q]);
    }
  }
}

// acc[r][h] += sum over kk of Y[i0 + r, pair kk] . panel[kk][16h .. 16h + 15], for `mr` rows
template <int R>
inline void tile(const uint16_t* Y, int64_t k, int64_t i0, const uint32_t* panel, __m512 (&acc)[MR][2]) {
  const int64_t kp = k / 2;
  const uint32_t* y[R];
  for (int r = 0; r < R; ++r) y[r] = reinterpret_cast<const uint32_t*>(Y + (i0 + r) * k);
  __m512 a[R][2];
  for (int r = 0; r < R; ++r) a[r][0] = a[r][1] = _mm512_setzero_ps();
  for (int64_t kk = 0; kk < kp; ++kk) {
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(panel + kk * NR);
    const __m512bh b1 = (__m512bh)_mm512_loadu_si512(panel + kk * NR + 16);
#pragma GCC unroll 12
    for (int r = 0; r < R; ++r) {
      const __m512bh av = (__m512bh)_mm512_set1_epi32((int)y[r][kk]);
      a[r][0] = _mm512_dpbf16_ps(a[r][0], av, b0);
      a[r][1] = _mm512_dpbf16_ps(a[r][1], av, b1);
    }
  }
  for (int r = 0; r < R; ++r) {
    acc[r][0] = a[r][0];
    acc[r][1] = a[r][1];
  }
}

inline __m512 load_bf16(const uint16_t* p, __mmask16 mask) {
  const __m256i h = _mm256_maskz_loadu_epi16(mask, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// one tile: rows [i0, i0 + mr) x columns [j0, j0 + NR) of out (columns past m not stored)
void run_tile(const uint16_t* Y, const uint16_t* C0, uint16_t* out, int64_t m, int64_t k, int64_t i0, int64_t j0,
              const uint32_t* panel, float alpha, float beta) {
  // rows past the panel's last column belong to the lower triangle, which the mirror of another panel writes
  const int mr = (int)std::min<int64_t>(MR, std::min<int64_t>(m, j0 + NR) - i0);
  __m512 acc[MR][2];
  switch (mr) {
#define MF_TILE_CASE(R) \
  case R: tile<R>(Y, k, i0, panel, acc); break;
    MF_TILE_CASE(1) MF_TILE_CASE(2) MF_TILE_CASE(3) MF_TILE_CASE(4) MF_TILE_CASE(5) MF_TILE_CASE(6)
    MF_TILE_CASE(7) MF_TILE_CASE(8) MF_TILE_CASE(9) MF_TILE_CASE(10) MF_TILE_CASE(11) MF_TILE_CASE(12)
#undef MF_TILE_CASE
    default: return;
  }
  const __m512 va = _mm512_set1_ps(alpha), vb = _mm512_set1_ps(beta);
  for (int h = 0; h < 2; ++h) {
    const int64_t c = j0 + 16 * h;
    if (c >= m) break;
    const int w = (int)std::min<int64_t>(16, m - c);
    const __mmask16 mask = (__mmask16)(w == 16 ? 0xffffu : ((1u << w) - 1u));
    for (int r = 0; r < mr; ++r) {
      __m512 v = _mm512_mul_ps(va, acc[r][h]);
      if (C0 != nullptr) v = _mm512_add_ps(v, _mm512_mul_ps(vb, load_bf16(C0 + (i0 + r) * m + c, mask)));
      const __m256i o = (__m256i)_mm512_cvtneps_pbh(v);
      _mm256_mask_storeu_epi16(out + (i0 + r) * m + c, mask, o);
    }
  }
}

// the lower triangle's rows [j0, j0 + NR) from the upper triangle: out[r][c] = out[c][r] for c < r (row c of the
// panel's columns is read contiguously, its values go down column c)
void mirror_panel(uint16_t* out, int64_t m, int64_t j0) {
  const int64_t j1 = std::min<int64_t>(j0 + NR, m);
  for (int64_t c = 0; c < j1; ++c) {
    const uint16_t* row = out + c * m;
    for (int64_t r = std::max<int64_t>(j0, c + 1); r < j1; ++r) out[r * m + c] = row[r];
  }
}

#pragma GCC pop_options

}  // namespace
#endif

bool sym_mm_bf16_available() {
#if MF_X86_VARIANTS
  static const bool ok = [] {
    __builtin_cpu_init();
    // not with AMX: torch's bf16 GEMMs run on its tiles there, several times VDPBF16PS's peak
    return std::strncmp(isa(), "avx512", 6) == 0 && __builtin_cpu_supports("avx512bf16") &&
           !__builtin_cpu_supports("amx-bf16");
  }();
  return ok;
#else
  return false;
#endif
}

bool sym_mm_bf16(int64_t n, int64_t m, int64_t k, const uint16_t* Y, const uint16_t* Z, const uint16_t* C0,
                 uint16_t* out, float alpha, float beta, int nthreads) {
#if MF_X86_VARIANTS
  if (!sym_mm_bf16_available() || k % 2 != 0) return false;
  if (n == 0 || m == 0) return true;
  const int64_t panels = (m + NR - 1) / NR;
  const int64_t items = n * panels;
  // one work item: a panel of NR columns of one matrix, packed into a buffer of the thread, then its tiles on or
  // above the diagonal (row tiles from 0 to the panel's last column), then the mirror of those into the rows
  // of the lower triangle that the panel's columns index. Items write disjoint parts of out: no barrier. The
  // widest panels (most tiles) go first.
#pragma omp parallel num_threads(nthreads)
  {
    std::vector<uint32_t> panel((size_t)(k / 2 * NR));
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < items; ++it) {
      const int64_t b = it % n, p = panels - 1 - it / n, j0 = p * NR;
      const uint16_t* y = Y + b * m * k;
      uint16_t* o = out + b * m * m;
      pack_panel(Z + b * m * k, m, k, j0, panel.data());
      for (int64_t i0 = 0; i0 < m && i0 < j0 + NR; i0 += MR)
        run_tile(y, C0 ? C0 + b * m * m : nullptr, o, m, k, i0, j0, panel.data(), alpha, beta);
      mirror_panel(o, m, j0);
    }
  }
  return true;
#else
  (void)n, (void)m, (void)k, (void)Y, (void)Z, (void)C0, (void)out, (void)alpha, (void)beta, (void)nthreads;
  return false;
#endif
}

}  // namespace cpu
}  // namespace mf
