"""The module's speed levers (compile, losses, sdpa pinning, checkpointing), on real tiny models and Trainer runs."""

from __future__ import annotations

import pytest
import torch
from helpers import compose_config, fit, loader, quiet_trainer, tiny_llama
from lightning.pytorch import Callback

from afpt import CausalLMModule
from afpt.errors import AfptError
from afpt.pretrain.optim import OptimConfig
from afpt.speed.levers import activation_checkpointing_on


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
    from afpt.app.stages import build_optim

    module = CausalLMModule(tiny_llama(tied=True), **build_optim(cfg).as_kwargs())
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


class StepLosses(Callback):
    """Records each training step's loss."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


@pytest.mark.parametrize("progress_bar", [True, False])
def test_progress_bar_loss_is_a_host_copy_refreshed_every_log_interval(progress_bar):
    losses = StepLosses()
    trainer = quiet_trainer(max_steps=4, log_every_n_steps=2, enable_progress_bar=progress_bar, callbacks=[losses])
    trainer.fit(CausalLMModule(tiny_llama(tied=True), compile=False), train_dataloaders=loader())
    assert len(set(losses.losses)) == 4
    # The logger and callbacks see every step's device loss; the bar never holds a device tensor.
    assert trainer.callback_metrics["train/loss"].item() == pytest.approx(losses.losses[3])
    assert "train/loss" not in trainer.progress_bar_metrics
    if progress_bar:  # refreshed at batches 0 and 2 only, as a host float
        assert trainer.progress_bar_metrics["loss"] == pytest.approx(losses.losses[2])
    else:
        assert "loss" not in trainer.progress_bar_metrics


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
    trainer = quiet_trainer(max_steps=2, limit_val_batches=0)
    trainer.fit(module, datamodule=datamodule)
    return trainer


def test_bad_compile_value_is_refused():
    with pytest.raises(AfptError, match="optim.compile must be true, false or 'auto'"):
        CausalLMModule(tiny_llama(tied=True), compile="yes")


def test_pinning_an_sdpa_kernel_on_a_flex_model_is_refused():
    model = tiny_llama(tied=True)
    model.set_attn_implementation("flex_attention")
    with pytest.raises(AfptError, match="optim.sdpa_backend='math' pins a kernel of sdpa attention"):
        fit(CausalLMModule(model, sdpa_backend="math"), [], max_steps=1)


def fp8_run(fp8, recipe="tensorwise"):
    from afpt import ActiveForgetting

    losses = []

    class Losses(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    module = CausalLMModule(tiny_llama(tied=False, layers=2), lr=1e-2, fp8=fp8, fp8_recipe=recipe, compile=False)
    forgetting = ActiveForgetting(every_n_steps=3, head="never")
    fit(module, [forgetting, Losses()], max_steps=6)
    return module, forgetting, losses


def test_fp8_trains_the_decoder_linears_in_float8_and_leaves_embedding_and_head_to_forgetting():
    pytest.importorskip("torchao")
    from torchao.float8.float8_linear import Float8Linear

    module, forgetting, losses = fp8_run("emulate")
    model = module.model
    converted = sorted(n for n, m in model.named_modules() if isinstance(m, Float8Linear))
    assert len(converted) == 2 * 7 and all(n.startswith("model.layers.") for n in converted)  # q k v o gate up down
    assert not isinstance(model.lm_head, Float8Linear)
    assert type(model.get_input_embeddings()) is torch.nn.Embedding
    assert [h["step"] for h in forgetting.history] == [3]
    _, _, reference = fp8_run(False)
    assert all(torch.isfinite(torch.tensor(losses)))
    # Emulated float8 rounds the GEMM inputs to e4m3/e5m2: close to the full-precision run, not equal.
    assert losses != reference and abs(losses[-1] - reference[-1]) < 0.05 * reference[-1]


def test_fp8_recipe_picks_torchao_scaling(caplog):
    """``optim.fp8_recipe=rowwise`` scales per row (torchao's axiswise granularity), tensorwise per tensor."""
    pytest.importorskip("torchao")
    from torchao.float8.config import ScalingGranularity

    granularity = {}
    for recipe in ("tensorwise", "rowwise"):
        module, _, losses = fp8_run("emulate", recipe)
        q_proj = module.model.model.layers[0].self_attn.q_proj
        granularity[recipe] = q_proj.config.cast_config_input.scaling_granularity
        assert all(torch.isfinite(torch.tensor(losses)))
    assert granularity == {"tensorwise": ScalingGranularity.TENSORWISE, "rowwise": ScalingGranularity.AXISWISE}
    with pytest.raises(AfptError, match="optim.fp8_recipe must be one of .*got 'blockwise'"):
        CausalLMModule(tiny_llama(tied=True), fp8=True, fp8_recipe="blockwise")
    with caplog.at_level("WARNING", logger="afpt"):
        CausalLMModule(tiny_llama(tied=True), fp8_recipe="rowwise")
    assert "optim.fp8_recipe=rowwise has no effect: optim.fp8 is false" in caplog.text


def test_fp8_is_refused_without_an_fp8_gpu_and_on_models_it_cannot_convert():
    pytest.importorskip("torchao")
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=96, n_embd=32, n_layer=1, n_head=2, n_positions=32))
    with pytest.raises(AfptError, match="optim.fp8=true needs a CUDA GPU with FP8 support; the trainer runs on cpu"):
        fit(CausalLMModule(tiny_llama(tied=True), fp8=True), [], max_steps=1)
    with pytest.raises(AfptError, match="optim.fp8 must be false, true or 'emulate'"):
        CausalLMModule(tiny_llama(tied=True), fp8="yes")
    with pytest.raises(AfptError, match="GPT-2 uses Conv1D"):
        fit(CausalLMModule(gpt2, fp8="emulate"), [], max_steps=1)


