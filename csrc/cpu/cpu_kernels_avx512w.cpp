// Kernels for x86-64 with AVX-512 F/VL/BW/DQ, tuned for CPUs whose 512-bit units are full width (AMD Zen 5 and
// later; picked at run time by cpu_kernels.cpp): the avx512 variant's file compiled with MF_CPU_WIDE
// (cpu_kernels_impl.inc says what changes) in the namespace avx512w.
#define MF_CPU_WIDE 1
#define MF_AVX512_NAMESPACE avx512w
#include "cpu_kernels_avx512.cpp"
