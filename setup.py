"""Installs the pure-Python package. Optional C++/CUDA extensions (csrc/) are added by later work;
a plain install needs no compiler."""
from setuptools import find_packages, setup

setup(
    name="momentum_fused",
    version="0.1.0",
    description="Fused multi-tensor momentum optimizers for PyTorch, with a float64 reference spec",
    packages=find_packages(include=["momentum_fused", "momentum_fused.*", "triton_kernels", "triton_kernels.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4"],
    extras_require={
        "dev": ["pytest", "hypothesis"],
    },
)
