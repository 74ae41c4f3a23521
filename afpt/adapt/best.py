"""Keep the trained weights of the best validation loss, and the validation curve, through an adaptation run."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from afpt.models import find_model


class BestWeights(Callback):
    """Record ``monitor`` at every validation and keep a CPU copy of the trainable weights where it is lowest.

    Only parameters that train are copied (a frozen body is the same at every step). ``restore`` puts the best
    copy back; the copy, the best step and the curve are part of the checkpoint, so a resumed run keeps them.
    """

    def __init__(self, monitor: str = "val/loss") -> None:
        super().__init__()
        self.monitor = monitor
        self.curve: list[tuple[int, float]] = []
        self.best_loss: float | None = None
        self.best_step: int | None = None
        self._best: dict[str, torch.Tensor] = {}

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Add the point to the curve; copy the trainable weights if it is the lowest so far (first one wins ties)."""
        if trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        step, loss = trainer.global_step, float(trainer.callback_metrics[self.monitor])
        if self.curve and self.curve[-1][0] == step:  # the closing validation of a step already checked
            return
        self.curve.append((step, loss))
        if self.best_loss is None or loss < self.best_loss:
            self.best_loss, self.best_step = loss, step
            model = find_model(pl_module)
            self._best = {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def restore(self, pl_module: LightningModule) -> None:
        """Copy the best weights back into the model (nothing to do before the first validation)."""
        params = dict(find_model(pl_module).named_parameters())
        for name, value in self._best.items():
            params[name].copy_(value.to(params[name].device))

    def state_dict(self) -> dict[str, Any]:
        """The curve, the best point and its weights (tensors and plain values: safe for ``weights_only``)."""
        return {
            "curve": [list(p) for p in self.curve],
            "best_loss": self.best_loss,
            "best_step": self.best_step,
            "best": self._best,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the curve, the best point and its weights."""
        self.curve = [(int(s), float(v)) for s, v in state_dict.get("curve", [])]
        self.best_loss, self.best_step = state_dict.get("best_loss"), state_dict.get("best_step")
        self._best = dict(state_dict.get("best", {}))
