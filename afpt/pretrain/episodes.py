"""What happens around forgetting's episodes: Chen et al.'s per-episode embedding learning rate, and a saved model
at the end of each episode. Each is a Lightning callback of its own; ``ActiveForgetting`` composes them when
``episode_lr`` or ``save_before_reset`` is on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer

from afpt.models import find_model, save_model_dir
from afpt.pretrain.schedule import episode_step, lr_factor
from afpt.speed.distributed import full_model_state_dict


def embedding_param_group(trainer: Trainer, pl_module: LightningModule) -> dict:
    """The optimizer param group that holds the input embedding."""
    weight = find_model(pl_module).get_input_embeddings().weight
    for group in trainer.optimizers[0].param_groups:
        if any(p is weight for p in group["params"]):
            return group
    raise RuntimeError("the input embedding is in no optimizer param group")


class EpisodeLearningRate(Callback):
    """Drive the embedding param group's learning rate with Chen et al.'s episode schedule: the whole warmup +
    decay compressed into every ``every_n_steps``-step episode, from the group's own peak rate; the body keeps the
    global schedule. ``total_steps``: T of the schedule (default: the trainer's ``estimated_stepping_batches``)."""

    def __init__(
        self,
        every_n_steps: int,
        warmup_fraction: float = 0.1,
        min_lr_ratio: float = 0.0,
        decay: str = "linear",
        total_steps: int | None = None,
    ) -> None:
        self.every_n_steps, self.warmup_fraction = every_n_steps, warmup_fraction
        self.min_lr_ratio, self.decay, self.total_steps = min_lr_ratio, decay, total_steps
        self.peak_lr: float | None = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Remember the embedding group's peak learning rate (kept across a resume)."""
        if self.peak_lr is None:
            group = embedding_param_group(trainer, pl_module)
            self.peak_lr = float(group.get("initial_lr", group["lr"]))

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        """Set the embedding group's learning rate for this step of its episode."""
        total = int(self.total_steps or trainer.estimated_stepping_batches)
        step = episode_step(trainer.global_step, total, self.every_n_steps)
        warmup = int(self.warmup_fraction * total)
        factor = lr_factor(step, total, warmup, self.min_lr_ratio, self.decay)
        embedding_param_group(trainer, pl_module)["lr"] = self.peak_lr * factor

    def state_dict(self) -> dict[str, Any]:
        """The peak rate, so that a resumed run continues the same schedule."""
        return {"peak_lr": self.peak_lr}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the peak rate."""
        self.peak_lr = state_dict.get("peak_lr")


class EpisodeSaver:
    """Save the model as it ends an episode, just before a reset: ``<default_root_dir>/episodes/step<N>/``, a Hugging
    Face directory with the datamodule's tokenizer, written atomically. ``ActiveForgetting`` calls ``save`` before
    each reset; every rank calls it, and a sharded model's full weights are gathered to rank 0, which writes them."""

    def save(self, trainer: Trainer, pl_module: LightningModule, step: int) -> None:
        """Write ``episodes/step<step>/``."""
        state_dict = full_model_state_dict(trainer, pl_module)
        if not trainer.is_global_zero:
            return
        tokenizer = getattr(getattr(trainer, "datamodule", None), "tokenizer", None)
        save_model_dir(
            find_model(pl_module), tokenizer, Path(trainer.default_root_dir) / "episodes" / f"step{step}", state_dict
        )
