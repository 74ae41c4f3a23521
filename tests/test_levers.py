"""Performance levers of CausalLMModule and the trainer configs, on real tiny models and Trainer runs."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import compose_config, fit, loader, tiny_llama
from lightning.pytorch import Callback
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.masking_utils import sdpa_mask

from afpt import CausalLMModule
from afpt.errors import AfptError
from afpt.speed.attention import CAUSAL_SDPA, RotaryTable, one_sequence_per_row, use_rotary_tables
from afpt.speed.distributed import fsdp_strategy
from afpt.speed.levers import activation_checkpointing_on
from afpt.stages import build_trainer


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


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"compile_options": {"no_such_option": True}}, r"\['no_such_option'\] are not torch._inductor.config"),
        (
            {"compile_options": {"coordinate_descent_tuning": True}, "compile_mode": "max-autotune"},
            "cannot both be set",
        ),
    ],
)
def test_bad_compile_options_are_refused(kwargs, message):
    with pytest.raises(AfptError, match=message):
        CausalLMModule(tiny_llama(tied=True), compile=True, **kwargs)


def test_compile_options_reach_torch_compile(tmp_path, monkeypatch):
    """``optim.compile_options`` from the Hydra config is what the loss is compiled with."""
    seen = []

    def recording_compile(fn, **kwargs):
        seen.append((fn.__name__, kwargs))
        return fn

    monkeypatch.setattr(torch, "compile", recording_compile)
    cfg = compose_config(tmp_path, ["optim.compile_options={coordinate_descent_tuning:true}", "optim.compile=true"])
    from afpt.stages import to_dict

    module = CausalLMModule(tiny_llama(tied=True), **to_dict(cfg.optim))
    fit(module, [], max_steps=1)
    assert seen == [("_hf_loss", {"mode": None, "options": {"coordinate_descent_tuning": True}})]


def test_the_compiled_hf_loss_has_the_loss_as_its_only_differentiable_output(monkeypatch):
    """No logits leave the graph, so autograd fills no logits-sized zero gradient in the backward."""
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: real_compile(fn, backend=recording_backend))
    torch._dynamo.reset()
    trainer = fit(CausalLMModule(tiny_llama(tied=True), compile=True), [], max_steps=2)
    assert trainer.global_step == 2 and graphs
    for gm in graphs:
        (output,) = [node for node in gm.graph.nodes if node.op == "output"]
        values = [node.meta["example_value"] for node in output.args[0] if hasattr(node, "meta")]
        differentiable = [v for v in values if v.requires_grad]
        assert len(differentiable) == 1 and differentiable[0].dim() == 0


def test_unknown_compile_mode_is_refused():
    with pytest.raises(AfptError, match="optim.compile_mode must be one of"):
        CausalLMModule(tiny_llama(tied=True), compile=True, compile_mode="fastest")


def test_fsdp_without_original_parameters_is_refused():
    with pytest.raises(AfptError, match="use_orig_params=false is not supported"):
        fsdp_strategy(use_orig_params=False)


def test_a_strategy_that_cannot_be_built_names_its_target(tmp_path):
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"trainer": {"accelerator": "cpu", "strategy": {"_target_": "afpt.speed.distributed.nope"}}})
    with pytest.raises(AfptError, match="trainer.strategy: cannot build 'afpt.speed.distributed.nope'"):
        build_trainer(cfg, tmp_path, [])


def test_shipped_ddp_and_fsdp2_configs_build_their_strategies(tmp_path):
    from lightning.pytorch.strategies import DDPStrategy

    from afpt.speed.distributed import FSDP2Strategy

    cfg = compose_config(tmp_path, ["trainer=ddp", "trainer.accelerator=cpu", "trainer.strategy.comm_hook=bf16"])
    strategy = build_trainer(cfg, tmp_path, []).strategy
    assert isinstance(strategy, DDPStrategy) and strategy._ddp_comm_hook.__name__ == "bf16_compress_hook"
    assert strategy._ddp_kwargs == {"bucket_cap_mb": 25, "gradient_as_bucket_view": True}
    cfg = compose_config(tmp_path, ["trainer=fsdp2", "trainer.accelerator=cpu"])
    strategy = build_trainer(cfg, tmp_path, []).strategy
    assert isinstance(strategy, FSDP2Strategy)
    assert strategy.shard_options == {"reshard_after_forward": False, "reduce_dtype": "float32", "prefetch": 1}
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
    from afpt.speed.throughput import KernelBreakdown, is_host_sync, kernel_category

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
    assert written["host_syncs_per_step"] == 0 and written["sync_sites"] == {}  # CPU: nothing to wait for
    assert is_host_sync("cudaStreamSynchronize") and is_host_sync("cudaMemcpy")
    assert not is_host_sync("cudaMemcpyAsync") and not is_host_sync("cudaLaunchKernel")


def test_kernel_breakdown_names_the_line_of_an_implicit_sync():
    from afpt.speed.throughput import KernelBreakdown

    profile = KernelBreakdown("unused")
    message = UserWarning("called a synchronizing CUDA operation")
    for _ in range(2):
        profile._record_warning(message, UserWarning, "torch/cuda/__init__.py", 1)
    line = test_kernel_breakdown_names_the_line_of_an_implicit_sync.__code__.co_firstlineno + 6
    assert profile._stop_sync_debug() == {f"tests/test_levers.py:{line}": 2}
    with pytest.warns(UserWarning, match="unrelated"):  # other warnings are shown as usual
        profile._record_warning(UserWarning("unrelated"), UserWarning, __file__, 1)
    assert profile._stop_sync_debug() == {}


class StepLosses(Callback):
    """Records each training step's loss."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


