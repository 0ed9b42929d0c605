// torch binding of the momentum_fused CUDA kernels (UNTESTED: built only with a CUDA torch; this project's
// CPU machines have none). Registers, as a fragment of the `momentum_fused` op library:
//   cuda_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] states, Tensor scalars, int rule, int flags,
//             Tensor? found_inf, Tensor? grad_scale, Tensor? lr, int layout=0, Tensor? sr_keys=None) -> ()
// scalars: float64 [n, k] packs (host or device; copied to the device, stream-ordered). found_inf /
// grad_scale: float32 one-element device tensors; lr: float64 one-element device tensor (see fused_step.h).
// layout: 0 native, 1 bf16_state, 2 master (the fp32 master last in each tensor's states), 3 bf16_sr;
// sr_keys: int64 [n] uint32 keys (host or device), bf16_sr only. The dtypes are checked against the
// layout table (momentum_fused/layouts.py) before anything is launched.
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

const char* layout_name(int64_t layout) {
  switch (layout) {
    case mf::cuda::LAYOUT_NATIVE: return "native";
    case mf::cuda::LAYOUT_BF16_STATE: return "bf16_state";
    case mf::cuda::LAYOUT_MASTER: return "master";
    case mf::cuda::LAYOUT_BF16_SR: return "bf16_sr";
    default: return "?";
  }
}

// The layout table: is `dt` a param dtype of `layout`; the state dtype.
bool layout_param_ok(int64_t layout, c10::ScalarType dt) {
  switch (layout) {
    case mf::cuda::LAYOUT_NATIVE: return dtype_code(dt) >= 0;
    case mf::cuda::LAYOUT_BF16_STATE: return dt == c10::ScalarType::Float;
    case mf::cuda::LAYOUT_MASTER: return dt == c10::ScalarType::BFloat16 || dt == c10::ScalarType::Half;
    case mf::cuda::LAYOUT_BF16_SR: return dt == c10::ScalarType::BFloat16;
    default: return false;
  }
}

c10::ScalarType layout_state_dtype(int64_t layout, c10::ScalarType dt) {
  switch (layout) {
    case mf::cuda::LAYOUT_BF16_STATE:
    case mf::cuda::LAYOUT_BF16_SR: return c10::ScalarType::BFloat16;
    case mf::cuda::LAYOUT_MASTER: return c10::ScalarType::Float;
    default: return dt;
  }
}

