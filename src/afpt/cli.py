"""The ``afpt`` command: a Hydra app over ``conf/`` that runs one stage."""

from __future__ import annotations

import logging
import sys
from typing import Any

import hydra
from omegaconf import DictConfig

from afpt.errors import AfptError

log = logging.getLogger("afpt")


def run_stage(cfg: DictConfig) -> dict[str, Any]:
    """Run the stage named by ``cfg.stage.name`` and return its metrics."""
    from afpt.stages import adapt, evaluate, generate, instruct, pipeline, pretrain

    stages = {
        "pretrain": pretrain.run,
        "adapt": adapt.run,
        "instruct": instruct.run,
        "generate": generate.run,
        "evaluate": evaluate.run,
        "pipeline": pipeline.run,
    }
    name = cfg.stage.name
    if name not in stages:
        raise AfptError(f"stage={name!r} is not available; expected one of {sorted(stages)}")
    return stages[name](cfg)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    """Entry point; returns ``cfg.optimized_metric`` for sweepers."""
    try:
        metrics = run_stage(cfg)
    except AfptError as err:
        log.error("%s", err)
        print(f"afpt: error: {err}", file=sys.stderr)
        sys.exit(2)
    key = cfg.get("optimized_metric")
    return float(metrics[key]) if key and key in metrics else None


if __name__ == "__main__":
    main()
