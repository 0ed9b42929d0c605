// Kernels for the baseline ISA the extension is compiled for (x86-64: SSE2).
#include "cpu_kernels_variant.h"

namespace mf {
namespace cpu {
namespace baseline {
#include "cpu_kernels_impl.inc"
}  // namespace baseline
}  // namespace cpu
}  // namespace mf
