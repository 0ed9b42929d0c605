// torch binding of the momentum_fused CUDA kernels (built only with a CUDA torch; this project's CPU machines
// have none: the test suite compiles this file with g++ -fsyntax-only, tests/test_cuda_sources.py). Registers,
// as a fragment of the `momentum_fused` op library:
//   cuda_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] states, Tensor scalars, int rule, int flags,
//             Tensor? found_inf, Tensor? grad_scale, int layout=0, Tensor? sr_keys=None) -> ()
// on mf_cuda_step (cuda_ops.h), which the eager entry _C_cuda.cuda_step (cuda_python.cpp) calls as well.
// scalars: contiguous float64 [n, k] packs (host or device; copied to the device, stream-ordered). found_inf /
// grad_scale: float32 one-element device tensors (see fused_step.h).
// layout: 0 native, 1 bf16_state, 2 master (the fp32 master last in each tensor's states), 3 bf16_sr, 4 master16
// (the int16 remainder last in each tensor's states), 5 int8_state (a quantized param's states: its codes, then
// their fp32 block scales; see step_args.h), 6 master16_int8, 7 int8_sr, 8 master16_int8_sr; sr_keys: int64 [n]
// uint32 keys (host or device), the stochastic layouts only (bf16_sr, int8_sr, master16_int8_sr). Every argument
// is checked before anything is launched, by the checks the CPU op runs too (../step_args.h).
// Avoids ATen/cuda/CUDAContext.h (it pulls cusparse.h, absent from the toolkit here).
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <vector>

#include "../step_args.h"
#include "../update_rules.h"
#include "cuda_ops.h"
#include "fused_step.h"

namespace {

const void* opt_ptr(const c10::optional<at::Tensor>& t, c10::ScalarType want, const char* what,
                    const c10::Device& dev) {
  if (!t.has_value() || !t->defined()) return nullptr;
  TORCH_CHECK(t->device() == dev && t->scalar_type() == want && t->numel() == 1, "momentum_fused cuda_step: ", what,
              " must be a one-element ", want, " tensor on ", dev, ", got ", t->scalar_type(), " with ", t->numel(),
              " elements on ", t->device());
  return t->data_ptr();
}

}  // namespace

void mf_cuda_step(at::TensorList params, at::TensorList grads, at::TensorList states, const at::Tensor& scalars,
                  int64_t rule, int64_t flags, const c10::optional<at::Tensor>& found_inf,
                  const c10::optional<at::Tensor>& grad_scale, int64_t layout,
                  const c10::optional<at::Tensor>& sr_keys) {
  const mf::bind::StepArgs a = mf::bind::check_step("cuda_step", c10::kCUDA, params, grads, states, scalars, rule,
                                                    flags, layout, sr_keys, /*scalars_on_host_only=*/false);
  if (a.n == 0) return;
  const void* fi = opt_ptr(found_inf, c10::ScalarType::Float, "found_inf", a.device);
  const void* gs = opt_ptr(grad_scale, c10::ScalarType::Float, "grad_scale", a.device);
  c10::cuda::CUDAGuard guard(a.device);
  // the packs (and host keys) go to the device stream-ordered; check_step has checked them on the host
  const at::Tensor packs = scalars.to(a.device, /*non_blocking=*/true);
  at::Tensor keys;
  if (mf::layout_stochastic(a.layout)) keys = sr_keys->to(a.device, /*non_blocking=*/true);
  // int8_state: the code dtype of each state position, one for the bucket (bit j: uint8 codes)
  int code_unsigned = -1;
  if (a.int8) {
    for (int64_t i = 0; i < a.n && a.ns > 0; ++i) {
      if (a.scales[i * a.ns] == nullptr) continue;  // an fp32-state tensor
      int mask = 0;
      for (int j = 0; j < a.ns; ++j) mask |= a.code_signed[i * a.ns + j] ? 0 : (1 << j);
      TORCH_CHECK(code_unsigned < 0 || mask == code_unsigned, "momentum_fused cuda_step: params[", i,
                  "]'s code dtypes (int8 / uint8 per state) differ from the bucket's first quantized param's");
      code_unsigned = mask;
    }
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(a.device.index()).stream();
  const cudaError_t err =
      mf::cuda::step(a.rule, a.flags, a.layout, a.dtype, a.n, a.params.data(), a.grads.data(), a.states.data(),
                     a.master ? a.masters.data() : a.remainder ? a.remainders.data() : nullptr, a.numel.data(),
                     packs.data_ptr<double>(), static_cast<const float*>(fi), static_cast<const float*>(gs),
                     keys.defined() ? keys.data_ptr<int64_t>() : nullptr, stream,
                     a.int8 ? a.scales.data() : nullptr, code_unsigned < 0 ? 0 : code_unsigned);
  TORCH_CHECK(err == cudaSuccess, "momentum_fused cuda_step: ", cudaGetErrorString(err));
}

TORCH_LIBRARY_FRAGMENT(momentum_fused, m) {
  m.def("cuda_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] states, Tensor scalars, int rule, int flags, "
        "Tensor? found_inf=None, Tensor? grad_scale=None, int layout=0, Tensor? sr_keys=None) -> ()");
}

TORCH_LIBRARY_IMPL(momentum_fused, CUDA, m) { m.impl("cuda_step", &mf_cuda_step); }
