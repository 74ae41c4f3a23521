"""The study's report: its headline numbers and ``report/report.md``, which links what each stage wrote."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from afpt.artifacts.io import write_text
from afpt.evaluate.report import flat_metrics, format_value, markdown_tables

log = logging.getLogger("afpt")
ARMS = ("af", "baseline")


def headline(results: dict[str, dict[str, Any]], evaluation: dict[str, Any]) -> dict[str, float]:
    """The study's key numbers: adaptation perplexity on the new languages, AF vs baseline, and per model the
    mean isotropy and the world tasks' scores."""
    out: dict[str, float] = {}
    for arm in ARMS:
        after = results[f"adapt_{arm}"]["after"]
        for lang, values in after.items():
            out[f"{arm}/adapt/{lang}/ppl_char"] = values["ppl_char"]
            out[f"{arm}/adapt/{lang}/ppl_token"] = values["ppl_token"]
        out[f"{arm}/adapt/mean_ppl_char"] = sum(v["ppl_char"] for v in after.values()) / len(after)
        out[f"{arm}/pretrain/val_loss"] = results[f"pretrain_{arm}"]["val/loss"]
        if f"instruct_{arm}" in results:
            out[f"{arm}/instruct/answer_logprob"] = results[f"instruct_{arm}"]["after"]["answer_logprob_per_token"]
    out["adapt_ppl_char_gain"] = out["baseline/adapt/mean_ppl_char"] - out["af/adapt/mean_ppl_char"]
    for arm in ARMS:
        new = results[f"adapt_{arm}"]["languages"]
        for lang, ratios in retention(evaluation["models"], arm, new).items():
            for step, ratio in ratios.items():
                out[f"{arm}/retention/{lang}/{step}"] = ratio
    wanted = (
        "/isotropy/mean/self_similarity",
        "/isotropy/mean/self_similarity_adjusted",
        "/task/afpt_mc/acc",
        "/task/afpt_translate/chrf",
    )
    out.update({f"eval/{k}": v for k, v in flat_metrics(evaluation["models"]).items() if k.endswith(wanted)})
    return out


def ppl_char(models: dict[str, Any], model: str, lang: str) -> float | None:
    """One evaluated model's per-character perplexity in ``lang`` (None if it was not scored)."""
    return (models.get(model, {}).get("perplexity", {}).get(lang) or {}).get("ppl_char")


def retention(models: dict[str, Any], arm: str, new_languages: list[str]) -> dict[str, dict[str, float]]:
    """Per language the evaluation scored, how each step changed the ``arm``'s per-character perplexity:
    ``adapted`` = adapted / pretrained (for the pretraining languages; the new ones were unknown before) and
    ``instructed`` = instructed / adapted (1 = kept, 2 = doubled)."""

    out: dict[str, dict[str, float]] = {}
    for lang in models.get(arm, {}).get("perplexity", {}):
        pretrained, adapted, instructed = (
            ppl_char(models, m, lang) for m in (arm, f"{arm}_adapted", f"{arm}_instructed")
        )
        if adapted and lang not in new_languages:
            out.setdefault(lang, {})["adapted"] = adapted / pretrained
        if adapted and instructed:
            out.setdefault(lang, {})["instructed"] = instructed / adapted
    return out


def stage_rows(results: dict[str, dict[str, Any]], evaluation: dict[str, Any]) -> list[str]:
    """Markdown rows: each stage run's wall time, training time and throughput (steady-state windows)."""
    rows = [
        "| stage | wall time (s) | training (s) | tokens/s | real (non-pad) tokens/s | MFU |",
        "|---|---:|---:|---:|---:|---:|",
    ]

    def number(value: Any, fmt: str) -> str:
        return format(value, fmt) if isinstance(value, (int, float)) else "–"

    for name, r in results.items():
        if name == "evaluate":
            continue
        t = r.get("throughput") or {}
        rows.append(
            f"| {name} | {number(r.get('wall_time_s'), '.1f')} | {number(r.get('train_time_s'), '.1f')} | "
            f"{number(t.get('tokens_per_s'), ',.0f')} | {number(t.get('real_tokens_per_s'), ',.0f')} | "
            f"{number(t.get('mfu'), '.1%')} |"
        )
    n = len(evaluation["models"])
    rows.append(
        f"| evaluate ({n} models, {evaluation.get('device', '?')}) | "
        f"{number(evaluation.get('wall_time_s'), '.1f')} | – | – | – | – |"
    )
    return rows


def _forgetting(forgetting: DictConfig) -> str:
    """The AF arm's forgetting in words: its variant, K, and the options that make it that variant."""
    words = f"forgetting `{forgetting.get('label', 'every_k')}` every {forgetting.get('every_n_steps')} steps"
    if forgetting.get("stop_after_steps") is not None:
        words += f" until step {forgetting.stop_after_steps}"
    if forgetting.get("row_probability") is not None:
        words += f", each row with probability {forgetting.row_probability}"
    elif forgetting.get("fraction", 1.0) < 1:
        words += f", {forgetting.fraction:g} of the rows"
    return words


