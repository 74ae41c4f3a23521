"""Behaviour that only exists on CUDA: run on a GPU machine with ``python3 -m pytest -q -m gpu``."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from helpers import loader, quiet_trainer, tiny_llama

from afpt import CausalLMModule
from afpt.pretrain.forgetting import ActiveForgetting
from afpt.speed.throughput import KernelBreakdown

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_a_compiled_training_loop_with_forgetting_never_waits_for_the_gpu(tmp_path):
    """No implicit host sync in the steady loop, resets and the progress bar included."""
    forgetting = ActiveForgetting(every_n_steps=2)
    profile = KernelBreakdown(str(tmp_path), start_step=4, steps=6)
    trainer = quiet_trainer(
        accelerator="gpu",
        precision="bf16-mixed",
        max_steps=12,
        log_every_n_steps=100,
        enable_progress_bar=True,
        callbacks=[forgetting, profile],
    )
    trainer.fit(CausalLMModule(tiny_llama(tied=True)), train_dataloaders=loader())
    assert profile.result["sync_sites"] == {}
    assert [h["step"] for h in forgetting.history] == [2, 4, 6, 8, 10]
    for entry in forgetting.history:  # settled into plain numbers at the end of the fit
        assert isinstance(entry["duration_ms"], float) and entry["duration_ms"] > 0
        assert isinstance(entry["loss_before"], float) and isinstance(entry["loss_after"], float)


@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is None, reason="needs liger-kernel")
def test_liger_cross_entropy_matches_the_hf_loss_and_gradients():
    batch = {"input_ids": torch.randint(1, 96, (4, 16), device="cuda")}
    batch["labels"] = batch["input_ids"].clone()
    batch["labels"][:, :3] = -100  # ignored positions, as in chat masks
    results = []
    for loss in ("hf", "liger_ce"):
        module = CausalLMModule(tiny_llama(tied=True), loss=loss, compile=False).cuda()
        module.configure_model()
        value, n_tokens = module._loss(batch)
        value.backward()
        results.append((value.detach(), n_tokens, [p.grad.clone() for p in module.parameters()]))
    (hf, n_hf, hf_grads), (liger, n_liger, liger_grads) = results
    assert n_hf == n_liger == 4 * 13  # labels 1..15 of each row, less the two masked ones
    torch.testing.assert_close(liger, hf, rtol=1e-5, atol=1e-5)
    for a, b in zip(liger_grads, hf_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
