"""The ``afpt`` command: a Hydra app over ``conf/`` (installed as ``afpt.conf``) that runs one stage."""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig

from afpt.errors import AfptError
from afpt.stages import run_stage

log = logging.getLogger("afpt")


@hydra.main(version_base="1.3", config_path="pkg://afpt.conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    """Entry point; returns ``cfg.optimized_metric`` for sweepers."""
    try:
        metrics = run_stage(cfg.stage.name, cfg)
    except AfptError as err:
        log.error("%s", err)
        print(f"afpt: error: {err}", file=sys.stderr)
        sys.exit(2)
    key = cfg.get("optimized_metric")
    return float(metrics[key]) if key and key in metrics else None


if __name__ == "__main__":
    main()
