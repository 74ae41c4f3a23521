"""``stage=pipeline``, the whole study in one command: pretrain with and without forgetting, adapt, instruct, evaluate, report."""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from afpt.app.stages import forgetting_on, run_stage
from afpt.artifacts.io import read_json, write_json
from afpt.errors import AfptError
from afpt.study.report import write_report

log = logging.getLogger("afpt")

# Stages whose Lightning checkpoints resume bit-exactly (instruct restarts its epoch, so it reruns).
RESUMABLE = ("pretrain", "adapt")
# The evaluate stage's columns, left to right.
EVALUATION_ORDER = ("baseline", "af", "baseline_adapted", "af_adapted", "baseline_instructed", "af_instructed")


def arms(cfg: DictConfig) -> dict[str, DictConfig | None]:
    """The compared arms: ``af`` with the configured forgetting, ``baseline`` with none, everything else equal."""
    if not forgetting_on(cfg.get("forgetting")):
        raise AfptError("stage=pipeline compares forgetting with none: keep forgetting=every_k (set its options)")
    return {"af": cfg.forgetting, "baseline": None}


@dataclass(frozen=True)
class Step:
    """One stage run of the study: its run directory's name, the stage, the config keys it sets (dotted paths, over
    the study's config), and the step whose model it starts from (a rerun there makes this one stale; ``"*"``: it
    reads every earlier step's model, so any rerun does)."""

    name: str
    stage: str
    keys: dict[str, Any] = field(default_factory=dict)
    after: str | None = None


def plan(cfg: DictConfig, study: Path) -> list[Step]:
    """The study as a list of steps: per arm pretrain -> adapt (-> instruct), then one evaluate of every model."""
    steps, evaluated = [], {}
    for arm, forgetting in arms(cfg).items():
        pre, ada, ins = f"pretrain_{arm}", f"adapt_{arm}", f"instruct_{arm}"
        steps.append(Step(pre, "pretrain", {"forgetting": forgetting}))
        steps.append(Step(ada, "adapt", {"init_from": str(study / pre / "model")}, after=pre))
        evaluated[arm], evaluated[f"{arm}_adapted"] = pre, ada
        if cfg.pipeline.instruct:
            steps.append(Step(ins, "instruct", {"init_from": str(study / ada / "model")}, after=ada))
            if cfg.pipeline.evaluate_instructed:
                evaluated[f"{arm}_instructed"] = ins
    order = [m for m in EVALUATION_ORDER if m in evaluated]
    models = [str(study / evaluated[m] / "model") for m in order]
    steps.append(Step("evaluate", "evaluate", {"init_from": models, "evaluate.labels": order}, after="*"))
    return steps


def sub_config(cfg: DictConfig, step: Step, run_dir: Path) -> DictConfig:
    """The study's config for one step: its stage and run directory, no checkpoint, and the step's keys."""
    sub = cfg.copy()
    with open_dict(sub):
        sub.stage = {"name": step.stage}
        sub.paths.run_dir = str(run_dir)
        sub.ckpt_path = None
        for key, value in step.keys.items():
            OmegaConf.update(sub, key, value, merge=False)
    return sub


def run_once(stage: str, sub: DictConfig, run_dir: Path, stale: bool = False) -> tuple[dict[str, Any], bool]:
    """Run a stage unless ``run_dir/metrics.json`` says it finished; resume or restart an interrupted one.

    ``stale``: an upstream stage has just rerun, so a finished result here is outdated and reruns too.
    Returns (metrics, whether the stage ran now).
    """
    done = run_dir / "metrics.json"
    if done.is_file() and not stale:
        log.info("pipeline: %s already finished, reusing %s", run_dir.name, run_dir)
        return read_json(done), False
    if stale and run_dir.exists():
        shutil.rmtree(run_dir)
    last = run_dir / "checkpoints" / "last.ckpt"
    if stage in RESUMABLE and last.is_file():
        log.info("pipeline: resuming %s from %s", run_dir.name, last)
        with open_dict(sub):
            sub.ckpt_path = str(last)
    elif run_dir.exists():
        log.info("pipeline: restarting the interrupted %s", run_dir.name)
        shutil.rmtree(run_dir)
    log.info("pipeline: running %s in %s", run_dir.name, run_dir)
    return run_stage(stage, sub), True


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run ``plan``'s steps in order (reusing finished ones), then write ``report/`` and ``metrics.json``."""
    study = Path(cfg.paths.run_dir)
    results: dict[str, dict[str, Any]] = {}
    reran: set[str] = set()
    steps = plan(cfg, study)
    for step in steps:
        stale = bool(reran) if step.after == "*" else step.after in reran
        results[step.name], ran = run_once(
            step.stage, sub_config(cfg, step, study / step.name), study / step.name, stale
        )
        if ran:
            reran.add(step.name)
    evaluate = steps[-1]
    models = dict(zip(evaluate.keys["evaluate.labels"], evaluate.keys["init_from"]))
    summary = write_report(study, results, read_json(study / "evaluate" / "metrics.json"), cfg)
    write_json({"stage": "pipeline", "models": models, **summary}, study / "metrics.json")
    return summary
