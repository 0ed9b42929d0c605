"""A small character-level transformer LM trainer for optimizer comparisons on the CPU.

The corpus is built offline from the docstrings of the Python standard library (``build_corpus``:
``ast`` parses the stdlib sources, nothing is imported or downloaded; ~1.6 M characters on CPython
3.11, so the exact text depends on the Python version). The model is a pre-LayerNorm GPT with tied
embeddings; the default size (d_model 128, 5 layers, 4 heads, context 128) has ~1.0 M parameters.

Command line::

    python examples/train_charlm.py --opt AdamW --opt-kwargs '{"lr": 3e-3, "weight_decay": 0.1}' \\
        --steps 600 --seed 0 --schedule cosine
    python examples/train_charlm.py --quick            # the "small" model, 100 steps: ~10 s on one core
    python examples/train_charlm.py --opt AdamWScheduleFree --opt-kwargs '{"lr": 3e-3, "weight_rule": "lr_t"}' \\
        --schedule wsd

``--opt`` names an optimizer of ``momentum_fused`` (``AdamW``, ``AdamTied``, ``Signum``, ``SGD``,
``AdamWScheduleFree``, ``FSGDM``, ...) or of torch (``torch.AdamW``); ``--opt-kwargs`` is a JSON dict
passed to its constructor. Schedule-free optimizers are switched to eval mode (the averaged iterate x)
for every evaluation and back to train mode after it.

As a library (``sys.path`` must contain ``examples/``)::

    from train_charlm import train
    res = train(opt="AdamTied", opt_kwargs={"lr": 3e-3, "beta": 0.95}, steps=300, size="small", seed=1)
    res["train_loss"]   # one float per step;  res["val"]: [(step, val loss), ...];  res["final_val"]

Runs use one thread by default (``threads=1``): the intended machine is a shared CPU.
"""
from __future__ import annotations

import argparse
import ast
import functools
import json
import math
import os
import sys
import sysconfig
import time

import torch
from torch import nn
from torch.nn import functional as F

import momentum_fused as mf
from momentum_fused.schedules import wsd

SIZES = {  # name: (d_model, n_layer, n_head, context)
    "tiny": (32, 1, 2, 32),        # ~15 k params: tests
    "small": (64, 2, 4, 64),       # ~0.11 M params: the CPU-budget research runs
    "medium": (96, 3, 4, 96),      # ~0.35 M params
    "default": (128, 5, 4, 128),   # ~1.0 M params
}
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "turtledemo", "lib2to3", "ensurepip",
              "__pycache__"}


# ------------------------------------------------------------------ corpus
@functools.lru_cache(maxsize=4)
def build_corpus(max_chars: int | None = None, root: str | None = None) -> str:
    """The docstrings (module, class, function) of the standard library's .py files, in a fixed order
    (sorted walk of ``root``, default the running interpreter's stdlib; tests, idlelib, turtledemo,
    lib2to3 and site-packages are skipped), joined by blank lines. Characters outside printable ASCII
    become "?" (tabs become spaces), so the vocabulary is at most 96 symbols. Stops once ``max_chars``
    characters are collected (at a file boundary, then truncated)."""
    root = root or sysconfig.get_paths()["stdlib"]
    parts, n = [], 0
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in _SKIP_DIRS)
        for f in sorted(files):
            if not f.endswith(".py"):
                continue
            try:
                with open(os.path.join(d, f), encoding="utf-8") as fh:
                    tree = ast.parse(fh.read())
            except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    s = ast.get_docstring(node)
                    if s:
                        parts.append(s)
                        n += len(s) + 2
            if max_chars is not None and n >= max_chars:
                break
        if max_chars is not None and n >= max_chars:
            break
    text = "\n\n".join(parts).replace("\t", " ")
    text = "".join(c if (32 <= ord(c) < 127 or c == "\n") else "?" for c in text)
    return text[:max_chars] if max_chars is not None else text


class CharData:
    """Encodes the corpus; the last ``val_frac`` of the text is the validation split."""

    def __init__(self, text: str, val_frac: float = 0.1):
        self.chars = sorted(set(text))
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        ids = torch.tensor([self.stoi[c] for c in text], dtype=torch.long)
        cut = int(len(ids) * (1 - val_frac))
        self.train, self.val = ids[:cut], ids[cut:]

    @property
    def vocab(self) -> int:
        return len(self.chars)

    @staticmethod
    def batch(ids, batch, ctx, gen):
        ix = torch.randint(0, len(ids) - ctx - 1, (batch,), generator=gen)
        x = torch.stack([ids[i:i + ctx] for i in ix.tolist()])
        y = torch.stack([ids[i + 1:i + ctx + 1] for i in ix.tolist()])
        return x, y


