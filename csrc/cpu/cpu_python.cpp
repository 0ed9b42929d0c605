// The Python module momentum_fused._C_cpu: the eager hot path's two entry points, bound with pybind11 (the
// ops themselves are registered with TORCH_LIBRARY in cpu_ops.cpp and stay visible as
// torch.ops.momentum_fused.*, e.g. for torch.compile).
//
// Why a second entry to the same op: a torch.ops call converts every tensor of its TensorList arguments to an
// IValue and back (measured here: ~1.9 us per param for params + grads + one state list), which dominated a
// step over 10,000 small tensors. pybind's tensor caster unpacks a Python list at ~50 ns per tensor.
//
//   cpu_step(params, grads, states, scalars, rule, flags, layout=0, sr_keys=None) -> int
//       the same function as torch.ops.momentum_fused.cpu_step (mf_cpu_step in cpu_ops.cpp), on lists it
//       borrows (see BorrowedTensors); `states` may also be a list of per-param tuples. The GIL is released
//       while the kernels run. Returns DONE, or, having done nothing: PYTHON_DISPATCH when a tensor is a
//       subclass that dispatches to Python (FakeTensor, ...): the caller then calls the registered op, which
//       the dispatcher routes (as it must while a TorchDispatchMode is active: this entry bypasses the
//       dispatcher); NOT_CONTIGUOUS when a strided tensor is not contiguous: the caller copies it in and out.
//   cached_grads(params, mask, state_dicts, keys, flat, pdtype, device, sdtypes) -> list | None
//       the per-tensor checks of the optimizers' cached plan (FusedOptimizer._fast_plan), in one C loop:
//       the gradients of `params` (those with mask[i] True; mask None: all) when every one of these holds,
//       else None (the caller then takes the full validation, which names the problem):
//         - mask[i] False <=> params[i].grad is None;
//         - params: exactly torch.Tensor or nn.Parameter (a subclass may override `grad` in Python), dtype
//           `pdtype`, device `device`, strided, contiguous;
//         - each gradient: a plain strided contiguous tensor with its param's sizes, dtype and device;
//         - state tensor j of param i: state_dicts[i][keys[j]] is the object flat[i * len(keys) + j], of
//           dtype sdtypes[j], on `device`, with the param's sizes, strided and contiguous.
//       Reads metadata only: no tensor data, no device synchronization (CUDA params are fine).
//       momentum_fused/optim/base.py has the same checks in Python (_cached_grads_py), used when this
//       extension is not built; tests/test_fast_path.py runs both.
#include <torch/csrc/Device.h>
#include <torch/csrc/Dtype.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/extension.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "cpu_ops.h"

namespace py = pybind11;

namespace {

// The status codes of cpu_step (module attributes DONE, PYTHON_DISPATCH, NOT_CONTIGUOUS).
enum Status : int { DONE = 0, PYTHON_DISPATCH = 1, NOT_CONTIGUOUS = 2 };

// A Python list of tensors (for `states` also a list of tuples of tensors, flattened in order) as
// at::Tensor objects that BORROW the list's tensors (no reference count changes). Measured on 10,000
// tensors: the increments and decrements of a std::vector<at::Tensor> copy were ~25% of the op's time, the
// decrements running after the kernel had evicted every TensorImpl from the caches. The list keeps the
// tensors alive: callers pass lists private to the call (the optimizers build them per step) and must not
// mutate them while it runs (the GIL is released then).
class BorrowedTensors {
 public:
  BorrowedTensors(const py::handle& seq, const char* what, bool nested) : what_(what) {
    PyObject* o = seq.ptr();
    if (!PyList_Check(o) && !PyTuple_Check(o))
      throw py::type_error(std::string("cpu_step: ") + what + " must be a list of tensors");
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(o);
    v_.reserve(static_cast<size_t>(n));
    try {
      for (Py_ssize_t i = 0; i < n; ++i) {
        PyObject* item = PySequence_Fast_GET_ITEM(o, i);
        if (nested && (PyTuple_Check(item) || PyList_Check(item))) {
          for (Py_ssize_t j = 0; j < PySequence_Fast_GET_SIZE(item); ++j)
            add(PySequence_Fast_GET_ITEM(item, j), i, j);
        } else {
          add(item, i, -1);
        }
      }
    } catch (...) {  // (no destructor runs for a throwing constructor: release the borrows here)
      release();
      throw;
    }
  }
  ~BorrowedTensors() { release(); }
  BorrowedTensors(const BorrowedTensors&) = delete;
  BorrowedTensors& operator=(const BorrowedTensors&) = delete;
  at::TensorList list() const { return v_; }
  // a tensor subclass that dispatches to Python (FakeTensor, DTensor, ...): the op must go through the dispatcher
  bool python_dispatch = false;
  // a strided tensor that is not contiguous: the caller copies it in and out
  bool not_contiguous = false;

