"""Active forgetting: periodic re-initialisation of the token embeddings (Chen et al. 2023).

The callback works on any LightningModule whose model exposes ``get_input_embeddings()``, on the
module itself or on its ``.model`` attribute. The pure functions below (and ``afpt.pretrain.rows``) do the
work and can be used without Lightning. ``ActiveForgetting`` schedules the resets and delegates: the rows to
a row selection (``rows.py``), the episode learning rate and the saved episodes to ``episodes.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from afpt.errors import AfptError
from afpt.models import find_model, is_tied
from afpt.pretrain.episodes import EpisodeLearningRate, EpisodeSaver
from afpt.pretrain.reinit import (
    HEAD_POLICIES,
    INITS,
    MEAN_STD_SCOPES,
    EmbeddingReset,
    reinitialize_,
    reset_optimizer_state_,
)
from afpt.pretrain.rows import reset_optimizer_rows_, reset_rows, row_selection
from afpt.pretrain.schedule import DECAYS
from afpt.pretrain.seeding import reset_seed
from afpt.speed.distributed import layout
from afpt.speed.timing import HostCopy, ResetTimer, settle, step_loss

__all__ = [
    "ActiveForgetting",
    "ForgettingOptions",
    "find_model",
    "reinitialize_",
    "reset_optimizer_rows_",
    "reset_optimizer_state_",
    "reset_rows",
    "reset_seed",
]


@dataclass(frozen=True)
class ForgettingOptions:
    """``ActiveForgetting``'s options, each checked once: one clear error naming the ``forgetting.*`` key."""

    every_n_steps: int
    init: str = "normal"
    std: float | None = None
    head: str = "auto"
    episode_warmup_fraction: float = 0.1
    episode_decay: str = "linear"
    stop_after_steps: int | None = None
    fraction: float = 1.0
    row_probability: float | None = None
    mean_std_scope: str = "matrix"

    def __post_init__(self) -> None:
        def positive_int(value: Any) -> bool:
            return not isinstance(value, bool) and isinstance(value, int) and value > 0

        def share(value: Any) -> bool:
            return not isinstance(value, bool) and isinstance(value, (int, float)) and 0 < value <= 1

        if not positive_int(self.every_n_steps):
            raise AfptError(f"forgetting.every_n_steps must be a positive integer, got {self.every_n_steps!r}")
        for key, value, choices in (
            ("init", self.init, INITS),
            ("mean_std_scope", self.mean_std_scope, MEAN_STD_SCOPES),
            ("head", self.head, HEAD_POLICIES),
            ("episode_decay", self.episode_decay, DECAYS),
        ):
            if value not in choices:
                raise AfptError(f"forgetting.{key} must be one of {choices}, got {value!r}")
        if self.std is not None and self.std <= 0:
            raise AfptError(f"forgetting.std must be positive, got {self.std!r}")
        if not 0.0 <= self.episode_warmup_fraction < 1.0:
            raise AfptError(
                f"forgetting.episode_warmup_fraction must be in [0, 1), got {self.episode_warmup_fraction!r}"
            )
        if self.stop_after_steps is not None and not positive_int(self.stop_after_steps):
            raise AfptError(
                f"forgetting.stop_after_steps must be null or a positive integer, got {self.stop_after_steps!r}"
            )
        if not share(self.fraction):
            raise AfptError(f"forgetting.fraction must be in (0, 1], got {self.fraction!r}")
        if self.row_probability is not None and not share(self.row_probability):
            raise AfptError(f"forgetting.row_probability must be null or in (0, 1], got {self.row_probability!r}")
        if self.row_probability is not None and self.fraction < 1:
            raise AfptError(
                "forgetting.row_probability must be null when forgetting.fraction < 1: they are two ways to pick "
                f"the reset rows, set one (got fraction={self.fraction!r}, row_probability={self.row_probability!r})"
            )


