"""The performance levers of ``CausalLMModule``: checked at construction, applied by ``ModelTransforms`` in
``configure_model``.

Compile (one graph from tokens to loss for ``loss=hf``), the afpt_sdpa attention and rotary tables, a pinned
sdpa kernel, liger-kernel losses, activation checkpointing, FP8 training of the decoder layers (torchao) and
FSDP2 sharding. benchmarks/README.md
measures each of them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import PreTrainedModel

from afpt.errors import AfptError
from afpt.speed.attention import CAUSAL_SDPA, use_rotary_tables
from afpt.speed.distributed import decoder_layers, fully_shard_model, layout

log = logging.getLogger("afpt")

LOSSES = ("hf", "liger_ce", "fused_linear_ce")
# Tensor-core FP8 GEMMs (torch._scaled_mm): Ada (8.9) and Hopper (9.0) on.
FP8_MIN_CAPABILITY = (8, 9)
# torchao's float8 recipes: tensorwise (cuBLAS, fastest), rowwise (CUTLASS, Hopper on; more accurate),
# rowwise_with_gw_hp (the weight gradient in bf16; most accurate).
FP8_RECIPES = ("tensorwise", "rowwise", "rowwise_with_gw_hp")
ROWWISE_MIN_CAPABILITY = (9, 0)
# Which decoder-layer linears go FP8: every one whose dimensions are multiples of 16, or torchao's
# auto filter (leaves out the shapes its H100 measurements found slower in FP8; tensorwise and rowwise only).
FP8_LINEARS = ("all", "auto")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
SDPA_BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}


def check_levers(
    loss: str,
    compile: bool | str,
    compile_mode: str,
    compile_options: Mapping[str, Any] | None,
    sdpa_backend: str | None,
    fp8: bool | str = False,
    fp8_recipe: str = "tensorwise",
    fp8_linears: str = "all",
    prefix: str = "optim",
) -> None:
    """One clear error for a lever setting that cannot work, before any training starts; ``prefix`` is the config
    node the error names (``adapt.optim``)."""
    if not (isinstance(fp8, bool) or fp8 == "emulate"):
        raise AfptError(f"{prefix}.fp8 must be false, true or 'emulate', got {fp8!r}")
    if fp8_recipe not in FP8_RECIPES:
        raise AfptError(f"{prefix}.fp8_recipe must be one of {FP8_RECIPES}, got {fp8_recipe!r}")
    if fp8_linears not in FP8_LINEARS:
        raise AfptError(f"{prefix}.fp8_linears must be one of {FP8_LINEARS}, got {fp8_linears!r}")
    if fp8_linears == "auto" and fp8_recipe == "rowwise_with_gw_hp":
        raise AfptError(f"{prefix}.fp8_linears=auto has no torchao filter for fp8_recipe=rowwise_with_gw_hp: use all")
    for key, value, default in (("fp8_recipe", fp8_recipe, "tensorwise"), ("fp8_linears", fp8_linears, "all")):
        if value != default and not fp8:
            log.warning("%s.%s=%s has no effect: %s.fp8 is false", prefix, key, value, prefix)
    if fp8 and importlib.util.find_spec("torchao") is None:
        raise AfptError(f"{prefix}.fp8 needs torchao: pip install -e '.[fp8]' (torchao 0.18)")
    if loss not in LOSSES:
        raise AfptError(f"{prefix}.loss must be one of {LOSSES}, got {loss!r}")
    if loss != "hf" and importlib.util.find_spec("liger_kernel") is None:
        raise AfptError(f"{prefix}.loss={loss} needs liger-kernel (CUDA only): pip install liger-kernel")
    if not isinstance(compile, bool) and compile != "auto":
        raise AfptError(f"{prefix}.compile must be true, false or 'auto', got {compile!r}")
    if compile_mode not in COMPILE_MODES:
        raise AfptError(f"{prefix}.compile_mode must be one of {COMPILE_MODES}, got {compile_mode!r}")
    if compile_options:
        import torch._inductor.config as inductor_config

        if compile_mode != "default":
            raise AfptError(
                f"{prefix}.compile_options and {prefix}.compile_mode={compile_mode!r} cannot both be set: "
                "torch.compile takes a mode or options"
            )
        unknown = sorted(k for k in compile_options if not hasattr(inductor_config, k))
        if unknown:
            raise AfptError(f"{prefix}.compile_options: {unknown} are not torch._inductor.config options")
    if sdpa_backend is not None and sdpa_backend not in SDPA_BACKENDS:
        raise AfptError(f"{prefix}.sdpa_backend must be null or one of {sorted(SDPA_BACKENDS)}, got {sdpa_backend!r}")


def activation_checkpointing_on(model: PreTrainedModel) -> bool:
    """Whether the model recomputes activations (the attribute's name changed in transformers 5.2x)."""
    if hasattr(model, "is_activation_checkpointing"):
        return bool(model.is_activation_checkpointing)
    return bool(model.is_gradient_checkpointing)


def enable_activation_checkpointing(model: PreTrainedModel) -> None:
    """Hugging Face activation (gradient) checkpointing of every decoder layer, non-reentrant."""
    if activation_checkpointing_on(model):
        return
    enable = getattr(model, "activation_checkpointing_enable", None)  # newer transformers
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _scaled_mm_shape(linear: nn.Linear, _fqn: str) -> bool:
    return linear.in_features % 16 == 0 and linear.out_features % 16 == 0


def fp8_linears(model: nn.Module, which: str = "all", recipe: str = "tensorwise") -> set[int]:
    """The ids of the ``nn.Linear`` modules FP8 training converts, all inside the decoder layers (the embedding
    and the head stay bf16): ``which="all"``: those whose dimensions are multiples of 16 (what
    ``torch._scaled_mm`` takes); ``"auto"``: those torchao's filter for ``recipe`` keeps (it also leaves out
    shapes too small for FP8 to pay)."""
    keep = _scaled_mm_shape
    if which == "auto":
        from torchao.float8 import _auto_filter_for_recipe

        keep = _auto_filter_for_recipe(recipe, filter_fqns=[])
    return {
        id(m) for layer in decoder_layers(model) for m in layer.modules() if isinstance(m, nn.Linear) and keep(m, "")
    }


def convert_to_fp8(
    model: nn.Module, mode: bool | str, device: torch.device, recipe: str = "tensorwise", which: str = "all"
) -> int:
    """Swap the decoder layers' linears that ``which`` picks (``fp8_linears``) for torchao's ``Float8Linear``
    (dynamic casts, scaled by torchao's ``recipe``: one scale per tensor, or per row); ``mode='emulate'`` runs
    the casts in emulation (any device, slow: for tests). Returns how many were swapped.

    Refuses, with one clear error, a device without FP8 tensor cores and a model with nothing to convert.
    """
    if mode != "emulate":
        if device.type != "cuda":
            raise AfptError(f"optim.fp8=true needs a CUDA GPU with FP8 support; the trainer runs on {device.type}")
        capability = torch.cuda.get_device_capability(device)
        if capability < FP8_MIN_CAPABILITY:
            raise AfptError(
                f"optim.fp8=true needs FP8 tensor cores (compute capability >= 8.9: Ada, Hopper or newer); "
                f"{torch.cuda.get_device_name(device)} has {capability[0]}.{capability[1]}"
            )
        if recipe != "tensorwise" and capability < ROWWISE_MIN_CAPABILITY:
            raise AfptError(
                f"optim.fp8_recipe={recipe} needs rowwise-scaled FP8 GEMMs (compute capability >= 9.0: Hopper or "
                f"newer); {torch.cuda.get_device_name(device)} has {capability[0]}.{capability[1]}: use tensorwise"
            )
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    chosen = fp8_linears(model, which, recipe)
    if not chosen:
        kept = "large enough for torchao's filter" if which == "auto" else "with dimensions divisible by 16"
        raise AfptError(
            f"optim.fp8: {type(model).__name__} has no nn.Linear {kept} in its decoder layers "
            "(GPT-2 uses Conv1D): nothing to train in FP8"
        )
    config = dataclasses.replace(Float8LinearConfig.from_recipe_name(recipe), emulate=mode == "emulate")
    convert_to_float8_training(model, module_filter_fn=lambda m, _: id(m) in chosen, config=config)
    return len(chosen)


class ModelTransforms:
    """The speed levers as transforms of the model, applied in one place (``apply``, from the module's
    ``configure_model``), each once: FP8 linears, rotary tables, the afpt_sdpa attention, the liger loss,
    activation checkpointing, FSDP2 sharding and torch.compile. What they produce the module reads here:
    ``liger`` (the liger loss object) and ``compiled_loss`` (the compiled ``loss=hf`` function)."""

    def __init__(self) -> None:
        self.fp8_linears = 0
        self.liger: Any = None
        self.compiled_loss: Any = None
        self.sharded = False
        self.compiled = False

    def apply(self, module: Any, compiles: bool) -> None:
        """Transform ``module.model`` by ``module.hparams``' levers (the ones not applied yet)."""
        hp, model = module.hparams, module.model
        if hp.get("fp8") and not self.fp8_linears:
            recipe, which = hp.get("fp8_recipe", "tensorwise"), hp.get("fp8_linears", "all")
            self.fp8_linears = convert_to_fp8(model, hp.fp8, module.trainer.strategy.root_device, recipe, which)
        if hp.rotary_tables:
            use_rotary_tables(model)
        attention = getattr(model.config, "_attn_implementation", None)
        if attention == "sdpa" and compiles:
            # Keep sdpa's unmasked causal path (flash / cuDNN kernels) under torch.compile.
            model.set_attn_implementation(CAUSAL_SDPA)
            attention = CAUSAL_SDPA
        if hp.sdpa_backend is not None and attention not in ("sdpa", CAUSAL_SDPA):
            raise AfptError(
                f"optim.sdpa_backend={hp.sdpa_backend!r} pins a kernel of sdpa attention, but the model "
                f"uses {attention!r}; set model.attn_implementation=sdpa"
            )
        if hp.loss != "hf" and self.liger is None:
            from liger_kernel.transformers import LigerCrossEntropyLoss, LigerFusedLinearCrossEntropyLoss

            self.liger = (LigerFusedLinearCrossEntropyLoss if hp.loss == "fused_linear_ce" else LigerCrossEntropyLoss)()
        if hp.activation_checkpointing:
            enable_activation_checkpointing(model)
        if module.device_mesh is not None and not self.sharded:
            # ModelParallelStrategy (trainer=fsdp2): FSDP2 shards over the data-parallel mesh dimension.
            bf16 = str(module.trainer.precision) == "bf16-mixed"
            options = getattr(module.trainer.strategy, "shard_options", {})
            fully_shard_model(model, module.device_mesh["data_parallel"], bf16, **options)
            self.sharded = True
        if compiles and not self.compiled:
            self.compile(module, model)

    def compile(self, module: Any, model: nn.Module) -> None:
        """torch.compile: the ``loss=hf`` function whole (one graph from tokens to loss), else the model in place."""
        hp = module.hparams
        if layout(module.trainer) != "replicated":
            # FSDP's hooks break the graph inside the decoder's layer loop, so torch.compile runs that
            # loop eagerly and compiles each layer as a frame of its own: one guarded entry per layer
            # instance (and per grad mode, for validation). Past the recompile limit (default 8) the
            # remaining layers would silently run uncompiled.
            needed = 2 * len(decoder_layers(model)) + 8
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, needed)
        options = dict(hp.compile_options or {})
        how = {"mode": None if options else hp.compile_mode, "options": options or None}
        if hp.loss == "hf" and module.device_mesh is None:
            # One graph from tokens to loss, whose only differentiable output is the loss. A compiled
            # model would also output the logits, and autograd would fill a zero gradient for them
            # (a logits-sized write, and a read in the loss's backward, every step). Under FSDP2 the
            # model compiled in place measured faster.
            self.compiled_loss = torch.compile(module._hf_loss, **how)
        else:  # the fused loss calls the decoder body directly, so that is what gets compiled
            (model.base_model if hp.loss == "fused_linear_ce" else model).compile(**how)
        self.compiled = True


