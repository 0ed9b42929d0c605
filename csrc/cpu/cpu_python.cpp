// The Python module momentum_fused._C_cpu: the eager hot path's two entry points, bound with pybind11 (the
// ops themselves are registered with TORCH_LIBRARY in cpu_ops.cpp and stay visible as
// torch.ops.momentum_fused.*, e.g. for torch.compile). Why a second entry to the same op, and its status
// codes: ../py_borrow.h (shared with the CUDA module's cuda_step).
//
//   cpu_step(params, grads, states, scalars, rule, flags, layout=0, sr_keys=None) -> int
//       the same function as torch.ops.momentum_fused.cpu_step (mf_cpu_step in cpu_ops.cpp), on lists it
//       borrows (py_borrow::BorrowedTensors); `states` may also be a list of per-param tuples. The GIL is
//       released while the kernels run; then the params' autograd version counters are bumped (the registered
//       op leaves that to its Python caller, backends.run_step_op). Returns DONE, or, having done nothing, PYTHON_DISPATCH (then the
//       caller calls the registered op, as it must while a TorchDispatchMode is active: this entry bypasses
//       the dispatcher) or NOT_CONTIGUOUS (then the caller copies).
//   cached_grads(params, mask, state_dicts, keys, flat, pdtype, device, sdtypes) -> list | None
//       the per-tensor checks of the optimizers' cached plan (FusedOptimizer._fast_plan), in one C loop:
//       the gradients of `params` (those with mask[i] True; mask None: all) when every one of these holds,
//       else None (the caller then takes the full validation, which names the problem):
//         - mask[i] False <=> params[i].grad is None;
//         - params: exactly torch.Tensor or nn.Parameter (a subclass may override `grad` in Python), dtype
//           `pdtype`, device `device`, strided, dense (contiguous or a permutation of it: `plain` below);
//         - each gradient: a plain strided dense tensor with its param's sizes, dtype and device (no
//           conjugate or negative bit, not a ZeroTensor);
//         - state tensor j of param i: state_dicts[i][keys[j]] is the object flat[i * len(keys) + j], of
//           dtype sdtypes[j], on `device`, with the param's sizes, strided and dense.
//       Reads metadata only: no tensor data, no device synchronization (CUDA params are fine).
//       Without this extension there is no cached plan (every step takes the full plan).
//     cached_grads(..., signatures=[(keys, sdtypes, divisors, size), ...]): the state keys and dtypes per param
//       (then `keys` and `sdtypes` are not used, `flat` holds each param's tensors in its signature's order), the
//       size of each state tensor relative to the param (divisor 1: the param's sizes; n > 1: numel = the param's
//       / n) and the number of entries of its state dict (a key added or removed since: None). The int8 layouts:
//       codes and block scales for a quantized tensor, fp32 state for the others.
//     cached_grads(..., ptrs=t): t an int64 CPU tensor of 2 (n + f) entries: the data_ptr()s the full plan saw, those
//       of the n params with gradients (for DTensors: of their local shards) then those of the f tensors of `flat`,
//       then their numels in the same order: each tensor's must be the same (a `p.data = other` or `set_` since,
//       even to memory starting at the same address: None, so that the full plan checks overlaps, e.g. weight
//       tying). An inference-tensor param: None as well (the full plan refuses it outside inference mode).
//     cached_grads(..., sparse=True): mask[i] True (mask None: every param) marks a *member* of the cached plan (a
//       param whose state the full plan validated, with or without a gradient then), which may have no gradient
//       now: nothing of it is read then (its state is checked at the step that gives it a gradient); every other
//       check as above (the ptrs: of the members). Returns (grads, sel): the gradients of the members that have
//       one, and sel None when every member has one, else their positions among the members (a list of ints); or
//       None as above. (A mixture of experts, zero_grad(set_to_none=True), FSDP2 with experts a batch did not use:
//       the set of params with a gradient changes every step; before 2026-12-07 each such step took the full plan.)
//     cached_grads(..., spans=t): t the byte spans of the state tensors of every group of the cached plan ([2, n]
//       int64: starts in increasing order, ends; disjoint): a gradient sharing a byte with one of them, another
//       param's state, gives None, so that the full plan refuses it (before 2026-12-07 only the param's own state
//       was compared, and such a gradient was stepped from the cached plan).
//     cached_grads(..., dtensor=(cls, param_locals, param_specs, flat_locals)): the same for a group of DTensor
//       params (FSDP2): the *local shards* of the gradients, when besides the above (read on the local shards:
//       dtype, device, layout, contiguity, the param's local sizes) these hold:
//         - params[i], its gradient and its state tensors are exactly of class `cls` (DTensor);
//         - params[i]._spec is param_specs[i] and params[i]._local_tensor is param_locals[i] (identity);
//         - the gradient's _spec is the param's (FSDP2 builds both from one spec object) or has an equal
//           `mesh` and equal `placements` (distribute_tensor, DTensor.from_local);
//         - state tensor j's _local_tensor is the object flat_locals[i * len(keys) + j].
//   same_objects(now, cached), same_dict(d, keys, values), same_entries(dicts, key, objs) -> bool
//       the cached plan's identity checks (below), with Python twins in base.py.
//   pointer_rows(params, grads, states, nstate, ragged=False) -> int64 CPU tensor [3 + nstate (+ 1), n], or None
//       row 0 the params' data_ptr()s, row 1 the grads', row 2 + j state j's (states: one tuple or list of
//       nstate tensors per param; ragged: of at most nstate, a missing one's pointer 0, and a last row of the
//       tuples' lengths), then the params' numels, when every tensor is a contiguous tensor
//       that does not dispatch to Python; else None (the caller copies what needs it). The Triton launcher's
//       tables (triton_kernels/launcher.py) are found and checked by these rows: at C speed, no Python int per
//       tensor (4,981 tiny tensors: ~2.5 ms of Python pointer tuples, hashes and comparisons a step before).
//   version_marks(tensors) -> int64 CPU tensor [2, n]: row 0 the autograd versions (-1: an inference tensor), row 1
//       the data_ptr()s: what the master layout's check of params edited between steps compares.
//   sym_mm_bf16(out, y, z, c0, alpha, beta) -> bool, sym_mm_bf16_available() -> bool
//       out = alpha * y z^T + beta * c0 for [n, m, k] bf16 y, z whose product is symmetric (cpu_symmm.h): the
//       symmetric products of Muon's Newton-Schulz phase (momentum_fused/_symmm.py). False, having done
//       nothing, when this CPU has no AVX-512-BF16 (or has AMX) or k is odd; bad arguments raise ValueError.
#include <torch/csrc/Device.h>
#include <torch/csrc/Dtype.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/extension.h>

