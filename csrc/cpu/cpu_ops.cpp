// torch binding of the momentum_fused CPU kernels: ops in the `momentum_fused` namespace, registered
// with TORCH_LIBRARY (visible as torch.ops.momentum_fused.*). Minimal torch headers, no pybind: the
// Python module `momentum_fused._C_cpu` (cpu_python.cpp, linked into the same library) holds the eager
// entry points; importing it runs the registration.
//
//   cpu_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] states, Tensor scalars, int rule,
//            int flags, int layout=0, Tensor? sr_keys=None) -> ()
//     states: tensor-major flat list (n * (num_states(rule, flags) + [1 for the fp32 master with layout
//     master])), in the layout's state dtype; scalars: float64 [n, k] packs; layout: 0 native,
//     1 bf16_state, 2 master, 3 bf16_sr (cpu_kernels.h); sr_keys: int64 [n] uint32 keys, bf16_sr only.
//     Every argument is checked before anything is written: an error leaves all tensors unchanged.
//   rule_id(str name) -> int, num_states(int rule, int flags) -> int, num_scalars(int rule) -> int,
//   isa() -> str, round_to(Tensor x_f32, ScalarType dtype) -> Tensor  (the kernels' fp32 -> storage
//   rounding, for tests), sr_round(Tensor x_f32, int key, int buffer, int offset=0) -> Tensor (the
//   kernels' stochastic rounding to bf16, for tests).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "../storage.h"
#include "../update_rules.h"
#include "cpu_kernels.h"
#include "cpu_ops.h"

namespace {

int dtype_code(c10::ScalarType t) {
  switch (t) {
    case c10::ScalarType::Float: return mf::cpu::DT_F32;
    case c10::ScalarType::Double: return mf::cpu::DT_F64;
    case c10::ScalarType::BFloat16: return mf::cpu::DT_BF16;
    case c10::ScalarType::Half: return mf::cpu::DT_F16;
    default: return -1;
  }
}

void check_rule(int64_t rule, int64_t flags) {
  TORCH_CHECK(rule >= 0 && rule < mf::RULE_COUNT, "momentum_fused cpu_step: unknown rule id ", rule);
  const int nbits = mf::rule_num_flag_bits(static_cast<int>(rule));
  TORCH_CHECK(flags >= 0 && flags < (int64_t(1) << nbits), "momentum_fused cpu_step: invalid flags ", flags,
              " for rule ", mf::rule_name(static_cast<int>(rule)), " (", nbits, " flag bits)");
}

void check_tensor(const at::Tensor& t, const char* what, size_t i, c10::ScalarType dtype, int64_t numel) {
  TORCH_CHECK(t.defined(), "momentum_fused cpu_step: ", what, "[", i, "] is undefined");
  TORCH_CHECK(t.device().is_cpu(), "momentum_fused cpu_step: ", what, "[", i, "] is on ", t.device(),
              ", expected cpu");
  TORCH_CHECK(t.layout() == c10::kStrided, "momentum_fused cpu_step: ", what, "[", i, "] is not strided");
  TORCH_CHECK(t.scalar_type() == dtype, "momentum_fused cpu_step: ", what, "[", i, "] has dtype ",
              t.scalar_type(), ", expected ", dtype);
  TORCH_CHECK(t.numel() == numel, "momentum_fused cpu_step: ", what, "[", i, "] has ", t.numel(),
              " elements, the param has ", numel);
  TORCH_CHECK(t.is_contiguous(), "momentum_fused cpu_step: ", what, "[", i,
              "] is not contiguous (the Python backend copies non-contiguous tensors in and out)");
}

const char* layout_name(int64_t layout) {
  switch (layout) {
    case mf::cpu::LAYOUT_NATIVE: return "native";
    case mf::cpu::LAYOUT_BF16_STATE: return "bf16_state";
    case mf::cpu::LAYOUT_MASTER: return "master";
    case mf::cpu::LAYOUT_BF16_SR: return "bf16_sr";
    default: return "?";
  }
}

// The layout table (momentum_fused/layouts.py): is `dtype` a param dtype of `layout`, and the state dtype.
bool layout_param_ok(int64_t layout, c10::ScalarType dtype) {
  switch (layout) {
    case mf::cpu::LAYOUT_NATIVE: return dtype_code(dtype) >= 0;
    case mf::cpu::LAYOUT_BF16_STATE: return dtype == c10::ScalarType::Float;
    case mf::cpu::LAYOUT_MASTER: return dtype == c10::ScalarType::BFloat16 || dtype == c10::ScalarType::Half;
    case mf::cpu::LAYOUT_BF16_SR: return dtype == c10::ScalarType::BFloat16;
    default: return false;
  }
}

const char* layout_param_dtypes(int64_t layout) {
  switch (layout) {
    case mf::cpu::LAYOUT_NATIVE: return "float32, float64, bfloat16, float16";
    case mf::cpu::LAYOUT_BF16_STATE: return "float32";
    case mf::cpu::LAYOUT_MASTER: return "bfloat16, float16";
    case mf::cpu::LAYOUT_BF16_SR: return "bfloat16";
    default: return "";
  }
}

c10::ScalarType layout_state_dtype(int64_t layout, c10::ScalarType param) {
  switch (layout) {
    case mf::cpu::LAYOUT_BF16_STATE: return c10::ScalarType::BFloat16;
    case mf::cpu::LAYOUT_MASTER: return c10::ScalarType::Float;
    case mf::cpu::LAYOUT_BF16_SR: return c10::ScalarType::BFloat16;
    default: return param;
  }
}

}  // namespace

