"""The whole study in one command: pretrain with and without forgetting, adapt, instruct, evaluate, report."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from afpt.errors import AfptError
from afpt.plots import plot_comparison, plot_curves, plot_loss_with_resets, read_metric_csv
from afpt.stages import adapt, evaluate, instruct, pretrain
from afpt.stages.common import read_json, write_json

log = logging.getLogger("afpt")

STAGES = {"pretrain": pretrain.run, "adapt": adapt.run, "instruct": instruct.run, "evaluate": evaluate.run}
# Stages whose Lightning checkpoints resume bit-exactly (instruct restarts its epoch, so it reruns).
RESUMABLE = ("pretrain", "adapt")


def arms(cfg: DictConfig) -> dict[str, DictConfig | None]:
    """The compared arms: ``af`` with the configured forgetting, ``baseline`` with none, everything else equal."""
    if cfg.forgetting.name == "none":
        raise AfptError("stage=pipeline compares forgetting with none: keep forgetting=every_k (set its options)")
    return {"af": cfg.forgetting, "baseline": OmegaConf.create({"name": "none"})}


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
    return STAGES[stage](sub), True


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


def headline(results: dict[str, dict[str, Any]], evaluation: dict[str, Any]) -> dict[str, float]:
    """The study's key numbers: adaptation perplexity on the new languages, AF vs baseline, and per model the
    mean isotropy and the world tasks' scores."""
    out: dict[str, float] = {}
    for arm in ("af", "baseline"):
        after = results[f"adapt_{arm}"]["after"]
        for lang, values in after.items():
            out[f"{arm}/adapt/{lang}/ppl_char"] = values["ppl_char"]
            out[f"{arm}/adapt/{lang}/ppl_token"] = values["ppl_token"]
        out[f"{arm}/adapt/mean_ppl_char"] = sum(v["ppl_char"] for v in after.values()) / len(after)
        out[f"{arm}/pretrain/val_loss"] = results[f"pretrain_{arm}"]["val/loss"]
        if f"instruct_{arm}" in results:
            out[f"{arm}/instruct/answer_logprob"] = results[f"instruct_{arm}"]["after"]["answer_logprob_per_token"]
    out["adapt_ppl_char_gain"] = out["baseline/adapt/mean_ppl_char"] - out["af/adapt/mean_ppl_char"]
    flat = evaluate.flat_metrics(evaluation["models"])
    wanted = (
        "/isotropy/mean/self_similarity",
        "/isotropy/mean/self_similarity_adjusted",
        "/task/afpt_mc/acc",
        "/task/afpt_translate/chrf",
    )
    out.update({f"eval/{k}": v for k, v in flat.items() if k.endswith(wanted)})
    return out


def write_report(study: Path, results: dict[str, dict[str, Any]], evaluation: dict[str, Any], cfg: DictConfig):
    """``report/report.md`` with every table, and the PNG plots; returns the headline numbers."""
    report = study / "report"
    report.mkdir(parents=True, exist_ok=True)
    numbers = headline(results, evaluation)
    for arm in ("af", "baseline"):
        run_dir = study / f"pretrain_{arm}"
        csvs = sorted(run_dir.glob("logs/**/metrics.csv"), key=lambda p: p.stat().st_mtime)
        plot_loss_with_resets(
            read_metric_csv(csvs, "train/loss"),
            read_metric_csv(csvs, "val/loss"),
            [r["step"] for r in results[f"pretrain_{arm}"]["resets"]],
            report / f"pretrain_loss_{arm}.png",
            f"pretraining loss, {'forgetting' if arm == 'af' else 'baseline (no forgetting)'}",
        )
    tokens_per_step = {
        arm: results[f"adapt_{arm}"]["tokens_seen"] / max(1, results[f"adapt_{arm}"]["global_step"])
        for arm in ("af", "baseline")
    }
    curves = {}
    for arm in ("af", "baseline"):
        csvs = sorted((study / f"adapt_{arm}").glob("logs/**/metrics.csv"), key=lambda p: p.stat().st_mtime)
        for lang in results[f"adapt_{arm}"]["languages"]:
            points = read_metric_csv(csvs, f"val/ppl/{lang}")
            curves[f"{arm} {lang}"] = [(s * tokens_per_step[arm], v) for s, v in points]
    plot_curves(
        curves,
        report / "adaptation.png",
        "adaptation tokens",
        "validation perplexity (per token)",
        "adaptation to the held-out languages: forgetting vs baseline",
    )
    labels = list(evaluation["models"])
    for title, groups in evaluate.chart_panels(evaluation["models"]).items():
        safe = "".join(c if c.isalnum() else "_" for c in title)
        plot_comparison({title: groups}, labels, report / f"bars_{safe}.png")
    lines = [
        "# afpt study: active forgetting vs baseline",
        "",
        f"Model `{cfg.model.name}`, seed {cfg.seed}, forgetting every {cfg.forgetting.get('every_n_steps')} steps, "
        f"{results['pretrain_af']['global_step']} pretraining steps, adaptation to "
        f"{', '.join(results['adapt_af']['languages'])} ({cfg.adapt.init} init, {cfg.adapt.policy}).",
        "",
        "## Pretraining",
        "",
        "| arm | val loss | resets | train time (s) |",
        "|---|---:|---:|---:|",
    ]
    for arm in ("af", "baseline"):
        r = results[f"pretrain_{arm}"]
        lines.append(f"| {arm} | {r['val/loss']:.4f} | {len(r['resets'])} | {r['train_time_s']} |")
    lines += ["", "![pretraining loss, forgetting](pretrain_loss_af.png)", "", "## Adaptation (held-out languages)", ""]
    lines += [
        "| arm | language | ppl/token before | ppl/token after | ppl/char before | ppl/char after |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for arm in ("af", "baseline"):
        r = results[f"adapt_{arm}"]
        for lang in r["languages"]:
            b, a = r["before"][lang], r["after"][lang]
            lines.append(
                f"| {arm} | {lang} | {b['ppl_token']:.4g} | {a['ppl_token']:.4g} | {b['ppl_char']:.4g} | {a['ppl_char']:.4g} |"
            )
    lines += ["", "![adaptation curves](adaptation.png)", ""]
    if "instruct_af" in results:
        lines += [
            "## Instruction tuning (English)",
            "",
            "| arm | gold log-prob/token before | after | exact match after |",
            "|---|---:|---:|---:|",
        ]
        for arm in ("af", "baseline"):
            r = results[f"instruct_{arm}"]
            lines.append(
                f"| {arm} | {r['before']['answer_logprob_per_token']:.3f} | {r['after']['answer_logprob_per_token']:.3f} | "
                f"{r['after']['exact_match']:.2f} |"
            )
        lines.append("")
    lines += ["## Evaluation of every model", ""]
    body = (study / "evaluate" / "results.md").read_text().split("\n", 2)[2]
    lines += [body.replace("## ", "### "), ""]
    lines += [f"![{p.stem}]({p.name})" for p in sorted(report.glob("bars_*.png"))]
    text = "\n".join(lines) + "\n"
    tmp = report / ".report.md.tmp"
    tmp.write_text(text)
    tmp.replace(report / "report.md")
    log.info("pipeline report: %s", report / "report.md")
    return numbers
