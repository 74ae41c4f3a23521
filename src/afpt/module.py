"""The LightningModule that trains any Hugging Face causal decoder."""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torchmetrics import MeanMetric
from transformers import PreTrainedModel

from afpt.distributed import decoder_layers, full_value, fully_shard_model, layout
from afpt.errors import AfptError
from afpt.models import CAUSAL_SDPA, ModelConfig, build_model, load_model, one_sequence_per_row, use_rotary_tables
from afpt.schedule import DECAYS, lr_factor

LOSSES = ("hf", "liger_ce", "fused_linear_ce")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
SDPA_BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}


def activation_checkpointing_on(model: PreTrainedModel) -> bool:
    """Whether the model recomputes activations (the attribute's name changed in transformers 5.2x)."""
    if hasattr(model, "is_activation_checkpointing"):
        return bool(model.is_activation_checkpointing)
    return bool(model.is_gradient_checkpointing)


class CausalLMModule(pl.LightningModule):
    """Next-token training of a Hugging Face decoder, with the embeddings in their own param group.

    Param groups: ``embeddings`` (input embedding and a tied head), ``head`` (an untied head),
    ``decay`` (other matrices) and ``no_decay`` (norms, biases). Active forgetting addresses the
    ``embeddings`` group; ``embedding_lr`` gives it its own peak learning rate.

    Args:
        model: any ``PreTrainedModel`` with a causal LM head; or a saved model directory (safetensors);
            or a ``ModelConfig`` mapping (``{family: llama, hidden_size: ...}``), built in
            ``configure_model`` for the datamodule's ``tokenizer`` (how ``afpt-lightning`` builds models).
        lr: peak learning rate. ``embedding_lr``: peak for the embeddings group (default ``lr``).
        weight_decay: for ``decay`` and ``head``; ``embedding_weight_decay`` for the embeddings.
        warmup_fraction, decay, min_lr_ratio: linear warmup, then cosine/linear/constant decay.
        total_steps: length of the schedule; default: the trainer's estimated stepping batches.
        fused: fused AdamW; ``None`` uses it on CUDA.
        compile: ``torch.compile`` the loss computation: for ``loss=hf`` one graph from tokens to loss,
            with the loss its only output (so no zero gradient is filled for the logits); under FSDP2
            (measured faster) and for the liger losses, the model (or its decoder body) in place, after
            sharding. State-dict keys are unchanged.
            ``"auto"``: compile when the trainer runs on CUDA. A compiled sdpa model trains as ``afpt_sdpa``
            (``afpt.models.causal_sdpa_mask``: no mask for plain causal rows).
        compile_mode: ``torch.compile`` mode: ``default``, ``reduce-overhead`` (CUDA graphs),
            ``max-autotune`` or ``max-autotune-no-cudagraphs``.
        compile_options: inductor options for ``torch.compile(options=...)`` (e.g.
            ``{coordinate_descent_tuning: true}``), instead of a ``compile_mode``.
        grad_clip: max global gradient norm, applied by the module (Lightning's own
            ``gradient_clip_val`` refuses fused optimizers); ``None`` turns clipping off.
        loss: ``hf`` (the model's own loss on full logits, compiled with the model), ``liger_ce``
            (liger-kernel's cross-entropy kernel on the full bf16 logits, which writes their gradient in
            place; CUDA only) or ``fused_linear_ce`` (liger-kernel's fused head matmul + cross-entropy in
            chunks, so the logits are never materialised; CUDA only).
        sdpa_backend: pin ``scaled_dot_product_attention`` to one kernel (``flash``, ``cudnn``,
            ``efficient``, ``math``) for models with ``attn_implementation=sdpa``; ``None``: PyTorch chooses.
        activation_checkpointing: recompute each decoder layer's activations in the backward pass
            (Hugging Face gradient checkpointing, non-reentrant): less memory, about a third more compute.
        rotary_tables: serve rotary cos/sin from a table computed once (``afpt.models.RotaryTable``)
            instead of recomputing them every step; exact, and faster compiled on GPU.
    """

    def __init__(
        self,
        model: PreTrainedModel | str | dict[str, Any],
        lr: float = 3e-4,
        embedding_lr: float | None = None,
        weight_decay: float = 0.1,
        embedding_weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        warmup_fraction: float = 0.1,
        decay: str = "cosine",
        min_lr_ratio: float = 0.1,
        total_steps: int | None = None,
        fused: bool | None = None,
        compile: bool | str = "auto",
        compile_mode: str = "default",
        compile_options: Mapping[str, Any] | None = None,
        grad_clip: float | None = 1.0,
        loss: str = "hf",
        sdpa_backend: str | None = None,
        activation_checkpointing: bool = False,
        rotary_tables: bool = True,
    ) -> None:
        super().__init__()
        if loss not in LOSSES:
            raise AfptError(f"optim.loss must be one of {LOSSES}, got {loss!r}")
        if loss != "hf" and importlib.util.find_spec("liger_kernel") is None:
            raise AfptError(f"optim.loss={loss} needs liger-kernel (CUDA only): pip install liger-kernel")
        if not isinstance(compile, bool) and compile != "auto":
            raise AfptError(f"optim.compile must be true, false or 'auto', got {compile!r}")
        if compile_mode not in COMPILE_MODES:
            raise AfptError(f"optim.compile_mode must be one of {COMPILE_MODES}, got {compile_mode!r}")
        if compile_options:
            import torch._inductor.config as inductor_config

            if compile_mode != "default":
                raise AfptError(
                    f"optim.compile_options and optim.compile_mode={compile_mode!r} cannot both be set: "
                    "torch.compile takes a mode or options"
                )
            unknown = sorted(k for k in compile_options if not hasattr(inductor_config, k))
            if unknown:
                raise AfptError(f"optim.compile_options: {unknown} are not torch._inductor.config options")
        if sdpa_backend is not None and sdpa_backend not in SDPA_BACKENDS:
            raise AfptError(f"optim.sdpa_backend must be null or one of {sorted(SDPA_BACKENDS)}, got {sdpa_backend!r}")
        if decay not in DECAYS:
            raise ValueError(f"optim.decay must be one of {DECAYS}, got {decay!r}")
        if lr <= 0:
            raise ValueError(f"optim.lr must be positive, got {lr!r}")
        self.save_hyperparameters(ignore=["model"])
        self.model_spec = None
        if isinstance(model, str):
            model = load_model(model)
        elif isinstance(model, Mapping):
            self.model_spec, model = ModelConfig.from_mapping(dict(model)), None
        elif not isinstance(model, PreTrainedModel):
            raise AfptError(
                f"model must be a PreTrainedModel, a model directory or a ModelConfig mapping, got {model!r}"
            )
        # from_pretrained returns eval mode; Lightning keeps modes as found.
        self.model = model.train() if model is not None else None
        self.val_loss = MeanMetric()
        self.val_loss_per_language = nn.ModuleDict()
        self.val_names: list[str] = []
        self._sdpa_pin: contextlib.ExitStack | None = None

    def compiles(self) -> bool:
        """Whether the model is compiled: ``compile`` as given, or for ``"auto"`` when running on CUDA."""
        if self.hparams.compile == "auto":
            return self.trainer.strategy.root_device.type == "cuda"
        return self.hparams.compile

    def configure_model(self) -> None:
        """Build a model given as a config (for the datamodule's tokenizer); compile it in place when asked."""
        if self.model is None:
            tokenizer = getattr(self.trainer.datamodule, "tokenizer", None)
            if tokenizer is None:
                raise AfptError("a model given as a config needs a datamodule with a `tokenizer` (CorpusDataModule)")
            special = {k: getattr(tokenizer, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
            self.model = build_model(self.model_spec, len(tokenizer), special).train()
        if self.hparams.rotary_tables:
            use_rotary_tables(self.model)
        attention = getattr(self.model.config, "_attn_implementation", None)
        if attention == "sdpa" and self.compiles():
            # Keep sdpa's unmasked causal path (flash / cuDNN kernels) under torch.compile.
            self.model.set_attn_implementation(CAUSAL_SDPA)
            attention = CAUSAL_SDPA
        if self.hparams.sdpa_backend is not None and attention not in ("sdpa", CAUSAL_SDPA):
            raise AfptError(
                f"optim.sdpa_backend={self.hparams.sdpa_backend!r} pins a kernel of sdpa attention, but the model "
                f"uses {attention!r}; set model.attn_implementation=sdpa"
            )
        if self.hparams.loss == "fused_linear_ce" and not hasattr(self, "_fused_ce"):
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

            self._fused_ce = LigerFusedLinearCrossEntropyLoss()
        if self.hparams.loss == "liger_ce" and not hasattr(self, "_liger_ce"):
            from liger_kernel.transformers import LigerCrossEntropyLoss

            self._liger_ce = LigerCrossEntropyLoss()
        if self.hparams.activation_checkpointing and not activation_checkpointing_on(self.model):
            enable = getattr(self.model, "activation_checkpointing_enable", None)  # newer transformers
            if enable is not None:
                enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if self.device_mesh is not None and not getattr(self, "_sharded", False):
            # ModelParallelStrategy (trainer=fsdp2): FSDP2 shards over the data-parallel mesh dimension.
            bf16 = str(self.trainer.precision) == "bf16-mixed"
            options = getattr(self.trainer.strategy, "shard_options", {})
            fully_shard_model(self.model, self.device_mesh["data_parallel"], bf16, **options)
            self._sharded = True
        if self.compiles() and not getattr(self, "_compiled", False):
            if layout(self.trainer) != "replicated":
                # FSDP's hooks break the graph inside the decoder's layer loop, so torch.compile runs that
                # loop eagerly and compiles each layer as a frame of its own: one guarded entry per layer
                # instance (and per grad mode, for validation). Past the recompile limit (default 8) the
                # remaining layers would silently run uncompiled.
                needed = 2 * len(decoder_layers(self.model)) + 8
                torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, needed)
            options = dict(self.hparams.compile_options or {})
            how = {"mode": None if options else self.hparams.compile_mode, "options": options or None}
            if self.hparams.loss == "hf" and self.device_mesh is None:
                # One graph from tokens to loss, whose only differentiable output is the loss. A compiled
                # model would also output the logits, and autograd would fill a zero gradient for them
                # (a logits-sized write, and a read in the loss's backward, every step). Under FSDP2 the
                # model compiled in place measured faster.
                self._compiled_hf_loss = torch.compile(self._hf_loss, **how)
            else:  # the fused loss calls the decoder body directly, so that is what gets compiled
                (self.model.base_model if self.hparams.loss == "fused_linear_ce" else self.model).compile(**how)
            self._compiled = True

    def setup(self, stage: str) -> None:
        """Pin the attention kernel (until ``teardown``); create one validation metric per language."""
        if self.hparams.sdpa_backend is not None and self._sdpa_pin is None:
            # Held for the whole run: backward passes and activation recomputation use the same kernel.
            self._sdpa_pin = contextlib.ExitStack()
            self._sdpa_pin.enter_context(sdpa_kernel(SDPA_BACKENDS[self.hparams.sdpa_backend]))
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        self.val_names = list(getattr(datamodule, "val_names", None) or ["val"])
        for name in self.val_names:
            if name not in self.val_loss_per_language:
                self.val_loss_per_language[name] = MeanMetric()

    def teardown(self, stage: str) -> None:
        """Release the attention-kernel pin."""
        if self._sdpa_pin is not None:
            self._sdpa_pin.close()
            self._sdpa_pin = None

    def forward(self, input_ids: torch.Tensor, **kwargs: Any) -> Any:
        """Run the wrapped model."""
        return self.model(input_ids=input_ids, **kwargs)

    def _loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        # The model gets no position ids, so rows without a padding mask are single causal sequences.
        with one_sequence_per_row() if batch.get("attention_mask") is None else contextlib.nullcontext():
            return self._loss_of(batch)

    def _loss_of(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        labels = batch.get("labels", batch["input_ids"])
        n_tokens = (labels[:, 1:] != -100).sum()
        if self.hparams.loss == "fused_linear_ce":
            hidden = self.model.base_model(
                input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), use_cache=False
            ).last_hidden_state
            head = self.model.get_output_embeddings()
            loss = self._fused_ce(
                head.weight,
                hidden[:, :-1].reshape(-1, hidden.shape[-1]),
                labels[:, 1:].reshape(-1),
                getattr(head, "bias", None),
            )
            return loss, n_tokens
        if self.hparams.loss == "liger_ce":
            logits = self.model(
                input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), use_cache=False
            ).logits
            # Position t predicts token t + 1; the last position predicts nothing. Shifting the labels, not
            # slicing the logits, keeps the logits contiguous (no copy).
            targets = nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
            return self._liger_ce(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)), n_tokens
        loss = getattr(self, "_compiled_hf_loss", None) or self._hf_loss
        return loss(batch["input_ids"], batch.get("attention_mask"), labels), n_tokens

    def _hf_loss(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor
    ) -> torch.Tensor:
        # No KV cache (HF builds one by default, in training too): nothing is generated, and under FSDP each
        # compiled layer would guard on the cache's state.
        return self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, use_cache=False).loss

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Mean next-token loss over the batch; logs loss and perplexity, and shows the loss in the progress bar.

        The progress bar's ``loss`` is a host copy refreshed every ``trainer.log_every_n_steps`` batches:
        Lightning reads every progress-bar value after every batch, so a device tensor there would stall
        the host on the GPU once per step. The logger reads ``train/loss`` only when it writes.
        """
        loss, _ = self._loss(batch)
        # A copy: CUDA graphs (compile_mode=reduce-overhead) overwrite their outputs at the next replay.
        logged = loss.detach().clone()
        self.log("train/loss", logged, on_step=True, on_epoch=False)
        self.log("train/ppl", logged.exp(), on_step=True, on_epoch=False)
        if self.trainer.progress_bar_callback is not None and batch_idx % max(self.trainer.log_every_n_steps, 1) == 0:
            self.log("loss", logged.cpu(), prog_bar=True, logger=False, on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        """Accumulate the token-weighted loss per validation language."""
        loss, n_tokens = self._loss(batch)
        name = self.val_names[dataloader_idx] if dataloader_idx < len(self.val_names) else str(dataloader_idx)
        self.val_loss_per_language[name].update(loss.detach(), weight=n_tokens)
        self.val_loss.update(loss.detach(), weight=n_tokens)

    def on_validation_epoch_end(self) -> None:
        """Log loss and perplexity per language and over all validation tokens (of all ranks)."""
        # compute() already reduces over ranks, so sync_dist averages equal values: it only tells
        # Lightning that the logged value is global.
        for name, metric in self.val_loss_per_language.items():
            if metric.update_called:
                value = metric.compute()
                self.log(f"val/loss/{name}", value, sync_dist=True)
                self.log(f"val/ppl/{name}", value.exp(), sync_dist=True)
            metric.reset()
        if self.val_loss.update_called:
            value = self.val_loss.compute()
            self.log("val/loss", value, prog_bar=True, sync_dist=True)
            self.log("val/ppl", value.exp(), sync_dist=True)
        self.val_loss.reset()

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Clip the global gradient norm (gradients are already unscaled here, or never scaled)."""
        if self.hparams.grad_clip:
            wrapper = self.trainer.strategy.model
            if layout(self.trainer) == "fsdp":  # the norm of flat shards must be reduced across ranks
                norm = wrapper.clip_grad_norm_(self.hparams.grad_clip)
            else:  # plain tensors, or FSDP2 DTensors (reduced by clip_grad_norm_ itself)
                norm = full_value(torch.nn.utils.clip_grad_norm_(self.parameters(), self.hparams.grad_clip))
            self.log("train/grad_norm", norm, on_step=True, on_epoch=False)

    def param_groups(self) -> list[dict[str, Any]]:
        """AdamW groups: embeddings, untied head, decayed matrices, and undecayed vectors."""
        hp = self.hparams
        embedding = self.model.get_input_embeddings().weight
        head_module = self.model.get_output_embeddings()
        head = head_module.weight if head_module is not None and head_module.weight is not embedding else None
        groups: dict[str, list[nn.Parameter]] = {"embeddings": [], "head": [], "decay": [], "no_decay": []}
        for param in self.model.parameters():
            if not param.requires_grad:
                continue
            if param is embedding:
                groups["embeddings"].append(param)
            elif param is head:
                groups["head"].append(param)
            elif param.dim() >= 2:
                groups["decay"].append(param)
            else:
                groups["no_decay"].append(param)
        settings = {
            "embeddings": {"lr": hp.embedding_lr or hp.lr, "weight_decay": hp.embedding_weight_decay},
            "head": {"lr": hp.lr, "weight_decay": hp.weight_decay},
            "decay": {"lr": hp.lr, "weight_decay": hp.weight_decay},
            "no_decay": {"lr": hp.lr, "weight_decay": 0.0},
        }
        return [{"name": name, "params": params, **settings[name]} for name, params in groups.items() if params]

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW (fused on CUDA by default) with warmup and decay, stepped every optimizer step."""
        hp = self.hparams
        fp16 = str(self.trainer.precision).startswith("16")
        fused = hp.fused if hp.fused is not None else (self.device.type == "cuda" and not fp16)
        if fused and fp16 and hp.grad_clip:
            raise AfptError(
                "optim.fused=true with trainer.precision=16-mixed cannot clip unscaled gradients; "
                "set optim.fused=false, optim.grad_clip=null, or use bf16-mixed"
            )
        optimizer = torch.optim.AdamW(self.param_groups(), lr=hp.lr, betas=tuple(hp.betas), eps=hp.eps, fused=fused)
        total = int(hp.total_steps or self.trainer.estimated_stepping_batches)
        warmup = int(hp.warmup_fraction * total)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(step, total, warmup, hp.min_lr_ratio, hp.decay)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
