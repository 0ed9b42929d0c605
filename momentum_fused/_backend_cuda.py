"""The compiled CUDA backend: csrc/cuda (multi_tensor_apply launcher + one functor per rule family), math
from csrc/update_rules.h, the same header as the CPU kernels.

``make_backend()`` returns a ``backends.Backend`` named "cuda", the default for CUDA tensors (ahead of
triton) when it is usable. It is registered as unavailable, with the reason, when the extension
``momentum_fused._C_cuda`` was not built (the reason setup.py stored in ``_C_cuda.build-error.txt``, or
the import error) or when torch sees no CUDA device.

One call of ``apply`` runs one bucket through ONE call of the op ``cuda_step(params, grads, states_flat,
scalars[n, k] float64, rule, flags, found_inf, grad_scale, layout, sr_keys)``, which launches one kernel per
table of tensors and chunks of 65,536 elements (built with CUDA 12.1+: 32 KB kernel parameters, up to 256 tensors
and ~3,400-5,100 chunks a launch, by the number of lists; 4 KB before: 36 tensors, 320 chunks; see
csrc/cuda/multi_tensor_apply.cuh). As on the CPU backend, the op is called through the extension module's
pybind entry ``momentum_fused._C_cuda.cuda_step`` (the same C++ function as the registered op
``torch.ops.momentum_fused.cuda_step``, without the TensorList conversion of a torch.ops call: ~0.6 us per
tensor per list measured on the CPU), and through the registered op under a TorchDispatchMode and for tensor
subclasses that dispatch to Python (``backends.run_step_op``). Rule ids, flag bits and the dtype layout
codes are those of the CPU backend (``_backend_cpu.RULE_IDS`` / ``LAYOUT_CODES``, derived from the specs and
layouts; csrc/generated/tables.h is generated from the same). Both ops check their arguments with the same C++ code (csrc/step_args.h).

found_inf / grad_scale (one-element float32 CUDA tensors) are read by the kernels on the device: a
nonzero found_inf makes every block return before any write. Non-contiguous tensors run on contiguous
copies that are copied back, as on the CPU backend.

Verified on an H200 (2026-11-28) with the registered op; the eager entry, the shared argument checks and the
fake kernel were written afterwards without a GPU (compiled here: tests/test_cuda_sources.py) and wait for
the next GPU run (tests/test_cuda_backend.py compares both entries).
"""
from __future__ import annotations


import torch

from . import backends, layouts
from ._backend_cpu import RULE_IDS, flags_to_int, layout_args

# the layouts the CUDA kernels implement (csrc/cuda/fused_step.cu, `step`); int8_sr and master16_int8_sr (2026-12-06)
# are compiled, statically checked (bench/kernel_report.py) and host-emulated (tests/test_cuda_sources.py) but have
# not run on a GPU yet (tests/test_cuda_backend.py; the others passed there on an H200, 2026-12-04)
CUDA_LAYOUTS = layouts.BASE_KERNEL_LAYOUTS + ("master16", "int8_state", "master16_int8", "int8_sr",
                                              "master16_int8_sr")

__all__ = ["make_backend", "SUPPORTED_DTYPES"]

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _load():
    err = backends.import_extension("cuda", "CUDA", "MOMENTUM_FUSED_BUILD_CUDA=1 pip install -e . --no-build-isolation "
                                    "(needs nvcc and a CUDA build of torch)")
    if err is not None:
        return None, err
    if not torch.cuda.is_available():
        return None, "the CUDA extension is built but torch sees no CUDA device"
    return torch.ops.momentum_fused, None


def _device_scalar(x, name, device):
    """found_inf / grad_scale as the one-element float32 tensor on ``device`` the op requires."""
    if x is None:
        return None
    if not isinstance(x, torch.Tensor) or x.numel() != 1:
        raise TypeError(f"momentum_fused cuda backend: {name} must be a one-element tensor")
    return x.to(device=device, dtype=torch.float32, non_blocking=True).reshape(1)


def make_backend() -> backends.Backend:
    ops, err = _load()
    if err is not None:
        return backends.Backend(name="cuda", apply=None, devices=("cuda",), load_error=err)
    backends.register_step_fake("momentum_fused::cuda_step")
    from . import _C_cuda

    def supports(spec, device, dtype):
        if torch.device(device).type != "cuda":
            return f"the cuda backend runs on cuda tensors only, got {torch.device(device).type}"
        if spec.name not in RULE_IDS:
            return f"rule {spec.name!r} has no CUDA kernel (csrc/update_rules.h implements: {', '.join(RULE_IDS)})"
        if dtype not in SUPPORTED_DTYPES:
            return (f"dtype {dtype} is not supported by the cuda kernels (supported: "
                    f"{', '.join(str(d).replace('torch.', '') for d in SUPPORTED_DTYPES)})")
        return None

    def apply(spec, flags, params, grads, states, scalars, *, layout=layouts.NATIVE, sr_keys=None, found_inf=None,
              grad_scale=None) -> int:
        code, keys = layout_args(layout, sr_keys, len(params))
        if not params:
            return 0
        device = params[0].device
        packs = backends.pack_table(scalars, len(spec.scalar_names)).contiguous()
        args = (packs, RULE_IDS[spec.name], flags_to_int(spec.name, flags),
                _device_scalar(found_inf, "found_inf", device), _device_scalar(grad_scale, "grad_scale", device),
                code, keys)
        backends.run_step_op(_C_cuda, _C_cuda.cuda_step, ops.cuda_step, params, grads, states, args,
                             memory_order=not layouts.get_layout(layout).by_element_index)
        return 1

    return backends.Backend(name="cuda", apply=apply, supports=supports, devices=("cuda",), load_error=None,
                            layouts=CUDA_LAYOUTS, device_scalars=True, scalar_tables=True)
