"""The ``optim`` group as a typed config: AdamW, its learning-rate schedule and the speed levers, checked once."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import InitVar, dataclass, field
from typing import Any

import torch

from afpt.errors import AfptError, check_number
from afpt.pretrain.schedule import DECAYS, lr_factor
from afpt.speed.levers import check_levers


@dataclass(frozen=True)
class OptimConfig:
    """What ``conf/optim/*.yaml`` builds (its ``_target_``): every setting checked when the object is made.

    ``where`` (not stored) is the config node that errors name: ``optim``, or ``adapt.optim`` /
    ``instruct.optim`` for a stage's settings over the group's. ``CausalLMModule`` takes these fields as its
    keyword arguments (its checkpoint's hyperparameters); ``build`` makes the optimizer and its schedule.
    """

    lr: float = 3e-4
    embedding_lr: float | None = None
    weight_decay: float = 0.1
    embedding_weight_decay: float = 0.0
    betas: Sequence[float] = (0.9, 0.95)
    eps: float = 1e-8
    warmup_fraction: float = 0.1
    decay: str = "cosine"
    min_lr_ratio: float = 0.1
    total_steps: int | None = None
    fused: bool | None = None
    compile: bool | str = "auto"
    compile_mode: str = "default"
    compile_options: Mapping[str, Any] | None = None
    grad_clip: float | None = 1.0
    loss: str = "hf"
    sdpa_backend: str | None = None
    activation_checkpointing: bool = False
    rotary_tables: bool = True
    fp8: bool | str = False
    fp8_recipe: str = "tensorwise"
    fp8_linears: str = "all"
    dynamic_length: bool = False
    where: InitVar[str] = field(default="optim")

    @classmethod
    def from_options(cls, where: str = "optim", **options: Any) -> OptimConfig:
        """Build from settings by name (the ``_target_``): an unknown name is one clear error listing the known."""
        names = sorted(cls.names())
        unknown = sorted(set(options) - set(names))
        if unknown:
            raise AfptError(f"{where}.{unknown[0]} is not an optim setting; expected one of {names}")
        return cls(**options, where=where)

    @classmethod
    def names(cls) -> list[str]:
        """The settings' names."""
        return [f.name for f in dataclasses.fields(cls)]

    def as_kwargs(self) -> dict[str, Any]:
        """The settings by name (``CausalLMModule``'s keyword arguments)."""
        return {name: getattr(self, name) for name in self.names()}

    def __post_init__(self, where: str) -> None:
        check_levers(
            self.loss, self.compile, self.compile_mode, self.compile_options, self.sdpa_backend, self.fp8,
            self.fp8_recipe, self.fp8_linears, where,
        )  # fmt: skip
        if self.decay not in DECAYS:
            raise AfptError(f"{where}.decay must be one of {DECAYS}, got {self.decay!r}")
        check_number(f"{where}.lr", self.lr, above=0)
        check_number(f"{where}.eps", self.eps, above=0)
        check_number(f"{where}.weight_decay", self.weight_decay, least=0)
        check_number(f"{where}.embedding_weight_decay", self.embedding_weight_decay, least=0)
        check_number(f"{where}.warmup_fraction", self.warmup_fraction, least=0, most=1)
        check_number(f"{where}.min_lr_ratio", self.min_lr_ratio, least=0, most=1)
        for key in ("embedding_lr", "grad_clip"):
            if getattr(self, key) is not None:
                check_number(f"{where}.{key}", getattr(self, key), above=0)
        if self.total_steps is not None:
            check_number(f"{where}.total_steps", self.total_steps, least=1, integer=True)
        betas = self.betas
        if isinstance(betas, str) or not (isinstance(betas, Sequence) and len(betas) == 2):
            raise AfptError(f"{where}.betas must be two numbers in [0, 1), got {betas!r}")
        for beta in betas:
            check_number(f"{where}.betas", beta, least=0, below=1)

    def build(
        self, param_groups: list[dict[str, Any]], total_steps: int, device: torch.device, precision: str
    ) -> dict[str, Any]:
        """AdamW over ``param_groups`` (fused on CUDA unless ``fused`` says otherwise) and its warmup + decay
        schedule, stepped every optimizer step, as Lightning's ``configure_optimizers`` returns them."""
        fp16 = precision.startswith("16")
        fused = self.fused if self.fused is not None else (device.type == "cuda" and not fp16)
        if fused and fp16 and self.grad_clip:
            raise AfptError(
                "optim.fused=true with trainer.precision=16-mixed cannot clip unscaled gradients; "
                "set optim.fused=false, optim.grad_clip=null, or use bf16-mixed"
            )
        optimizer = torch.optim.AdamW(param_groups, lr=self.lr, betas=tuple(self.betas), eps=self.eps, fused=fused)
        total = int(self.total_steps or total_steps)
        warmup = int(self.warmup_fraction * total)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(step, total, warmup, self.min_lr_ratio, self.decay)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
