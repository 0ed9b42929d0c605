// The CPU op's C++ entry, shared by its two bindings: the TORCH_LIBRARY op (cpu_ops.cpp,
// torch.ops.momentum_fused.cpu_step) and the pybind function of the Python module (cpu_python.cpp,
// momentum_fused._C_cpu.cpu_step). Arguments and checks: cpu_ops.cpp.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

void mf_cpu_step(at::TensorList params, at::TensorList grads, at::TensorList states, const at::Tensor& scalars,
                 int64_t rule, int64_t flags, int64_t layout, const c10::optional<at::Tensor>& sr_keys);
