"""Probabilistic temporary forgetting (Anand et al. 2024, arXiv 2406.00053): per-step token-embedding swaps.

During the first ``stop_after_steps`` optimizer steps, every token of the vocabulary is, with probability ``p``,
shown to the model as a fresh N(0, std) vector instead of its stored embedding, for that step's forward and
backward only. The stored embedding, its optimizer state and every other parameter are never overwritten, so
nothing has to be restored: the swap lives in a forward hook on the input embedding. Unlike the every-K resets of
``ActiveForgetting`` it forgets nothing for good; it keeps the body from relying on any one token's vector.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn
from torch.utils.hooks import RemovableHandle

from afpt.errors import AfptError
from afpt.models import find_model
from afpt.pretrain.forgetting import reset_seed


def check_swap_options(probability: float, stop_after_steps: int, std: float | None) -> None:
    """One clear error, naming the ``forgetting.*`` key, for an option the swap cannot use."""
    if isinstance(probability, bool) or not isinstance(probability, (int, float)) or not 0 < probability < 1:
        raise AfptError(f"forgetting.probability must be in (0, 1), got {probability!r}")
    if isinstance(stop_after_steps, bool) or not isinstance(stop_after_steps, int) or stop_after_steps <= 0:
        raise AfptError(f"forgetting.stop_after_steps must be a positive integer, got {stop_after_steps!r}")
    if std is not None and (isinstance(std, bool) or not isinstance(std, (int, float)) or std <= 0):
        raise AfptError(f"forgetting.std must be null or positive, got {std!r}")


@torch.no_grad()
def swap_draw(
    n_rows: int, dim: int, probability: float, std: float, seed: int, step: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The swap of optimizer step ``step``: a per-row mask (each row with ``probability``) and a fresh N(0, std)
    vector per row, from a generator seeded by (seed, step): the same on every rank and after a resume."""
    generator = torch.Generator(device=device).manual_seed(reset_seed(seed, step, "swap"))
    mask = torch.rand(n_rows, generator=generator, device=device) < probability
    fresh = torch.randn(n_rows, dim, generator=generator, device=device) * std
    return mask, fresh


class ProbabilisticTemporaryForgetting(Callback):
    """Swap a random share of the token embeddings for fresh vectors at every step of an early phase.

    Args:
        probability: each vocabulary row is swapped with this probability at each optimizer step (so each
            distinct token of a batch, with all its occurrences alike).
        stop_after_steps: no swap from this optimizer step on: the phase with swaps is the first N steps.
        std: of the fresh vectors; default: the model config's ``initializer_range``, else 0.02.
        pad_token_id: a row never swapped; ``"auto"``: the model config's ``pad_token_id``.
        seed: step ``s`` draws from a generator seeded by (seed, s).
        label: the variant's name in reports.

    The swapped positions' gradient stops at the fresh vector: the stored row learns only from the positions
    where it was shown. ``history`` stays empty (nothing is reset); ``swapped_rows`` counts the rows swapped
    per step, summed over the phase.
    """

    def __init__(
        self,
        probability: float = 0.1,
        stop_after_steps: int = 200,
        std: float | None = None,
        pad_token_id: int | str | None = "auto",
        seed: int = 0,
        label: str = "probabilistic_temporary",
    ) -> None:
        super().__init__()
        check_swap_options(probability, stop_after_steps, std)
        self.probability, self.stop_after_steps, self.std = float(probability), stop_after_steps, std
        self.pad_token_id, self.seed, self.label = pad_token_id, seed, label
        self.history: list[dict[str, Any]] = []
        self._swapped: torch.Tensor | int = 0  # summed on the device: no host sync per step
        self._mask: torch.Tensor | None = None
        self._fresh: torch.Tensor | None = None
        self._handle: RemovableHandle | None = None

    def _swap(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        """The forward hook: swapped rows' positions take their fresh vector (training only)."""
        if not module.training or self._mask is None:
            return output
        ids = args[0]
        return torch.where(self._mask[ids].unsqueeze(-1), self._fresh[ids].to(output.dtype), output)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Hook the input embedding, unless the swap phase is already over (a late resume)."""
        if trainer.global_step < self.stop_after_steps and self._handle is None:
            self._handle = find_model(pl_module).get_input_embeddings().register_forward_hook(self._swap)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        """Draw this step's swap (every micro-batch of one optimizer step shares it); past the phase, unhook."""
        step = trainer.global_step
        if step >= self.stop_after_steps:
            self._unhook()
            return
        model = find_model(pl_module)
        weight = model.get_input_embeddings().weight
        config = getattr(model, "config", None)
        std = self.std or float(getattr(config, "initializer_range", 0.02) or 0.02)
        mask, fresh = swap_draw(weight.shape[0], weight.shape[1], self.probability, std, self.seed, step, weight.device)
        pad = getattr(config, "pad_token_id", None) if self.pad_token_id == "auto" else self.pad_token_id
        if pad is not None:
            mask[pad] = False
        self._mask, self._fresh = mask, fresh.to(weight.dtype)
        if batch_idx % trainer.accumulate_grad_batches == 0:
            self._swapped = self._swapped + mask.sum()

    def _unhook(self) -> None:
        if self._handle is not None:
            self._handle.remove()
        self._handle, self._mask, self._fresh = None, None, None

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Remove the hook: the saved and evaluated model is the plain one."""
        self._unhook()

    @property
    def swapped_rows(self) -> int:
        """Rows swapped so far, summed over the optimizer steps."""
        return int(self._swapped)

    def state_dict(self) -> dict[str, Any]:
        """The swap count (the draws are a function of the step, so nothing else is needed to resume)."""
        return {"swapped_rows": self.swapped_rows}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the swap count."""
        self._swapped = int(state_dict.get("swapped_rows", 0))