#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "../py_borrow.h"
#include "cpu_ops.h"
#include "cpu_symmm.h"

namespace py = pybind11;

namespace {

int cpu_step_py(const py::handle& params, const py::handle& grads, const py::handle& states,
                const at::Tensor& scalars, int64_t rule, int64_t flags, int64_t layout,
                const c10::optional<at::Tensor>& sr_keys) {
  using mf::py_borrow::BorrowedTensors;
  const BorrowedTensors ps("cpu_step", params, "params", false), gs("cpu_step", grads, "grads", false),
      ss("cpu_step", states, "states", true);
  const int status = mf::py_borrow::status_of({&ps, &gs, &ss});
  if (status != mf::py_borrow::DONE) return status;
  mf::py_borrow::run_without_gil(
      [&] { mf_cpu_step(ps.list(), gs.list(), ss.list(), scalars, rule, flags, layout, sr_keys); });
  mf::py_borrow::bump_versions(ps.list());  // (the params; Backend.bumps_versions)
  return mf::py_borrow::DONE;
}

// (a lazy conjugate or negative view, or autograd's ZeroTensor, which has no memory: not plain; the full plan
// resolves such a gradient, optim/checks.py _resolve_grad). Dense: contiguous, or a permutation of a contiguous
// block (channels_last), which occupies the same bytes, so that the data pointers and numels the cached plan
// compares decide overlaps as for a contiguous tensor; the step then runs it in memory order or on copies
// (backends.contiguous_lists). Contiguous only before 2026-12-07: a channels_last model took the full plan
// every step.
bool plain(const at::Tensor& t, c10::ScalarType dtype, const c10::Device& device) {
  const c10::DispatchKeySet ks = t.key_set();
  return t.scalar_type() == dtype && t.device() == device && t.layout() == c10::kStrided &&
         !ks.has(c10::DispatchKey::Python) && !ks.has(c10::DispatchKey::Conjugate) &&
         !ks.has(c10::DispatchKey::Negative) && !ks.has(c10::DispatchKey::ZeroTensor) && t.is_non_overlapping_and_dense();
}

// Whether two dense tensors (`plain`: their bytes one block each) share a byte (no data: meta or fake tensors, no).
bool shares_bytes(const at::Tensor& a, const at::Tensor& b) {
  const auto lo_a = reinterpret_cast<uintptr_t>(a.data_ptr()), lo_b = reinterpret_cast<uintptr_t>(b.data_ptr());
  if (lo_a == 0 || lo_b == 0) return false;
  const uintptr_t hi_a = lo_a + static_cast<uintptr_t>(a.numel()) * a.element_size(),
                  hi_b = lo_b + static_cast<uintptr_t>(b.numel()) * b.element_size();
  return lo_a < hi_b && lo_b < hi_a;
}

// A new reference to o.<name> (name interned), or a Python error.
py::object attr(PyObject* o, PyObject* name) {
  PyObject* v = PyObject_GetAttr(o, name);
  if (v == nullptr) throw py::error_already_set();
  return py::reinterpret_steal<py::object>(v);
}

// The byte spans of every state tensor of a cached plan (cached_grads' `spans`): [2, n] int64, row 0 the starts in
// increasing order, row 1 the ends; disjoint (the full plan's overlap check). Whether a dense tensor shares a byte
// with one of them: a binary search for the first span ending after its start.
struct StateSpans {
  const int64_t* lo = nullptr;
  const int64_t* hi = nullptr;
  int64_t n = 0;
  explicit StateSpans(const py::object& t) {
    if (t.is_none()) return;
    if (!THPVariable_Check(t.ptr())) throw std::invalid_argument("cached_grads: spans must be None or a tensor");
    const at::Tensor& v = THPVariable_Unpack(t.ptr());
    if (v.scalar_type() != c10::kLong || v.device().type() != c10::kCPU || !v.is_contiguous() || v.dim() != 2 ||
        v.size(0) != 2)
      throw std::invalid_argument("cached_grads: spans must be a contiguous [2, n] int64 CPU tensor");
    n = v.size(1);
    lo = v.const_data_ptr<int64_t>();
    hi = lo + n;
  }
  bool hit(const at::Tensor& t) const {
    const auto a = reinterpret_cast<int64_t>(t.data_ptr());
    if (a == 0 || t.numel() == 0) return false;
    const int64_t b = a + t.numel() * static_cast<int64_t>(t.element_size());
    int64_t l = 0, r = n;  // the first span with hi > a
    while (l < r) {
      const int64_t m = (l + r) / 2;
      if (hi[m] > a)
        r = m;
      else
        l = m + 1;
    }
    return l < n && lo[l] < b;
  }
};

// The DTensor part of cached_grads (see the file comment): the cached objects of a group of DTensor params.
struct DTensorCache {
  PyObject* cls = nullptr;           // the DTensor class (exact type of every param, grad and state tensor)
  PyObject* param_locals = nullptr;  // list: params[i]._local_tensor, per param with a gradient
  PyObject* param_specs = nullptr;   // list: params[i]._spec, likewise
  PyObject* flat_locals = nullptr;   // list: the state tensors' _local_tensor, as `flat`
  PyObject* s_local = nullptr;       // interned attribute names
  PyObject* s_spec = nullptr;
  PyObject* s_mesh = nullptr;
  PyObject* s_placements = nullptr;

