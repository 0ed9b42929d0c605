// CPU kernels of momentum_fused (no torch headers): run-time choice of the instruction-set variant.
// The kernel body (cpu_kernels_impl.inc) is compiled once per variant, in cpu_kernels_<isa>.cpp; the
// math comes from ../update_rules.h, the header the CUDA kernels use too.
#include <cstdlib>
#include <stdexcept>
#include <string>

#include "cpu_kernels_variant.h"

namespace mf {
namespace cpu {

namespace {
enum Isa { ISA_BASELINE = 0, ISA_AVX2 = 1, ISA_AVX512 = 2 };

int detect() {
  int best = ISA_BASELINE;
#if MF_X86_VARIANTS
  __builtin_cpu_init();
  // both variants use F16C (the fp16 conversions of cpu_simd_avx2.inc; every AVX2 CPU has it) and are compiled
  // with BMI2 (#pragma GCC target), which the compiler may emit anywhere: a VM can expose AVX2 without it
  const bool f16c_bmi2 = __builtin_cpu_supports("f16c") && __builtin_cpu_supports("bmi2");
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("fma") && f16c_bmi2)
    best = ISA_AVX512;
  else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && f16c_bmi2)
    best = ISA_AVX2;
#endif
  // MOMENTUM_FUSED_CPU_ISA=baseline|avx2|avx512 caps the choice (tests; never raises it above the CPU's)
  const char* env = std::getenv("MOMENTUM_FUSED_CPU_ISA");
  if (env != nullptr) {
    const std::string want(env);
    const int cap = want == "baseline" ? ISA_BASELINE : want == "avx2" ? ISA_AVX2 : ISA_AVX512;
    if (cap < best) best = cap;
  }
  return best;
}

int selected() {
  static const int isa = detect();
  return isa;
}
}  // namespace

const char* isa() {
  switch (selected()) {
    case ISA_AVX512: return "avx512";
    case ISA_AVX2: return "avx2";
    default: return "baseline";
  }
}

void step(int rule, int flags, int layout, int dtype, const Bucket& b) {
  flags = normalize_flags(rule, flags);
  bool done;
  switch (selected()) {
#if MF_X86_VARIANTS
    case ISA_AVX512: done = avx512::dispatch(rule, flags, layout, dtype, b); break;
    case ISA_AVX2: done = avx2::dispatch(rule, flags, layout, dtype, b); break;
#endif
    default: done = baseline::dispatch(rule, flags, layout, dtype, b); break;
  }
  if (!done)
    throw std::invalid_argument("momentum_fused cpu: no kernel for rule " + std::to_string(rule) + " flags " +
                                std::to_string(flags) + " layout " + std::to_string(layout) + " dtype " +
                                std::to_string(dtype));
}

}  // namespace cpu
}  // namespace mf