void cuda_step(at::TensorList params, at::TensorList grads, at::TensorList states, const at::Tensor& scalars,
               int64_t rule, int64_t flags, const c10::optional<at::Tensor>& found_inf,
               const c10::optional<at::Tensor>& grad_scale, const c10::optional<at::Tensor>& lr, int64_t layout,
               const c10::optional<at::Tensor>& sr_keys) {
  TORCH_CHECK(rule >= 0 && rule < mf::RULE_COUNT, "momentum_fused cuda_step: unknown rule ", rule);
  const int r = static_cast<int>(rule), f = static_cast<int>(flags);
  TORCH_CHECK(flags >= 0 && flags < (1 << mf::rule_num_flag_bits(r)), "momentum_fused cuda_step: bad flags ", flags);
  TORCH_CHECK(layout >= mf::cuda::LAYOUT_NATIVE && layout <= mf::cuda::LAYOUT_BF16_SR,
              "momentum_fused cuda_step: unknown layout code ", layout, " (0 native, 1 bf16_state, 2 master, 3 bf16_sr)");
  const int L = static_cast<int>(layout);
  const size_t n = params.size();
  const int ns = mf::rule_num_states(r, f), k = mf::rule_num_scalars(r);
  const int nm = L == mf::cuda::LAYOUT_MASTER ? 1 : 0;
  const int per = ns + nm;
  TORCH_CHECK(grads.size() == n && states.size() == n * per, "momentum_fused cuda_step: list sizes do not match (",
              n, " params, ", grads.size(), " grads, ", states.size(), " states; rule ", mf::rule_name(r),
              " with layout ", layout_name(L), " needs ", per, " state tensors per param)");
  TORCH_CHECK(scalars.scalar_type() == c10::ScalarType::Double && scalars.dim() == 2 &&
                  scalars.size(0) == static_cast<int64_t>(n) && scalars.size(1) == k,
              "momentum_fused cuda_step: scalars must be float64 [", n, ", ", k, "]");
  const bool has_keys = sr_keys.has_value() && sr_keys->defined();
  if (L == mf::cuda::LAYOUT_BF16_SR) {
    TORCH_CHECK(has_keys && sr_keys->scalar_type() == c10::ScalarType::Long && sr_keys->dim() == 1 &&
                    sr_keys->size(0) == static_cast<int64_t>(n),
                "momentum_fused cuda_step: layout bf16_sr needs sr_keys, an int64 tensor of shape [", n, "]");
    if (sr_keys->device().is_cpu()) {  // device keys are the caller's to check (no host sync here)
      const at::Tensor kc = sr_keys->contiguous();
      const int64_t* kp = kc.data_ptr<int64_t>();
      for (size_t i = 0; i < n; ++i)
        TORCH_CHECK(kp[i] >= 0 && kp[i] <= int64_t(0xFFFFFFFF), "momentum_fused cuda_step: sr_keys[", i, "] = ",
                    kp[i], " is not a uint32");
    }
  } else {
    TORCH_CHECK(!has_keys, "momentum_fused cuda_step: sr_keys given, but layout ", layout_name(L),
                " does not round stochastically (only bf16_sr does)");
  }
  if (n == 0) return;
  const c10::Device dev = params[0].device();
  TORCH_CHECK(dev.is_cuda(), "momentum_fused cuda_step: params must be CUDA tensors");
  const c10::ScalarType dt = params[0].scalar_type();
  const int code = dtype_code(dt);
  TORCH_CHECK(code >= 0, "momentum_fused cuda_step: unsupported dtype ", dt);
  TORCH_CHECK(layout_param_ok(L, dt), "momentum_fused cuda_step: layout ", layout_name(L),
              " does not take params of dtype ", dt);
  const c10::ScalarType sdt = layout_state_dtype(L, dt);
  std::vector<void*> pp(n), sp(n * per);
  std::vector<const void*> gp(n);
  std::vector<int64_t> numel(n);
  auto check = [&](const at::Tensor& t, c10::ScalarType want, int64_t ne, const char* what) {
    TORCH_CHECK(t.device() == dev && t.scalar_type() == want && t.numel() == ne && t.is_contiguous(),
                "momentum_fused cuda_step: every ", what, " must be a contiguous ", want, " tensor on ", dev,
                " with the param's numel (layout ", layout_name(L), "), got ", t.scalar_type(), " on ", t.device());
  };
  for (size_t i = 0; i < n; ++i) {
    numel[i] = params[i].numel();
    check(params[i], dt, numel[i], "param");
    check(grads[i], dt, numel[i], "grad");
    pp[i] = params[i].data_ptr();
    gp[i] = grads[i].data_ptr();
    for (int j = 0; j < per; ++j) {
      const bool master = j == ns;
      check(states[i * per + j], master ? c10::ScalarType::Float : sdt, numel[i], master ? "master" : "state");
      sp[i * per + j] = states[i * per + j].data_ptr();
    }
  }
  const void* fi = opt_ptr(found_inf, c10::ScalarType::Float, "found_inf", dev);
  const void* gs = opt_ptr(grad_scale, c10::ScalarType::Float, "grad_scale", dev);
  const void* lrp = opt_ptr(lr, c10::ScalarType::Double, "lr", dev);
  TORCH_CHECK(lrp == nullptr || mf::cuda::lr_pointer_supported(r), "momentum_fused cuda_step: rule ",
              mf::rule_name(r), " folds lr into its host scalars; a device lr is not supported for it");
  c10::cuda::CUDAGuard guard(dev);
  const at::Tensor packs = scalars.to(dev, /*non_blocking=*/true).contiguous();
  at::Tensor keys;
  if (has_keys) keys = sr_keys->to(dev, /*non_blocking=*/true).contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(dev.index()).stream();
  const cudaError_t err = mf::cuda::step(r, f, L, code, static_cast<int64_t>(n), pp.data(), gp.data(), sp.data(),
                                         numel.data(), packs.data_ptr<double>(), static_cast<const float*>(fi),
                                         static_cast<const float*>(gs), static_cast<const double*>(lrp),
                                         has_keys ? keys.data_ptr<int64_t>() : nullptr, stream);
  TORCH_CHECK(err == cudaSuccess, "momentum_fused cuda_step: ", cudaGetErrorString(err));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(momentum_fused, m) {
  m.def("cuda_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] states, Tensor scalars, int rule, int flags, "
        "Tensor? found_inf=None, Tensor? grad_scale=None, Tensor? lr=None, int layout=0, Tensor? sr_keys=None) -> ()");
}

TORCH_LIBRARY_IMPL(momentum_fused, CUDA, m) { m.impl("cuda_step", &cuda_step); }

static struct PyModuleDef mf_cuda_module = {PyModuleDef_HEAD_INIT, "_C_cuda",
                                            "momentum_fused CUDA kernels (torch.ops.momentum_fused.cuda_step)", -1,
                                            nullptr};

PyMODINIT_FUNC PyInit__C_cuda(void) { return PyModule_Create(&mf_cuda_module); }
