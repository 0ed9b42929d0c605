// Kernels for x86-64 with AVX-512 F/VL/BW/DQ, tuned for CPUs whose 512-bit units are full width (AMD Zen 5 and
// later; picked at run time by cpu_kernels.cpp): the avx512 variant's code with MF_CPU_WIDE (cpu_kernels_impl.inc).
#include "cpu_kernels_variant.h"

#if MF_X86_VARIANTS
// gcc 12 flags its own AVX-512 intrinsics (their _mm512_undefined_* operands) as "may be used uninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"  // the same, in _mm512_permutexvar_epi8 (VBMI)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c,bmi2")
namespace mf {
namespace cpu {
namespace avx512w {
#define MF_CPU_SIMD_AVX2 1  // explicit AVX2 + F16C conversions (cpu_simd_avx2.inc), 512-bit loads (MF_CPU_WIDE)
#define MF_CPU_SIMD_AVX512 1  // explicit AVX-512 int8_state block codes (cpu_simd_avx512.inc)
#define MF_CPU_WIDE 1
#include "cpu_kernels_impl.inc"
}  // namespace avx512w
}  // namespace cpu
}  // namespace mf
#pragma GCC pop_options
#endif
