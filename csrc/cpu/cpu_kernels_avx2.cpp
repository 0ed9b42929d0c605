// Kernels for x86-64 with AVX2 + FMA + F16C (picked at run time by cpu_kernels.cpp).
#include "cpu_kernels_variant.h"

#if MF_X86_VARIANTS
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi2")
namespace mf {
namespace cpu {
namespace avx2 {
#define MF_CPU_SIMD_AVX2 1  // explicit AVX2 + F16C conversions (cpu_simd_avx2.inc)
#include "cpu_kernels_impl.inc"
}  // namespace avx2
}  // namespace cpu
}  // namespace mf
#pragma GCC pop_options
#endif