def test_fp8_linears_auto_keeps_what_torchaos_filter_keeps(caplog):
    """``optim.fp8_linears=auto``: at 1.6B's shapes tensorwise leaves out k/v (1024 x 2048), rowwise keeps only the
    MLP's gate/up; at the tiny model's shapes nothing is left, which is one clear error, not a silent bf16 run."""
    pytest.importorskip("torchao")
    from transformers import MistralConfig, MistralForCausalLM

    from afpt.speed.levers import fp8_linears

    config = MistralConfig(
        vocab_size=64, hidden_size=2048, intermediate_size=6144, num_hidden_layers=2,
        num_attention_heads=16, num_key_value_heads=8, tie_word_embeddings=False,
    )  # fmt: skip
    with torch.device("meta"):
        model = MistralForCausalLM(config)
    names = {id(m): name.rsplit(".", 1)[-1] for name, m in model.named_modules()}

    def kinds(which, recipe):
        return sorted({names[i] for i in fp8_linears(model, which, recipe)})

    assert kinds("all", "tensorwise") == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert kinds("auto", "tensorwise") == ["down_proj", "gate_proj", "o_proj", "q_proj", "up_proj"]
    assert kinds("auto", "rowwise") == ["gate_proj", "up_proj"]
    assert len(fp8_linears(model, "auto", "tensorwise")) == 2 * 5
    with pytest.raises(AfptError, match="no nn.Linear large enough for torchao's filter"):
        fit(CausalLMModule(tiny_llama(tied=True), fp8="emulate", fp8_linears="auto"), [], max_steps=1)
    with pytest.raises(AfptError, match="optim.fp8_linears must be one of .*got 'some'"):
        CausalLMModule(tiny_llama(tied=True), fp8=True, fp8_linears="some")
    with pytest.raises(AfptError, match="no torchao filter for fp8_recipe=rowwise_with_gw_hp"):
        CausalLMModule(tiny_llama(tied=True), fp8=True, fp8_recipe="rowwise_with_gw_hp", fp8_linears="auto")
    with caplog.at_level("WARNING", logger="afpt"):
        CausalLMModule(tiny_llama(tied=True), fp8_linears="auto")
    assert "optim.fp8_linears=auto has no effect: optim.fp8 is false" in caplog.text


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.decay=bogus", r"optim.decay must be one of \('cosine', 'linear', 'constant'\), got 'bogus'"),
        ("optim.lr=-1", "optim.lr must be a number > 0, got -1"),
        ("optim.lr=abc", "optim.lr must be a number > 0, got 'abc'"),
        ("optim.warmup_fraction=2", "optim.warmup_fraction must be a number >= 0 and <= 1, got 2"),
        ("optim.betas=[0.9]", r"optim.betas must be two numbers in \[0, 1\), got \[0.9\]"),
        ("optim.betas=[0.9,1.0]", "optim.betas must be a number >= 0 and < 1, got 1.0"),
        ("optim.total_steps=2.5", "optim.total_steps must be an integer >= 1, got 2.5"),
        ("optim.grad_clip=0", "optim.grad_clip must be a number > 0, got 0"),
        ("+optim.lrr=1", r"optim.lrr is not an optim setting; expected one of \['activation_checkpointing'"),
        ("optim.fp8_linears=some", r"optim.fp8_linears must be one of \('all', 'auto'\), got 'some'"),
    ],
)
def test_bad_optim_settings_stop_pretraining_before_the_data_is_touched(tmp_path, override, message):
    """One error naming the key and the value, raised before the tokenizer and the token store are built (a
    typo must not wait for a corpus to be tokenised), and the same error from the module itself for a value."""
    import afpt.pretrain.stage as pretrain

    cfg = compose_config(tmp_path / "run", [override])
    with pytest.raises(AfptError, match=message):
        pretrain.run(cfg)
    assert not (tmp_path / "run").exists()
    if override.startswith("+"):
        return  # a keyword argument the module does not take is Python's TypeError
    with pytest.raises(AfptError, match=message):
        optim = compose_config(tmp_path, [override]).optim
        CausalLMModule(tiny_llama(tied=True), **{k: v for k, v in optim.items() if k != "_target_"})


def test_a_stage_names_its_own_optim_node():
    """``adapt.optim`` over ``optim``: a bad value there is named as ``adapt.optim.<key>``."""
    with pytest.raises(AfptError, match="adapt.optim.lr must be a number > 0, got 0"):
        OptimConfig.from_options(where="adapt.optim", lr=0)
    with pytest.raises(AfptError, match=r"instruct.optim.sdpa_backend must be null or one of .*got 'flsh'"):
        OptimConfig.from_options(where="instruct.optim", sdpa_backend="flsh")
    OptimConfig.from_options(lr=1e-3, betas=(0.9, 0.95), embedding_lr=None, total_steps=10)
