"""momentum_fused's Triton kernels (see docs/triton.md).

Another PyPI package also installs an import named ``triton_kernels``; ``__momentum_fused__`` marks
this one, and momentum_fused.backends reports Triton as unavailable when a foreign package shadows it.

This package never imports momentum_fused: it takes pointers, sizes, a rule id, flags and a scalar
table. Importing it is cheap and does not import triton; the kernels live in submodules
(``rules``, ``kernels``, ``launcher``, ``reductions``), whose ``@triton.jit`` decorators decide at
import time whether kernels run compiled or in the interpreter (``TRITON_INTERPRET=1`` must be set
before they are imported).
"""
__momentum_fused__ = True