# ------------------------------------------------------------------ model
class Block(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.h = h
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.h, D // self.h).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(B, T, D))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class CharGPT(nn.Module):
    """Pre-LN GPT, learned positions, tied input/output embedding, GPT-2-style init."""

    def __init__(self, vocab, d_model, n_layer, n_head, ctx):
        super().__init__()
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(ctx, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_head) for _ in range(n_layer))
        self.ln = nn.LayerNorm(d_model)
        self.apply(self._init)
        for b in self.blocks:  # residual projections scaled by depth
            nn.init.normal_(b.proj.weight, std=0.02 / math.sqrt(2 * n_layer))
            nn.init.normal_(b.out.weight, std=0.02 / math.sqrt(2 * n_layer))

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, idx):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for b in self.blocks:
            x = b(x)
        return self.ln(x) @ self.tok.weight.T


# ------------------------------------------------------------------ optimizer and schedule
def make_optimizer(name: str, params, kwargs: dict | None = None):
    """``name``: a momentum_fused optimizer class name, or ``torch.<Name>`` for torch.optim."""
    kwargs = dict(kwargs or {})
    if name.startswith("torch."):
        cls = getattr(torch.optim, name[len("torch."):], None)
    else:
        cls = getattr(mf, name, None)
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise ValueError(f"unknown optimizer {name!r}: use a momentum_fused optimizer name (e.g. AdamW, "
                         f"AdamTied, Signum, SGD, AdamWScheduleFree) or torch.<Name>")
    return cls(params, **kwargs)


def make_schedule(opt, kind: str, steps: int, warmup_frac: float = 0.05, decay_frac: float = 0.2):
    """"constant" (None), "cosine" (linear warmup then cosine to 0) or "wsd" (warmup, stable, linear decay to
    0 over the last ``decay_frac`` of the steps: momentum_fused.schedules.wsd)."""
    warm = max(1, int(round(warmup_frac * steps))) if warmup_frac > 0 else 0
    if kind == "constant":
        return None
    if kind == "cosine":
        def f(s):
            if s < warm:
                return (s + 1) / warm
            u = min(1.0, (s - warm + 1) / max(1, steps - warm))
            return 0.5 * (1 + math.cos(math.pi * u))
        return torch.optim.lr_scheduler.LambdaLR(opt, f)
    if kind == "wsd":
        decay = max(1, int(round(decay_frac * steps)))
        return wsd(opt, warmup=warm, stable=max(0, steps - warm - decay), decay=decay)
    raise ValueError(f"unknown schedule {kind!r} (constant, cosine, wsd)")


@torch.no_grad()
def evaluate(model, data, batches, batch, ctx, seed=1234):
    g = torch.Generator().manual_seed(seed)  # the same validation windows at every evaluation
    model.eval()
    tot = 0.0
    for _ in range(batches):
        x, y = data.batch(data.val, batch, ctx, g)
        tot += float(F.cross_entropy(model(x).flatten(0, 1), y.flatten()))
    model.train()
    return tot / batches