  DTensorCache(const py::object& dt, Py_ssize_t n_items, Py_ssize_t n_flat) {
    if (!PyTuple_Check(dt.ptr()) || PyTuple_GET_SIZE(dt.ptr()) != 4)
      throw std::invalid_argument("cached_grads: dtensor must be (cls, param_locals, param_specs, flat_locals)");
    cls = PyTuple_GET_ITEM(dt.ptr(), 0);
    param_locals = PyTuple_GET_ITEM(dt.ptr(), 1);
    param_specs = PyTuple_GET_ITEM(dt.ptr(), 2);
    flat_locals = PyTuple_GET_ITEM(dt.ptr(), 3);
    if (!PyType_Check(cls) || !PyList_Check(param_locals) || !PyList_Check(param_specs) || !PyList_Check(flat_locals) ||
        PyList_GET_SIZE(param_locals) != n_items || PyList_GET_SIZE(param_specs) != n_items ||
        PyList_GET_SIZE(flat_locals) != n_flat)
      throw std::invalid_argument("cached_grads: bad dtensor argument");
    static PyObject* const names[4] = {PyUnicode_InternFromString("_local_tensor"),
                                       PyUnicode_InternFromString("_spec"), PyUnicode_InternFromString("mesh"),
                                       PyUnicode_InternFromString("placements")};
    s_local = names[0];
    s_spec = names[1];
    s_mesh = names[2];
    s_placements = names[3];
  }