void mf_cpu_step(at::TensorList params, at::TensorList grads, at::TensorList states, const at::Tensor& scalars,
                 int64_t rule, int64_t flags, int64_t layout, const c10::optional<at::Tensor>& sr_keys) {
  check_rule(rule, flags);
  TORCH_CHECK(layout >= mf::cpu::LAYOUT_NATIVE && layout <= mf::cpu::LAYOUT_BF16_SR,
              "momentum_fused cpu_step: unknown layout code ", layout,
              " (0 native, 1 bf16_state, 2 master, 3 bf16_sr)");
  const int r = static_cast<int>(rule);
  const int f = static_cast<int>(flags);
  const int L = static_cast<int>(layout);
  const size_t n = params.size();
  const int ns = mf::rule_num_states(r, f);
  const int nm = L == mf::cpu::LAYOUT_MASTER ? 1 : 0;  // the fp32 master follows the rule's state
  const int per = ns + nm;
  const int k = mf::rule_num_scalars(r);
  TORCH_CHECK(grads.size() == n, "momentum_fused cpu_step: ", n, " params but ", grads.size(), " grads");
  TORCH_CHECK(states.size() == n * static_cast<size_t>(per), "momentum_fused cpu_step: rule ",
              mf::rule_name(r), " with flags ", f, " and layout ", layout_name(L), " needs ", per,
              " state tensors per param (", ns, " rule state", nm ? " + the fp32 master" : "", "; ", n * per,
              " in all), got ", states.size());
  TORCH_CHECK(scalars.device().is_cpu() && scalars.scalar_type() == c10::ScalarType::Double &&
                  scalars.dim() == 2 && scalars.size(0) == static_cast<int64_t>(n) && scalars.size(1) == k &&
                  scalars.is_contiguous(),
              "momentum_fused cpu_step: scalars must be a contiguous float64 cpu tensor of shape [", n, ", ", k,
              "] for rule ", mf::rule_name(r), ", got ", scalars.scalar_type(), " ", scalars.sizes());
  const bool has_keys = sr_keys.has_value() && sr_keys->defined();
  if (L == mf::cpu::LAYOUT_BF16_SR) {
    TORCH_CHECK(has_keys, "momentum_fused cpu_step: layout bf16_sr needs sr_keys (one uint32 key per tensor)");
    TORCH_CHECK(sr_keys->device().is_cpu() && sr_keys->scalar_type() == c10::ScalarType::Long &&
                    sr_keys->dim() == 1 && sr_keys->size(0) == static_cast<int64_t>(n) && sr_keys->is_contiguous(),
                "momentum_fused cpu_step: sr_keys must be a contiguous int64 cpu tensor of shape [", n, "], got ",
                sr_keys->scalar_type(), " ", sr_keys->sizes(), " on ", sr_keys->device());
    const int64_t* kp = sr_keys->data_ptr<int64_t>();
    for (size_t i = 0; i < n; ++i)
      TORCH_CHECK(kp[i] >= 0 && kp[i] <= int64_t(0xFFFFFFFF), "momentum_fused cpu_step: sr_keys[", i, "] = ", kp[i],
                  " is not a uint32");
  } else {
    TORCH_CHECK(!has_keys, "momentum_fused cpu_step: sr_keys given, but layout ", layout_name(L),
                " does not round stochastically (only bf16_sr does)");
  }
  if (n == 0) return;
  const c10::ScalarType dtype = params[0].scalar_type();
  const int code = dtype_code(dtype);
  TORCH_CHECK(code >= 0, "momentum_fused cpu_step: unsupported dtype ", dtype,
              " (supported: float32, float64, bfloat16, float16)");
  TORCH_CHECK(layout_param_ok(L, dtype), "momentum_fused cpu_step: layout ", layout_name(L),
              " takes params of dtype ", layout_param_dtypes(L), ", got ", dtype);
  const c10::ScalarType sdtype = layout_state_dtype(L, dtype);

  std::vector<void*> pp(n), sp(n * ns), mp(nm ? n : 0);
  std::vector<const void*> gp(n);
  std::vector<int64_t> numel(n);
  std::vector<uint32_t> keys(L == mf::cpu::LAYOUT_BF16_SR ? n : 0);
  // Reading the metadata of many tensors is a chain of cache misses (TensorImpl, then its storage): prefetch
  // the TensorImpls a few tensors ahead so that the misses overlap.
  auto prefetch_impl = [](const at::Tensor& t) {
    const char* q = reinterpret_cast<const char*>(t.unsafeGetTensorImpl());
    for (int o = 0; o < 256; o += 64) __builtin_prefetch(q + o, 0, 3);
  };
  constexpr size_t kAhead = 8;
  for (size_t i = 0; i < n; ++i) {
    if (i + kAhead < n) {
      prefetch_impl(params[i + kAhead]);
      prefetch_impl(grads[i + kAhead]);
      for (int j = 0; j < per; ++j) prefetch_impl(states[(i + kAhead) * per + j]);
    }
    const int64_t ne = params[i].numel();
    check_tensor(params[i], "params", i, dtype, ne);
    check_tensor(grads[i], "grads", i, dtype, ne);
    for (int j = 0; j < ns; ++j) check_tensor(states[i * per + j], "states", i * per + j, sdtype, ne);
    if (nm) check_tensor(states[i * per + ns], "states (master)", i * per + ns, c10::ScalarType::Float, ne);
    numel[i] = ne;
    pp[i] = params[i].data_ptr();
    gp[i] = grads[i].data_ptr();
    for (int j = 0; j < ns; ++j) sp[i * ns + j] = states[i * per + j].data_ptr();
    if (nm) mp[i] = states[i * per + ns].data_ptr();
    if (!keys.empty()) keys[i] = static_cast<uint32_t>(sr_keys->data_ptr<int64_t>()[i]);
  }
  mf::cpu::Bucket b;
  b.n = static_cast<int64_t>(n);
  b.params = pp.data();
  b.grads = gp.data();
  b.states = sp.data();
  b.masters = nm ? mp.data() : nullptr;
  b.sr_keys = keys.empty() ? nullptr : keys.data();
  b.numel = numel.data();
  b.scalars = scalars.data_ptr<double>();
  b.k = k;
  b.nthreads = at::get_num_threads();
  try {
    mf::cpu::step(r, f, L, code, b);
  } catch (const std::exception& e) {
    TORCH_CHECK(false, e.what());
  }
}

