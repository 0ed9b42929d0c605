// torch binding of the momentum_fused CPU kernels: ops in the `momentum_fused` namespace, registered
// with TORCH_LIBRARY (visible as torch.ops.momentum_fused.*). Minimal torch headers, no pybind: the
// Python module `momentum_fused._C_cpu` (cpu_python.cpp, linked into the same library) holds the eager
// entry points; importing it runs the registration.
//
//   cpu_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] states, Tensor scalars, int rule,
//            int flags, int layout=0, Tensor? sr_keys=None) -> ()
//     states: tensor-major flat list (n * (num_states(rule, flags) + [1 for the fp32 master with layout
//     master, or the int16 remainder with master16 and master16_int8])), in the layout's state dtype (int8_state:
//     a quantized param's codes then their scales; master16_int8: its codes, its remainder, then the scales;
//     ../step_args.h); scalars: float64 [n, k] packs; layout: the codes of
//     enum Layout (generated/tables.h); sr_keys: int64 [n] uint32 keys, the stochastic layouts only
//     (bf16_sr, int8_sr, master16_int8_sr: layout_stochastic).
//     Every argument is checked before anything is written (../step_args.h, shared with the CUDA op): an
//     error leaves all tensors unchanged.
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

#include "../step_args.h"
#include "../storage.h"
#include "../update_rules.h"
#include "cpu_kernels.h"
#include "cpu_ops.h"

void mf_cpu_step(at::TensorList params, at::TensorList grads, at::TensorList states, const at::Tensor& scalars,
                 int64_t rule, int64_t flags, int64_t layout, const c10::optional<at::Tensor>& sr_keys) {
  const mf::bind::StepArgs a = mf::bind::check_step("cpu_step", c10::kCPU, params, grads, states, scalars, rule, flags,
                                                    layout, sr_keys, /*scalars_on_host_only=*/true);
  if (a.n == 0) return;
  mf::cpu::Bucket b;
  b.n = a.n;
  b.params = a.params.data();
  b.grads = a.grads.data();
  b.states = a.states.data();
  b.masters = a.master ? a.masters.data() : nullptr;
  b.remainders = a.remainder ? a.remainders.data() : nullptr;
  b.scales = a.int8 ? a.scales.data() : nullptr;
  b.code_signed = a.int8 ? a.code_signed.data() : nullptr;
  b.sr_keys = a.keys.empty() ? nullptr : a.keys.data();
  b.numel = a.numel.data();
  b.scalars = scalars.data_ptr<double>();
  b.k = a.k;
  b.nthreads = at::get_num_threads();
  try {
    mf::cpu::step(a.rule, a.flags, a.layout, a.dtype, b);
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
  mf::bind::check_rule("num_states", rule, flags);
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