class ResetLog:
    """The resets' history, with the losses of the steps around each and its timing, filled without a host sync.

    ``history`` holds one dict per reset (see ``ActiveForgetting``); device-side values (CUDA event timings, step
    losses) become plain numbers as they reach the host (``settle``), all of them by the end of the fit.
    """

    def __init__(self) -> None:
        self.history: list[dict[str, Any]] = []
        self.last_loss: torch.Tensor | None = None
        self.awaiting_loss_after = False
        self.unsettled: list[dict[str, Any]] = []

    def record(self, entry: dict[str, Any], pl_module: LightningModule) -> None:
        """Add a reset's entry (the loss before it is the latest step's); log the reset count."""
        self.history.append(entry)
        self.unsettled.append(entry)
        if self.last_loss is not None:
            entry["loss_before"] = HostCopy(self.last_loss)
            pl_module.log("forgetting/loss_before_reset", self.last_loss, on_step=True, on_epoch=False)
        self.awaiting_loss_after = True
        pl_module.log("forgetting/resets", torch.tensor(float(len(self.history))), on_step=True, on_epoch=False)

    def step_end(self, loss: torch.Tensor | None, pl_module: LightningModule) -> None:
        """Keep a step's loss; the first after a reset is that reset's ``loss_after``."""
        self.last_loss = loss
        if self.awaiting_loss_after and loss is not None:
            self.awaiting_loss_after = False
            self.history[-1]["loss_after"] = HostCopy(loss)
            pl_module.log("forgetting/loss_after_reset", loss, on_step=True, on_epoch=False)
        self.settle(wait=False)

    def settle(self, wait: bool) -> None:
        """Fill the device-side values that have reached the host; with ``wait``, wait for all of them."""
        self.unsettled = settle(self.unsettled, wait)
        last = self.history[-1] if self.history else None
        if self.awaiting_loss_after and all(entry is not last for entry in self.unsettled):
            self.unsettled.append(last)

    def state_dict(self) -> dict[str, Any]:
        """The history and the pending loss, as plain Python values."""
        self.settle(wait=True)
        return {
            "history": [dict(h) for h in self.history],
            "awaiting_loss_after": self.awaiting_loss_after,
            "last_loss": None if self.last_loss is None else float(self.last_loss),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what ``state_dict`` saved."""
        self.history = [dict(h) for h in state_dict.get("history", [])]
        self.awaiting_loss_after = bool(state_dict.get("awaiting_loss_after", False))
        last_loss = state_dict.get("last_loss")
        self.last_loss = None if last_loss is None else torch.tensor(last_loss)


class ActiveForgetting(Callback):
    """Re-initialise the input token embeddings, and their optimizer state, every K optimizer steps.

    Args:
        every_n_steps: K, counted in optimizer steps (``trainer.global_step``). The reset happens
            between step K's update and the next forward pass; none after the final step.
        init: ``normal`` (N(0, std)) or ``mean_std`` (the current mean and std, see ``mean_std_scope``).
        mean_std_scope: ``matrix``: one scalar mean and std over the whole matrix (Chen et al.'s code);
            ``dim``: one per embedding dimension.
        std: standard deviation for ``normal``; default: the model config's ``initializer_range``,
            else 0.02.
        head: ``auto`` resets the output head exactly when it is tied to the input embedding;
            ``always`` also re-initialises an untied head; ``never`` leaves an untied head alone
            (and refuses a tied one, which cannot be kept while the embedding is reset).
        pad_token_id: row to zero after each reset; ``"auto"`` takes the model config's
            ``pad_token_id``; ``None`` zeroes nothing.
        seed: reset ``i`` draws from a generator seeded by (seed, i): identical on every rank
            without communication, and identical after a resume.
        episode_lr: drive the embedding param group's learning rate with Chen et al.'s episode
            schedule (the full warmup + decay compressed into each K-step episode).
        episode_warmup_fraction, episode_min_lr_ratio, episode_decay: shape of that schedule.
        total_steps: T of the schedule and the last step; default: the trainer's
            ``estimated_stepping_batches``.
        check_sync: after each reset on several ranks, gather the reset tensors through any sharding
            (DDP, FSDP, FSDP2), check that every rank holds exactly the drawn values and that its shard
            of their optimizer state is zero, and raise if not. Costs an all-gather per reset.
        stop_after_steps: no reset from this optimizer step on (temporary forgetting: a long stable
            phase at the end); None: until the last step.
        fraction: share of the embedding rows a reset re-initialises (``round(fraction * rows)`` rows
            drawn from the reset's generator; the other rows and their optimizer state stay bit for bit);
            1: the whole matrix. Below 1 it runs on one device, under DDP or under FSDP2 (each rank zeroes the
            optimizer state of the reset rows in its own shard); FSDP v1 is refused.
        row_probability: Bernoulli row resets (afpt's own variant, no published method): at each every-K reset
            every embedding row is re-initialised independently with this probability (drawn from the reset's
            generator, so the same rows on every rank and after a resume); the others and their optimizer
            state stay bit for bit. None: off. Exclusive with ``fraction`` < 1. Anand et al.'s probabilistic
            temporary forgetting is ``afpt.pretrain.token_swap.ProbabilisticTemporaryForgetting``.
        save_before_reset: write the model (and the datamodule's tokenizer) as a Hugging Face directory
            ``<default_root_dir>/episodes/step<N>/`` just before the reset at step N: the end of an episode.
        label: the variant's name in reports (``every_k``, ``temporary``, ``partial``, ``bernoulli``).

    ``history`` holds one dict per reset: ``step``, ``reset_index``, ``rows`` (how many rows were reset), ``loss_before`` / ``loss_after``
    (the losses of the steps around it), ``duration_ms`` (GPU time from CUDA events on CUDA, wall time
    on CPU), ``host_ms`` (host time spent issuing it) and ``verify_ms``. On CUDA the values arrive
    without a host sync and are plain numbers by the end of the fit (and in every checkpoint).
    """

    def __init__(
        self,
        every_n_steps: int,
        init: str = "normal",
        std: float | None = None,
        head: str = "auto",
        pad_token_id: int | str | None = "auto",
        seed: int = 0,
        episode_lr: bool = False,
        episode_warmup_fraction: float = 0.1,
        episode_min_lr_ratio: float = 0.0,
        episode_decay: str = "linear",
        total_steps: int | None = None,
        check_sync: bool = False,
        stop_after_steps: int | None = None,
        fraction: float = 1.0,
        save_before_reset: bool = False,
        label: str = "every_k",
        row_probability: float | None = None,
        mean_std_scope: str = "matrix",
    ) -> None:
        super().__init__()
        options = ForgettingOptions(every_n_steps, init, std, head, episode_warmup_fraction, episode_decay,
                                    stop_after_steps, fraction, row_probability, mean_std_scope)  # fmt: skip
        self.every_n_steps, self.init, self.std, self.head = every_n_steps, init, std, head
        self.mean_std_scope, self.stop_after_steps = mean_std_scope, stop_after_steps
        self.fraction = float(fraction)
        self.row_probability = None if row_probability is None else float(row_probability)
        self.rows = row_selection(options.fraction, options.row_probability)
        self.reset = EmbeddingReset(init, std, head, pad_token_id, mean_std_scope, self.rows, check_sync)
        self.pad_token_id, self.seed, self.label = pad_token_id, seed, label
        self.total_steps, self.check_sync = total_steps, check_sync
        self.episode_lr = (
            EpisodeLearningRate(
                every_n_steps, episode_warmup_fraction, episode_min_lr_ratio, episode_decay, total_steps
            )
            if episode_lr
            else None
        )
        self.episodes = EpisodeSaver() if save_before_reset else None
        self.reset_log = ResetLog()

    @property
    def history(self) -> list[dict[str, Any]]:
        """One dict per reset so far (``ResetLog``)."""
        return self.reset_log.history

    # ----------------------------------------------------------------- resolution
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Refuse FSDP (v1) for partial resets: its optimizer state is a flat shard with no rows to address."""
        if layout(trainer) == "fsdp" and self.rows.subset:
            raise AfptError(
                "forgetting.fraction < 1 and forgetting.row_probability run on one device, under DDP or FSDP2 "
                "(trainer=fsdp2): FSDP v1 (trainer=fsdp) keeps the optimizer state as flat shards without rows"
            )

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Check the head policy against the model (built by now, also when ``configure_model`` builds it)."""
        model = find_model(pl_module)  # a module without get_input_embeddings() stops here, with its name
        if self.head == "never" and is_tied(model):
            raise AfptError(
                "forgetting.head='never' cannot keep the output head: it is tied to the input embedding. "
                "Use head='auto' or untie the head (model.tie_word_embeddings=false)."
            )

    def due(self, trainer: Trainer) -> bool:
        """Whether a reset is due before this batch: right after every K-th optimizer step, once, until
        ``stop_after_steps`` and never after the final step."""
        step = trainer.global_step
        last_reset = self.history[-1]["step"] if self.history else 0
        total = int(self.total_steps or trainer.estimated_stepping_batches)
        if step == 0 or step % self.every_n_steps or step == last_reset or step >= total:
            return False
        return self.stop_after_steps is None or step < self.stop_after_steps

    # ----------------------------------------------------------------- hooks
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Start the episode learning rate, if on."""
        if self.episode_lr:
            self.episode_lr.on_train_start(trainer, pl_module)

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        """Set the embedding group's learning rate from the episode schedule, if on."""
        if self.episode_lr:
            self.episode_lr.on_before_optimizer_step(trainer, pl_module, optimizer)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        """Reset before the first batch that follows every K-th optimizer step.

        Resetting here rather than right after step K lets validation and checkpoints at step K
        see the trained embeddings; a run resumed from such a checkpoint resets on its first batch.
        """
        if not self.due(trainer):
            return
        step = trainer.global_step
        if self.episodes:
            self.episodes.save(trainer, pl_module, step)
        reset_index = step // self.every_n_steps
        timer = ResetTimer(pl_module.device)
        rows = self.reset(trainer, pl_module, self.seed, reset_index)
        duration_ms, host_ms = timer.stop()
        entry = {"step": step, "reset_index": reset_index, "rows": rows, "loss_before": None, "loss_after": None}
        entry.update(duration_ms=duration_ms, host_ms=host_ms, verify_ms=self.reset.verify(trainer, pl_module))
        self.reset_log.record(entry, pl_module)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Keep the latest loss and record the first loss after a reset, both without a host sync."""
        self.reset_log.step_end(step_loss(outputs, trainer.accumulate_grad_batches), pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Turn every reset's timing and losses into plain numbers."""
        self.reset_log.settle(wait=True)

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """History and schedule state, as plain Python values (safe for ``weights_only`` loads)."""
        return {**self.reset_log.state_dict(), "peak_lr": self.episode_lr.peak_lr if self.episode_lr else None}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the history so that a resumed run reports every reset once."""
        self.reset_log.load_state_dict(state_dict)
        if self.episode_lr:
            self.episode_lr.load_state_dict(state_dict)