namespace {

int64_t rule_id(const std::string& name) {
  for (int r = 0; r < mf::RULE_COUNT; ++r)
    if (name == mf::rule_name(r)) return r;
  return -1;
}

int64_t num_states(int64_t rule, int64_t flags) {
  check_rule(rule, flags);
  return mf::rule_num_states(static_cast<int>(rule), static_cast<int>(flags));
}

int64_t num_scalars(int64_t rule) {
  TORCH_CHECK(rule >= 0 && rule < mf::RULE_COUNT, "momentum_fused: unknown rule id ", rule);
  return mf::rule_num_scalars(static_cast<int>(rule));
}

std::string isa() { return mf::cpu::isa(); }

at::Tensor round_to(const at::Tensor& x, c10::ScalarType dtype) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == c10::ScalarType::Float && x.is_contiguous(),
              "round_to: x must be a contiguous float32 cpu tensor");
  TORCH_CHECK(dtype == c10::ScalarType::BFloat16 || dtype == c10::ScalarType::Half,
              "round_to: dtype must be bfloat16 or float16");
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(dtype));
  const float* src = x.data_ptr<float>();
  uint16_t* dst = static_cast<uint16_t*>(out.data_ptr());
  const int64_t n = x.numel();
  const bool bf = dtype == c10::ScalarType::BFloat16;
  for (int64_t i = 0; i < n; ++i) dst[i] = bf ? mf::float_to_bf16(src[i]) : mf::float_to_fp16(src[i]);
  return out;
}

