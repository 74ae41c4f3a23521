"""``stage=pipeline``, the whole study in one command: pretrain with and without forgetting, adapt, instruct, evaluate, report."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, open_dict

from afpt.errors import AfptError
from afpt.io import read_json, write_json
from afpt.stages import forgetting_on, run_stage
from afpt.study.report import write_report

log = logging.getLogger("afpt")

# Stages whose Lightning checkpoints resume bit-exactly (instruct restarts its epoch, so it reruns).
RESUMABLE = ("pretrain", "adapt")


def arms(cfg: DictConfig) -> dict[str, DictConfig | None]:
    """The compared arms: ``af`` with the configured forgetting, ``baseline`` with none, everything else equal."""
    if not forgetting_on(cfg.get("forgetting")):
        raise AfptError("stage=pipeline compares forgetting with none: keep forgetting=every_k (set its options)")
    return {"af": cfg.forgetting, "baseline": None}


def sub_config(cfg: DictConfig, stage: str, run_dir: Path, **keys: Any) -> DictConfig:
    """A copy of the study's config for one stage run in ``run_dir``, with ``keys`` set at the top level."""
    sub = cfg.copy()
    with open_dict(sub):
        sub.stage = {"name": stage}
        sub.paths.run_dir = str(run_dir)
        sub.ckpt_path = None
        for key, value in keys.items():
            sub[key] = value
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
    """Pretrain AF and baseline, adapt both, instruction-tune both, evaluate every model; write ``report/``."""
    p = cfg.pipeline
    study = Path(cfg.paths.run_dir)
    results: dict[str, dict[str, Any]] = {}
    models: dict[str, str] = {}
    any_ran = False
    for arm, forgetting in arms(cfg).items():
        pre_dir, ada_dir, ins_dir = study / f"pretrain_{arm}", study / f"adapt_{arm}", study / f"instruct_{arm}"
        results[f"pretrain_{arm}"], ran = run_once(
            "pretrain", sub_config(cfg, "pretrain", pre_dir, forgetting=forgetting), pre_dir
        )
        results[f"adapt_{arm}"], ran = run_once(
            "adapt", sub_config(cfg, "adapt", ada_dir, init_from=str(pre_dir / "model")), ada_dir, stale=ran
        )
        models[arm] = str(pre_dir / "model")
        models[f"{arm}_adapted"] = str(ada_dir / "model")
        if p.instruct:
            results[f"instruct_{arm}"], ran = run_once(
                "instruct", sub_config(cfg, "instruct", ins_dir, init_from=str(ada_dir / "model")), ins_dir, stale=ran
            )
            if p.evaluate_instructed:
                models[f"{arm}_instructed"] = str(ins_dir / "model")
        any_ran = any_ran or ran
    order = [
        m
        for m in ("baseline", "af", "baseline_adapted", "af_adapted", "baseline_instructed", "af_instructed")
        if m in models
    ]
    eval_dir = study / "evaluate"
    sub = sub_config(cfg, "evaluate", eval_dir, init_from=[models[m] for m in order])
    with open_dict(sub):
        sub.evaluate.labels = order
    results["evaluate"], _ = run_once("evaluate", sub, eval_dir, stale=any_ran)
    summary = write_report(study, results, read_json(eval_dir / "metrics.json"), cfg)
    write_json({"stage": "pipeline", "models": models, **summary}, study / "metrics.json")
    return summary