@pytest.mark.parametrize("progress_bar", [True, False])
def test_progress_bar_loss_is_a_host_copy_refreshed_every_log_interval(progress_bar):
    import lightning.pytorch as pl

    losses = StepLosses()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=4,
        log_every_n_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=progress_bar,
        enable_model_summary=False,
        callbacks=[losses],
    )
    trainer.fit(CausalLMModule(tiny_llama(tied=True), compile=False), train_dataloaders=loader())
    assert len(set(losses.losses)) == 4
    # The logger and callbacks see every step's device loss; the bar never holds a device tensor.
    assert trainer.callback_metrics["train/loss"].item() == pytest.approx(losses.losses[3])
    assert "train/loss" not in trainer.progress_bar_metrics
    if progress_bar:  # refreshed at batches 0 and 2 only, as a host float
        assert trainer.progress_bar_metrics["loss"] == pytest.approx(losses.losses[2])
    else:
        assert "loss" not in trainer.progress_bar_metrics


def test_models_default_to_sdpa_and_keep_a_named_attention(tmp_path):
    from afpt.models import ModelConfig, build_model, load_model

    def attention(family: str, **kwargs) -> str:
        cfg = ModelConfig(family=family, vocab_size=64, hidden_size=32, num_heads=4, **kwargs)
        return build_model(cfg, 64, {}).config._attn_implementation

    assert attention("llama") == attention("mistral", num_kv_heads=2) == attention("gpt2") == "sdpa"
    assert attention("llama", attn_implementation="eager") == "eager"
    tiny_llama(tied=True).save_pretrained(tmp_path / "m")
    assert load_model(tmp_path / "m", attn_implementation="eager").config._attn_implementation == "eager"


def test_auto_levers_keep_a_cpu_run_eager_without_workers():
    """``compile``, ``num_workers`` and ``pin_memory`` default to ``auto``: off on a CPU trainer."""
    import datasets

    from afpt.data import PretrainDataModule

    blocks = datasets.Dataset.from_dict({"input_ids": torch.randint(0, 96, (32, 16)).tolist()})
    datamodule = PretrainDataModule({"en": blocks}, {"en": blocks.select(range(4))}, batch_size=4)
    module = CausalLMModule(tiny_llama(tied=True))
    assert module.hparams.compile == "auto"
    trainer = fit_datamodule(module, datamodule)
    assert trainer.global_step == 2 and not module.compiles() and not hasattr(module, "_compiled")
    assert (datamodule.num_workers, datamodule.pin_memory) == (0, False)
    loader = datamodule.train_dataloader()
    assert (loader.num_workers, loader.pin_memory) == (0, False)


def fit_datamodule(module, datamodule):
    from lightning.pytorch import Trainer

    trainer = Trainer(
        accelerator="cpu",
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(module, datamodule=datamodule)
    return trainer


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("num_workers", "many", "data.num_workers must be 'auto' or an integer >= 0"),
        ("num_workers", -1, "data.num_workers must be 'auto' or an integer >= 0"),
        ("pin_memory", "yes", "data.pin_memory must be 'auto', true or false"),
    ],
)
def test_bad_loader_settings_are_refused(key, value, message):
    import datasets

    from afpt.data import DataError, PretrainDataModule

    blocks = datasets.Dataset.from_dict({"input_ids": [[1, 2, 3, 4]] * 4})
    with pytest.raises(DataError, match=message):
        PretrainDataModule({"en": blocks}, {}, batch_size=2, **{key: value})


def test_bad_compile_value_is_refused():
    with pytest.raises(AfptError, match="optim.compile must be true, false or 'auto'"):
        CausalLMModule(tiny_llama(tied=True), compile="yes")


