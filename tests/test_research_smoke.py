"""Smoke tests of examples/train_charlm.py and the research scripts of docs/research.md (issue 18).

The research runs themselves are not part of the suite (minutes of CPU each); here: every script imports
and parses its arguments, the trainer trains a tiny model a few steps (the loss is finite and drops), and
the cheap core functions of two scripts run on tiny inputs against closed forms.
"""
import importlib
import math
import os
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for d in (os.path.join(ROOT, "examples"), os.path.join(ROOT, "examples", "research")):
    if d not in sys.path:
        sys.path.insert(0, d)

SCRIPTS = ["adam_secret_sauce", "schedulefree_schedulers", "fsgdm_digits", "hb_continuous", "qhm_stability"]


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_imports_and_parses(name):
    mod = importlib.import_module(name)
    args = mod.parse_args(["--quick", "--seeds", "2"])
    assert args.quick and args.seeds == 2 and args.threads == 1
    assert callable(mod.run) and callable(mod.report) and callable(mod.plot)


def test_charlm_cli_parses():
    import train_charlm
    a = train_charlm.parse_args(["--opt", "AdamTied", "--opt-kwargs", '{"lr": 0.01, "beta": 0.9}', "--steps", "7",
                                 "--seed", "3", "--size", "tiny"])
    assert (a.opt, a.opt_kwargs, a.steps, a.seed, a.size, a.threads) == ("AdamTied", {"lr": 0.01, "beta": 0.9}, 7, 3,
                                                                         "tiny", 1)
    q = train_charlm.parse_args(["--quick"])
    assert (q.size, q.steps) == ("small", 100)
    with pytest.raises(ValueError, match="unknown optimizer"):
        train_charlm.make_optimizer("NoSuchOpt", [torch.zeros(1, requires_grad=True)])


def test_corpus_is_stdlib_docstrings():
    from train_charlm import CharData, build_corpus
    text = build_corpus(20_000)
    assert len(text) == 20_000
    assert all(32 <= ord(c) < 127 or c == "\n" for c in text)
    d = CharData(text)
    assert d.vocab <= 96 and len(d.train) + len(d.val) == len(text)


def test_charlm_trains_tiny_model():
    from train_charlm import train
    threads = torch.get_num_threads()
    try:
        seen = []
        res = train(opt="AdamW", opt_kwargs={"lr": 1e-2}, steps=40, size="tiny", batch=16, schedule="constant",
                    corpus_chars=30_000, eval_every=20, on_eval=lambda s, m, o: seen.append(s) or s)
        res2 = train(opt="AdamW", opt_kwargs={"lr": 1e-2}, steps=40, size="tiny", batch=16, schedule="constant",
                     corpus_chars=30_000, eval_every=20)
    finally:
        torch.set_num_threads(threads)
    tl = res["train_loss"]
    assert len(tl) == 40 and all(math.isfinite(x) for x in tl) and not res["diverged"]
    assert sum(tl[-10:]) / 10 < sum(tl[:5]) / 5 - 0.3          # from ~ln(vocab) = 4.4 down
    assert [s for s, _ in res["val"]] == [20, 40] == seen and res["val"][1][1] < res["val"][0][1]
    assert res["train_loss"] == res2["train_loss"]            # same seed: the same run


def test_charlm_schedule_free_evaluates_x():
    from train_charlm import train
    threads = torch.get_num_threads()
    modes = []
    try:
        res = train(opt="AdamWScheduleFree", opt_kwargs={"lr": 1e-2, "weight_rule": "lr_t"}, steps=10, size="tiny",
                    batch=8, schedule="wsd", corpus_chars=30_000, eval_every=5,
                    on_eval=lambda s, m, o: modes.append(o.training))
    finally:
        torch.set_num_threads(threads)
    assert modes == [False, False] and math.isfinite(res["final_val"])


def test_hb_counter_terms_reduce_error_by_order():
    """The piecewise ODE models of hb_continuous on a small quadratic: each added order of counter terms
    lowers the error, and halving eta shrinks the errors by ~2, ~4, ~8."""
    import hb_continuous as hb
    prob = hb.Quadratic(0, d=6)
    beta = 0.9
    errs = {m: [] for m in hb.MODELS}
    for eta in (0.001, 0.0005):  # eta/(1 - beta)^2 = 0.1, 0.05: inside the expansion's range
        steps = int(round(2.0 * (1 - beta) / eta))
        xd = hb.hb_discrete(prob, eta, beta, steps)
        for m in hb.MODELS:
            errs[m].append(float(np.abs(xd - hb.ode(prob, eta, beta, steps, m, sub=2)).max()))
    ratios = {m: e[0] / e[1] for m, e in errs.items()}
    assert errs["plain"][1] > errs["order1"][1] > errs["order2"][1]
    # measured 1.79, 3.78, 7.26 (the asymptotic 2, 4, 8 up to higher-order terms)
    assert 1.5 < ratios["plain"] < 2.5 and 3.2 < ratios["order1"] < 5.0 and 6.0 < ratios["order2"] < 10.0, ratios


def test_qhm_measured_rate_matches_spectral_radius():
    import qhm_stability as q
    lrhs = [0.05, 0.5, 2.0, 4.5]
    rate = q.measure(0.5, [0.7], lrhs, 400)[0]
    for lrh, r in zip(lrhs, rate.tolist()):
        rho = q.radius(lrh, 0.5, 0.7)
        assert (r < 1) == (rho < 1)
        if 0.3 < rho < 0.999:
            assert abs(r - rho) < 1e-2, (lrh, r, rho)


def test_int8_accuracy_ablation_reproduces_both_layouts():
    """bench/int8_accuracy.py --ablation: torch's AdamW formula with nothing round-tripped is the fp32-state run, and
    with m and v round-tripped through the int8 map it is int8_state's run (reference backend), loss for loss: so
    its m-only and v-only rows isolate each state's cost (docs/algorithms.md section 11). Synthetic digits-shaped
    data, two epochs."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        import int8_accuracy as ia
    finally:
        sys.path.remove(os.path.join(ROOT, "bench"))
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(96, 64, generator=g), torch.randint(0, 10, (96,), generator=g)
    data = ((x[:64], y[:64]), None, (x[64:], y[64:]))
    assert ia.digits_run("", "ablation", 0, 2, data) == ia.digits_run("native", "reference", 0, 2, data)
    both = ia.digits_run("mv", "ablation", 0, 2, data)
    assert both == ia.digits_run("int8_state", "reference", 0, 2, data)
    assert ia.digits_run("m", "ablation", 0, 2, data) != both != ia.digits_run("v", "ablation", 0, 2, data)
