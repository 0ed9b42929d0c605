"""momentum_fused's Triton kernels (see docs/triton.md), installed as ``momentum_fused.triton_kernels`` (the
folder stays at the top of the repository; setup.py maps it with package_dir), so no top-level
``triton_kernels`` module is registered (another PyPI package uses that name).

They take pointers, sizes, a rule id, flags and a scalar table. Importing this package is cheap and does not
import triton; the kernels live in submodules (``rules``, ``kernels``, ``launcher``, ``reductions``,
``cholesky_qr``), whose ``@triton.jit`` decorators decide at import time whether kernels run compiled or in the
interpreter (``TRITON_INTERPRET=1`` must be set before they are imported).
"""