def test_pinning_an_sdpa_kernel_on_a_flex_model_is_refused():
    model = tiny_llama(tied=True)
    model.set_attn_implementation("flex_attention")
    with pytest.raises(AfptError, match="optim.sdpa_backend='math' pins a kernel of sdpa attention"):
        fit(CausalLMModule(model, sdpa_backend="math"), [], max_steps=1)


def traced(model, **inputs) -> tuple[list, torch.Tensor]:
    """The nodes of the graph torch.compile traces for ``model(**inputs)``, and the logits."""
    nodes = []

    def backend(gm, example_inputs):
        nodes.extend(gm.graph.nodes)
        return gm

    torch._dynamo.reset()
    logits = torch.compile(model, backend=backend)(**inputs, use_cache=False).logits
    return nodes, logits


def sdpa_calls(model, **inputs) -> tuple[list[dict], torch.Tensor]:
    """The keyword arguments of every sdpa call in the traced graph of ``model(**inputs)``, and the logits."""
    nodes, logits = traced(model, **inputs)
    return [n.kwargs for n in nodes if n.target is torch.nn.functional.scaled_dot_product_attention], logits


def test_compiled_causal_sdpa_drops_the_mask_only_for_plain_rows():
    """Under torch.compile HF always materialises the mask; afpt_sdpa drops it for rows declared plain."""
    model = tiny_llama(tied=True, layers=2)
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    padding = torch.ones_like(ids)
    padding[0, :5] = 0
    reference = {mask: model(input_ids=ids, attention_mask=mask, use_cache=False).logits for mask in (None, padding)}
    stock, _ = sdpa_calls(model, input_ids=ids)
    assert stock[0]["attn_mask"] is not None and not stock[0]["is_causal"]

    model.set_attn_implementation(CAUSAL_SDPA)
    with one_sequence_per_row():
        plain, logits = sdpa_calls(model, input_ids=ids)
        padded, padded_logits = sdpa_calls(model, input_ids=ids, attention_mask=padding)
    undeclared, _ = sdpa_calls(model, input_ids=ids)
    assert len(plain) == 2 and all(c["attn_mask"] is None and c["is_causal"] for c in plain)
    assert padded[0]["attn_mask"] is not None and undeclared[0]["attn_mask"] is not None
    torch.testing.assert_close(logits, reference[None])
    torch.testing.assert_close(padded_logits[0, 5:], reference[padding][0, 5:])


def test_compiled_training_builds_no_attention_mask(monkeypatch):
    """A compiled fit (real inductor) switches sdpa models to afpt_sdpa and never builds a mask."""
    import afpt.speed.attention

    built = []

    def recording_sdpa_mask(**kwargs):
        built.append(kwargs["q_length"])
        return sdpa_mask(**kwargs)

    monkeypatch.setattr(afpt.speed.attention, "sdpa_mask", recording_sdpa_mask)
    torch._dynamo.reset()
    module = CausalLMModule(tiny_llama(tied=True), compile=True)
    trainer = fit(module, [], max_steps=2)
    trainer.validate(module, dataloaders=loader(), verbose=False)
    assert module.model.config._attn_implementation == CAUSAL_SDPA
    assert isinstance(module.model.model.rotary_emb, RotaryTable)
    assert built == []
    assert torch.isfinite(trainer.callback_metrics["val/loss"])


def test_rotary_tables_serve_the_same_cos_sin_without_recomputing_them():
    """Inside one_sequence_per_row the traced graph has no sin/cos; the logits stay bit-identical."""
    model = tiny_llama(tied=True, layers=2)
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    reference = model(input_ids=ids, use_cache=False).logits
    trig = (torch.sin, torch.cos, torch.Tensor.sin, torch.Tensor.cos, "sin", "cos")
    stock, _ = traced(model, input_ids=ids)
    assert any(n.target in trig for n in stock)

    assert use_rotary_tables(model) and isinstance(model.model.rotary_emb, RotaryTable)
    with one_sequence_per_row():
        tabled, logits = traced(model, input_ids=ids)
        longer, _ = traced(model, input_ids=torch.randint(0, 96, (1, 40)))  # past the 32-row table
    undeclared, undeclared_logits = traced(model, input_ids=ids)
    assert not any(n.target in trig for n in tabled)
    assert any(n.target in trig for n in longer) and any(n.target in trig for n in undeclared)
    assert torch.equal(logits, reference) and torch.equal(undeclared_logits, reference)
    assert not any("cos" in key or "sin" in key for key in model.state_dict())


def test_rotary_tables_can_be_turned_off_and_skip_models_without_rope():
    module = CausalLMModule(tiny_llama(tied=True), rotary_tables=False)
    fit(module, [], max_steps=1)
    assert not isinstance(module.model.model.rotary_emb, RotaryTable)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=96, n_positions=32, n_embd=32, n_layer=1, n_head=2))
    assert not use_rotary_tables(gpt2)
