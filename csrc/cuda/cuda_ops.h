// The CUDA op's C++ entry, shared by its two bindings: the TORCH_LIBRARY op (cuda_ops.cpp,
// torch.ops.momentum_fused.cuda_step) and the pybind function of the Python module (cuda_python.cpp,
// momentum_fused._C_cuda.cuda_step). Arguments and checks: cuda_ops.cpp, ../step_args.h.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

void mf_cuda_step(at::TensorList params, at::TensorList grads, at::TensorList states, const at::Tensor& scalars,
                  int64_t rule, int64_t flags, const c10::optional<at::Tensor>& found_inf,
                  const c10::optional<at::Tensor>& grad_scale, int64_t layout,
                  const c10::optional<at::Tensor>& sr_keys);
