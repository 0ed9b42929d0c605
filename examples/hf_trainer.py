"""A momentum_fused optimizer in ``transformers.Trainer``: ``optimizers=(optimizer, scheduler)``.

A tiny GPT-2 is built from a config (random init, nothing is downloaded) and trained for a few
steps on synthetic token sequences, on the CPU. The tokens are random, so the model's loss stays near
ln(64) = 4.16 (the Trainer logs ~15/16 of it, ~3.9: recent transformers divide the summed loss by all the
label positions of the batch, one more per sequence than the shifted loss predicts): the example shows the wiring (optimizer, scheduler, Trainer's train/eval calls), not learning; see
examples/train_charlm.py for a model that learns.

    python examples/hf_trainer.py                       # AdamW + WSD schedule
    python examples/hf_trainer.py --optimizer sf_adamw  # schedule-free AdamW (Trainer calls
                                                        # optimizer.train()/.eval() itself)

Needs ``pip install transformers accelerate``.
"""
from __future__ import annotations

import argparse
import tempfile

import torch

import momentum_fused as mf
from momentum_fused.schedules import wsd


class SyntheticTokens(torch.utils.data.Dataset):
    """Random token sequences; the labels are the inputs (the model shifts them for next-token loss)."""

    def __init__(self, n: int, seq_len: int, vocab: int, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, vocab, (n, seq_len), generator=gen)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def make_optimizer(name: str, model: torch.nn.Module, steps: int):
    """(optimizer, scheduler) for Trainer. Weight decay only on matrices, as usual for transformers."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}]
    if name == "adamw":
        opt = mf.AdamW(groups, lr=3e-3, betas=(0.9, 0.95))
        warmup = max(1, steps // 4)
        decay_steps = max(1, steps // 4)
        sched = wsd(opt, warmup=warmup, stable=max(0, steps - warmup - decay_steps), decay=decay_steps)
    elif name == "sf_adamw":
        # schedule-free: a constant lr (its own warmup); Trainer calls opt.train() before training and
        # opt.eval() before evaluating. A scheduler is still required by Trainer's API: a constant one.
        opt = mf.AdamWScheduleFree(groups, lr=3e-3, warmup_steps=max(1, steps // 4))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    else:
        raise ValueError(f"unknown optimizer {name!r} (choose adamw or sf_adamw)")
    return opt, sched


def main(steps: int = 4, optimizer: str = "adamw", output_dir: str | None = None, seed: int = 0) -> dict:
    """Train; returns {"losses": per-step training losses, "lrs": per-step lrs, "optimizer", "model"}."""
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2)
    model = GPT2LMHeadModel(config)
    opt, sched = make_optimizer(optimizer, model, steps)
    lrs = []

    class RecordLR(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            lrs.append(float(opt.param_groups[0]["lr"]))  # the lr the coming optimizer step uses

    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=output_dir or tmp, max_steps=steps, per_device_train_batch_size=4,
                                 logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=seed,
                                 data_seed=seed, dataloader_num_workers=0, disable_tqdm=True)
        trainer = Trainer(model=model, args=args, train_dataset=SyntheticTokens(32, 16, config.vocab_size),
                          optimizers=(opt, sched), callbacks=[RecordLR()])
        trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"losses": losses, "lrs": lrs, "optimizer": opt, "model": model}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--optimizer", default="adamw", choices=["adamw", "sf_adamw"])
    a = ap.parse_args()
    out = main(a.steps, a.optimizer)
    for i, (loss, lr) in enumerate(zip(out["losses"], out["lrs"])):
        print(f"step {i + 1}: loss {loss:.4f}  lr {lr:.2e}")
