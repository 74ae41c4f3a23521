"""The stage registry and what every stage shares: the config readers, the trainer and its callbacks.

A stage is a module with ``run(cfg) -> metrics``; it reads one model directory and writes one run directory.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.fabric.plugins import CheckpointIO
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import LearningRateMonitor
from omegaconf import DictConfig, ListConfig, OmegaConf

from afpt.artifacts.checkpoints import CHECKPOINT_DIR, AtomicCheckpointIO, PreemptionCheckpoint, resolve_ckpt_path
from afpt.artifacts.io import write_json
from afpt.artifacts.tracking import build_loggers, publish_artifacts
from afpt.errors import AfptError, build_target
from afpt.models import save_model_dir
from afpt.pretrain.optim import OptimConfig
from afpt.speed.distributed import layout

log = logging.getLogger("afpt")

STAGES = {
    "prepare": "afpt.data.stage",
    "pretrain": "afpt.pretrain.stage",
    "adapt": "afpt.adapt.stage",
    "splice": "afpt.adapt.splice",
    "instruct": "afpt.instruct.stage",
    "generate": "afpt.instruct.generate",
    "evaluate": "afpt.evaluate.stage",
    "pipeline": "afpt.study.pipeline",
}


def run_stage(name: str, cfg: DictConfig) -> dict[str, Any]:
    """Run the stage called ``name`` with ``cfg`` and return its metrics."""
    if name not in STAGES:
        raise AfptError(f"stage={name!r} is not available; expected one of {sorted(STAGES)}")
    return importlib.import_module(STAGES[name]).run(cfg)


def to_dict(node: Any) -> Any:
    """A resolved plain-Python copy of a config node."""
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, (DictConfig, ListConfig)) else node


def build_optim(cfg: DictConfig, over: DictConfig | None = None, where: str = "optim") -> OptimConfig:
    """The ``optim`` group's ``OptimConfig`` (its ``_target_``), with a stage's own settings ``over`` it (e.g.
    ``adapt.optim``; errors then name ``where``). Checked as it is built: before any data or model work."""
    node = cfg.optim if over is None else OmegaConf.merge(to_dict(cfg.optim), to_dict(over))
    return build_target(node, where, where=where, _convert_="all")


def init_from(cfg: DictConfig, stage: str) -> str:
    """The model directory (or, for ``evaluate``, the list of them) a stage starts from: ``init_from``."""
    value = cfg.get("init_from")
    if not value:
        raise AfptError(f"stage={stage} needs init_from=<a model directory>")
    return value


def check_ckpt_path(cfg: DictConfig) -> str | None:
    """``cfg.ckpt_path`` as a whole, safely loadable checkpoint file (``last``: the run's own ``last.ckpt``)."""
    return resolve_ckpt_path(cfg.get("ckpt_path"), Path(cfg.paths.run_dir))


def check_batches(data: DictConfig, positions: int | None) -> None:
    """``data.batch_size`` and ``data.block_size`` are positive, and a block fits the model's ``positions``."""
    for key in ("batch_size", "block_size"):
        value = data.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise AfptError(f"data.{key} must be a positive integer, got {value!r}")
    if positions and data.block_size > positions:
        raise AfptError(
            f"data.block_size={data.block_size} is longer than the model's {positions} positions "
            "(model.max_position_embeddings); use a shorter block or a model with more positions"
        )


def forgetting_on(node: DictConfig | None) -> bool:
    """Whether ``forgetting`` describes a callback (a ``_target_`` node) rather than ``forgetting=none``."""
    return node is not None and "_target_" in node


def build_forgetting(node: DictConfig | None) -> pl.Callback | None:
    """The forgetting callback that ``forgetting`` describes (a ``_target_`` node), or None for ``forgetting=none``.

    Options merged into ``forgetting=none`` (an experiment's K, say) are ignored, with a warning naming them."""
    if not forgetting_on(node):
        if node:
            log.warning("forgetting=none: ignoring the forgetting options %s", sorted(node))
        return None
    return build_target(node, "forgetting")


def stage_callbacks(cfg: DictConfig) -> list[pl.Callback]:
    """The ``callbacks`` group's callbacks for this stage: an entry with ``only_in_stages: [...]`` runs only in
    the stages it names (the key is afpt's, not passed to the callback)."""
    callbacks = []
    for name, node in (cfg.get("callbacks") or {}).items():
        if node is None:
            continue
        node = OmegaConf.to_container(node, resolve=True)
        stages = node.pop("only_in_stages", None)
        if stages is not None and cfg.stage.name not in stages:
            continue
        callbacks.append(build_target(node, f"callbacks.{name}"))
    return callbacks


def build_trainer(cfg: DictConfig, run_dir: Path, extra_callbacks: list[pl.Callback], **overrides: Any) -> pl.Trainer:
    """A Lightning Trainer from ``cfg.trainer`` (plain Trainer kwargs) with ``overrides`` on top, ``cfg.callbacks``
    and ``cfg.logger``."""
    callbacks = stage_callbacks(cfg)
    loggers = build_loggers(cfg)
    if not loggers:  # LearningRateMonitor refuses to run without a logger
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    kwargs = {**to_dict(cfg.trainer), **overrides}
    for key in ("max_steps", "max_epochs"):
        if kwargs.get(key) == 0:
            raise AfptError(f"trainer.{key}=0 trains nothing; give a positive number (or -1 for no limit)")
    for key in ("strategy", "profiler"):  # an object: {_target_: ..., **kwargs}
        if isinstance(kwargs.get(key), dict):
            kwargs[key] = build_target(kwargs[key], f"trainer.{key}")
    preemption = PreemptionCheckpoint(run_dir / CHECKPOINT_DIR)
    plugins = [
        build_target(p, "trainer.plugins") if isinstance(p, dict) else p for p in kwargs.pop("plugins", None) or []
    ]
    if not any(isinstance(p, CheckpointIO) for p in plugins):  # a user's own CheckpointIO replaces afpt's
        plugins.append(AtomicCheckpointIO())
    try:
        return pl.Trainer(
            **kwargs,
            callbacks=callbacks + extra_callbacks + [preemption],
            logger=loggers or False,
            default_root_dir=str(run_dir),
            plugins=plugins,
        )
    except TypeError as err:
        raise AfptError(f"trainer: {err}") from err
    except MisconfigurationException as err:
        settings = ", ".join(f"{k}={kwargs.get(k)}" for k in ("accelerator", "devices", "strategy", "precision"))
        raise AfptError(f"trainer ({settings}): {err}") from err


def require_replicated(trainer: pl.Trainer, stage: str) -> None:
    """Refuse sharded strategies in stages that evaluate and save the model whole after ``fit``."""
    if layout(trainer) != "replicated":
        raise AfptError(
            f"stage={stage} runs on one device or under DDP (trainer=gpu, trainer=ddp): "
            f"{type(trainer.strategy).__name__} shards the model, and this stage evaluates and saves it whole"
        )


def scalar_metrics(trainer: pl.Trainer) -> dict[str, float]:
    """The trainer's latest logged metrics as floats."""
    return {key: float(value) for key, value in trainer.callback_metrics.items()}


def publish_run(
    trainer: pl.Trainer,
    run_dir: Path,
    model: Any,
    tokenizer: Any,
    metrics: dict[str, Any],
    plot: Callable[[], Any] | None = None,
    state_dict: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A trained stage's epilogue, on rank 0: ``model/`` (with ``tokenizer``; ``state_dict`` when gathered from
    shards), ``metrics.json``, the stage's ``plot``, and every artifact to the trackers. Returns ``metrics``."""
    if trainer.is_global_zero:
        save_model_dir(model, tokenizer, run_dir / "model", state_dict)
        write_json(metrics, run_dir / "metrics.json")
        if plot is not None:
            plot()
        publish_artifacts(trainer.loggers, run_dir)
    return metrics
