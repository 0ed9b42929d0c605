"""csrc/generated/tables.h is what momentum_fused/_codegen.py writes from the Python facts (rule ids, flag bits,
scalar-pack columns, dtype codes, the layout table): the C++ copy cannot drift from specs.py / layouts.py."""
import os

from momentum_fused import _codegen, layouts, specs
from momentum_fused._backend_cpu import LAYOUT_CODES, RULE_IDS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_committed_header_is_the_generated_one():
    assert _codegen.main(["--check", "--root", ROOT]) == 0, "run `python -m momentum_fused._codegen` and commit"


def test_the_header_states_every_fact_of_the_specs():
    text = _codegen.render()
    for i, name in enumerate(specs.KERNEL_RULES):
        spec = specs.get_spec(name)
        assert f"RULE_{name.upper()} = {i}," in text
        for b, flag in enumerate(spec.flag_names):
            assert f"{name.upper()}_{flag.upper()} = {1 << b}" in text
        cols = ", ".join(f"{c} = {k}" for k, c in enumerate(spec.scalar_names))
        assert f"struct {name} {{ enum : int {{ {cols}, size = {len(spec.scalar_names)} }}; }};" in text
    for i, name in enumerate(layouts.LAYOUTS):
        assert f"LAYOUT_{name.upper()} = {i}," in text
    assert RULE_IDS == {n: i for i, n in enumerate(specs.KERNEL_RULES)} and list(LAYOUT_CODES) == list(layouts.LAYOUTS)


def test_a_changed_fact_changes_the_header(monkeypatch):
    last = specs.KERNEL_RULES[-1]
    monkeypatch.setattr(specs, "KERNEL_RULES", specs.KERNEL_RULES[::-1])
    assert f"RULE_{last.upper()} = 0," in _codegen.render()
