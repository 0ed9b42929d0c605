// Shared prologue of the per-ISA kernel files cpu_kernels_{baseline,avx2,avx512,avx512w}.cpp.
#pragma once

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "../compressed.h"
#include "../storage.h"
#include "../update_rules.h"
#include "cpu_kernels.h"

// x86-64 with GCC/Clang: AVX2 and AVX-512 variants are compiled too and chosen at run time.
#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__)) && \
    !defined(MF_NO_X86_VARIANTS)
#define MF_X86_VARIANTS 1
#else
#define MF_X86_VARIANTS 0
#endif

// intrinsics for the explicit AVX2 code of the avx2/avx512 variants (gcc/clang declare every intrinsic
// whatever the -m flags; the variants use them under their target pragma), or of a -mavx2 -mf16c baseline
#if MF_X86_VARIANTS || (defined(__AVX2__) && defined(__F16C__))
#include <immintrin.h>
#endif

namespace mf {
namespace cpu {
namespace baseline {
bool dispatch(int rule, int flags, int layout, int dtype, const Bucket& b);
}
namespace avx2 {
bool dispatch(int rule, int flags, int layout, int dtype, const Bucket& b);
}
namespace avx512 {
bool dispatch(int rule, int flags, int layout, int dtype, const Bucket& b);
}
namespace avx512w {
bool dispatch(int rule, int flags, int layout, int dtype, const Bucket& b);
}
}  // namespace cpu
}  // namespace mf
