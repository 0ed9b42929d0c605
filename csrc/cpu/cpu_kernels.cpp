// CPU kernels of momentum_fused (no torch headers): run-time choice of the instruction-set variant.
// The kernel body (cpu_kernels_impl.inc) is compiled once per variant, in cpu_kernels_<isa>.cpp; the
// math comes from ../update_rules.h, the header the CUDA kernels use too.
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#include "cpu_kernels_variant.h"

#if MF_X86_VARIANTS
#include <cpuid.h>
#endif

namespace mf {
namespace cpu {

namespace {
// ISA_AVX512W: the AVX-512 code tuned for full-width 512-bit units (cpu_kernels_avx512w.cpp); the same
// instruction set as ISA_AVX512
enum Isa { ISA_BASELINE = 0, ISA_AVX2 = 1, ISA_AVX512 = 2, ISA_AVX512W = 3 };

#if MF_X86_VARIANTS
// AMD family 0x1A (Zen 5) or later: AVX-512 on full 512-bit data paths, where the avx512w variant's bf16 block loop
// ran 1.6x faster than the avx512 variant's, AdamW bf16 1.2-1.7x (2026-12-07). Not Zen 4 (0x19: 512-bit
// operations split in two halves; not measured) nor Intel (the avx512 variant's prefetch and 8-lane blocks were
// the faster choice on an AVX-512 Xeon, 2026-12-06).
bool full_width_avx512() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid(0, &a, &b, &c, &d)) return false;
  char vendor[13];
  std::memcpy(vendor, &b, 4);
  std::memcpy(vendor + 4, &d, 4);
  std::memcpy(vendor + 8, &c, 4);
  vendor[12] = '\0';
  if (std::strcmp(vendor, "AuthenticAMD") != 0 || !__get_cpuid(1, &a, &b, &c, &d)) return false;
  const unsigned base = (a >> 8) & 0xF, ext = (a >> 20) & 0xFF;
  return (base == 0xF ? base + ext : base) >= 0x1A;
}
#endif

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
    best = full_width_avx512() ? ISA_AVX512W : ISA_AVX512;
  else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && f16c_bmi2)
    best = ISA_AVX2;
#endif
  // MOMENTUM_FUSED_CPU_ISA=baseline|avx2|avx512|avx512w caps the choice (tests; never raises the instruction set
  // above the CPU's); avx512 and avx512w name the tuning on a CPU with AVX-512 (either may run on any such CPU)
  const char* env = std::getenv("MOMENTUM_FUSED_CPU_ISA");
  if (env != nullptr && *env != '\0') {
    const std::string want(env);
    if (best >= ISA_AVX512 && (want == "avx512" || want == "avx512w"))
      return want == "avx512w" ? ISA_AVX512W : ISA_AVX512;
    const int cap = want == "baseline" ? ISA_BASELINE : want == "avx2" ? ISA_AVX2 : ISA_AVX512W;
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
    case ISA_AVX512W: return "avx512w";
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
    case ISA_AVX512W: done = avx512w::dispatch(rule, flags, layout, dtype, b); break;
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
