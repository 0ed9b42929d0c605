// The argument checks of the step ops, shared by the CPU and the CUDA bindings (cpu/cpu_ops.cpp,
// cuda/cuda_ops.cpp), written once: the rule and flags, the dtype-layout table (momentum_fused/layouts.py),
// the list sizes, the scalar packs, the stochastic-rounding keys, and every tensor (defined, on the params'
// device, strided, the layout's dtype, the param's numel, contiguous). Everything is checked before anything
// is written, so an error leaves every tensor unchanged; the CPU tests run these checks on every bad
// argument (tests/test_cpu_backend.py), and the CUDA binding runs the same code.
//
// Torch glue (c10 errors, at::Tensor): host code only, never included by a .cu file.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <cstdint>
#include <vector>

#include "compressed.h"
#include "mf_common.h"
#include "update_rules.h"

namespace mf {
namespace bind {

inline int dtype_code(c10::ScalarType t) {
  switch (t) {
    case c10::ScalarType::Float: return DT_F32;
    case c10::ScalarType::Double: return DT_F64;
    case c10::ScalarType::BFloat16: return DT_BF16;
    case c10::ScalarType::Half: return DT_F16;
    default: return -1;
  }
}

// The layout table (generated/tables.h): the param dtypes of each layout, and the state dtype for a param dtype.
inline c10::ScalarType dtype_of_code(int code) {
  switch (code) {
    case DT_F32: return c10::ScalarType::Float;
    case DT_F64: return c10::ScalarType::Double;
    case DT_BF16: return c10::ScalarType::BFloat16;
    default: return c10::ScalarType::Half;
  }
}

inline bool layout_param_ok(int64_t layout, c10::ScalarType dtype) {
  const int code = dtype_code(dtype);
  return code >= 0 && ((layout_param_dtype_bits(layout) >> code) & 1u) != 0;
}

inline c10::ScalarType layout_state_dtype(int64_t layout, c10::ScalarType param) {
  const int code = layout_state_dtype_code(layout);
  return code < 0 ? param : dtype_of_code(code);
}

// op: the op's name in messages ("cpu_step", "cuda_step").
inline void check_rule(const char* op, int64_t rule, int64_t flags) {
  TORCH_CHECK(rule >= 0 && rule < RULE_COUNT, "momentum_fused ", op, ": unknown rule id ", rule);
  const int nbits = rule_num_flag_bits(static_cast<int>(rule));
  TORCH_CHECK(flags >= 0 && flags < (int64_t(1) << nbits), "momentum_fused ", op, ": invalid flags ", flags,
              " for rule ", rule_name(static_cast<int>(rule)), " (", nbits, " flag bits)");
}

inline void check_tensor(const char* op, const at::Tensor& t, const char* what, size_t i, const c10::Device& device,
                         c10::ScalarType dtype, int64_t numel) {
  TORCH_CHECK(t.defined(), "momentum_fused ", op, ": ", what, "[", i, "] is undefined");
  TORCH_CHECK(t.device() == device, "momentum_fused ", op, ": ", what, "[", i, "] is on ", t.device(), ", expected ",
              device, " (the params' device)");
  TORCH_CHECK(t.layout() == c10::kStrided, "momentum_fused ", op, ": ", what, "[", i, "] is not strided");
  TORCH_CHECK(t.scalar_type() == dtype, "momentum_fused ", op, ": ", what, "[", i, "] has dtype ", t.scalar_type(),
              ", expected ", dtype);
  TORCH_CHECK(t.numel() == numel, "momentum_fused ", op, ": ", what, "[", i, "] has ", t.numel(),
              " elements, the param has ", numel);
  TORCH_CHECK(t.is_contiguous(), "momentum_fused ", op, ": ", what, "[", i,
              "] is not contiguous (the Python backends copy non-contiguous tensors in and out)");
}

// A checked bucket: the kernels' pointer tables (as mf::cpu::Bucket and mf::cuda::step take them).
struct StepArgs {
  int rule = 0, flags = 0, layout = 0;
  int dtype = -1;  // mf::Dtype of the params (-1 when n == 0)
  int k = 0;       // scalars per pack
  int ns = 0;      // rule state tensors per param
  bool master = false;
  bool remainder = false;  // layouts master16, master16_int8: an int16 remainder per param
  bool int8 = false;       // layouts int8_state, master16_int8: quantized params' states as codes + block scales
  int64_t n = 0;
  c10::Device device = c10::Device(c10::kCPU);
  std::vector<void*> params, states, masters;  // states: n * ns, tensor-major; masters: n (layout master)
  std::vector<void*> remainders;               // n int16 remainders (layouts master16, master16_int8)
  // layouts int8_state, master16_int8: for a quantized param (its states are codes) states[i * ns + j] are its codes,
  // scales[i * ns + j] their fp32 block scales and code_signed[i * ns + j] 1 for int8 codes, 0 for uint8;
  // for the others states are fp32 and scales nullptr
  std::vector<void*> scales;
  std::vector<uint8_t> code_signed;
  std::vector<const void*> grads;
  std::vector<int64_t> numel;
  std::vector<uint32_t> keys;  // layout bf16_sr with host keys: the checked uint32 keys
};

// Checks a step's arguments for the op `op` on devices of type `device_type` and returns the pointer tables.
//   states: tensor-major, ns rule states per param, then the fp32 master (layout master) or the int16 remainder
//     (layouts master16, master16_int8); layouts int8_state, master16_int8: a quantized param (its first state int8
//     or uint8) has its ns codes (int8 or uint8), then its remainder (master16_int8), then their ns fp32 scales
//     [numel / INT8_BLOCK]; the others ns fp32 states (then the remainder).
//   scalars: float64 [n, k]; on the CPU when `scalars_on_host_only`, else on the CPU or the params' device
//     (the CUDA binding copies it, stream-ordered).
//   sr_keys: int64 [n] uint32 keys, the stochastic layouts only (layout_stochastic); host keys are range-checked here, device keys (CUDA only)
//     are the caller's (reading them would synchronize).
inline StepArgs check_step(const char* op, c10::DeviceType device_type, at::TensorList params, at::TensorList grads,
                           at::TensorList states, const at::Tensor& scalars, int64_t rule, int64_t flags,
                           int64_t layout, const c10::optional<at::Tensor>& sr_keys, bool scalars_on_host_only) {
  check_rule(op, rule, flags);
  TORCH_CHECK(layout >= 0 && layout < LAYOUT_COUNT, "momentum_fused ", op, ": unknown layout code ",
              layout, " (0 .. ", LAYOUT_COUNT - 1, ": generated/tables.h, enum Layout)");
  StepArgs a;
  a.rule = static_cast<int>(rule);
  a.flags = static_cast<int>(flags);
  a.layout = static_cast<int>(layout);
  a.ns = rule_num_states(a.rule, a.flags);
  a.k = rule_num_scalars(a.rule);
  a.master = layout_master(a.layout);
  a.remainder = layout_remainder(a.layout);
  a.int8 = layout_int8(a.layout);
  const size_t n = params.size();
  const int nm = (a.master || a.remainder) ? 1 : 0;
  const int per = a.ns + nm;
  a.n = static_cast<int64_t>(n);
  TORCH_CHECK(grads.size() == n, "momentum_fused ", op, ": ", n, " params but ", grads.size(), " grads");
  // layouts int8_state, master16_int8: a param is quantized when its first state is codes (int8 / uint8): the front end decides
  // (layouts.int8_quantized, on the global tensor: an FSDP2 shard may hold fewer than INT8_MIN_NUMEL elements)
  std::vector<uint8_t> quantized(a.int8 ? n : 0);
  if (a.int8) {  // the count depends on that: quantized params have 2 ns (codes, then scales) + nm (the remainder)
    size_t want = 0;
    for (size_t i = 0; i < n; ++i) {
      TORCH_CHECK(params[i].defined(), "momentum_fused ", op, ": params[", i, "] is undefined");
      bool q = false;
      if (a.ns > 0 && want < states.size() && states[want].defined()) {
        const auto st = states[want].scalar_type();
        q = st == c10::ScalarType::Char || st == c10::ScalarType::Byte;
        TORCH_CHECK(q || st == c10::ScalarType::Float, "momentum_fused ", op, ": states[", want, "] (state 0 of params[",
                    i, "], layout ", layout_name(a.layout), ") has dtype ", st,
                    ", expected int8 or uint8 codes, or float32");
      }
      TORCH_CHECK(!q || params[i].numel() % INT8_BLOCK == 0, "momentum_fused ", op, ": params[", i, "] has ",
                  params[i].numel(), " elements, not a multiple of ", INT8_BLOCK, ", but its state is 8-bit codes");
      quantized[i] = q ? 1 : 0;
      want += static_cast<size_t>((q ? 2 * a.ns : a.ns) + nm);
    }
    TORCH_CHECK(states.size() == want, "momentum_fused ", op, ": rule ", rule_name(a.rule), " with flags ", a.flags,
                " and layout ", layout_name(a.layout), " needs ", want, " state tensors for these params (", a.ns,
                a.remainder ? " + the int16 remainder" : "", " per param; a param whose states are 8-bit codes has ",
                a.ns, " codes, ", a.remainder ? "the remainder, " : "", "then their ", a.ns, " scales), got ",
                states.size());
  } else {
    TORCH_CHECK(states.size() == n * static_cast<size_t>(per), "momentum_fused ", op, ": rule ", rule_name(a.rule),
                " with flags ", a.flags, " and layout ", layout_name(a.layout), " needs ", per,
                " state tensors per param (", a.ns, " rule state",
                a.master ? " + the fp32 master" : a.remainder ? " + the int16 remainder" : "", "; ", n * per,
                " in all), got ", states.size());
  }
  TORCH_CHECK(scalars.defined(), "momentum_fused ", op, ": scalars is undefined");
  const bool scalars_device_ok = scalars.device().is_cpu() ||
                                 (!scalars_on_host_only && n > 0 && scalars.device() == params[0].device());
  TORCH_CHECK(scalars_device_ok && scalars.scalar_type() == c10::ScalarType::Double &&
                  scalars.dim() == 2 && scalars.size(0) == a.n && scalars.size(1) == a.k && scalars.is_contiguous(),
              "momentum_fused ", op, ": scalars must be a contiguous float64 tensor of shape [", n, ", ", a.k,
              "] on the cpu", scalars_on_host_only ? "" : " or the params' device", " for rule ", rule_name(a.rule),
              ", got ", scalars.scalar_type(), " ", scalars.sizes(), " on ", scalars.device());
  const bool has_keys = sr_keys.has_value() && sr_keys->defined();
  if (layout_stochastic(a.layout)) {
    TORCH_CHECK(has_keys, "momentum_fused ", op, ": layout ", layout_name(a.layout),
                " needs sr_keys (one uint32 key per tensor)");
    const bool keys_device_ok = sr_keys->device().is_cpu() ||
                                (!scalars_on_host_only && n > 0 && sr_keys->device() == params[0].device());
    TORCH_CHECK(keys_device_ok && sr_keys->scalar_type() == c10::ScalarType::Long && sr_keys->dim() == 1 &&
                    sr_keys->size(0) == a.n && sr_keys->is_contiguous(),
                "momentum_fused ", op, ": sr_keys must be a contiguous int64 tensor of shape [", n, "] on the cpu",
                scalars_on_host_only ? "" : " or the params' device", ", got ", sr_keys->scalar_type(), " ",
                sr_keys->sizes(), " on ", sr_keys->device());
    if (sr_keys->device().is_cpu()) {
      const int64_t* kp = sr_keys->data_ptr<int64_t>();
      a.keys.resize(n);
      for (size_t i = 0; i < n; ++i) {
        TORCH_CHECK(kp[i] >= 0 && kp[i] <= int64_t(0xFFFFFFFF), "momentum_fused ", op, ": sr_keys[", i, "] = ", kp[i],
                    " is not a uint32");
        a.keys[i] = static_cast<uint32_t>(kp[i]);
      }
    }
  } else {
    TORCH_CHECK(!has_keys, "momentum_fused ", op, ": sr_keys given, but layout ", layout_name(a.layout),
                " does not round stochastically (bf16_sr, int8_sr and master16_int8_sr do)");
  }
  if (n == 0) return a;
  TORCH_CHECK(params[0].defined(), "momentum_fused ", op, ": params[0] is undefined");
  a.device = params[0].device();
  TORCH_CHECK(a.device.type() == device_type, "momentum_fused ", op, ": params must be ",
              c10::DeviceTypeName(device_type, /*lower_case=*/true), " tensors, got one on ", a.device);
  const c10::ScalarType dtype = params[0].scalar_type();
  a.dtype = dtype_code(dtype);
  TORCH_CHECK(a.dtype >= 0, "momentum_fused ", op, ": unsupported dtype ", dtype,
              " (supported: float32, float64, bfloat16, float16)");
  TORCH_CHECK(layout_param_ok(a.layout, dtype), "momentum_fused ", op, ": layout ", layout_name(a.layout),
              " takes params of dtype ", layout_param_dtypes(a.layout), ", got ", dtype);
  const c10::ScalarType sdtype = layout_state_dtype(a.layout, dtype);

  a.params.resize(n);
  a.grads.resize(n);
  a.states.resize(n * a.ns);
  a.masters.resize(a.master ? n : 0);
  a.remainders.resize(a.remainder ? n : 0);
  a.scales.resize(a.int8 ? n * a.ns : 0);
  a.code_signed.resize(a.int8 ? n * a.ns : 0);
  a.numel.resize(n);
  // Reading the metadata of many tensors is a chain of cache misses (TensorImpl, then its storage): prefetch
  // the TensorImpls a few tensors ahead so that the misses overlap.
  auto prefetch_impl = [](const at::Tensor& t) {
    const char* q = reinterpret_cast<const char*>(t.unsafeGetTensorImpl());
    for (int o = 0; o < 256; o += 64) __builtin_prefetch(q + o, 0, 3);
  };
  constexpr size_t kAhead = 8;
  size_t at = 0;  // the first state tensor of param i
  for (size_t i = 0; i < n; ++i) {
    if (i + kAhead < n) {
      prefetch_impl(params[i + kAhead]);
      prefetch_impl(grads[i + kAhead]);
      if (!a.int8)
        for (int j = 0; j < per; ++j) prefetch_impl(states[(i + kAhead) * per + j]);
    }
    TORCH_CHECK(params[i].defined(), "momentum_fused ", op, ": params[", i, "] is undefined");
    const int64_t ne = params[i].numel();
    check_tensor(op, params[i], "params", i, a.device, dtype, ne);
    check_tensor(op, grads[i], "grads", i, a.device, dtype, ne);
    a.numel[i] = ne;
    a.params[i] = params[i].data_ptr();
    a.grads[i] = grads[i].data_ptr();
    if (a.int8 && quantized[i]) {
      for (int j = 0; j < a.ns; ++j) {
        const at::Tensor& c = states[at + j];
        TORCH_CHECK(c.defined(), "momentum_fused ", op, ": states[", at + j, "] is undefined");
        const bool sgn = c.scalar_type() == c10::ScalarType::Char;
        TORCH_CHECK(sgn || c.scalar_type() == c10::ScalarType::Byte, "momentum_fused ", op, ": states[", at + j,
                    "] (codes of state ", j, " of params[", i, "], quantized by layout ", layout_name(a.layout),
                    ") has dtype ",
                    c.scalar_type(), ", expected int8 (a signed state) or uint8 (a non-negative one)");
        check_tensor(op, c, "states (codes)", at + j, a.device, c.scalar_type(), ne);
        check_tensor(op, states[at + a.ns + nm + j], "states (scales)", at + a.ns + nm + j, a.device,
                     c10::ScalarType::Float, ne / INT8_BLOCK);
        a.states[i * a.ns + j] = c.data_ptr();
        a.scales[i * a.ns + j] = states[at + a.ns + nm + j].data_ptr();
        a.code_signed[i * a.ns + j] = sgn ? 1 : 0;
      }
      if (a.remainder) {
        check_tensor(op, states[at + a.ns], "states (remainder)", at + a.ns, a.device, c10::ScalarType::Short, ne);
        a.remainders[i] = states[at + a.ns].data_ptr();
      }
      at += static_cast<size_t>(2 * a.ns + nm);
      continue;
    }
    for (int j = 0; j < a.ns; ++j) check_tensor(op, states[at + j], "states", at + j, a.device, sdtype, ne);
    if (a.master)
      check_tensor(op, states[at + a.ns], "states (master)", at + a.ns, a.device, c10::ScalarType::Float, ne);
    if (a.remainder)
      check_tensor(op, states[at + a.ns], "states (remainder)", at + a.ns, a.device, c10::ScalarType::Short, ne);
    for (int j = 0; j < a.ns; ++j) a.states[i * a.ns + j] = states[at + j].data_ptr();
    if (a.master) a.masters[i] = states[at + a.ns].data_ptr();
    if (a.remainder) a.remainders[i] = states[at + a.ns].data_ptr();
    at += static_cast<size_t>(per);
  }
  return a;
}

}  // namespace bind
}  // namespace mf