def _image(report: Path, path: Path, alt: str) -> list[str]:
    """A Markdown image line for a plot a stage wrote (relative to the report), if it exists."""
    return [f"![{alt}]({os.path.relpath(path, report)})", ""] if path.is_file() else []


def write_report(study: Path, results: dict[str, dict[str, Any]], evaluation: dict[str, Any], cfg: DictConfig):
    """``report/report.md``: every table, and links to the plots the stages wrote; returns the headline numbers."""
    report = study / "report"
    numbers = headline(results, evaluation)
    lines = [
        "# afpt study: active forgetting vs baseline",
        "",
        f"Model `{cfg.model.name}`, seed {cfg.seed}, {_forgetting(cfg.forgetting)}, "
        f"{results['pretrain_af']['global_step']} pretraining steps, adaptation to "
        f"{', '.join(results['adapt_af']['languages'])} ({cfg.adapt.init} init, {cfg.adapt.policy}).",
        "",
        "## Pretraining",
        "",
        "| arm | val loss | resets | train time (s) |",
        "|---|---:|---:|---:|",
    ]
    for arm in ARMS:
        r = results[f"pretrain_{arm}"]
        lines.append(f"| {arm} | {r['val/loss']:.4f} | {len(r['resets'])} | {r['train_time_s']} |")
    lines.append("")
    for arm in ARMS:
        lines += _image(report, study / f"pretrain_{arm}" / "loss.png", f"pretraining loss, {arm}")
    ada = results["adapt_af"]
    lines += ["## Adaptation (held-out languages)", ""]
    lines += [
        f"Perplexities of the first {ada.get('perplexity_docs', '?')} held-out documents per language, each cut to "
        f"{ada.get('perplexity_context', '?')} tokens: the evaluate stage's definition, so the adapted models' "
        "numbers below and there agree.",
        "",
    ]
    lines += [
        "| arm | language | ppl/token before | ppl/token after | ppl/char before | ppl/char after |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for arm in ARMS:
        r = results[f"adapt_{arm}"]
        for lang in r["languages"]:
            b, a = r["before"][lang], r["after"][lang]
            lines.append(
                f"| {arm} | {lang} | {b['ppl_token']:.4g} | {a['ppl_token']:.4g} | {b['ppl_char']:.4g} | {a['ppl_char']:.4g} |"
            )
    lines.append("")
    for arm in ARMS:
        lines += _image(report, study / f"adapt_{arm}" / "adaptation.png", f"adaptation curves, {arm}")
    if "instruct_af" in results:
        lines += [
            "## Instruction tuning (English)",
            "",
            "| arm | gold log-prob/token before | after | exact match after |",
            "|---|---:|---:|---:|",
        ]
        for arm in ARMS:
            r = results[f"instruct_{arm}"]
            lines.append(
                f"| {arm} | {r['before']['answer_logprob_per_token']:.3f} | {r['after']['answer_logprob_per_token']:.3f} | "
                f"{r['after']['exact_match']:.2f} |"
            )
        lines.append("")
    lines += ["## Retention: per-character perplexity after adaptation and instruction tuning", ""]
    lines += [
        "Each language's per-character perplexity (the evaluate stage's) for each model of an arm, and how each step "
        "changed it: adaptation (adapted / pretrained; not for the new languages, unknown before it) and instruction "
        "tuning (instructed / adapted). 1.00 kept, 2.00 doubled.",
        "",
        "| arm | language | pretrained | adapted | instructed | adaptation | instruction tuning |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    models = evaluation["models"]
    for arm in ARMS:
        new = results[f"adapt_{arm}"]["languages"]
        for lang, ratios in retention(models, arm, new).items():
            values = [ppl_char(models, m, lang) for m in (arm, f"{arm}_adapted", f"{arm}_instructed")]
            cells = [format_value(v) for v in values]
            cells += [
                f"{ratios[s]:.2f}x" if s in ratios else "new" if s == "adapted" else "–"
                for s in ("adapted", "instructed")
            ]
            lines.append(f"| {arm} | {lang} | " + " | ".join(cells) + " |")
    lines += ["", "## Time and throughput of each stage", "", *stage_rows(results, evaluation), ""]
    lines += ["## Evaluation of every model", ""]
    lines += markdown_tables(evaluation["models"], evaluation["config"]["isotropy"]["layer"], level=3)
    lines += _image(report, study / "evaluate" / "comparison.png", "evaluation of every model")
    write_text(report / "report.md", "\n".join(lines) + "\n")
    log.info("pipeline report: %s", report / "report.md")
    return numbers
