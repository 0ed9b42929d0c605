// The eager entries' argument conversion, shared by the pybind modules of the CPU and the CUDA op
// (cpu/cpu_python.cpp: _C_cpu.cpu_step, cuda/cuda_python.cpp: _C_cuda.cuda_step).
//
// Why the ops have a second entry: a torch.ops call converts every tensor of its TensorList arguments to an
// IValue and back (measured on the CPU: ~0.6 us per tensor per list), which dominated a step over 10,000
// small tensors. Here a Python list is read directly and its tensors are borrowed.
//
// The entries return one of the status codes below, having done nothing unless DONE:
//   PYTHON_DISPATCH  a tensor is a subclass that dispatches to Python (FakeTensor, DTensor, ...): the caller
//                    calls the registered op, which the dispatcher routes (this entry bypasses it);
//   NOT_CONTIGUOUS   a strided tensor is not contiguous: the caller copies it in and out.
#pragma once

#include <torch/csrc/autograd/python_variable.h>
#include <torch/extension.h>

#include <initializer_list>
#include <stdexcept>
#include <string>
#include <vector>

namespace mf {
namespace py_borrow {

// The status codes of the eager entries (module attributes DONE, PYTHON_DISPATCH, NOT_CONTIGUOUS).
enum Status : int { DONE = 0, PYTHON_DISPATCH = 1, NOT_CONTIGUOUS = 2 };

inline void add_status_codes(pybind11::module_& m) {
  m.attr("DONE") = static_cast<int>(DONE);
  m.attr("PYTHON_DISPATCH") = static_cast<int>(PYTHON_DISPATCH);
  m.attr("NOT_CONTIGUOUS") = static_cast<int>(NOT_CONTIGUOUS);
}

// Software prefetch for loops over lists of tensors, whose every element is a chain of dependent cache misses
// (the PyObject, then the TensorImpl it points to) once the objects are scattered over a model's heap. A loop
// at element i calls prefetch_object(x) for the element kFar ahead, and prefetch_impl(x) for the element
// kNear ahead, whose PyObject the first call has brought in by then.
constexpr Py_ssize_t kPrefetchFar = 16, kPrefetchNear = 8;

inline void prefetch_object(PyObject* o) { __builtin_prefetch(o, 0, 3); }

inline void prefetch_impl(PyObject* o) {
  if (THPVariable_CheckExact(o)) {  // (reads the type pointer only; a subclass is left to the loop)
    const char* q = reinterpret_cast<const char*>(THPVariable_Unpack(o).unsafeGetTensorImpl());
    for (int off = 0; off < 256; off += 64) __builtin_prefetch(q + off, 0, 3);
  }
}

// A Python list of tensors (for `states` also a list of tuples of tensors, flattened in order) as
// at::Tensor objects that BORROW the list's tensors (no reference count changes). Measured on 10,000
// tensors: the increments and decrements of a std::vector<at::Tensor> copy were ~25% of the op's time, the
// decrements running after the kernel had evicted every TensorImpl from the caches. The list keeps the
// tensors alive: callers pass lists private to the call (the optimizers build them per step) and must not
// mutate them while it runs (the GIL is released then).
class BorrowedTensors {
 public:
  // op: the entry's name in messages; what: the argument's name.
  BorrowedTensors(const char* op, const pybind11::handle& seq, const char* what, bool nested) : op_(op), what_(what) {
    PyObject* o = seq.ptr();
    if (!PyList_Check(o) && !PyTuple_Check(o))
      throw pybind11::type_error(std::string(op_) + ": " + what + " must be a list of tensors");
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(o);
    v_.reserve(static_cast<size_t>(n));
    try {
      for (Py_ssize_t i = 0; i < n; ++i) {
        if (i + kPrefetchFar < n) prefetch_object(PySequence_Fast_GET_ITEM(o, i + kPrefetchFar));
        if (i + kPrefetchNear < n) prefetch_nested(PySequence_Fast_GET_ITEM(o, i + kPrefetchNear), nested);
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
  // a tensor subclass that dispatches to Python (FakeTensor, DTensor, ...), a lazy conjugate or negative view or
  // a ZeroTensor: the op must go through the dispatcher
  bool python_dispatch = false;
  // a strided tensor that is not contiguous: the caller copies it in and out
  bool not_contiguous = false;

 private:
  // a tensor: its TensorImpl; a per-param tuple of states (cached by now): its tensors' PyObjects
  static void prefetch_nested(PyObject* o, bool nested) {
    if (nested && (PyTuple_Check(o) || PyList_Check(o))) {
      for (Py_ssize_t j = 0; j < PySequence_Fast_GET_SIZE(o); ++j) prefetch_object(PySequence_Fast_GET_ITEM(o, j));
    } else {
      prefetch_impl(o);
    }
  }
  void add(PyObject* o, Py_ssize_t i, Py_ssize_t j) {
    if (!THPVariable_Check(o))
      throw pybind11::type_error(std::string(op_) + ": " + what_ + "[" + std::to_string(i) + "]" +
                                 (j >= 0 ? "[" + std::to_string(j) + "]" : std::string()) + " is a " +
                                 Py_TYPE(o)->tp_name + ", expected a Tensor");
    const at::Tensor& t = THPVariable_Unpack(o);
    if (t.defined()) {
      // (also a lazy conjugate / negative view or a ZeroTensor, which has no memory: the dispatcher's fallbacks
      // resolve them; the optimizers hand the kernels resolved gradients, optim/checks.py _resolve_grad)
      const c10::DispatchKeySet ks = t.key_set();
      python_dispatch |= ks.has(c10::DispatchKey::Python) || ks.has(c10::DispatchKey::Conjugate) ||
                         ks.has(c10::DispatchKey::Negative) || ks.has(c10::DispatchKey::ZeroTensor);
      not_contiguous |= t.layout() == c10::kStrided && !t.is_contiguous();
    }
    v_.push_back(c10::MaybeOwnedTraits<at::Tensor>::createBorrow(t));
  }
  // the borrowed tensors must never be destroyed as owners (that would drop references they do not hold)
  void release() {
    for (auto& t : v_) c10::MaybeOwnedTraits<at::Tensor>::destroyBorrow(t);
    v_.clear();
  }
  const char* op_;
  const char* what_;
  std::vector<at::Tensor> v_;
};

// PYTHON_DISPATCH if any list needs the dispatcher, else NOT_CONTIGUOUS if any needs copies, else DONE (go on).
inline int status_of(std::initializer_list<const BorrowedTensors*> lists) {
  for (const BorrowedTensors* l : lists)
    if (l->python_dispatch) return PYTHON_DISPATCH;
  for (const BorrowedTensors* l : lists)
    if (l->not_contiguous) return NOT_CONTIGUOUS;
  return DONE;
}

// A one-element optional tensor argument (found_inf, grad_scale, sr_keys) that dispatches to Python
// sends the call through the dispatcher as well.
inline bool dispatches_to_python(const c10::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() && t->key_set().has(c10::DispatchKey::Python);
}

// Runs f() with the GIL released; a c10::Error (a TORCH_CHECK of the op) leaves as a RuntimeError with its
// message and no C++ backtrace, as from torch.ops. The GIL is held again before the exception is converted.
template <class F>
void run_without_gil(F&& f) {
  try {
    pybind11::gil_scoped_release nogil;
    f();
  } catch (const c10::Error& e) {
    throw std::runtime_error(e.what_without_backtrace());
  }
}

// After a kernel wrote the tensors in memory: bump their autograd version counters, as an in-place ATen op does
// (a tensor saved for backward then makes that backward raise; inference tensors have no counter).
inline void bump_versions(at::TensorList ts) {
  for (const at::Tensor& t : ts)
    if (t.defined() && !t.is_inference()) t.unsafeGetTensorImpl()->bump_version();
}

}  // namespace py_borrow
}  // namespace mf
