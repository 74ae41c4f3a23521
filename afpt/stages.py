"""The stage registry and what every stage shares: the config readers, the trainer and its callbacks.

A stage is a module with ``run(cfg) -> metrics``; it reads one model directory and writes one run directory.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor
from omegaconf import DictConfig, ListConfig, OmegaConf

from afpt.errors import AfptError
from afpt.speed.distributed import layout

STAGES = {
    "prepare": "afpt.data.stage",
    "pretrain": "afpt.pretrain.stage",
    "adapt": "afpt.adapt.stage",
    "instruct": "afpt.instruct.stage",
    "generate": "afpt.instruct.generate",
    "evaluate": "afpt.evaluate.stage",
    "pipeline": "afpt.study.pipeline",
}
LIGHTNING_CKPT_ALIASES = ("last", "hpc", "registry")


def run_stage(name: str, cfg: DictConfig) -> dict[str, Any]:
    """Run the stage called ``name`` with ``cfg`` and return its metrics."""
    if name not in STAGES:
        raise AfptError(f"stage={name!r} is not available; expected one of {sorted(STAGES)}")
    return importlib.import_module(STAGES[name]).run(cfg)


def to_dict(node: Any) -> Any:
    """A resolved plain-Python copy of a config node."""
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, (DictConfig, ListConfig)) else node


def merged(base: DictConfig, override: DictConfig | None) -> dict[str, Any]:
    """``base`` with a stage's own settings (e.g. ``adapt.optim`` over ``optim``) on top, as a plain dict."""
    return to_dict(OmegaConf.merge(base, override or {}))


def init_from(cfg: DictConfig, stage: str) -> str:
    """The model directory (or, for ``evaluate``, the list of them) a stage starts from: ``init_from``."""
    value = cfg.get("init_from")
    if not value:
        raise AfptError(f"stage={stage} needs init_from=<a model directory>")
    return value


def check_ckpt_path(ckpt_path: str | None) -> str | None:
    """``ckpt_path`` must name an existing file (or one of Lightning's aliases such as ``last``)."""
    if ckpt_path is None or ckpt_path in LIGHTNING_CKPT_ALIASES:
        return ckpt_path
    if not Path(ckpt_path).is_file():
        raise AfptError(f"ckpt_path={ckpt_path!r} does not exist; give a checkpoint file written by an earlier run")
    return ckpt_path


def build_forgetting(node: DictConfig | None) -> pl.Callback | None:
    """The forgetting callback that ``forgetting`` describes (a ``_target_`` node), or None for ``forgetting=none``."""
    if node is None or len(node) == 0:
        return None
    if "_target_" not in node:
        raise AfptError(f"forgetting: expected a _target_ callback config or forgetting=none, got keys {sorted(node)}")
    try:
        return instantiate(node)
    except InstantiationException as err:  # Hydra wraps the callback's own error; that one names the key
        if isinstance(err.__cause__, AfptError):
            raise err.__cause__ from None
        raise AfptError(f"forgetting: cannot build {node._target_!r}: {err.__cause__ or err}") from err


def build_trainer(cfg: DictConfig, run_dir: Path, extra_callbacks: list[pl.Callback], **overrides: Any) -> pl.Trainer:
    """A Lightning Trainer from ``cfg.trainer`` (plain Trainer kwargs) with ``overrides`` on top, ``cfg.callbacks``
    and ``cfg.logger``."""
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    loggers = [instantiate(lg) for lg in (cfg.get("logger") or {}).values() if lg is not None]
    if not loggers:  # LearningRateMonitor refuses to run without a logger
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    kwargs = {**to_dict(cfg.trainer), **overrides}
    if isinstance(kwargs.get("strategy"), dict):  # a strategy object: {_target_: ..., **kwargs}
        try:
            kwargs["strategy"] = instantiate(cfg.trainer.strategy)
        except Exception as err:
            raise AfptError(f"trainer.strategy: cannot build {kwargs['strategy'].get('_target_')!r}: {err}") from err
    try:
        return pl.Trainer(
            **kwargs, callbacks=callbacks + extra_callbacks, logger=loggers or False, default_root_dir=str(run_dir)
        )
    except TypeError as err:
        raise AfptError(f"trainer: {err}") from err


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
