"""Performance levers of CausalLMModule and the trainer configs, on real tiny models and Trainer runs."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import compose_config, fit, loader, tiny_llama
from lightning.pytorch import Callback

from afpt import CausalLMModule
from afpt.distributed import fsdp_strategy
from afpt.errors import AfptError
from afpt.module import activation_checkpointing_on
from afpt.stages.common import build_trainer


def gradients_after_one_step(activation_checkpointing: bool) -> dict[str, torch.Tensor]:
    module = CausalLMModule(tiny_llama(tied=False), activation_checkpointing=activation_checkpointing, grad_clip=None)
    grads = {}

    class Grab(Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            grads.update({n: p.grad.clone() for n, p in pl_module.model.named_parameters()})

    fit(module, [Grab()], max_steps=1)
    assert activation_checkpointing_on(module.model) == activation_checkpointing
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


def test_training_and_validation_build_no_kv_cache():
    """A cache is useless for a loss, and under FSDP each compiled layer would guard on its state."""
    caches = []
    module = CausalLMModule(tiny_llama(tied=True))
    module.model.register_forward_hook(lambda mod, args, out: caches.append((mod.training, out.past_key_values)))
    trainer = fit(module, [], max_steps=2)
    trainer.validate(module, dataloaders=loader(), verbose=False)
    assert [training for training, _ in caches] == [True, True] + [False] * len(loader())
    assert all(cache is None for _, cache in caches)


def test_unknown_sdpa_backend_is_refused():
    with pytest.raises(AfptError, match="optim.sdpa_backend must be null or one of"):
        CausalLMModule(tiny_llama(tied=True), sdpa_backend="flash3")


def test_unknown_compile_mode_is_refused():
    with pytest.raises(AfptError, match="optim.compile_mode must be one of"):
        CausalLMModule(tiny_llama(tied=True), compile=True, compile_mode="fastest")


def test_fsdp_without_original_parameters_is_refused():
    with pytest.raises(AfptError, match="use_orig_params=false is not supported"):
        fsdp_strategy(use_orig_params=False)


def test_a_strategy_that_cannot_be_built_names_its_target(tmp_path):
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"trainer": {"accelerator": "cpu", "strategy": {"_target_": "afpt.distributed.nope"}}})
    with pytest.raises(AfptError, match="trainer.strategy: cannot build 'afpt.distributed.nope'"):
        build_trainer(cfg, tmp_path, [])


def test_shipped_ddp_and_fsdp2_configs_build_their_strategies(tmp_path):
    from lightning.pytorch.strategies import DDPStrategy

    from afpt.distributed import FSDP2Strategy

    cfg = compose_config(tmp_path, ["trainer=ddp", "trainer.accelerator=cpu", "trainer.strategy.comm_hook=bf16"])
    strategy = build_trainer(cfg, tmp_path, []).strategy
    assert isinstance(strategy, DDPStrategy) and strategy._ddp_comm_hook.__name__ == "bf16_compress_hook"
    assert strategy._ddp_kwargs == {"bucket_cap_mb": 25, "gradient_as_bucket_view": True}
    cfg = compose_config(tmp_path, ["trainer=fsdp2", "trainer.accelerator=cpu"])
    strategy = build_trainer(cfg, tmp_path, []).strategy
    assert isinstance(strategy, FSDP2Strategy)
    assert strategy.shard_options == {"reshard_after_forward": True, "reduce_dtype": "float32", "prefetch": 1}
    cfg = compose_config(tmp_path, ["trainer=fsdp2", "trainer.accelerator=cpu", "trainer.strategy.prefetch=2"])
    assert build_trainer(cfg, tmp_path, []).strategy.shard_options["prefetch"] == 2


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["trainer=ddp", "trainer.strategy.comm_hook=int8"], "trainer.strategy.comm_hook must be null or one of"),
        (["trainer=fsdp2", "trainer.strategy.reduce_dtype=fp8"], "trainer.strategy.reduce_dtype must be one of"),
        (["trainer=fsdp2", "trainer.strategy.prefetch=-1"], "trainer.strategy.prefetch must be a non-negative"),
    ],
)
def test_bad_strategy_options_are_refused_by_name(tmp_path, overrides, message):
    cfg = compose_config(tmp_path, [*overrides, "trainer.accelerator=cpu"])
    with pytest.raises(AfptError, match=message):
        build_trainer(cfg, tmp_path, [])


def test_kernel_breakdown_splits_the_profiled_steps_by_category(tmp_path):
    from afpt.throughput import KernelBreakdown, kernel_category

    profile = KernelBreakdown(str(tmp_path), start_step=2, steps=3, top=4)
    fit(CausalLMModule(tiny_llama(tied=True)), [profile], max_steps=6)
    written = json.loads((tmp_path / "profile.json").read_text())
    assert written == profile.result and written["steps"] == 3
    ms = written["kernel_ms_per_step"]
    for category in ("matmul", "attention", "loss (softmax / cross-entropy)", "optimizer + grad clip"):
        assert ms.get(category, 0) > 0, category
    assert sum(ms.values()) <= written["wall_ms_per_step"] * 1.05
    top = written["top_kernels_ms_per_step"]
    assert len(top) == 4 and list(top.values()) == sorted(top.values(), reverse=True)
    assert max(top.values()) <= max(ms.values()) and any("mm" in name or "linear" in name for name in top)
    assert kernel_category("sm90_xmma_gemm_bf16bf16_bf16f32") == "matmul"
    assert kernel_category("flash_fwd_kernel") == "attention"
    assert kernel_category("triton_red_fused__log_softmax_0") == "loss (softmax / cross-entropy)"
    assert kernel_category("ncclDevKernel_AllGather_RING_LL") == "communication"
    assert kernel_category("triton_poi_fused_mul_rsqrt_1") == "other"
