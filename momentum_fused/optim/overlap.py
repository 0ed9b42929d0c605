"""Which elements of params share memory (optim/checks.py ``_check_param_memory``): exact tests on views' strides
and offsets, in bytes across dtypes, with torch's own internal-overlap check's "too hard" cases decided here."""
from __future__ import annotations

import torch

__all__ = ["span_bytes", "elements_overlap", "self_overlap", "first_shared", "shared_state", "PARAM", "GRAD"]

# The keys of first_shared's entries that are not state: a param and its gradient, read by the step (params also
# written, and checked against each other by the optimizer's _check_param_memory, which allows what the backend
# does); a conflict needs a written state on at least one side.
PARAM, GRAD = None, "\x00grad"


def span_bytes(t: torch.Tensor) -> tuple[int, int]:
    """The byte range [lo, hi) of a strided tensor's storage that holds its elements (numel > 0)."""
    n = t.element_size()
    lo = t.storage_offset() * n
    return lo, lo + (sum((k - 1) * abs(st) for k, st in zip(t.shape, t.stride())) + 1) * n


def elements_overlap(a: torch.Tensor, b: torch.Tensor, shift: int = 0) -> bool:
    """Whether two views of one storage share a byte (exact, also across dtypes: torch._C._overlaps compares
    extents only); ``a is b``: whether two of its elements share one (an internal overlap). ``shift``: the address
    of b's storage start minus a's, in bytes, for two storages over one memory (numpy or DLPack views)."""
    if a.numel() == 0 or b.numel() == 0:
        return False
    (a0, a1), (b0, b1) = span_bytes(a), span_bytes(b)
    b0, b1 = b0 + shift, b1 + shift
    if a is not b and (a1 <= b0 or b1 <= a0):
        return False
    lo, hi = min(a0, b0), max(a1, b1)
    if a is b:  # every element's first byte offset, each counted once: a repeat is an internal overlap
        n = a.element_size()
        first = torch.arange(a0 // n, a1 // n).as_strided(a.shape, a.stride(), 0).reshape(-1)
        return first.unique().numel() < first.numel()
    if a.element_size() == b.element_size():  # one flag per element
        n = a.element_size()
        mark = torch.zeros((hi - lo) // n, dtype=torch.bool)
        mark.as_strided(a.shape, a.stride(), (a0 - lo) // n).fill_(True)
        return bool(mark.as_strided(b.shape, b.stride(), (b0 - lo) // n).any())
    mark = torch.zeros(hi - lo, dtype=torch.bool)  # views as different dtypes: one flag per byte
    na, nb = a.element_size(), b.element_size()
    mark.as_strided((*a.shape, na), (*(st * na for st in a.stride()), 1), a0 - lo).fill_(True)
    return bool(mark.as_strided((*b.shape, nb), (*(st * nb for st in b.stride()), 1), b0 - lo).any())


def self_overlap(shape: tuple, stride: tuple, t: torch.Tensor) -> bool:
    """Whether two elements of a view share memory, for strides torch calls too hard to tell (any non-dense view:
    a column slice). Exact and O(ndim) when the dims nest (sorted by stride, each stride at least the extent of the
    smaller dims: column, gapped and transposed slices); else element by element, remembered per (shape, stride)
    (an overlap depends on nothing else)."""
    if 0 in shape:
        return False
    dims = sorted((abs(st), n) for n, st in zip(shape, stride) if n > 1)
    reach = 0  # the largest offset the smaller dims reach
    for st, n in dims:
        if st <= reach:
            break
        reach += (n - 1) * st
    else:
        return False
    key = (shape, stride)
    hit = _SELF_OVERLAP.get(key)
    if hit is None:
        if len(_SELF_OVERLAP) > 256:
            _SELF_OVERLAP.clear()
        hit = _SELF_OVERLAP[key] = elements_overlap(t, t)
    return hit


_SELF_OVERLAP: dict = {}




def _base(t: torch.Tensor) -> int:
    """The address of t's storage start (data pointer minus the storage offset, in bytes)."""
    return t.data_ptr() - t.storage_offset() * t.element_size()


def first_shared(entries) -> tuple | None:
    """``entries``: (owner, tensor) pairs (plain strided tensors; an owner is (gi, pi, key), key PARAM or GRAD for a
    param or its gradient). The first two distinct entries, one of them a state, whose elements overlap in memory,
    as ((owner, tensor), (owner, tensor)), or None (two states of one param, a state and its own param or gradient
    too: the kernels read and write them through distinct restrict pointers; 2026-12-06, a review). Byte spans
    from data pointers, one sort by device and start (spans that overlap on one device share an allocation;
    strided ones are then compared element by element, at their absolute addresses)."""
    spans = []
    for owner, t in entries:
        n, ptr = t.numel(), t.data_ptr()
        if n and ptr:  # (0: meta or fake tensors)
            if t.is_contiguous():
                lo, hi = ptr, ptr + n * t.element_size()
            else:
                a, b = span_bytes(t)
                lo, hi = _base(t) + a, _base(t) + b
            spans.append((t.get_device(), lo, hi, owner, t))
    spans.sort(key=lambda x: (x[0], x[1]))
    active = []  # spans of the current device that reach past the current start
    for dev, lo, hi, owner, t in spans:
        active = [a for a in active if a[0] == dev and a[2] > lo]
        for _, _, _, other, r in active:
            if other != owner and (_is_state(other) or _is_state(owner)) and (
                    (t.is_contiguous() and r.is_contiguous()) or elements_overlap(r, t, _base(t) - _base(r))):
                return (other, r), (owner, t)
        active.append((dev, lo, hi, owner, t))
    return None


def _is_state(owner) -> bool:
    return owner[2] is not PARAM and owner[2] != GRAD


def _what(owner) -> str:
    gi, pi, key = owner
    return (f"param {pi} of group {gi}" if key is PARAM else f"the gradient of param {pi} of group {gi}" if key == GRAD
            else f"state {key!r} of param {pi} of group {gi}")


def shared_state(ts: list, owners: list, memo: dict, ptrs_of=None) -> str | None:
    """The state tensors a step writes, with the params and gradients of their owners (``ts``, with their owners
    (gi, pi, key)): why a state shares memory with another of them (a message), or None. ``memo`` (the optimizer's
    ``__dict__``) keeps the data pointers of the last set found disjoint: the same pointers in the same order
    (shapes and dtypes are validated before) skip the sort, so a full plan that runs every step (groups the cached
    plan does not serve, the low-rank optimizers' dense params) pays one C call while the gradients keep their
    memory (new gradient tensors each step: one sort; a full plan of 292 tensors took the same time within noise). ``ptrs_of``: tensors -> int64 data pointers (the cpu extension's version_marks row 1)."""
    ptrs = ptrs_of(ts) if ptrs_of is not None else torch.tensor([t.data_ptr() for t in ts], dtype=torch.int64)
    last = memo.get("_state_ptrs")
    if last is not None and last.shape == ptrs.shape and torch.equal(last, ptrs):
        return None
    hit = first_shared(list(zip(owners, ts)))
    if hit is not None:
        a, b = hit[0][0], hit[1][0]
        if _is_state(a) and _is_state(b) and a[:2] != b[:2]:
            a, b = sorted((a, b))
            return (f"param {a[1]} of group {a[0]} and param {b[1]} of group {b[0]} share state memory ({a[2]!r}, "
                    f"{b[2]!r}); each param's state must be its own (copy it: "
                    "{k: v.clone() for k, v in state.items()}); nothing changed")
        a, b = (a, b) if _is_state(a) else (b, a)
        return (f"{_what(a)} shares memory with {_what(b)}; a state tensor must have memory of its own (the step "
                "writes it while reading the others: clone it); nothing changed")
    memo["_state_ptrs"] = ptrs
    return None
