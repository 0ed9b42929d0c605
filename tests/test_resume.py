"""Resume on the same backend is bitwise equal to the uninterrupted run, for every optimizer class and dtype
layout, on the reference and the compiled cpu backend (issue 19 item 8: a loaded state_dict used to reset a
forced backend, so a resumed run silently continued on another one). Triton: tests/triton/test_resume_triton.py."""
import pytest

from momentum_fused import backends
from resume_cases import cases, check_resume

BACKENDS = ["reference"] + [b for b in ("cpu",) if backends.status().get(b) == "available"]


@pytest.mark.parametrize("name,cls,kw,backend,layout,dtype", cases(BACKENDS))
def test_resume_is_bitwise_equal_to_the_uninterrupted_run(name, cls, kw, backend, layout, dtype):
    check_resume(cls, kw, backend, layout, dtype)
