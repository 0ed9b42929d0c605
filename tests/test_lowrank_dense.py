"""lowrank.convert with tied/shared layers, and lowrank.to_dense (the way back to nn.Linear).

convert must not untie a Linear whose weight is also another module's parameter (GPT-2/nanoGPT's
``lm_head.weight is wte.weight``) nor a Linear registered under two names: by default such layers stay
dense and tied (one warning naming them), ``tied="error"`` refuses before changing anything.
to_dense turns every LowRankLinear back into an nn.Linear with W = U_r S_r V_rᵀ, so a checkpoint of a
low-rank-trained model loads into the original dense architecture.
"""
import copy
import warnings

import pytest
import torch
from torch import nn

from momentum_fused import lowrank
from momentum_fused.lowrank import LowRankLinear, LowRankSGD, convert, to_dense

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices (tests/conftest.py)


class TinyLM(nn.Module):
    """nanoGPT's layout in miniature: token embedding, an MLP, and a head tied to the embedding."""

    def __init__(self, vocab=24, d=16, tie=True):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.mlp = nn.Sequential(nn.Linear(d, 32), nn.GELU(), nn.Linear(32, d))
        self.lm_head = nn.Linear(d, vocab, bias=False)
        if tie:
            self.wte.weight = self.lm_head.weight  # as nanoGPT does

    def forward(self, idx):
        h = self.wte(idx)
        return self.lm_head(h + self.mlp(h))


def _no_warnings():
    ctx = warnings.catch_warnings()
    ctx.__enter__()
    warnings.simplefilter("error")
    return ctx


def test_convert_keeps_a_tied_head_dense_and_tied():
    torch.manual_seed(0)
    model = TinyLM()
    with pytest.warns(UserWarning, match=r"(?s)'lm_head'.*wte\.weight"):
        convert(model, rank=4, max_rank=8)
    assert type(model.lm_head) is nn.Linear
    assert model.lm_head.weight is model.wte.weight  # still tied
    assert isinstance(model.mlp[0], LowRankLinear) and isinstance(model.mlp[2], LowRankLinear)
    # one warning per call, whatever the number of tied layers
    model = TinyLM()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        convert(model, rank=4, max_rank=8)
    assert len([w for w in rec if "convert" in str(w.message)]) == 1


def test_convert_tied_error_names_the_layer_and_changes_nothing():
    torch.manual_seed(0)
    model = TinyLM()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"(?s)'lm_head'.*wte\.weight"):
        convert(model, rank=4, max_rank=8, tied="error")
    assert all(type(m) is nn.Linear for m in (model.mlp[0], model.mlp[2], model.lm_head))
    assert model.lm_head.weight is model.wte.weight
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_convert_tied_option_is_validated_first():
    model = TinyLM(tie=False)
    with pytest.raises(ValueError, match="tied must be one of"):
        convert(model, rank=4, tied="untie")
    assert all(type(m) is nn.Linear for m in (model.mlp[0], model.mlp[2], model.lm_head))


def test_convert_untied_or_filtered_out_layers_do_not_warn():
    torch.manual_seed(0)
    model = TinyLM(tie=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        convert(model, rank=4, max_rank=8)
    assert isinstance(model.lm_head, LowRankLinear)
    model = TinyLM()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        convert(model, filter=lambda name, m: name != "lm_head", rank=4, max_rank=8, tied="error")
    assert model.lm_head.weight is model.wte.weight and isinstance(model.mlp[0], LowRankLinear)


def test_convert_keeps_a_module_registered_twice():
    torch.manual_seed(0)
    shared = nn.Linear(8, 8)
    model = nn.Sequential(shared, nn.ReLU(), shared, nn.ReLU(), nn.Linear(8, 8))
    with pytest.warns(UserWarning, match=r"(?s)'0'.*'2'"):
        convert(model, rank=2, max_rank=4)
    assert model[0] is shared and model[2] is shared
    assert isinstance(model[4], LowRankLinear)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    with pytest.raises(ValueError, match="'0'"):
        convert(model, rank=2, tied="error")
    assert model[0] is shared and model[2] is shared


def test_convert_linear_sharing_a_weight_with_another_linear():
    torch.manual_seed(0)
    a, b = nn.Linear(8, 8), nn.Linear(8, 8)
    b.weight = a.weight  # two modules, one weight (biases separate)
    model = nn.Sequential(a, nn.ReLU(), b)
    with pytest.raises(ValueError, match=r"(?s)'0'.*'2\.weight'.*'2'.*'0\.weight'"):
        convert(model, rank=2, tied="error")
    with pytest.warns(UserWarning):
        convert(model, rank=2)
    assert model[0].weight is model[2].weight and type(model[0]) is type(model[2]) is nn.Linear


def _train_lowrank(model, steps=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    opt = LowRankSGD(model.parameters(), lr=0.05, momentum=0.9, tau=0.2)
    for _ in range(steps):
        x = torch.randn(16, 12, generator=g, dtype=torch.float64)
        y = torch.randn(16, 6, generator=g, dtype=torch.float64)
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    return model


def test_to_dense_matches_the_lowrank_model_and_loads_into_the_original():
    torch.manual_seed(0)
    original = nn.Sequential(nn.Linear(12, 20), nn.Tanh(), nn.Linear(20, 20, bias=False), nn.Tanh(),
                             nn.Linear(20, 6)).double()
    model = copy.deepcopy(original)
    convert(model, filter=lambda name, m: m.out_features >= 20, rank=4, max_rank=10)
    _train_lowrank(model)
    ranks = [model[i].r for i in (0, 2)]
    assert all(1 <= r <= 10 for r in ranks)
    x = torch.randn(7, 12, dtype=torch.float64)
    with torch.no_grad():
        y_lowrank = model(x)
    w0 = model[0].weight.detach().clone()
    b0 = model[0].bias.detach().clone()

    out = to_dense(model)
    assert out is model
    assert not any(isinstance(m, LowRankLinear) for m in model.modules())
    for i, bias in ((0, True), (2, False)):
        assert type(model[i]) is nn.Linear and (model[i].bias is not None) == bias
        assert model[i].weight.dtype == torch.float64 and model[i].weight.device.type == "cpu"
        assert model[i].weight.requires_grad
    torch.testing.assert_close(model[0].weight.detach(), w0, rtol=1e-12, atol=1e-14)
    assert torch.equal(model[0].bias.detach(), b0)
    with torch.no_grad():
        torch.testing.assert_close(model(x), y_lowrank, rtol=1e-10, atol=1e-12)

    fresh = copy.deepcopy(original)
    fresh.load_state_dict(model.state_dict())  # strict: the original architecture's keys and shapes
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), y_lowrank, rtol=1e-10, atol=1e-12)


