"""Lightning (docs/ecosystem.md "Lightning"): automatic optimization (Lightning's closure path), gradient
accumulation and clipping, a step scheduler and a checkpoint resume, against torch.optim's AdamW; and
Lightning's mixed precision with gradient clipping, which needs the documented setting (a review, 2026-12-08)."""
from __future__ import annotations

import importlib.util
import logging
import os
import warnings

import pytest
import torch

import momentum_fused as mf

pytestmark = pytest.mark.skipif(importlib.util.find_spec("lightning") is None,
                                reason="needs lightning (pip install -r requirements-dev.txt)")


def _fit(make_opt, tmp=None, resume=None, max_epochs=3, **kw):
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    class Lit(L.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))

        def training_step(self, batch, i):
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x).float(), y)

        def configure_optimizers(self):
            opt = make_opt(self.parameters())
            sched = torch.optim.lr_scheduler.StepLR(opt, 3, 0.7)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(64, 8, generator=g),
                                                                      torch.randn(64, 1, generator=g)), batch_size=8)
    callbacks = [] if tmp is None else [ModelCheckpoint(dirpath=tmp, save_last=True, save_top_k=-1)]
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=tmp is not None, callbacks=callbacks,
                        num_sanity_val_steps=0, max_epochs=max_epochs, accumulate_grad_batches=2,
                        gradient_clip_val=0.5, **kw)
    model = Lit()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (Lightning's advice on workers and logging)
        logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
        trainer.fit(model, data, ckpt_path=resume)
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _ours(ps):
    return mf.AdamW(ps, lr=1e-2, weight_decay=0.1)


def _torch(ps):
    return torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1)


def test_lightning_trains_as_torch_and_a_resumed_run_equals_an_uninterrupted_one(tmp_path):
    ours, ref = _fit(_ours), _fit(_torch)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)  # (torch's foreach rounds otherwise: conventions.md)
    _fit(_ours, tmp=tmp_path, max_epochs=1)
    resumed = _fit(_ours, resume=os.path.join(tmp_path, "last.ckpt"))
    assert torch.equal(resumed, ours)


def test_lightning_mixed_precision_with_clipping_needs_the_documented_setting():
    """Lightning refuses gradient clipping for an optimizer whose step unscales by itself
    (``_step_supports_amp_scaling``, as torch's fused=True AdamW), under bf16-mixed too; with the setting off the
    run equals torch.optim's."""
    with pytest.raises(RuntimeError, match="does not allow for gradient clipping"):
        _fit(_ours, precision="bf16-mixed")

    def plain(ps):
        opt = _ours(ps)
        opt._step_supports_amp_scaling = False
        return opt

    torch.testing.assert_close(_fit(plain, precision="bf16-mixed"), _fit(_torch, precision="bf16-mixed"),
                               rtol=1e-5, atol=1e-6)
