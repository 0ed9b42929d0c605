// torch binding of the momentum_fused CUDA kernels (UNTESTED: built only with a CUDA torch; this project's
// CPU machines have none). Registers, as a fragment of the `momentum_fused` op library:
//   cuda_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] states, Tensor scalars, int rule, int flags,
//             Tensor? found_inf, Tensor? grad_scale, Tensor? lr) -> ()
// scalars: float64 [n, k] packs (host or device; copied to the device, stream-ordered). found_inf /
// grad_scale: float32 one-element device tensors; lr: float64 one-element device tensor (see fused_step.h).
// Avoids ATen/cuda/CUDAContext.h (it pulls cusparse.h, absent from the toolkit here).
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <vector>

#include "../update_rules.h"
#include "fused_step.h"

namespace {

int dtype_code(c10::ScalarType t) {
  switch (t) {
    case c10::ScalarType::Float: return 0;
    case c10::ScalarType::Double: return 1;
    case c10::ScalarType::BFloat16: return 2;
    case c10::ScalarType::Half: return 3;
    default: return -1;
  }
}

const void* opt_ptr(const c10::optional<at::Tensor>& t, c10::ScalarType want, const char* what, c10::Device dev) {
  if (!t.has_value() || !t->defined()) return nullptr;
  TORCH_CHECK(t->device() == dev && t->scalar_type() == want && t->numel() == 1, "momentum_fused cuda_step: ",
              what, " must be a one-element ", want, " tensor on ", dev);
  return t->data_ptr();
}

void cuda_step(at::TensorList params, at::TensorList grads, at::TensorList states, const at::Tensor& scalars,
               int64_t rule, int64_t flags, const c10::optional<at::Tensor>& found_inf,
               const c10::optional<at::Tensor>& grad_scale, const c10::optional<at::Tensor>& lr) {
  TORCH_CHECK(rule >= 0 && rule < mf::RULE_COUNT, "momentum_fused cuda_step: unknown rule ", rule);
  const int r = static_cast<int>(rule), f = static_cast<int>(flags);
  TORCH_CHECK(flags >= 0 && flags < (1 << mf::rule_num_flag_bits(r)), "momentum_fused cuda_step: bad flags ", flags);
  const size_t n = params.size();
  const int ns = mf::rule_num_states(r, f), k = mf::rule_num_scalars(r);
  TORCH_CHECK(grads.size() == n && states.size() == n * ns, "momentum_fused cuda_step: list sizes do not match");
  TORCH_CHECK(scalars.scalar_type() == c10::ScalarType::Double && scalars.dim() == 2 &&
                  scalars.size(0) == static_cast<int64_t>(n) && scalars.size(1) == k,
              "momentum_fused cuda_step: scalars must be float64 [", n, ", ", k, "]");
  if (n == 0) return;
  const c10::Device dev = params[0].device();
  TORCH_CHECK(dev.is_cuda(), "momentum_fused cuda_step: params must be CUDA tensors");
  const c10::ScalarType dt = params[0].scalar_type();
  const int code = dtype_code(dt);
  TORCH_CHECK(code >= 0, "momentum_fused cuda_step: unsupported dtype ", dt);
  std::vector<void*> pp(n), sp(n * ns);
  std::vector<const void*> gp(n);
  std::vector<int64_t> numel(n);
  auto check = [&](const at::Tensor& t, int64_t ne) {
    TORCH_CHECK(t.device() == dev && t.scalar_type() == dt && t.numel() == ne && t.is_contiguous(),
                "momentum_fused cuda_step: every tensor must be a contiguous ", dt, " tensor on ", dev,
                " with the param's numel");
  };
  for (size_t i = 0; i < n; ++i) {
    numel[i] = params[i].numel();
    check(params[i], numel[i]);
    check(grads[i], numel[i]);
    pp[i] = params[i].data_ptr();
    gp[i] = grads[i].data_ptr();
    for (int j = 0; j < ns; ++j) {
      check(states[i * ns + j], numel[i]);
      sp[i * ns + j] = states[i * ns + j].data_ptr();
    }
  }
  const void* fi = opt_ptr(found_inf, c10::ScalarType::Float, "found_inf", dev);
  const void* gs = opt_ptr(grad_scale, c10::ScalarType::Float, "grad_scale", dev);
  const void* lrp = opt_ptr(lr, c10::ScalarType::Double, "lr", dev);
  TORCH_CHECK(lrp == nullptr || mf::cuda::lr_pointer_supported(r), "momentum_fused cuda_step: rule ",
              mf::rule_name(r), " folds lr into its host scalars; a device lr is not supported for it");
  c10::cuda::CUDAGuard guard(dev);
  const at::Tensor packs = scalars.to(dev, /*non_blocking=*/true).contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(dev.index()).stream();
  const cudaError_t err = mf::cuda::step(r, f, code, static_cast<int64_t>(n), pp.data(), gp.data(), sp.data(),
                                         numel.data(), packs.data_ptr<double>(), static_cast<const float*>(fi),
                                         static_cast<const float*>(gs), static_cast<const double*>(lrp), stream);
  TORCH_CHECK(err == cudaSuccess, "momentum_fused cuda_step: ", cudaGetErrorString(err));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(momentum_fused, m) {
  m.def("cuda_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] states, Tensor scalars, int rule, int flags, "
        "Tensor? found_inf=None, Tensor? grad_scale=None, Tensor? lr=None) -> ()");
}

TORCH_LIBRARY_IMPL(momentum_fused, CUDA, m) { m.impl("cuda_step", &cuda_step); }

static struct PyModuleDef mf_cuda_module = {PyModuleDef_HEAD_INIT, "_C_cuda",
                                            "momentum_fused CUDA kernels (torch.ops.momentum_fused.cuda_step)", -1,
                                            nullptr};

PyMODINIT_FUNC PyInit__C_cuda(void) { return PyModule_Create(&mf_cuda_module); }