at::Tensor widen(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && x.is_contiguous() &&
                  (x.scalar_type() == c10::ScalarType::BFloat16 || x.scalar_type() == c10::ScalarType::Half),
              "widen: x must be a contiguous bfloat16/float16 cpu tensor");
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(c10::ScalarType::Float));
  const uint16_t* src = static_cast<const uint16_t*>(x.data_ptr());
  float* dst = out.data_ptr<float>();
  const bool bf = x.scalar_type() == c10::ScalarType::BFloat16;
  for (int64_t i = 0; i < x.numel(); ++i) dst[i] = bf ? mf::bf16_to_float(src[i]) : mf::fp16_to_float(src[i]);
  return out;
}

// The kernels' stochastic rounding (storage.h store_sr) of a float32 tensor to bf16, element e of x at index
// offset + e (for tests: bit-equality with momentum_fused.layouts.sr_round_bf16, and indices >= 2^32).
at::Tensor sr_round(const at::Tensor& x, int64_t key, int64_t buffer, int64_t offset) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == c10::ScalarType::Float && x.is_contiguous(),
              "sr_round: x must be a contiguous float32 cpu tensor");
  TORCH_CHECK(key >= 0 && key <= int64_t(0xFFFFFFFF) && buffer >= 0 && offset >= 0,
              "sr_round: key must be a uint32, buffer and offset >= 0");
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(c10::ScalarType::BFloat16));
  const float* src = x.data_ptr<float>();
  mf::bf16* dst = static_cast<mf::bf16*>(out.data_ptr());
  const uint32_t kb = mf::sr_key_b(static_cast<uint32_t>(key), static_cast<uint32_t>(buffer));
  for (int64_t i = 0; i < x.numel(); ++i) mf::store_sr(dst[i], src[i], kb, offset + i);
  return out;
}

}  // namespace

TORCH_LIBRARY(momentum_fused, m) {
  m.def("cpu_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] states, Tensor scalars, int rule, int flags, "
        "int layout=0, Tensor? sr_keys=None) -> ()");
  m.def("rule_id(str name) -> int", &rule_id);
  m.def("num_states(int rule, int flags) -> int", &num_states);
  m.def("num_scalars(int rule) -> int", &num_scalars);
  m.def("cpu_isa() -> str", &isa);
  m.def("round_to(Tensor x, ScalarType dtype) -> Tensor", &round_to);
  m.def("widen(Tensor x) -> Tensor", &widen);
  m.def("sr_round(Tensor x, int key, int buffer, int offset=0) -> Tensor", &sr_round);
}

TORCH_LIBRARY_IMPL(momentum_fused, CPU, m) { m.impl("cpu_step", &mf_cpu_step); }
