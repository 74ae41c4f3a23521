"""The LightningModule that trains any Hugging Face causal decoder."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torchmetrics import MeanMetric
from transformers import PreTrainedModel

from afpt.errors import AfptError
from afpt.models import ModelConfig, build_model, load_model, untied_head
from afpt.pretrain.optim import OptimConfig
from afpt.speed.attention import one_sequence_per_row
from afpt.speed.distributed import full_value, layout
from afpt.speed.levers import ModelTransforms, liger_loss, pin_sdpa_kernel


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
        compile, compile_mode, compile_options, loss, sdpa_backend, activation_checkpointing, rotary_tables, fp8,
        fp8_recipe, fp8_linears:
            the speed levers (``afpt.speed.levers``). ``compile``: ``torch.compile`` the loss computation
            (``"auto"``: when the trainer runs on CUDA); ``compile_mode`` or inductor ``compile_options``;
            ``loss``: ``hf`` (the model's own), ``liger_ce`` or ``fused_linear_ce`` (liger-kernel, CUDA only);
            ``sdpa_backend``: pin one sdpa kernel (``flash``, ``cudnn``, ``efficient``, ``math``);
            ``activation_checkpointing``: recompute each decoder layer in the backward pass;
            ``rotary_tables``: rotary cos/sin from a table computed once (exact);
            ``fp8``: the decoder layers' linears in FP8 (torchao float8; ``"emulate"``: emulated, any device),
            scaled by torchao's ``fp8_recipe`` (``tensorwise``, ``rowwise``, ``rowwise_with_gw_hp``);
            ``fp8_linears``: ``all`` of them, or ``auto``: those torchao's size filter keeps.
        dynamic_length: batches vary in length (right-padded instruction batches): a compiled model traces the
            sequence length as a symbol from the first batch, one graph for every width instead of a graph for
            the first width and a second, dynamic one when the next differs.
        grad_clip: max global gradient norm, applied by the module (Lightning's own
            ``gradient_clip_val`` refuses fused optimizers); ``None`` turns clipping off.
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
        fp8: bool | str = False,
        fp8_recipe: str = "tensorwise",
        fp8_linears: str = "all",
        dynamic_length: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["model"])
        self.optim = OptimConfig.from_options(**{k: v for k, v in self.hparams.items() if k in OptimConfig.names()})
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
        self.transforms = ModelTransforms()

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
        self.transforms.apply(self, self.compiles())

    def setup(self, stage: str) -> None:
        """Pin the attention kernel (until ``teardown``); create one validation metric per language."""
        if self._sdpa_pin is None:
            self._sdpa_pin = pin_sdpa_kernel(self.hparams.sdpa_backend)
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
        if self.hparams.dynamic_length:
            for tensor in (batch["input_ids"], labels):
                torch._dynamo.maybe_mark_dynamic(tensor, 1)
        n_tokens = (labels[:, 1:] != -100).sum()
        if self.hparams.loss != "hf":
            return liger_loss(self, batch, labels), n_tokens
        loss = self.transforms.compiled_loss or self._hf_loss
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
        return adamw_param_groups(self.model, hp.lr, hp.embedding_lr, hp.weight_decay, hp.embedding_weight_decay)

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW (fused on CUDA by default) with warmup and decay, stepped every optimizer step."""
        return self.optim.build(
            self.param_groups(), self.trainer.estimated_stepping_batches, self.device, str(self.trainer.precision)
        )


def adamw_param_groups(
    model: PreTrainedModel, lr: float, embedding_lr: float | None, weight_decay: float, embedding_weight_decay: float
) -> list[dict[str, Any]]:
    """AdamW groups of the trainable parameters: ``embeddings`` (the input embedding and a tied head, so
    forgetting can address them), ``head`` (an untied head), ``decay`` (other matrices), ``no_decay``."""
    embedding = model.get_input_embeddings().weight
    head_module = untied_head(model)
    head = None if head_module is None else head_module.weight
    groups: dict[str, list[nn.Parameter]] = {"embeddings": [], "head": [], "decay": [], "no_decay": []}
    for param in model.parameters():
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
        "embeddings": {"lr": embedding_lr or lr, "weight_decay": embedding_weight_decay},
        "head": {"lr": lr, "weight_decay": weight_decay},
        "decay": {"lr": lr, "weight_decay": weight_decay},
        "no_decay": {"lr": lr, "weight_decay": 0.0},
    }
    return [{"name": name, "params": params, **settings[name]} for name, params in groups.items() if params]
