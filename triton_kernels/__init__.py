"""momentum_fused's Triton kernels (the GPU path; see the Triton backend issue).

Another PyPI package also installs an import named ``triton_kernels``; ``__momentum_fused__`` marks
this one, and momentum_fused.backends reports Triton as unavailable when a foreign package shadows it.
Nothing here is imported by momentum_fused yet: the kernels land with the Triton backend.
"""
__momentum_fused__ = True