  // Whether the two specs place their tensors alike (identity, else equal mesh and placements).
  bool same_placing(PyObject* a, PyObject* b) const {
    if (a == b) return true;
    for (PyObject* name : {s_mesh, s_placements}) {
      const int eq = PyObject_RichCompareBool(attr(a, name).ptr(), attr(b, name).ptr(), Py_EQ);
      if (eq < 0) throw py::error_already_set();
      if (eq == 0) return false;
    }
    return true;
  }
};

// What cached_grads checks on the state of one param: the keys, the dtype of each tensor and its size relative to
// the param (div 1: the param's sizes; div n > 1: numel = the param's / n, e.g. the int8 layouts' block scales).
struct StateSignature {
  PyObject* keys = nullptr;  // tuple (borrowed from the arguments)
  std::vector<c10::ScalarType> dtypes;
  std::vector<int64_t> div;
  Py_ssize_t dict_size = -1;  // the state dict's number of entries (-1: not checked)

  StateSignature(PyObject* k, PyObject* sdtypes, PyObject* divs, PyObject* size = nullptr) : keys(k) {
    if (size != nullptr) {
      dict_size = PyLong_AsSsize_t(size);
      if (dict_size < 0) {
        PyErr_Clear();
        throw std::invalid_argument("cached_grads: a signature's dict size must be an int >= 0");
      }
    }
    if (!PyTuple_Check(k) || !PyTuple_Check(sdtypes) || PyTuple_GET_SIZE(sdtypes) != PyTuple_GET_SIZE(k) ||
        (divs != nullptr && (!PyTuple_Check(divs) || PyTuple_GET_SIZE(divs) != PyTuple_GET_SIZE(k))))
      throw std::invalid_argument("cached_grads: a state signature is (keys, dtypes, divisors), tuples of one length");
    for (Py_ssize_t j = 0; j < PyTuple_GET_SIZE(k); ++j) {
      PyObject* d = PyTuple_GET_ITEM(sdtypes, j);
      if (!THPDtype_Check(d)) throw std::invalid_argument("cached_grads: sdtypes must be torch.dtype objects");
      dtypes.push_back(reinterpret_cast<THPDtype*>(d)->scalar_type);
      const int64_t n = divs == nullptr ? 1 : PyLong_AsLongLong(PyTuple_GET_ITEM(divs, j));
      if (n < 1) {
        PyErr_Clear();
        throw std::invalid_argument("cached_grads: divisors must be positive ints");
      }
      div.push_back(n);
    }
  }
  Py_ssize_t size() const { return static_cast<Py_ssize_t>(dtypes.size()); }
};

// See the file comment. Borrowed references throughout; the result list owns its gradients (for DTensor params,
// their local shards).
py::object cached_grads(const py::list& params, const py::object& mask, const py::list& state_dicts,
                        const py::tuple& keys, const py::list& flat, const py::object& pdtype,
                        const py::object& device, const py::tuple& sdtypes, const py::object& dtensor,
                        const py::object& signatures, const py::object& ptrs, bool sparse,
                        const py::object& state_spans) {
  const StateSpans spans(state_spans);
  const Py_ssize_t np = PyList_GET_SIZE(params.ptr());
  const Py_ssize_t ni = PyList_GET_SIZE(state_dicts.ptr());
  const Py_ssize_t nf = PyList_GET_SIZE(flat.ptr());
  if (!THPDtype_Check(pdtype.ptr()) || !THPDevice_Check(device.ptr()))
    throw std::invalid_argument("cached_grads: bad arguments");
  const bool masked = !mask.is_none();
  if (masked && (!PyList_Check(mask.ptr()) || PyList_GET_SIZE(mask.ptr()) != np))
    throw std::invalid_argument("cached_grads: mask must be None or a list of bools, one per param");
  // one signature for every param (keys, sdtypes), or one per param (`signatures`, a list of (keys, sdtypes,
  // divisors) tuples, few distinct objects: parsed once each)
  const bool varied = !signatures.is_none();
  if (varied && (!PyList_Check(signatures.ptr()) || PyList_GET_SIZE(signatures.ptr()) != ni))
    throw std::invalid_argument("cached_grads: signatures must be None or a list, one per state dict");
  const int64_t* cached_ptr = nullptr;  // ptrs: [ni params, nf state tensors]
  if (!ptrs.is_none()) {
    if (!THPVariable_Check(ptrs.ptr())) throw std::invalid_argument("cached_grads: ptrs must be None or a tensor");
    const at::Tensor& t = THPVariable_Unpack(ptrs.ptr());
    if (t.scalar_type() != c10::kLong || t.device().type() != c10::kCPU || !t.is_contiguous() ||
        t.numel() != 2 * (ni + nf))
      throw std::invalid_argument("cached_grads: ptrs must be a contiguous int64 CPU tensor of 2 (len(state_dicts) + "
                                  "len(flat)) entries: pointers, then numels");
    cached_ptr = t.const_data_ptr<int64_t>();
  }
  const StateSignature uniform(keys.ptr(), sdtypes.ptr(), nullptr);
  if (!varied && nf != ni * uniform.size()) throw std::invalid_argument("cached_grads: bad arguments");
  std::vector<std::pair<PyObject*, StateSignature>> parsed;
  const c10::ScalarType pdt = reinterpret_cast<THPDtype*>(pdtype.ptr())->scalar_type;
  const c10::Device dev = reinterpret_cast<THPDevice*>(device.ptr())->device;
  std::unique_ptr<DTensorCache> dt_cache;
  if (!dtensor.is_none()) dt_cache = std::make_unique<DTensorCache>(dtensor, ni, nf);
  const DTensorCache* dt = dt_cache.get();
  // the signature of member `it` (`varied`: its entry of `signatures`, few distinct objects, parsed once each)
  auto signature_of = [&](Py_ssize_t it) -> const StateSignature* {
    PyObject* so = PyList_GET_ITEM(signatures.ptr(), it);
    for (const auto& [obj, parsed_sig] : parsed)
      if (obj == so) return &parsed_sig;
    if (!PyTuple_Check(so) || PyTuple_GET_SIZE(so) != 4)
      throw std::invalid_argument("cached_grads: a signature is a (keys, sdtypes, divisors, dict size) tuple");
    parsed.emplace_back(so, StateSignature(PyTuple_GET_ITEM(so, 0), PyTuple_GET_ITEM(so, 1), PyTuple_GET_ITEM(so, 2),
                                           PyTuple_GET_ITEM(so, 3)));
    return &parsed.back().second;  // (used before the next emplace_back)
  };
  std::vector<Py_ssize_t> stepped;  // (sparse) the members with a gradient
  const bool append = masked || sparse;  // (else every param has a gradient: out[i] set in place)
  py::list out(append ? 0 : np);
  Py_ssize_t item = 0, at = 0;  // at: the first state tensor of `item` in `flat`
  using mf::py_borrow::kPrefetchFar;
  using mf::py_borrow::kPrefetchNear;
  const Py_ssize_t nk = uniform.size();
  for (Py_ssize_t i = 0; i < np; ++i) {
    // the objects of params[i + kFar] (and, unmasked with one signature, the state tensors of the same index),
    // then their TensorImpls kNear ahead (py_borrow.h)
    if (i + kPrefetchFar < np) {
      mf::py_borrow::prefetch_object(PyList_GET_ITEM(params.ptr(), i + kPrefetchFar));
      if (!masked && !varied)
        for (Py_ssize_t j = 0, a = (i + kPrefetchFar) * nk; j < nk && a + j < nf; ++j)
          mf::py_borrow::prefetch_object(PyList_GET_ITEM(flat.ptr(), a + j));
    }
    if (i + kPrefetchNear < np) {
      mf::py_borrow::prefetch_impl(PyList_GET_ITEM(params.ptr(), i + kPrefetchNear));
      if (!masked && !varied)
        for (Py_ssize_t j = 0, a = (i + kPrefetchNear) * nk; j < nk && a + j < nf; ++j)
          mf::py_borrow::prefetch_impl(PyList_GET_ITEM(flat.ptr(), a + j));
    }
    PyObject* po = PyList_GET_ITEM(params.ptr(), i);
    // exactly Tensor or Parameter: a subclass may define its own Python-level `grad`, which this C read of
    // the autograd gradient would not see (DTensor does not)
    if (dt == nullptr ? !THPVariable_CheckExact(po) : Py_TYPE(po) != reinterpret_cast<PyTypeObject*>(dt->cls))
      return py::none();
    const at::Tensor& g = THPVariable_Unpack(po).grad();
    if (masked && PyList_GET_ITEM(mask.ptr(), i) != Py_True) {
      if (g.defined()) return py::none();
      continue;
    }
    if (item >= ni || (!g.defined() && !sparse)) return py::none();
    const StateSignature* sig = varied ? signature_of(item) : &uniform;
    if (at + sig->size() > nf) throw std::invalid_argument("cached_grads: flat is shorter than the signatures");
    if (!g.defined()) {  // (sparse) a member without a gradient this step: nothing of it read
      at += sig->size();
      ++item;
      continue;
    }
    if (sparse) stepped.push_back(item);
    PyObject* go = THPVariable_Wrap(g);  // new reference (the grad's existing Python object, if any)
    if (go == nullptr) throw py::error_already_set();
    py::object grad_obj = py::reinterpret_steal<py::object>(go);
    PyObject* plo = po;  // the tensors whose metadata is checked: the local shards of DTensors
    if (dt != nullptr) {
      if (Py_TYPE(go) != reinterpret_cast<PyTypeObject*>(dt->cls)) return py::none();
      const py::object spec = attr(po, dt->s_spec), local = attr(po, dt->s_local);
      if (spec.ptr() != PyList_GET_ITEM(dt->param_specs, item) || local.ptr() != PyList_GET_ITEM(dt->param_locals, item))
        return py::none();  // (the cached list keeps the local shard alive)
      plo = local.ptr();
      if (!dt->same_placing(attr(go, dt->s_spec).ptr(), spec.ptr())) return py::none();
      grad_obj = attr(go, dt->s_local);
      if (!THPVariable_CheckExact(plo) || !THPVariable_CheckExact(grad_obj.ptr())) return py::none();
    }
    const at::Tensor& p = THPVariable_Unpack(plo);
    const at::Tensor& gl = THPVariable_Unpack(grad_obj.ptr());
    if (!plain(p, pdt, dev) || !plain(gl, pdt, dev) || !gl.sizes().equals(p.sizes())) return py::none();
    if (spans.n > 0 && spans.hit(gl)) return py::none();  // (another param's state: the full plan refuses it)
    if (cached_ptr != nullptr && (reinterpret_cast<int64_t>(p.data_ptr()) != cached_ptr[item] ||
                                  p.numel() != cached_ptr[ni + nf + item]))
      return py::none();
    if (p.is_inference()) return py::none();
    PyObject* st = PyList_GET_ITEM(state_dicts.ptr(), item);
    if (!PyDict_CheckExact(st)) return py::none();
    if (sig->dict_size >= 0 && PyDict_GET_SIZE(st) != sig->dict_size) return py::none();
    for (Py_ssize_t j = 0; j < sig->size(); ++j) {
      PyObject* v = PyDict_GetItem(st, PyTuple_GET_ITEM(sig->keys, j));  // borrowed; NULL if missing
      if (v == nullptr || v != PyList_GET_ITEM(flat.ptr(), at + j) || !THPVariable_Check(v)) return py::none();
      py::object local;
      if (dt != nullptr) {
        if (Py_TYPE(v) != reinterpret_cast<PyTypeObject*>(dt->cls)) return py::none();
        local = attr(v, dt->s_local);
        if (local.ptr() != PyList_GET_ITEM(dt->flat_locals, at + j)) return py::none();
        v = local.ptr();
      }
      const at::Tensor& s = THPVariable_Unpack(v);
      const int64_t div = sig->div[static_cast<size_t>(j)];
      if (!plain(s, sig->dtypes[static_cast<size_t>(j)], dev) ||
          !(div == 1 ? s.sizes().equals(p.sizes()) : s.numel() * div == p.numel()))
        return py::none();
      if (cached_ptr != nullptr && (reinterpret_cast<int64_t>(s.data_ptr()) != cached_ptr[ni + at + j] ||
                                    s.numel() != cached_ptr[2 * ni + nf + at + j]))
        return py::none();
      if (shares_bytes(s, gl)) return py::none();  // (a gradient set to its own state: the full plan refuses it)
    }
    at += sig->size();
    go = grad_obj.release().ptr();  // the new reference the result takes
    if (append) {
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
  if (item != ni || at != nf) return py::none();
  if (!sparse) return std::move(out);
  if (static_cast<Py_ssize_t>(stepped.size()) == ni) return py::make_tuple(out, py::none());
  py::list sel(static_cast<Py_ssize_t>(stepped.size()));
  for (size_t k = 0; k < stepped.size(); ++k) sel[k] = py::int_(stepped[k]);
  return py::make_tuple(out, sel);
}

// ---- the cached plan's identity checks (FusedOptimizer._fast_plan / _host_views): pointer comparisons that
// never touch the objects (a Python loop increments every object's reference count: one cache miss each,
// ~0.6 ms per 10,000 scattered objects). Python twins in momentum_fused/optim/base.py.

// Whether `now` is a list or tuple with now[i] is cached[i] for every i, and of equal length.
bool same_objects(const py::handle& now, const py::list& cached) {
  PyObject* o = now.ptr();
  if (!PyList_Check(o) && !PyTuple_Check(o)) return false;
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(o);
  if (n != PyList_GET_SIZE(cached.ptr())) return false;
  PyObject** a = PySequence_Fast_ITEMS(o);
  for (Py_ssize_t i = 0; i < n; ++i)
    if (a[i] != PyList_GET_ITEM(cached.ptr(), i)) return false;
  return true;
}

// Whether the dict d (a subclass too, e.g. defaultdict) holds exactly the keys `keys` and values `values`, in
// order (identity).
bool same_dict(const py::dict& d, const py::list& keys, const py::list& values) {
  const Py_ssize_t n = PyDict_GET_SIZE(d.ptr());
  if (n != PyList_GET_SIZE(keys.ptr()) || n != PyList_GET_SIZE(values.ptr())) return false;
  Py_ssize_t pos = 0, i = 0;
  PyObject *k, *v;
  while (PyDict_Next(d.ptr(), &pos, &k, &v)) {  // borrowed references
    if (i >= n || k != PyList_GET_ITEM(keys.ptr(), i) || v != PyList_GET_ITEM(values.ptr(), i)) return false;
    ++i;
  }
  return i == n;
}

// Whether `dicts` is a list or tuple with dicts[i].get(key) is objs[i] for every i, and of equal length (False
// when an entry is not a dict).
bool same_entries(const py::handle& dicts, const py::handle& key, const py::list& objs) {
  PyObject* o = dicts.ptr();
  if (!PyList_Check(o) && !PyTuple_Check(o)) return false;
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(o);
  if (n != PyList_GET_SIZE(objs.ptr())) return false;
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* d = PySequence_Fast_GET_ITEM(o, i);
    if (!PyDict_Check(d)) return false;
    PyObject* v = PyDict_GetItemWithError(d, key.ptr());  // borrowed; NULL if missing (or on error)
    if (v == nullptr) {
      if (PyErr_Occurred()) throw py::error_already_set();
      return false;
    }
    if (v != PyList_GET_ITEM(objs.ptr(), i)) return false;
  }
  return true;
}

// [2, n] int64: each tensor's autograd version (-1 for an inference tensor, which has none) and data_ptr(), for the
// master layout's check of params changed outside the optimizer (optim/masters.py).
at::Tensor version_marks(const py::handle& tensors) {
  PyObject* o = tensors.ptr();
  TORCH_CHECK(PyList_Check(o) || PyTuple_Check(o), "version_marks: a list or tuple of tensors");
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(o);
  at::Tensor out = at::empty({2, static_cast<int64_t>(n)}, at::kLong);
  int64_t* r = out.data_ptr<int64_t>();
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* t = PySequence_Fast_GET_ITEM(o, i);
    TORCH_CHECK(THPVariable_Check(t), "version_marks: item ", i, " is not a tensor");
    const at::Tensor& x = THPVariable_Unpack(t);
    r[i] = x.is_inference() ? -1 : static_cast<int64_t>(x._version());
    r[n + i] = reinterpret_cast<int64_t>(x.data_ptr());
  }
  return out;
}

py::object pointer_rows(const py::handle& params, const py::handle& grads, const py::handle& states, int64_t nstate,
                        bool ragged) {
  using mf::py_borrow::BorrowedTensors;
  PyObject* so = states.ptr();
  TORCH_CHECK(PyList_Check(so) || PyTuple_Check(so), "pointer_rows: states must be a list of per-param tuples");
  for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(so); ++i) {
    PyObject* st = PySequence_Fast_GET_ITEM(so, i);
    TORCH_CHECK((PyTuple_Check(st) || PyList_Check(st)) &&
                    (ragged ? PySequence_Fast_GET_SIZE(st) <= nstate : PySequence_Fast_GET_SIZE(st) == nstate),
                "pointer_rows: states[", i, "] must be a tuple of ", ragged ? "at most " : "", nstate, " tensors");
  }
  const BorrowedTensors ps("pointer_rows", params, "params", false), gs("pointer_rows", grads, "grads", false),
      ss("pointer_rows", states, "states", true);
  if (mf::py_borrow::status_of({&ps, &gs, &ss}) != mf::py_borrow::DONE) return py::none();
  const at::TensorList p = ps.list(), g = gs.list(), s = ss.list();
  const int64_t n = static_cast<int64_t>(p.size());
  TORCH_CHECK(nstate >= 0 && static_cast<int64_t>(g.size()) == n && PySequence_Fast_GET_SIZE(so) == n,
              "pointer_rows: ", n, " params, ", g.size(), " grads and ", PySequence_Fast_GET_SIZE(so), " state tuples");
  at::Tensor out = at::empty({3 + nstate + (ragged ? 1 : 0), n}, at::TensorOptions().dtype(at::kLong));
  int64_t* o = out.data_ptr<int64_t>();
  size_t k = 0;  // the next state tensor (the tuples' tensors in order, as BorrowedTensors flattened them)
  for (int64_t i = 0; i < n; ++i) {
    if (!p[i].defined() || !g[i].defined()) return py::none();
    o[i] = reinterpret_cast<int64_t>(p[i].data_ptr());
    o[n + i] = reinterpret_cast<int64_t>(g[i].data_ptr());
    o[(2 + nstate) * n + i] = p[i].numel();
    const int64_t len = PySequence_Fast_GET_SIZE(PySequence_Fast_GET_ITEM(so, i));
    if (ragged) o[(3 + nstate) * n + i] = len;
    for (int64_t j = 0; j < nstate; ++j) {
      if (j >= len) {
        o[(2 + j) * n + i] = 0;
        continue;
      }
      const at::Tensor& t = s[k++];
      if (!t.defined()) return py::none();
      o[(2 + j) * n + i] = reinterpret_cast<int64_t>(t.data_ptr());
    }
  }
  return py::cast(out);
}

