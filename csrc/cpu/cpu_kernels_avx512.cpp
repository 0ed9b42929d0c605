// Kernels for x86-64 with AVX-512 F/VL/BW/DQ (picked at run time by cpu_kernels.cpp). Also the body of
// cpu_kernels_avx512w.cpp, which includes this file with MF_CPU_WIDE 1 and the namespace avx512w.
#include "cpu_kernels_variant.h"

#if !defined(MF_AVX512_NAMESPACE)
#define MF_AVX512_NAMESPACE avx512
#endif

#if MF_X86_VARIANTS
// gcc 12 flags its own AVX-512 intrinsics (their _mm512_undefined_* operands) as "may be used uninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"  // the same, in _mm512_permutexvar_epi8 (VBMI)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c,bmi2")
namespace mf {
namespace cpu {
namespace MF_AVX512_NAMESPACE {
#define MF_CPU_SIMD_AVX2 1  // explicit AVX2 + F16C conversions (cpu_simd_avx2.inc; 512-bit forms under MF_CPU_WIDE)
#define MF_CPU_SIMD_AVX512 1  // explicit AVX-512 int8_state block codes (cpu_simd_avx512.inc)
#include "cpu_kernels_impl.inc"
}  // namespace MF_AVX512_NAMESPACE
}  // namespace cpu
}  // namespace mf
#pragma GCC pop_options
#endif
