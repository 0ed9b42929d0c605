"""The update kernels' two paths (issue 20), in the interpreter: full blocks (programs 0 .. n_full-1: one tensor,
no mask, scalar base + int32 lanes) and packed blocks (small tensors and tails, ``sub`` lanes at a time on a GPU).
The interpreter runs a packed block in one pass by default; here ``sub`` < ``block`` runs the sub-block loop the
compiled kernels run, and misaligned views take ALIGNED=False: both must give the bits of the default run."""
import pytest
import torch

from momentum_fused.specs import SPECS
from momentum_fused.triton_kernels import launcher, rules


@pytest.mark.parametrize("numels", [[1, 0, 1, 4097, 105, 0], [5000] * 3, [1] * 300, [0, 0], [2048, 4096, 1],
                                    [2047, 2, 2047, 2048], [70000, 3]])
def test_plan_split_covers_every_element_once(numels):
    block = 2048
    full_t, full_b, prog, segs = launcher.plan_split(numels, block)
    seen = {t: torch.zeros(n, dtype=torch.int64) for t, n in enumerate(numels)}
    for t, b in zip(full_t.tolist(), full_b.tolist()):
        assert (b + 1) * block <= numels[t]
        seen[t][b * block:(b + 1) * block] += 1
    for i in range(len(prog) - 1):
        own = segs[prog[i]:prog[i + 1]]
        assert 1 <= len(own) <= launcher.MAX_SEGS
        lanes = sorted((lane, lane + n) for _, _, lane, n in own)
        assert lanes[0][0] == 0 and lanes[-1][1] <= block
        assert all(a[1] <= b[0] for a, b in zip(lanes, lanes[1:]))
        for t, off, _, n in own:
            assert n < block
            seen[t][off:off + n] += 1
    for t, n in enumerate(numels):
        assert bool((seen[t] == 1).all())
    # the packed programs are those of plan_blocks without its full blocks (the same greedy packing)
    p2, s2 = launcher.plan_blocks(numels, block)
    packed = [s2[p2[i]:p2[i + 1]] for i in range(len(p2) - 1)
              if not (p2[i + 1] - p2[i] == 1 and s2[p2[i]][3] == block)]
    assert packed == [segs[prog[i]:prog[i + 1]] for i in range(len(prog) - 1)]


def _lists(dtype, shapes, nstate, seed=0, offset=0):
    gen = torch.Generator().manual_seed(seed)

    def mk(s, positive=False):
        n = int(torch.tensor(s).prod()) if s else 1
        x = torch.randn(n + offset, generator=gen).to(dtype)
        x = x.abs() if positive else x
        return x[offset:].view(s)  # offset > 0: a view off the 16-byte alignment
    return [[mk(s) for s in shapes] for _ in range(2)] + [[mk(s, positive=True) for s in shapes]
                                                          for _ in range(nstate)]


def _scalars(rule, n):
    spec = SPECS[rule]
    hp = dict(adam=dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1),
              sgd=dict(lr=0.1, weight_decay=0.01, momentum=0.9, dampening=0.0))[rule]
    return [spec.make_scalars(hp, {}, True) for _ in range(n)]


CASES = [("adam", "multi", (True, False), 2), ("sgd", "one", (True, False), 1)]
SHAPES = [(300,), (1,), (700,), (64,), (1000,), (5,)]  # block 256: full blocks, tails and tiny tensors


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rule,family,flags,nstate", CASES, ids=[c[0] for c in CASES])
def test_packed_sub_blocks_equal_one_pass(rule, family, flags, nstate, dtype):
    a = _lists(dtype, SHAPES, nstate)
    b = [[x.clone() for x in lst] for lst in a]
    sc = _scalars(rule, len(SHAPES))
    launcher.multi_tensor_apply(family, rules.RULE_IDS[rule], flags, a, sc, block=256)
    launcher.multi_tensor_apply(family, rules.RULE_IDS[rule], flags, b, sc, block=256, sub=64)
    for la, lb in zip(a, b):
        for x, y in zip(la, lb):
            assert torch.equal(x.view(-1).view(torch.uint8), y.view(-1).view(torch.uint8))


@pytest.mark.parametrize("rule,family,flags,nstate", CASES, ids=[c[0] for c in CASES])
def test_misaligned_views_take_the_unaligned_path_with_the_same_bits(rule, family, flags, nstate):
    shapes = [(600,), (3,)]
    a = _lists(torch.float32, shapes, nstate, offset=1)
    assert launcher.step_tables(a, 256)[-1] is False  # a pointer off 16 bytes: ALIGNED=False
    b = [[x.clone() for x in lst] for lst in a]  # fresh allocations: aligned
    assert launcher.step_tables(b, 256)[-1] is True
    sc = _scalars(rule, len(shapes))
    launcher.multi_tensor_apply(family, rules.RULE_IDS[rule], flags, a, sc, block=256)
    launcher.multi_tensor_apply(family, rules.RULE_IDS[rule], flags, b, sc, block=256)
    for la, lb in zip(a, b):
        for x, y in zip(la, lb):
            assert torch.equal(x.view(torch.int32), y.view(torch.int32))
    # a new misaligned gradient list on a cached table refreshes the flag
    g = [x.clone() for x in b[1]]
    g[0] = torch.zeros(601)[1:]
    assert launcher.step_tables([b[0], g] + b[2:], 256)[-1] is False


@pytest.mark.parametrize("rule,family,flags,nstate", CASES, ids=[c[0] for c in CASES])
def test_split_launches_equal_one_launch(rule, family, flags, nstate, monkeypatch):
    """MOMENTUM_FUSED_TRITON_SPLIT=1 (a GPU A/B): the full blocks and the packed blocks as two kernels."""
    a = _lists(torch.bfloat16, SHAPES, nstate)
    b = [[x.clone() for x in lst] for lst in a]
    sc = _scalars(rule, len(SHAPES))
    assert launcher.multi_tensor_apply(family, rules.RULE_IDS[rule], flags, a, sc, block=256) == 1
    monkeypatch.setattr(launcher, "SPLIT", True)
    assert launcher.multi_tensor_apply(family, rules.RULE_IDS[rule], flags, b, sc, block=256) == 2
    for la, lb in zip(a, b):
        for x, y in zip(la, lb):
            assert torch.equal(x.view(torch.int16), y.view(torch.int16))
