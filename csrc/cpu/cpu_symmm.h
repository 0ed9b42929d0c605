// Symmetric bf16 products of the Muon Newton-Schulz phase (cpu_symmm.cpp). No torch headers.
#pragma once

#include <cstdint>

namespace mf {
namespace cpu {

// Whether sym_mm_bf16 runs here: x86-64 with AVX-512-BF16, and MOMENTUM_FUSED_CPU_ISA not below avx512.
bool sym_mm_bf16_available();

// out[b] = alpha * Y[b] Z[b]^T + beta * C0[b] (C0 may be null: beta ignored) for contiguous [n, m, k] bf16 Y, Z
// and [n, m, m] bf16 C0, out (out may not alias Y, Z or C0), when the product is symmetric: only the
// tiles on or above the diagonal are computed, the lower triangle is their mirror. Returns false, having done
// nothing, when unavailable or k is odd.
bool sym_mm_bf16(int64_t n, int64_t m, int64_t k, const uint16_t* Y, const uint16_t* Z, const uint16_t* C0,
                 uint16_t* out, float alpha, float beta, int nthreads);

}  // namespace cpu
}  // namespace mf