def test_to_dense_fp32_tied_model_round_trip():
    torch.manual_seed(0)
    original = TinyLM()
    model = copy.deepcopy(original)
    with pytest.warns(UserWarning):
        convert(model, rank=4, max_rank=8)
    idx = torch.randint(0, 24, (3, 5))
    with torch.no_grad():
        y = model(idx)
    lowrank.to_dense(model)
    assert model.lm_head.weight is model.wte.weight
    with torch.no_grad():
        torch.testing.assert_close(model(idx), y, rtol=1e-5, atol=1e-6)
    fresh = copy.deepcopy(original)
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(idx), y, rtol=1e-5, atol=1e-6)


def test_to_dense_keeps_a_layer_registered_twice_shared():
    torch.manual_seed(0)
    layer = LowRankLinear(8, 8, 2, 4, dtype=torch.float64)
    model = nn.Sequential(layer, nn.ReLU(), layer)
    to_dense(model)
    assert type(model[0]) is nn.Linear and model[0] is model[2]
    torch.testing.assert_close(model[0].weight, layer.weight.detach())
    dense = to_dense(LowRankLinear(6, 5, 2, 3))  # a bare layer comes back as a new Linear
    assert type(dense) is nn.Linear and dense.weight.shape == (5, 6)


# ---------------------------------------------------------------- convert's edges (a review, 2026-12-06)
def test_convert_of_a_bare_linear_returns_the_converted_layer():
    """Before 2026-12-06 the Linear came back unconverted with a LowRankLinear registered under the name ""
    (its state_dict held both; LowRankSGD trained the dense weight only)."""
    torch.manual_seed(0)
    lin = nn.Linear(8, 6)
    x = torch.randn(4, 8)
    out = convert(lin, rank=6)
    assert isinstance(out, LowRankLinear) and not list(lin.children())
    assert set(out.state_dict()) == {"U", "S", "V", "bias", "rank"}
    torch.testing.assert_close(out(x), lin(x), rtol=1e-5, atol=1e-6)  # full rank: the same map
    assert convert(lin, rank=3, filter=lambda name, m: name != "") is lin  # not selected: itself


def test_convert_keeps_frozen_layers_frozen_and_eval_mode():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)).eval()
    model[0].requires_grad_(False)
    model[2].bias.requires_grad_(False)
    convert(model, rank=4)
    assert [p.requires_grad for p in model[0].parameters()] == [False] * 4
    assert [model[2].U.requires_grad, model[2].S.requires_grad, model[2].bias.requires_grad] == [True, True, False]
    assert not model[0].training and not model[2].training
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = LowRankSGD(trainable, lr=0.1)
    before = [p.detach().clone() for p in model[0].parameters()]
    model.train()
    model(torch.randn(5, 8)).sum().backward()
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model[0].parameters()))


@pytest.mark.parametrize("kind", ["meta", "tol_above_max_rank"])
def test_convert_errors_name_the_layer_and_convert_nothing(kind):
    if kind == "meta":
        with torch.device("meta"):
            model = nn.Sequential(nn.Linear(8, 8))
        kw, match = dict(rank=2), r"layer '0' \(8x8\): from_dense: the Linear is on the meta device"
    else:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 6))
        kw, match = dict(tol=1e-6, max_rank=2), r"layer '0' \(8x8\): LowRankLinear: rank \(\d\) must be <= max_rank"
    with pytest.raises(ValueError, match=match + ".*nothing was converted"):
        convert(model, **kw)
    assert all(isinstance(m, nn.Linear) for m in model)