# ------------------------------------------------------------------ training
def train(opt: str = "AdamW", opt_kwargs: dict | None = None, steps: int = 600, seed: int = 0,
          size: str = "default", d_model: int | None = None, n_layer: int | None = None,
          n_head: int | None = None, ctx: int | None = None, batch: int = 32, schedule: str = "cosine",
          warmup_frac: float = 0.05, decay_frac: float = 0.2, grad_clip: float | None = 1.0,
          eval_every: int | None = None, eval_batches: int = 4, corpus_chars: int | None = None,
          on_eval=None, threads: int | None = 1, diverge_at: float = 10.0, verbose: bool = False) -> dict:
    """Train a CharGPT and return its curves.

    Returns a dict: ``train_loss`` (one float per step), ``val`` ([step, val loss] at every
    ``eval_every`` steps and at the end, the schedule-free x in eval mode), ``final_val``, ``diverged``
    (the training loss was non-finite or above ``diverge_at``: the run stops and ``final_val`` is inf),
    ``params``, ``seconds``, ``config`` and ``extra`` (what ``on_eval(step, model, optimizer)`` returned at
    every evaluation, if given). The data order and the init depend only on ``seed``."""
    if threads is not None:
        torch.set_num_threads(threads)
    d0, l0, h0, c0 = SIZES[size]
    d_model, n_layer, n_head, ctx = d_model or d0, n_layer or l0, n_head or h0, ctx or c0
    data = CharData(build_corpus(corpus_chars))
    torch.manual_seed(seed)
    model = CharGPT(data.vocab, d_model, n_layer, n_head, ctx)
    optimizer = make_optimizer(opt, model.parameters(), opt_kwargs)
    sched = make_schedule(optimizer, schedule, steps, warmup_frac, decay_frac)
    sf = callable(getattr(optimizer, "eval", None)) and callable(getattr(optimizer, "train", None))
    gen = torch.Generator().manual_seed(10_000 + seed)
    eval_every = eval_every or max(1, steps // 10)
    out = dict(train_loss=[], val=[], extra=[], diverged=False,
               params=sum(p.numel() for p in model.parameters()),
               config=dict(opt=opt, opt_kwargs=opt_kwargs or {}, steps=steps, seed=seed, d_model=d_model,
                           n_layer=n_layer, n_head=n_head, ctx=ctx, batch=batch, schedule=schedule,
                           warmup_frac=warmup_frac, decay_frac=decay_frac, grad_clip=grad_clip,
                           vocab=data.vocab, train_chars=len(data.train)))
    t0 = time.perf_counter()

    def do_eval(step):
        if sf:
            optimizer.eval()
        v = evaluate(model, data, eval_batches, batch, ctx)
        out["val"].append([step, v])
        if on_eval is not None:
            out["extra"].append([step, on_eval(step, model, optimizer)])
        if sf:
            optimizer.train()
        if verbose:
            print(f"step {step:5d}  train {out['train_loss'][-1]:.4f}  val {v:.4f}  "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)

    for step in range(1, steps + 1):
        x, y = data.batch(data.train, batch, ctx, gen)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        lv = loss.item()
        out["train_loss"].append(lv)
        if not math.isfinite(lv) or lv > diverge_at:
            out["diverged"] = True
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        if sched is not None:
            sched.step()
        if step % eval_every == 0 or step == steps:
            do_eval(step)
    out["final_val"] = float("inf") if out["diverged"] else out["val"][-1][1]
    out["seconds"] = time.perf_counter() - t0
    return out


_DEFAULT_STEPS, _DEFAULT_SIZE = 600, "default"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--opt", default="AdamW", help="momentum_fused optimizer name, or torch.<Name>")
    p.add_argument("--opt-kwargs", default='{"lr": 3e-3, "weight_decay": 0.1}', type=json.loads,
                   help="JSON dict of constructor arguments")
    p.add_argument("--steps", type=int, help=f"default {_DEFAULT_STEPS} (--quick: 100)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", choices=sorted(SIZES), help=f"default {_DEFAULT_SIZE!r} (--quick: 'small')")
    p.add_argument("--d-model", type=int)
    p.add_argument("--n-layer", type=int)
    p.add_argument("--n-head", type=int)
    p.add_argument("--ctx", type=int)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--schedule", choices=("constant", "cosine", "wsd"), default="cosine")
    p.add_argument("--warmup-frac", type=float, default=0.05)
    p.add_argument("--decay-frac", type=float, default=0.2, help="wsd: fraction of the steps in the decay")
    p.add_argument("--grad-clip", type=float, default=1.0, help="0 disables clipping")
    p.add_argument("--eval-every", type=int)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", help="write the result dict to this file")
    p.add_argument("--quick", action="store_true", help="the small model for 100 steps (a smoke run; --size and --steps "
                   "given with it are kept)")
    a = p.parse_args(argv)
    if a.quick:  # (defaults only: a --size or --steps given with it is kept)
        a.size = a.size if a.size is not None else "small"
        a.steps = a.steps if a.steps is not None else 100
    a.size = a.size if a.size is not None else _DEFAULT_SIZE
    a.steps = a.steps if a.steps is not None else _DEFAULT_STEPS
    if a.steps < 1:
        p.error("--steps must be >= 1")
    return a


def main(argv=None):
    a = parse_args(argv)
    res = train(opt=a.opt, opt_kwargs=a.opt_kwargs, steps=a.steps, seed=a.seed, size=a.size, d_model=a.d_model,
                n_layer=a.n_layer, n_head=a.n_head, ctx=a.ctx, batch=a.batch, schedule=a.schedule,
                warmup_frac=a.warmup_frac, decay_frac=a.decay_frac, grad_clip=a.grad_clip or None,
                eval_every=a.eval_every, threads=a.threads, verbose=True)
    print(f"{a.opt} {json.dumps(a.opt_kwargs)}: {res['params'] / 1e6:.3f} M params, final val loss "
          f"{res['final_val']:.4f}{' (diverged)' if res['diverged'] else ''}, {res['seconds']:.0f} s")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(res, fh)
    return res


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
