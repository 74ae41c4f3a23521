"""Behaviour that only exists on CUDA: run on a GPU machine with ``python3 -m pytest -q -m gpu``."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from helpers import loader, quiet_trainer, tiny_llama

from afpt import CausalLMModule
from afpt.pretrain.forgetting import ActiveForgetting
from afpt.speed.throughput import KernelBreakdown, TokenThroughput

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
    # A tiny model on a big GPU: the host sets the pace, and its idle time is charged to what launched the kernels.
    by_launcher = profile.result["idle_ms_per_step_by_launcher"]
    assert by_launcher and 0 < sum(by_launcher.values()) <= profile.result["idle_ms_per_step"] * 1.01
    assert [h["step"] for h in forgetting.history] == [2, 4, 6, 8, 10]
    for entry in forgetting.history:  # settled into plain numbers at the end of the fit
        assert isinstance(entry["duration_ms"], float) and entry["duration_ms"] > 0
        assert isinstance(entry["loss_before"], float) and isinstance(entry["loss_after"], float)


def test_a_warm_loop_of_fixed_shapes_makes_no_device_allocation():
    """After the warm-up window the caching allocator serves every tensor, resets included: each window after it
    counts 0 cudaMalloc calls and 0 retries (the counts a run with changing shapes is checked against)."""
    throughput = TokenThroughput(window=3)
    trainer = quiet_trainer(
        accelerator="gpu",
        precision="bf16-mixed",
        max_steps=12,
        callbacks=[ActiveForgetting(every_n_steps=2), throughput],
    )
    trainer.fit(CausalLMModule(tiny_llama(tied=True), compile=True), train_dataloaders=loader())
    assert len(throughput.records) == 4
    assert [(r["device_mallocs"], r["alloc_retries"]) for r in throughput.records[1:]] == [(0, 0)] * 3


def test_adapting_new_rows_never_waits_for_the_gpu(tmp_path):
    """The new-rows policy's gradient hook runs on the GPU alone (it once copied a CPU mask every backward)."""
    from afpt.adapt.expansion import apply_policy, expand_vocabulary

    model = tiny_llama(tied=True, vocab=96)
    expand_vocabulary(model, 80, 96, "mean", torch.Generator().manual_seed(0), pad_multiple=1)
    apply_policy(model, "new_rows_and_head", 80)
    profile = KernelBreakdown(str(tmp_path), start_step=2, steps=4)
    trainer = quiet_trainer(accelerator="gpu", precision="bf16-mixed", max_steps=8, callbacks=[profile])
    trainer.fit(CausalLMModule(model, compile=True), train_dataloaders=loader())
    assert profile.result["sync_sites"] == {}


def test_instruct_batches_are_pinned_on_cuda():
    """``instruct.pin_memory=auto`` pins batches when the trainer runs on CUDA (pageable copies stall the host)."""
    from afpt.instruct.chat import InstructDataModule

    examples = [{"input_ids": [5] * n, "labels": [5] * n} for n in (3, 9, 17, 4)]
    module = InstructDataModule(examples, [], 2, 0, 0)
    module.trainer = quiet_trainer(accelerator="gpu")
    batch = next(iter(module.train_dataloader()))
    assert module.pin_memory is True and batch["input_ids"].is_pinned() and batch["labels"].is_pinned()


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
