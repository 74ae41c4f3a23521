"""Active forgetting: periodic re-initialisation of the token embeddings (Chen et al. 2023).

The callback works on any LightningModule whose model exposes ``get_input_embeddings()``, on the
module itself or on its ``.model`` attribute. The pure functions below do the work and can be used
without Lightning.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn

from afpt.errors import AfptError
from afpt.models import find_model, is_tied, save_model_dir
from afpt.pretrain.schedule import DECAYS, episode_step, lr_factor
from afpt.speed.distributed import (
    assign_full,
    full_model_state_dict,
    full_parameters,
    full_value,
    layout,
    local,
    local_rows,
    verify_reset,
)
from afpt.speed.timing import HostCopy, ResetTimer, settle, step_loss

INITS = ("normal", "mean_std")
MEAN_STD_SCOPES = ("matrix", "dim")
HEAD_POLICIES = ("auto", "always", "never")
RESET_NAMES = ("embedding", "head_weight", "head_bias")


def reset_seed(seed: int, reset_index: int, name: str) -> int:
    """A 63-bit seed that depends only on (seed, reset index, tensor name): same on every rank."""
    digest = hashlib.sha256(f"afpt-reset:{seed}:{reset_index}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


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


def reset_rows(
    n_rows: int, fraction: float, seed: int, reset_index: int, row_probability: float | None = None
) -> torch.Tensor | None:
    """The rows one reset re-initialises, sorted, drawn from the reset's own generator (the same on every rank
    and after a resume); None for a full reset.

    ``fraction`` < 1: exactly ``round(fraction * n_rows)`` rows. ``row_probability``: each row independently
    with that probability (a Bernoulli draw per row, so the count varies from reset to reset).
    """
    generator = torch.Generator().manual_seed(reset_seed(seed, reset_index, "rows"))
    if row_probability is not None:
        return torch.nonzero(torch.rand(n_rows, generator=generator) < row_probability).flatten()
    if fraction >= 1.0:
        return None
    return torch.randperm(n_rows, generator=generator)[: round(fraction * n_rows)].sort().values


@torch.no_grad()
def reset_optimizer_rows_(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], rows: torch.Tensor) -> None:
    """Zero the rows ``rows`` of every per-element state tensor (Adam's moments) of ``params``, in place.

    Per-tensor entries (Adam's ``step``) are left alone: the other rows keep training on the same step count.
    Under FSDP2 each rank zeroes the reset rows that fall in its own shard.
    """
    for param in params:
        for value in (optimizer.state.get(param) or {}).values():
            if torch.is_tensor(value) and value.shape == param.shape:
                local(value)[local_rows(value, rows)] = 0


def check_options(
    every_n_steps: int,
    init: str,
    std: float | None,
    head: str,
    episode_warmup_fraction: float,
    episode_decay: str,
    stop_after_steps: int | None = None,
    fraction: float = 1.0,
    row_probability: float | None = None,
    mean_std_scope: str = "matrix",
) -> None:
    """One clear error, naming the ``forgetting.*`` key, for an option ``ActiveForgetting`` cannot use."""
    if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps <= 0:
        raise AfptError(f"forgetting.every_n_steps must be a positive integer, got {every_n_steps!r}")
    if init not in INITS:
        raise AfptError(f"forgetting.init must be one of {INITS}, got {init!r}")
    if mean_std_scope not in MEAN_STD_SCOPES:
        raise AfptError(f"forgetting.mean_std_scope must be one of {MEAN_STD_SCOPES}, got {mean_std_scope!r}")
    if head not in HEAD_POLICIES:
        raise AfptError(f"forgetting.head must be one of {HEAD_POLICIES}, got {head!r}")
    if episode_decay not in DECAYS:
        raise AfptError(f"forgetting.episode_decay must be one of {DECAYS}, got {episode_decay!r}")
    if std is not None and std <= 0:
        raise AfptError(f"forgetting.std must be positive, got {std!r}")
    if not 0.0 <= episode_warmup_fraction < 1.0:
        raise AfptError(f"forgetting.episode_warmup_fraction must be in [0, 1), got {episode_warmup_fraction!r}")
    if stop_after_steps is not None and (
        isinstance(stop_after_steps, bool) or not isinstance(stop_after_steps, int) or stop_after_steps <= 0
    ):
        raise AfptError(f"forgetting.stop_after_steps must be null or a positive integer, got {stop_after_steps!r}")
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise AfptError(f"forgetting.fraction must be in (0, 1], got {fraction!r}")
    if row_probability is not None:
        if (
            isinstance(row_probability, bool)
            or not isinstance(row_probability, (int, float))
            or not 0 < row_probability <= 1
        ):
            raise AfptError(f"forgetting.row_probability must be null or in (0, 1], got {row_probability!r}")
        if fraction < 1:
            raise AfptError(
                "forgetting.row_probability must be null when forgetting.fraction < 1: they are two ways to pick "
                f"the reset rows, set one (got fraction={fraction!r}, row_probability={row_probability!r})"
            )


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
        check_options(
            every_n_steps,
            init,
            std,
            head,
            episode_warmup_fraction,
            episode_decay,
            stop_after_steps,
            fraction,
            row_probability,
            mean_std_scope,
        )
        self.mean_std_scope = mean_std_scope
        self.stop_after_steps = stop_after_steps
        self.fraction = float(fraction)
        self.row_probability = None if row_probability is None else float(row_probability)
        self.save_before_reset = save_before_reset
        self.label = label
        self.every_n_steps = every_n_steps
        self.init = init
        self.std = std
        self.head = head
        self.pad_token_id = pad_token_id
        self.seed = seed
        self.episode_lr = episode_lr
        self.episode_warmup_fraction = episode_warmup_fraction
        self.episode_min_lr_ratio = episode_min_lr_ratio
        self.episode_decay = episode_decay
        self.total_steps = total_steps
        self.check_sync = check_sync
        self.history: list[dict[str, Any]] = []
        self._last_loss: torch.Tensor | None = None
        self._awaiting_loss_after = False
        self._peak_lr: float | None = None
        self._pending_check: list[torch.Tensor] | None = None
        self._unsettled: list[dict[str, Any]] = []

    # ----------------------------------------------------------------- resolution
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Refuse strategies whose parameters this callback cannot address (DeepSpeed, FSDP without orig params),
        and FSDP (v1) for partial resets: its optimizer state is a flat shard with no rows to address."""
        if layout(trainer) == "fsdp" and self.rows_subset:
            raise AfptError(
                "forgetting.fraction < 1 and forgetting.row_probability run on one device, under DDP or FSDP2 "
                "(trainer=fsdp2): FSDP v1 (trainer=fsdp) keeps the optimizer state as flat shards without rows"
            )

    @property
    def rows_subset(self) -> bool:
        """Whether a reset re-initialises a subset of the rows (partial or probabilistic) rather than all."""
        return self.fraction < 1 or self.row_probability is not None

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Check the head policy against the model (built by now, also when ``configure_model`` builds it)."""
        model = find_model(pl_module)
        if self.head == "never" and is_tied(model):
            raise AfptError(
                "forgetting.head='never' cannot keep the output head: it is tied to the input embedding. "
                "Use head='auto' or untie the head (model.tie_word_embeddings=false)."
            )

    def reset_parameters(self, pl_module: LightningModule) -> list[nn.Parameter]:
        """The parameters one reset re-initialises, without duplicates (a tied head counts once)."""
        model = find_model(pl_module)
        params = [model.get_input_embeddings().weight]
        if self.head == "always" and not is_tied(model):
            head = model.get_output_embeddings()
            params.append(head.weight)
            if getattr(head, "bias", None) is not None:
                params.append(head.bias)
        return params

    def _std(self, model: nn.Module) -> float:
        if self.std is not None:
            return self.std
        return float(getattr(getattr(model, "config", None), "initializer_range", 0.02) or 0.02)

    def _pad_token_id(self, model: nn.Module) -> int | None:
        if self.pad_token_id == "auto":
            return getattr(getattr(model, "config", None), "pad_token_id", None)
        return self.pad_token_id

    def _total_steps(self, trainer: Trainer) -> int:
        return int(self.total_steps or trainer.estimated_stepping_batches)

    def embedding_param_group(self, trainer: Trainer, pl_module: LightningModule) -> dict:
        """The optimizer param group that holds the input embedding."""
        weight = find_model(pl_module).get_input_embeddings().weight
        for group in trainer.optimizers[0].param_groups:
            if any(p is weight for p in group["params"]):
                return group
        raise RuntimeError("the input embedding is in no optimizer param group")

    # ----------------------------------------------------------------- the reset
    def _fresh_value(self, param: torch.Tensor, name: str, reset_index: int, model: nn.Module) -> torch.Tensor:
        """The full new value of ``param``, drawn from the (seed, reset index, name) generator: same on every rank."""
        device = local(param).device
        value = torch.zeros(param.shape, dtype=param.dtype, device=device)
        if param.dim() == 1:
            return value
        if self.init == "mean_std":
            value.copy_(full_value(param))
        generator = torch.Generator(device=device)
        generator.manual_seed(reset_seed(self.seed, reset_index, name))
        pad = self._pad_token_id(model) if name == "embedding" else None
        reinitialize_(value, generator, self.init, self._std(model), pad, self.mean_std_scope)
        return value

    @torch.no_grad()
    def reset(self, trainer: Trainer, pl_module: LightningModule, reset_index: int) -> int:
        """Re-initialise the embeddings (and head, by policy), or ``fraction`` of their rows, and zero their
        optimizer state (of those rows); returns how many rows were reset.

        Works on whole tensors (single device, DDP), FSDP flat shards (through ``summon_full_params``)
        and FSDP2 ``DTensor`` shards: every rank draws the same full tensor and keeps its own shard.
        """
        model = find_model(pl_module)
        n_rows = model.get_input_embeddings().weight.shape[0]
        rows = reset_rows(n_rows, self.fraction, self.seed, reset_index, self.row_probability)
        with full_parameters(trainer, writeback=True):
            params = self.reset_parameters(pl_module)
            values = [self._fresh_value(p, n, reset_index, model) for n, p in zip(RESET_NAMES, params)]
            if rows is not None:  # keep every row but the drawn ones
                values = [_blend(full_value(p).detach(), v, rows) for p, v in zip(params, values)]
            for param, value in zip(params, values):
                assign_full(param, value)
        params = self.reset_parameters(pl_module)
        for optimizer in trainer.optimizers:
            if rows is None:
                reset_optimizer_state_(optimizer, params)
            else:
                reset_optimizer_rows_(optimizer, params, rows)
        if self.check_sync and trainer.world_size > 1:
            self._pending_check = (values, rows)
        return n_rows if rows is None else len(rows)

    def save_episode(self, trainer: Trainer, pl_module: LightningModule, step: int) -> None:
        """The model as it ends the episode before the reset at ``step``: ``episodes/step<step>/``, atomically.

        Every rank calls it: a sharded model's full weights are gathered to rank 0, which writes them."""
        state_dict = full_model_state_dict(trainer, pl_module)
        if not trainer.is_global_zero:
            return
        tokenizer = getattr(getattr(trainer, "datamodule", None), "tokenizer", None)
        save_model_dir(
            find_model(pl_module), tokenizer, Path(trainer.default_root_dir) / "episodes" / f"step{step}", state_dict
        )

    # ----------------------------------------------------------------- hooks
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Remember the embedding group's peak learning rate for the episode schedule."""
        if self.episode_lr and self._peak_lr is None:
            group = self.embedding_param_group(trainer, pl_module)
            self._peak_lr = float(group.get("initial_lr", group["lr"]))

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        """Set the embedding group's learning rate from the episode schedule, if enabled."""
        if not self.episode_lr:
            return
        total = self._total_steps(trainer)
        step = episode_step(trainer.global_step, total, self.every_n_steps)
        warmup = int(self.episode_warmup_fraction * total)
        factor = lr_factor(step, total, warmup, self.episode_min_lr_ratio, self.episode_decay)
        self.embedding_param_group(trainer, pl_module)["lr"] = self._peak_lr * factor

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        """Reset before the first batch that follows every K-th optimizer step.

        Resetting here rather than right after step K lets validation and checkpoints at step K
        see the trained embeddings; a run resumed from such a checkpoint resets on its first batch.
        """
        step = trainer.global_step
        last_reset = self.history[-1]["step"] if self.history else 0
        if step == 0 or step % self.every_n_steps or step == last_reset or step >= self._total_steps(trainer):
            return
        if self.stop_after_steps is not None and step >= self.stop_after_steps:
            return
        if self.save_before_reset:
            self.save_episode(trainer, pl_module, step)
        reset_index = step // self.every_n_steps
        timer = ResetTimer(pl_module.device)
        rows = self.reset(trainer, pl_module, reset_index)
        duration_ms, host_ms = timer.stop()
        entry = {"step": step, "reset_index": reset_index, "rows": rows, "loss_before": None, "loss_after": None}
        entry.update(duration_ms=duration_ms, host_ms=host_ms, verify_ms=self._verify_pending(trainer, pl_module))
        self.history.append(entry)
        self._unsettled.append(entry)
        if self._last_loss is not None:
            entry["loss_before"] = HostCopy(self._last_loss)
            pl_module.log("forgetting/loss_before_reset", self._last_loss, on_step=True, on_epoch=False)
        self._awaiting_loss_after = True
        pl_module.log("forgetting/resets", torch.tensor(float(len(self.history))), on_step=True, on_epoch=False)

    def _verify_pending(self, trainer: Trainer, pl_module: LightningModule) -> float | None:
        """Run the ``check_sync`` verification of the reset just made; its milliseconds, or None if none ran."""
        if self._pending_check is None:
            return None
        start = time.perf_counter()
        values, rows = self._pending_check
        verify_reset(trainer, pl_module, self.reset_parameters(pl_module), values, rows)
        self._pending_check = None
        return 1000 * (time.perf_counter() - start)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Keep the latest loss and record the first loss after a reset, both without a host sync."""
        self._last_loss = step_loss(outputs, trainer.accumulate_grad_batches)
        if self._awaiting_loss_after and self._last_loss is not None:
            self._awaiting_loss_after = False
            self.history[-1]["loss_after"] = HostCopy(self._last_loss)
            pl_module.log("forgetting/loss_after_reset", self._last_loss, on_step=True, on_epoch=False)
        self.settle(wait=False)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Turn every reset's timing and losses into plain numbers."""
        self.settle(wait=True)

    def settle(self, wait: bool) -> None:
        """Fill the history's device-side values (GPU timing, losses) that have reached the host;
        with ``wait``, wait for all of them."""
        self._unsettled = settle(self._unsettled, wait)
        last = self.history[-1] if self.history else None
        if self._awaiting_loss_after and all(entry is not last for entry in self._unsettled):
            self._unsettled.append(last)

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """History and schedule state, as plain Python values (safe for ``weights_only`` loads)."""
        self.settle(wait=True)
        return {
            "history": [dict(h) for h in self.history],
            "peak_lr": self._peak_lr,
            "awaiting_loss_after": self._awaiting_loss_after,
            "last_loss": None if self._last_loss is None else float(self._last_loss),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the history so that a resumed run reports every reset once."""
        self.history = [dict(h) for h in state_dict.get("history", [])]
        self._peak_lr = state_dict.get("peak_lr")
        self._awaiting_loss_after = bool(state_dict.get("awaiting_loss_after", False))
        last_loss = state_dict.get("last_loss")
        self._last_loss = None if last_loss is None else torch.tensor(last_loss)


def _blend(current: torch.Tensor, fresh: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``current`` with ``rows`` taken from ``fresh`` (a 1-D bias: the same entries)."""
    out = current.clone()
    out[rows.to(out.device)] = fresh[rows.to(fresh.device)]
    return out