 private:
  void add(PyObject* o, Py_ssize_t i, Py_ssize_t j) {
    if (!THPVariable_Check(o))
      throw py::type_error(std::string("cpu_step: ") + what_ + "[" + std::to_string(i) + "]" +
                           (j >= 0 ? "[" + std::to_string(j) + "]" : std::string()) + " is a " +
                           Py_TYPE(o)->tp_name + ", expected a Tensor");
    const at::Tensor& t = THPVariable_Unpack(o);
    if (t.defined()) {
      python_dispatch |= t.key_set().has(c10::DispatchKey::Python);
      not_contiguous |= t.layout() == c10::kStrided && !t.is_contiguous();
    }
    v_.push_back(c10::MaybeOwnedTraits<at::Tensor>::createBorrow(t));
  }
  // the borrowed tensors must never be destroyed as owners (that would drop references they do not hold)
  void release() {
    for (auto& t : v_) c10::MaybeOwnedTraits<at::Tensor>::destroyBorrow(t);
    v_.clear();
  }
  const char* what_;
  std::vector<at::Tensor> v_;
};

int cpu_step_py(const py::handle& params, const py::handle& grads, const py::handle& states,
                const at::Tensor& scalars, int64_t rule, int64_t flags, int64_t layout,
                const c10::optional<at::Tensor>& sr_keys) {
  const BorrowedTensors ps(params, "params", false), gs(grads, "grads", false), ss(states, "states", true);
  if (ps.python_dispatch || gs.python_dispatch || ss.python_dispatch) return PYTHON_DISPATCH;
  if (ps.not_contiguous || gs.not_contiguous || ss.not_contiguous) return NOT_CONTIGUOUS;
  try {
    py::gil_scoped_release nogil;
    mf_cpu_step(ps.list(), gs.list(), ss.list(), scalars, rule, flags, layout, sr_keys);
  } catch (const c10::Error& e) {  // as torch.ops does: a RuntimeError with the message, no C++ backtrace
    throw std::runtime_error(e.what_without_backtrace());
  }
  return DONE;
}

bool plain(const at::Tensor& t, c10::ScalarType dtype, const c10::Device& device) {
  return t.scalar_type() == dtype && t.device() == device && t.layout() == c10::kStrided &&
         !t.key_set().has(c10::DispatchKey::Python) && t.is_contiguous();
}

// See the file comment. Borrowed references throughout; the result list owns its gradients.
py::object cached_grads(const py::list& params, const py::object& mask, const py::list& state_dicts,
                        const py::tuple& keys, const py::list& flat, const py::object& pdtype,
                        const py::object& device, const py::tuple& sdtypes) {
  const Py_ssize_t np = PyList_GET_SIZE(params.ptr());
  const Py_ssize_t nk = PyTuple_GET_SIZE(keys.ptr());
  const Py_ssize_t ni = PyList_GET_SIZE(state_dicts.ptr());
  if (!THPDtype_Check(pdtype.ptr()) || !THPDevice_Check(device.ptr()) || PyTuple_GET_SIZE(sdtypes.ptr()) != nk ||
      PyList_GET_SIZE(flat.ptr()) != ni * nk)
    throw std::invalid_argument("cached_grads: bad arguments");
  const bool masked = !mask.is_none();
  if (masked && (!PyList_Check(mask.ptr()) || PyList_GET_SIZE(mask.ptr()) != np))
    throw std::invalid_argument("cached_grads: mask must be None or a list of bools, one per param");
  const c10::ScalarType pdt = reinterpret_cast<THPDtype*>(pdtype.ptr())->scalar_type;
  const c10::Device dev = reinterpret_cast<THPDevice*>(device.ptr())->device;
  std::vector<c10::ScalarType> sdt(static_cast<size_t>(nk));
  for (Py_ssize_t j = 0; j < nk; ++j) {
    PyObject* d = PyTuple_GET_ITEM(sdtypes.ptr(), j);
    if (!THPDtype_Check(d)) throw std::invalid_argument("cached_grads: sdtypes must be torch.dtype objects");
    sdt[static_cast<size_t>(j)] = reinterpret_cast<THPDtype*>(d)->scalar_type;
  }
  py::list out(masked ? 0 : np);
  Py_ssize_t item = 0;
  for (Py_ssize_t i = 0; i < np; ++i) {
    PyObject* po = PyList_GET_ITEM(params.ptr(), i);
    // exactly Tensor or Parameter: a subclass may define its own Python-level `grad`, which this C read of
    // the autograd gradient would not see
    if (!THPVariable_CheckExact(po)) return py::none();
    const at::Tensor& p = THPVariable_Unpack(po);
    const at::Tensor& g = p.grad();
    if (masked && PyList_GET_ITEM(mask.ptr(), i) != Py_True) {
      if (g.defined()) return py::none();
      continue;
    }
    if (!g.defined() || item >= ni || !plain(p, pdt, dev) || !plain(g, pdt, dev) || !g.sizes().equals(p.sizes()))
      return py::none();
    PyObject* st = PyList_GET_ITEM(state_dicts.ptr(), item);
    if (!PyDict_CheckExact(st)) return py::none();
    for (Py_ssize_t j = 0; j < nk; ++j) {
      PyObject* v = PyDict_GetItem(st, PyTuple_GET_ITEM(keys.ptr(), j));  // borrowed; NULL if missing
      if (v == nullptr || v != PyList_GET_ITEM(flat.ptr(), item * nk + j) || !THPVariable_Check(v)) return py::none();
      const at::Tensor& s = THPVariable_Unpack(v);
      if (!plain(s, sdt[static_cast<size_t>(j)], dev) || !s.sizes().equals(p.sizes())) return py::none();
    }
    PyObject* go = THPVariable_Wrap(g);  // new reference (the grad's existing Python object, if any)
    if (go == nullptr) throw py::error_already_set();
    if (masked) {
      if (PyList_Append(out.ptr(), go) != 0) {
        Py_DECREF(go);
        throw py::error_already_set();
      }
      Py_DECREF(go);
    } else {
      PyList_SET_ITEM(out.ptr(), i, go);  // steals the reference
    }
    ++item;
  }
  if (item != ni) return py::none();
  return std::move(out);
}

}  // namespace

PYBIND11_MODULE(_C_cpu, m) {
  m.doc() = "momentum_fused CPU kernels (ops in torch.ops.momentum_fused; fast eager entry points here)";
  m.attr("DONE") = static_cast<int>(DONE);
  m.attr("PYTHON_DISPATCH") = static_cast<int>(PYTHON_DISPATCH);
  m.attr("NOT_CONTIGUOUS") = static_cast<int>(NOT_CONTIGUOUS);
  m.def("cpu_step", &cpu_step_py, py::arg("params"), py::arg("grads"), py::arg("states"), py::arg("scalars"),
        py::arg("rule"), py::arg("flags"), py::arg("layout") = 0, py::arg("sr_keys") = py::none());
  m.def("cached_grads", &cached_grads, py::arg("params"), py::arg("mask"), py::arg("state_dicts"), py::arg("keys"),
        py::arg("flat"), py::arg("pdtype"), py::arg("device"), py::arg("sdtypes"));
}