void check_bf16(const at::Tensor& t, const char* name, int64_t n, int64_t r, int64_t c) {
  if (t.device().type() != c10::kCPU || t.scalar_type() != c10::kBFloat16 || t.layout() != c10::kStrided ||
      !t.is_contiguous() || t.dim() != 3 || t.size(0) != n || t.size(1) != r || t.size(2) != c)
    throw std::invalid_argument(std::string("sym_mm_bf16: ") + name + " must be a contiguous bf16 CPU tensor of shape [" +
                                std::to_string(n) + ", " + std::to_string(r) + ", " + std::to_string(c) + "]");
}

bool sym_mm_bf16_py(at::Tensor& out, const at::Tensor& y, const at::Tensor& z, const c10::optional<at::Tensor>& c0,
                    double alpha, double beta) {
  if (y.dim() != 3) throw std::invalid_argument("sym_mm_bf16: y must be [n, m, k]");
  const int64_t n = y.size(0), m = y.size(1), k = y.size(2);
  check_bf16(y, "y", n, m, k);
  check_bf16(z, "z", n, m, k);
  check_bf16(out, "out", n, m, m);
  if (c0.has_value()) check_bf16(*c0, "c0", n, m, m);
  if (out.numel() > 0 && (out.data_ptr() == y.data_ptr() || out.data_ptr() == z.data_ptr() ||
                          (c0.has_value() && out.data_ptr() == c0->data_ptr())))
    throw std::invalid_argument("sym_mm_bf16: out may not be y, z or c0");
  const int nthreads = at::get_num_threads();
  bool done = false;
  mf::py_borrow::run_without_gil([&] {
    done = mf::cpu::sym_mm_bf16(n, m, k, static_cast<const uint16_t*>(y.data_ptr()),
                                static_cast<const uint16_t*>(z.data_ptr()),
                                c0.has_value() ? static_cast<const uint16_t*>(c0->data_ptr()) : nullptr,
                                static_cast<uint16_t*>(out.data_ptr()), static_cast<float>(alpha),
                                static_cast<float>(beta), nthreads);
  });
  return done;
}

}  // namespace

