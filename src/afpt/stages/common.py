"""What every training stage shares: config checks, trainer assembly, atomic artifacts."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor
from omegaconf import DictConfig, OmegaConf

from afpt.distributed import layout
from afpt.errors import AfptError
from afpt.forgetting import ActiveForgetting

LIGHTNING_CKPT_ALIASES = ("last", "hpc", "registry")


def to_dict(node: Any) -> Any:
    """A resolved plain-Python copy of a config node."""
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def check_ckpt_path(ckpt_path: str | None) -> str | None:
    """``ckpt_path`` must name an existing file (or one of Lightning's aliases such as ``last``)."""
    if ckpt_path is None or ckpt_path in LIGHTNING_CKPT_ALIASES:
        return ckpt_path
    if not Path(ckpt_path).is_file():
        raise AfptError(f"ckpt_path={ckpt_path!r} does not exist; give a checkpoint file written by an earlier run")
    return ckpt_path


def build_forgetting(cfg: DictConfig, seed: int) -> ActiveForgetting | None:
    """The forgetting callback a ``forgetting`` config describes, or None for ``forgetting=none``."""
    options = to_dict(cfg)
    name = options.pop("name", None)
    if name == "none":
        return None
    if name != "every_k":
        raise AfptError(f"forgetting.name={name!r} is unknown; expected 'none' or 'every_k'")
    options.setdefault("seed", seed)
    return ActiveForgetting(**options)


def build_trainer(cfg: DictConfig, run_dir: Path, extra_callbacks: list[pl.Callback]) -> pl.Trainer:
    """A Lightning Trainer from ``cfg.trainer`` (plain Trainer kwargs), ``cfg.callbacks`` and ``cfg.logger``."""
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    loggers = [instantiate(lg) for lg in (cfg.get("logger") or {}).values() if lg is not None]
    if not loggers:  # LearningRateMonitor refuses to run without a logger
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    kwargs = to_dict(cfg.trainer)
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


def write_json(data: dict[str, Any], path: Path) -> Path:
    """Write JSON through a temporary file and an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)
    return path


def scalar_metrics(trainer: pl.Trainer) -> dict[str, float]:
    """The trainer's latest logged metrics as floats."""
    return {key: float(value) for key, value in trainer.callback_metrics.items()}


def read_json(path: Path) -> dict[str, Any]:
    """A JSON file written by ``write_json``."""
    return json.loads(Path(path).read_text())
