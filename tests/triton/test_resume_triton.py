"""Resume on the triton backend (in the interpreter) is bitwise equal to the uninterrupted run, for every
optimizer class and the Triton dtypes and layouts (tests/resume_cases.py)."""
import pytest
import torch

from resume_cases import cases, check_resume

# the triton backend stores fp32/fp16/bf16 (no float64)
CASES = [c for c in cases(["triton"]) if c.values[5] != torch.float64]


@pytest.mark.parametrize("name,cls,kw,backend,layout,dtype", CASES)
def test_resume_on_triton_is_bitwise_equal(name, cls, kw, backend, layout, dtype):
    check_resume(cls, kw, backend, layout, dtype)
