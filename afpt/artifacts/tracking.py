"""Experiment trackers: Lightning's own loggers built from the ``logger`` group, with the stage's whole config
as hyperparameters and its plots and ``metrics.json`` as artifacts (one tracker run per stage)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.loggers import MLFlowLogger as LightningMLFlowLogger
from omegaconf import DictConfig, OmegaConf

from afpt.errors import AfptError, build_target

# The package each tracker's Lightning logger imports, and the afpt extra that installs it.
TRACKER_PACKAGES = {
    "WandbLogger": ("wandb", "wandb"),
    "MLFlowLogger": ("mlflow", "mlflow"),
    "TensorBoardLogger": ("tensorboard", "tensorboard"),
}


class MLFlowLogger(LightningMLFlowLogger):
    """Lightning's ``MLFlowLogger``; on a local file store (``file:``) metric names use ``.`` for ``/``.

    A file store keeps one file per metric, so ``val/loss`` (a file) and ``val/loss/en`` (under a directory of
    the same name) cannot both exist there; tracking servers and databases keep afpt's names as they are.
    """

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Log ``metrics``, renamed for a file store."""
        if self._tracking_uri.startswith("file:"):
            metrics = {k.replace("/", "."): v for k, v in metrics.items()}
        super().log_metrics(metrics, step)


def make_loggers(cfg: DictConfig) -> list[Logger]:
    """The ``logger`` group's loggers, built (no tracker run is started yet); a missing tracker package is one clear
    error naming its extra."""
    loggers = []
    for name, node in (cfg.get("logger") or {}).items():
        if node is None:
            continue
        package, extra = TRACKER_PACKAGES.get(str(node.get("_target_", "")).rsplit(".", 1)[-1], (None, None))
        if package and importlib.util.find_spec(package) is None:
            raise AfptError(f"logger.{name} needs the {package} package: pip install 'afpt[{extra}]'")
        uri = str(node.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI") or "file:")
        if package == "mlflow" and (uri.startswith("file:") or "://" not in uri):  # a local file store
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3: see conf/logger/mlflow.yaml
        loggers.append(build_target(node, f"logger.{name}"))
    return loggers


def build_loggers(cfg: DictConfig) -> list[Logger]:
    """``make_loggers``, each given the resolved config (and ``run_dir``) as hyperparameters."""
    loggers = make_loggers(cfg)
    if loggers:
        params = {"run_dir": str(cfg.paths.run_dir), **config_params(cfg)}
        for logger in loggers:
            logger.log_hyperparams(params)
    return loggers


def config_params(cfg: DictConfig) -> dict[str, Any]:
    """The config as plain values; an interpolation that only resolves inside a Hydra app stays as written."""
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # e.g. ${hydra:...} in a config composed outside the app
        return OmegaConf.to_container(cfg, resolve=False)


def publish_artifacts(loggers: list[Logger], run_dir: Path) -> None:
    """Send the stage's plots (``run_dir/*.png``) and ``metrics.json`` to every tracker, then close its run.

    wandb: the plots as images under ``plots/<name>`` and the metrics file with the run's files; mlflow: both
    as run artifacts. Other loggers already write into ``run_dir``.
    """
    files = sorted(run_dir.glob("*.png")) + [p for p in [run_dir / "metrics.json"] if p.is_file()]
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            import wandb

            run = logger.experiment
            run.log({f"plots/{p.stem}": wandb.Image(str(p)) for p in files if p.suffix == ".png"})
            for path in files:
                run.save(str(path), base_path=str(run_dir), policy="now")
            run.finish()
        elif isinstance(logger, LightningMLFlowLogger):
            for path in files:
                logger.experiment.log_artifact(logger.run_id, str(path))
