// CPU kernels of momentum_fused: interface between the torch binding (cpu_ops.cpp) and the kernel
// translation unit (cpu_kernels.cpp). No torch headers on either side of this interface.
#pragma once

#include <cstdint>
#include <string>

namespace mf {
namespace cpu {

enum Dtype : int { DT_F32 = 0, DT_F64 = 1, DT_BF16 = 2, DT_F16 = 3 };

// One bucket: n tensors of one dtype, all contiguous. states holds n * num_states pointers,
// tensor-major (states[i * ns + j] is state j of tensor i). scalars is a row-major [n, k] float64 pack.
struct Bucket {
  int64_t n = 0;
  void* const* params = nullptr;
  const void* const* grads = nullptr;
  void* const* states = nullptr;
  const int64_t* numel = nullptr;
  const double* scalars = nullptr;
  int64_t k = 0;
  int nthreads = 1;
};

// Runs rule `rule` with flags `flags` on the bucket. Arguments are validated by the caller.
void step(int rule, int flags, int dtype, const Bucket& b);

// "avx512" or "baseline": which instruction-set variant step() dispatches to on this CPU.
const char* isa();

}  // namespace cpu
}  // namespace mf
