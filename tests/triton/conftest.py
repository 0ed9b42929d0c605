"""Triton interpreter tests: run in their own pytest process,
``TRITON_INTERPRET=1 .venv/bin/pytest tests/triton`` (the main run passes --ignore=tests/triton).

The interpreter must be chosen before any kernel is defined, hence the safety net below (the
Makefile also sets it in the environment).
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_configure(config):
    # numpy deprecation noise from inside triton's interpreter (one per interpreted op)
    config.addinivalue_line("filterwarnings", "ignore::DeprecationWarning:triton.runtime.interpreter")


def pytest_collection_modifyitems(config, items):
    """CPU tests need the interpreter; GPU tests need compiled kernels (TRITON_INTERPRET=0), since the
    interpreter cannot dereference the raw device pointers of the pointer tables."""
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    for item in items:
        if "gpu" in item.keywords:
            # without CUDA, tests/conftest.py already skips them with its "no CUDA device" reason
            if interpreting and torch.cuda.is_available():
                item.add_marker(pytest.mark.skip(
                    reason="Triton GPU tests need compiled kernels: run TRITON_INTERPRET=0 pytest tests/triton -m gpu"))
        elif not interpreting:
            item.add_marker(pytest.mark.skip(reason="Triton CPU tests need TRITON_INTERPRET=1"))
