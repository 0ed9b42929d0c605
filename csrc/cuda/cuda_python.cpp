// The Python module momentum_fused._C_cuda: the eager entry of the CUDA op, bound with pybind11 (the op is
// registered with TORCH_LIBRARY in cuda_ops.cpp and stays visible as torch.ops.momentum_fused.cuda_step, e.g.
// for torch.compile). Why a second entry, and its status codes: ../py_borrow.h (shared with _C_cpu).
//
//   cuda_step(params, grads, states, scalars, rule, flags, found_inf=None, grad_scale=None, layout=0,
//             sr_keys=None) -> int
//       the same function as torch.ops.momentum_fused.cuda_step (mf_cuda_step), on lists it borrows;
//       `states` may also be a list of per-param tuples. The GIL is released while the arguments are checked
//       and the kernels are launched (launches are asynchronous: nothing waits for the GPU). Returns DONE, or,
//       having done nothing, PYTHON_DISPATCH (a tensor, the optional ones included, dispatches to Python: the
//       caller calls the registered op) or NOT_CONTIGUOUS (the caller copies).
#include <torch/extension.h>

#include "../py_borrow.h"
#include "cuda_ops.h"

namespace py = pybind11;

namespace {

int cuda_step_py(const py::handle& params, const py::handle& grads, const py::handle& states,
                 const at::Tensor& scalars, int64_t rule, int64_t flags, const c10::optional<at::Tensor>& found_inf,
                 const c10::optional<at::Tensor>& grad_scale, int64_t layout,
                 const c10::optional<at::Tensor>& sr_keys) {
  using mf::py_borrow::BorrowedTensors;
  using mf::py_borrow::dispatches_to_python;
  const BorrowedTensors ps("cuda_step", params, "params", false), gs("cuda_step", grads, "grads", false),
      ss("cuda_step", states, "states", true);
  if (scalars.key_set().has(c10::DispatchKey::Python) || dispatches_to_python(found_inf) ||
      dispatches_to_python(grad_scale) || dispatches_to_python(sr_keys))
    return mf::py_borrow::PYTHON_DISPATCH;
  const int status = mf::py_borrow::status_of({&ps, &gs, &ss});
  if (status != mf::py_borrow::DONE) return status;
  mf::py_borrow::run_without_gil([&] {
    mf_cuda_step(ps.list(), gs.list(), ss.list(), scalars, rule, flags, found_inf, grad_scale, layout, sr_keys);
  });
  return mf::py_borrow::DONE;
}

}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "momentum_fused CUDA kernels (the op in torch.ops.momentum_fused.cuda_step; its fast eager entry here)";
  mf::py_borrow::add_status_codes(m);
  m.def("cuda_step", &cuda_step_py, py::arg("params"), py::arg("grads"), py::arg("states"), py::arg("scalars"),
        py::arg("rule"), py::arg("flags"), py::arg("found_inf") = py::none(), py::arg("grad_scale") = py::none(),
        py::arg("layout") = 0, py::arg("sr_keys") = py::none());
}
