"""Re-initialising the embeddings: the pure functions (fresh values, zeroed optimizer state) and ``EmbeddingReset``,
one reset of a LightningModule's embeddings (and head, by policy) on any strategy.
"""

from __future__ import annotations

import time

import torch
from lightning.pytorch import LightningModule, Trainer
from torch import nn

from afpt.models import find_model, is_tied
from afpt.pretrain.rows import AllRows, BernoulliRows, FractionOfRows, blend_rows, reset_optimizer_rows_
from afpt.pretrain.seeding import reset_seed
from afpt.speed.distributed import assign_full, full_parameters, full_value, local, verify_reset

INITS = ("normal", "mean_std")
MEAN_STD_SCOPES = ("matrix", "dim")
HEAD_POLICIES = ("auto", "always", "never")
RESET_NAMES = ("embedding", "head_weight", "head_bias")


@torch.no_grad()
def reinitialize_(
    weight: torch.Tensor,
    generator: torch.Generator,
    init: str = "normal",
    std: float = 0.02,
    pad_token_id: int | None = None,
    mean_std_scope: str = "matrix",
) -> None:
    """Overwrite ``weight`` in place with fresh values; the padding row, if given, becomes zero.

    ``normal`` draws N(0, std); ``mean_std`` draws from the current mean and std: one scalar pair over the
    whole matrix (``mean_std_scope="matrix"``, Chen et al.'s code) or one pair per dimension (``"dim"``).
    """
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; expected one of {INITS}")
    if mean_std_scope not in MEAN_STD_SCOPES:
        raise ValueError(f"unknown mean_std_scope {mean_std_scope!r}; expected one of {MEAN_STD_SCOPES}")
    noise = torch.randn(weight.shape, generator=generator, device=generator.device, dtype=torch.float32)
    noise = noise.to(weight.device)
    if init == "normal":
        values = noise * std
    elif mean_std_scope == "matrix":
        current = weight.float()
        values = current.mean() + current.std() * noise
    else:
        current = weight.float()
        values = current.mean(dim=0) + current.std(dim=0) * noise
    if pad_token_id is not None and weight.dim() == 2:
        values[pad_token_id] = 0
    weight.copy_(values)


@torch.no_grad()
def reset_optimizer_state_(optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> None:
    """Zero every state entry (moments and step) of exactly ``params``, keeping tensors in place."""
    for param in params:
        state = optimizer.state.get(param)
        if not state:
            continue
        for key, value in state.items():
            if torch.is_tensor(value):
                value.zero_()
            elif isinstance(value, (int, float)):
                state[key] = type(value)(0)


class EmbeddingReset:
    """One reset of the input embeddings (and an untied head when ``head == "always"``): fresh values drawn from the
    (seed, reset index, tensor name) generator, on the rows ``rows`` selects, and their optimizer state zeroed.

    Works on whole tensors (single device, DDP), FSDP flat shards (through ``summon_full_params``) and FSDP2
    ``DTensor`` shards: every rank draws the same full tensor and keeps its own shard. With ``check_sync`` the
    drawn values are kept until ``verify`` checks every rank against them.
    """

    def __init__(
        self,
        init: str,
        std: float | None,
        head: str,
        pad_token_id: int | str | None,
        mean_std_scope: str,
        rows: AllRows | FractionOfRows | BernoulliRows,
        check_sync: bool = False,
    ) -> None:
        self.init, self.std, self.head, self.pad_token_id = init, std, head, pad_token_id
        self.mean_std_scope, self.rows, self.check_sync = mean_std_scope, rows, check_sync
        self._pending: tuple | None = None

    def parameters(self, pl_module: LightningModule) -> list[nn.Parameter]:
        """The parameters one reset re-initialises, without duplicates (a tied head counts once)."""
        model = find_model(pl_module)
        params = [model.get_input_embeddings().weight]
        if self.head == "always" and not is_tied(model):
            head = model.get_output_embeddings()
            params += [head.weight] + ([head.bias] if getattr(head, "bias", None) is not None else [])
        return params

    def fresh_value(
        self, param: torch.Tensor, name: str, seed: int, reset_index: int, model: nn.Module
    ) -> torch.Tensor:
        """The full new value of ``param``, drawn from the (seed, reset index, name) generator: same on every rank."""
        device = local(param).device
        value = torch.zeros(param.shape, dtype=param.dtype, device=device)
        if param.dim() == 1:
            return value
        if self.init == "mean_std":
            value.copy_(full_value(param))
        config = getattr(model, "config", None)
        generator = torch.Generator(device=device).manual_seed(reset_seed(seed, reset_index, name))
        std = self.std if self.std is not None else float(getattr(config, "initializer_range", 0.02) or 0.02)
        pad = self.pad_token_id if self.pad_token_id != "auto" else getattr(config, "pad_token_id", None)
        reinitialize_(value, generator, self.init, std, pad if name == "embedding" else None, self.mean_std_scope)
        return value

    @torch.no_grad()
    def __call__(self, trainer: Trainer, pl_module: LightningModule, seed: int, reset_index: int) -> int:
        """Reset the parameters (or the selected rows) and zero their optimizer state; how many rows were reset."""
        model = find_model(pl_module)
        n_rows = model.get_input_embeddings().weight.shape[0]
        rows = self.rows.draw(n_rows, seed, reset_index)
        with full_parameters(trainer, writeback=True):
            params = self.parameters(pl_module)
            values = [self.fresh_value(p, n, seed, reset_index, model) for n, p in zip(RESET_NAMES, params)]
            if rows is not None:  # keep every row but the drawn ones
                values = [blend_rows(full_value(p).detach(), v, rows) for p, v in zip(params, values)]
            for param, value in zip(params, values):
                assign_full(param, value)
        params = self.parameters(pl_module)
        for optimizer in trainer.optimizers:
            if rows is None:
                reset_optimizer_state_(optimizer, params)
            else:
                reset_optimizer_rows_(optimizer, params, rows)
        if self.check_sync and trainer.world_size > 1:
            self._pending = (values, rows)
        return n_rows if rows is None else len(rows)

    def verify(self, trainer: Trainer, pl_module: LightningModule) -> float | None:
        """Check every rank against the values of the reset just made (``check_sync``); its milliseconds, or None
        if there was nothing to check."""
        if self._pending is None:
            return None
        start = time.perf_counter()
        values, rows = self._pending
        verify_reset(trainer, pl_module, self.parameters(pl_module), values, rows)
        self._pending = None
        return 1000 * (time.perf_counter() - start)