def liger_loss(module: Any, batch: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """The mean next-token loss through liger-kernel: ``fused_linear_ce`` (head matmul and cross-entropy in
    chunks, the logits never materialised) or ``liger_ce`` (its cross-entropy kernel on the full logits)."""
    model, mask = module.model, batch.get("attention_mask")
    if module.hparams.loss == "fused_linear_ce":
        hidden = model.base_model(input_ids=batch["input_ids"], attention_mask=mask, use_cache=False).last_hidden_state
        head = model.get_output_embeddings()
        return module.transforms.liger(
            head.weight,
            hidden[:, :-1].reshape(-1, hidden.shape[-1]),
            labels[:, 1:].reshape(-1),
            getattr(head, "bias", None),
        )
    logits = model(input_ids=batch["input_ids"], attention_mask=mask, use_cache=False).logits
    # Position t predicts token t + 1; the last position predicts nothing. Shifting the labels, not
    # slicing the logits, keeps the logits contiguous (no copy).
    targets = nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    return module.transforms.liger(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def pin_sdpa_kernel(backend: str | None) -> contextlib.ExitStack | None:
    """Hold ``scaled_dot_product_attention`` to one kernel until the returned stack is closed (None: no pin).

    Held for the whole run: backward passes and activation recomputation use the same kernel.
    """
    if backend is None:
        return None
    stack = contextlib.ExitStack()
    stack.enter_context(sdpa_kernel(SDPA_BACKENDS[backend]))
    return stack