PYBIND11_MODULE(_C_cpu, m) {
  m.doc() = "momentum_fused CPU kernels (ops in torch.ops.momentum_fused; fast eager entry points here)";
  mf::py_borrow::add_status_codes(m);
  m.def("cpu_step", &cpu_step_py, py::arg("params"), py::arg("grads"), py::arg("states"), py::arg("scalars"),
        py::arg("rule"), py::arg("flags"), py::arg("layout") = 0, py::arg("sr_keys") = py::none());
  m.def("cached_grads", &cached_grads, py::arg("params"), py::arg("mask"), py::arg("state_dicts"), py::arg("keys"),
        py::arg("flat"), py::arg("pdtype"), py::arg("device"), py::arg("sdtypes"), py::arg("dtensor") = py::none(),
        py::arg("signatures") = py::none(), py::arg("ptrs") = py::none(), py::arg("sparse") = false, py::arg("spans") = py::none());
  m.def("same_objects", &same_objects, py::arg("now"), py::arg("cached"));
  m.def("same_dict", &same_dict, py::arg("d"), py::arg("keys"), py::arg("values"));
  m.def("same_entries", &same_entries, py::arg("dicts"), py::arg("key"), py::arg("objs"));
  m.def("pointer_rows", &pointer_rows, py::arg("params"), py::arg("grads"), py::arg("states"), py::arg("nstate"),
        py::arg("ragged") = false);
  m.def("version_marks", &version_marks, py::arg("tensors"));
  m.def("sym_mm_bf16", &sym_mm_bf16_py, py::arg("out"), py::arg("y"), py::arg("z"), py::arg("c0"), py::arg("alpha"),
        py::arg("beta"));
  m.def("sym_mm_bf16_available", &mf::cpu::sym_mm_bf16_available);
}
