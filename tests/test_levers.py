"""Performance levers of CausalLMModule and the trainer configs, on real tiny models and Trainer runs."""

from __future__ import annotations

import pytest
import torch
from conftest import fit, tiny_llama
from lightning.pytorch import Callback

from afpt import CausalLMModule
from afpt.distributed import fsdp_strategy
from afpt.errors import AfptError
from afpt.stages.common import build_trainer


def gradients_after_one_step(activation_checkpointing: bool) -> dict[str, torch.Tensor]:
    module = CausalLMModule(tiny_llama(tied=False), activation_checkpointing=activation_checkpointing, grad_clip=None)
    grads = {}

    class Grab(Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            grads.update({n: p.grad.clone() for n, p in pl_module.model.named_parameters()})

    fit(module, [Grab()], max_steps=1)
    assert module.model.is_gradient_checkpointing == activation_checkpointing
    return grads


def test_activation_checkpointing_recomputes_the_same_gradients():
    plain, recomputed = gradients_after_one_step(False), gradients_after_one_step(True)
    assert plain.keys() == recomputed.keys() and len(plain) > 5
    for name in plain:
        torch.testing.assert_close(recomputed[name], plain[name], msg=name)


def test_sdpa_backend_is_pinned_for_the_whole_fit_and_released_after():
    seen = []

    class Flags(Callback):
        def on_before_backward(self, trainer, pl_module, loss):
            seen.append((torch.backends.cuda.math_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled()))

    before = torch.backends.cuda.flash_sdp_enabled()
    fit(CausalLMModule(tiny_llama(tied=True), sdpa_backend="math"), [Flags()], max_steps=2)
    assert seen == [(True, False), (True, False)]
    assert torch.backends.cuda.flash_sdp_enabled() == before


def test_unknown_sdpa_backend_is_refused():
    with pytest.raises(AfptError, match="optim.sdpa_backend must be null or one of"):
        CausalLMModule(tiny_llama(tied=True), sdpa_backend="flash3")


def test_fsdp_without_original_parameters_is_refused():
    with pytest.raises(AfptError, match="use_orig_params=false is not supported"):
        fsdp_strategy(use_orig_params=False)


def test_a_strategy_that_cannot_be_built_names_its_target(tmp_path):
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"trainer": {"accelerator": "cpu", "strategy": {"_target_": "afpt.distributed.nope"}}})
    with pytest.raises(AfptError, match="trainer.strategy: cannot build 'afpt.distributed.nope'"):
        build_trainer(cfg, tmp_path, [])
