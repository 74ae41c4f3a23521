"""Evaluation stage: per-language perplexity, isotropy and lm-eval tasks for one model or several side by side."""

from __future__ import annotations

import logging
import math
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets
import lightning.pytorch as pl
import torch
from omegaconf import DictConfig, ListConfig

from afpt.data import DataError, as_file_map, check_hub_reachable, load_text_files, load_tokenizer, world_from_config
from afpt.errors import AfptError
from afpt.evaluation import isotropy, text_nll
from afpt.harness import (
    WORLD_GROUPS,
    check_include_path,
    check_tasks,
    parse_tasks,
    run_tasks,
    task_manager,
    write_world_tasks,
)
from afpt.models import check_model_dir, load_model
from afpt.plots import plot_comparison
from afpt.stages.common import to_dict, write_json

log = logging.getLogger("afpt")

HELDOUT_SOURCES = ("world", "files", "hub")
POOLING = ("mean", "last")
TASK_HINT = "Run it where the Hub is reachable or with its dataset in the datasets cache; the other tasks still ran."


def model_dirs(cfg: DictConfig) -> list[str]:
    """``init_from`` as a list of model directories (one path, or a list for a side-by-side comparison)."""
    value = cfg.get("init_from") or cfg.model.get("init_from")
    if not value:
        raise AfptError("stage=evaluate needs init_from=<model dir> or init_from=[dirA,dirB,...]")
    dirs = [str(v) for v in value] if isinstance(value, (list, ListConfig)) else [str(value)]
    for d in dirs:
        check_model_dir(d)
    return dirs


def model_labels(dirs: Sequence[str], labels: Sequence[str] | None) -> list[str]:
    """Column names: ``evaluate.labels``, or each directory's name (its parent's when it is called ``model``)."""
    if labels:
        if len(labels) != len(dirs):
            raise AfptError(f"evaluate.labels has {len(labels)} names for {len(dirs)} models in init_from")
        names = [str(x) for x in labels]
    else:
        names = [Path(d).parent.name if Path(d).name == "model" else Path(d).name for d in dirs]
        names = [n or d for n, d in zip(names, dirs)]
    if len(set(names)) != len(names):
        names = [f"{i}:{n}" for i, n in enumerate(names)]
    return names


def heldout_texts(cfg: DictConfig) -> dict[str, list[str]]:
    """Held-out documents per language from ``evaluate.heldout`` (world, local files, or a hub dataset)."""
    h = cfg.evaluate.heldout
    if h.source not in HELDOUT_SOURCES:
        raise DataError(f"evaluate.heldout.source={h.source!r} is unknown; expected one of {HELDOUT_SOURCES}")
    if h.source == "world":
        world = world_from_config(cfg.data.world)
        codes = [spec.code for spec in world.config.languages]
        langs = list(h.languages or codes)
        unknown = [lang for lang in langs if lang not in codes]
        if unknown:
            raise DataError(f"evaluate.heldout.languages {unknown} have no held-out text in the world (it has {codes})")
        texts = {lang: world.documents(lang, "validation")[: h.docs] for lang in langs}
    elif h.source == "files":
        file_map = as_file_map(h.files, "evaluate.heldout.files")
        langs = list(h.languages or file_map)
        missing = [lang for lang in langs if lang not in file_map]
        if missing:
            raise DataError(f"evaluate.heldout.files has no files for languages {missing}; it has {sorted(file_map)}")
        texts = {
            lang: load_text_files(file_map[lang], f"evaluate.heldout.files[{lang}]", h.text_field)["text"][: h.docs]
            for lang in langs
        }
    else:
        if not h.languages:
            raise DataError("evaluate.heldout.languages is empty: name the hub languages to evaluate")
        check_hub_reachable(f"evaluate.heldout.hub.path={h.hub.path!r}")
        texts = {}
        for lang in h.languages:
            name = h.hub.name_template.format(lang=lang) if h.hub.name_template else None
            stream = datasets.load_dataset(h.hub.path, name, split=h.hub.split, streaming=True)
            texts[lang] = [row[h.hub.text_field] for _, row in zip(range(h.docs), stream)]
    empty = [lang for lang, docs in texts.items() if not any(t.strip() for t in docs)]
    if empty:
        raise DataError(f"languages {empty} have no held-out text in evaluate.heldout (source={h.source})")
    return texts


def prepare_tasks(cfg: DictConfig, run_dir: Path):
    """Parse and check ``evaluate.tasks``; write afpt's world tasks when asked for. Returns (specs, manager, paths)."""
    e = cfg.evaluate
    specs = parse_tasks(e.tasks, e.num_fewshot)
    if not specs:
        return [], None, []
    include = [check_include_path(e.include_path).resolve()] if e.include_path else []
    world_names = {s.name for s in specs if s.name in WORLD_GROUPS or s.name.startswith(tuple(WORLD_GROUPS))}
    if world_names:
        world = world_from_config(cfg.data.world)
        w = e.world_tasks
        codes = [spec.code for spec in world.config.languages]
        langs = list(w.languages or codes)
        unknown = [lang for lang in langs if lang not in codes]
        if unknown:
            raise AfptError(f"evaluate.world_tasks.languages {unknown} are not world languages ({codes})")
        out = write_world_tasks(
            world,
            (run_dir / "tasks").resolve(),
            langs,
            [lang for lang in langs if lang != "en"],
            mc_items=w.mc_items,
            mc_choices=w.mc_choices,
            translation_items=w.translation_items,
            translation_shots=w.translation_shots,
            max_gen_toks=w.max_gen_toks,
            seed=cfg.seed,
        )
        include.append(out)
    manager = task_manager(include)
    try:
        check_tasks(specs, manager, include)
    except AfptError:
        if world_names:
            shutil.rmtree(run_dir / "tasks", ignore_errors=True)
        raise
    return specs, manager, include


def hub_checker():
    """``check(task)``: raise a clear error naming the task when the Hub is unreachable (checked once)."""
    state: dict[str, str | None] = {}

    def check(task: str) -> None:
        if "error" not in state:
            try:
                check_hub_reachable("its dataset", hint=TASK_HINT)
                state["error"] = None
            except DataError as err:
                state["error"] = str(err)
        if state["error"]:
            raise AfptError(f"task {task!r} was not run: {state['error']}")

    return check


def evaluate_model(cfg: DictConfig, path: str, texts: dict[str, list[str]], tasks, hub_check) -> dict[str, Any]:
    """Perplexity and isotropy per language, then the tasks, for the model in ``path``."""
    e = cfg.evaluate
    device = torch.device("cuda" if torch.cuda.is_available() and e.device != "cpu" else "cpu")
    tokenizer = load_tokenizer(path)
    model = load_model(path).to(device).eval()
    max_length = e.heldout.max_length or model.config.max_position_embeddings
    result: dict[str, Any] = {"path": str(path), "perplexity": {}, "isotropy": {}, "tasks": {}, "failed_tasks": {}}
    if e.perplexity:
        for lang, docs in texts.items():
            result["perplexity"][lang] = text_nll(model, tokenizer, docs, max_length, e.batch_size)
    if e.isotropy.enabled:
        i = e.isotropy
        for lang, docs in texts.items():
            try:
                result["isotropy"][lang] = isotropy(
                    model,
                    tokenizer,
                    docs,
                    layer=i.layer,
                    words=i.words,
                    contexts=i.contexts,
                    baseline_pairs=i.baseline_pairs,
                    pooling=i.pooling,
                    max_length=max_length,
                    seed=cfg.seed,
                )
            except ValueError as err:
                raise AfptError(f"evaluate.isotropy ({lang}): {err}") from err
    specs, manager, include = tasks
    if specs:
        result["tasks"], result["failed_tasks"] = run_tasks(
            model,
            tokenizer,
            specs,
            manager,
            include,
            batch_size=e.batch_size,
            max_length=max_length,
            limit=e.limit,
            apply_chat_template=e.apply_chat_template,
            bootstrap_iters=e.bootstrap_iters,
            seed=cfg.seed,
            hub_check=hub_check,
        )
    return result


def summary_rows(results: dict[str, dict[str, Any]]) -> list[tuple[str, str, str, list[float | None]]]:
    """Table rows (section, name, metric, one value per model) gathered from every model's results."""
    labels = list(results)
    rows: list[tuple[str, str, str, list[float | None]]] = []
    sections = [
        ("perplexity", ("ppl_token", "ppl_char", "ppl_byte")),
        ("isotropy", ("self_similarity", "baseline", "self_similarity_adjusted")),
    ]
    for section, metrics in sections:
        langs = list(dict.fromkeys(lang for r in results.values() for lang in r[section]))
        for metric in metrics:
            for lang in langs:
                rows.append((section, lang, metric, [results[m][section].get(lang, {}).get(metric) for m in labels]))
            if len(langs) > 1:
                means = []
                for m in labels:
                    vals = [results[m][section][lang][metric] for lang in langs if lang in results[m][section]]
                    means.append(sum(vals) / len(vals) if vals else None)
                rows.append((section, "mean", metric, means))
    tasks = list(dict.fromkeys(t for r in results.values() for t in r["tasks"]))
    for task in tasks:
        metrics = list(dict.fromkeys(k for r in results.values() for k in r["tasks"].get(task, {})))
        for metric in metrics:
            if "_stderr" in metric:
                continue
            rows.append(("task", task, metric, [results[m]["tasks"].get(task, {}).get(metric) for m in labels]))
    return rows


def _fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if abs(value) >= 1e5:
        return f"{value:.3g}"
    return f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"


def markdown_report(results: dict[str, dict[str, Any]], cfg: DictConfig) -> str:
    """Every number in one Markdown table per section, models side by side, plus the tasks that failed."""
    labels = list(results)
    rows = summary_rows(results)
    titles = {
        "perplexity": "Held-out perplexity (lower is better; only per-char/per-byte compare across tokenizers)",
        "isotropy": (
            f"Isotropy: self-similarity at hidden layer {cfg.evaluate.isotropy.layer}, random-pair baseline, "
            "and their difference (lower is more isotropic)"
        ),
        "task": "lm-evaluation-harness tasks",
    }
    lines = ["# afpt evaluation", "", "Models: " + ", ".join(f"`{m}` ({results[m]['path']})" for m in labels), ""]
    for section, title in titles.items():
        section_rows = [r for r in rows if r[0] == section]
        if not section_rows:
            continue
        first = "task" if section == "task" else "language"
        lines += [f"## {title}", "", f"| {first} | metric | " + " | ".join(labels) + " |"]
        lines.append("|---|---|" + "---:|" * len(labels))
        for _, name, metric, values in section_rows:
            lines.append(f"| {name} | {metric} | " + " | ".join(_fmt(v) for v in values) + " |")
        lines.append("")
    failed = {(m, t): err for m in labels for t, err in results[m]["failed_tasks"].items()}
    if failed:
        lines += ["## Tasks that did not run", ""]
        lines += [f"- `{t}` ({m}): {err}" for (m, t), err in failed.items()]
        lines.append("")
    return "\n".join(lines)


def chart_panels(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, list[float | None]]]:
    """Bar-chart panels {title: {group: one value per model}}: per-char perplexity, isotropy and task scores."""
    panels: dict[str, dict[str, list[float | None]]] = {}
    for section, name, metric, values in summary_rows(results):
        if section == "perplexity" and metric == "ppl_char":
            panels.setdefault("perplexity per character", {})[name] = values
        elif section == "isotropy" and metric == "self_similarity_adjusted":
            panels.setdefault("self-similarity minus baseline", {})[name] = values
        elif section == "task":
            panels.setdefault(metric, {})[name] = values
    return panels


def run(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate every model of ``init_from``; write metrics.json, results.md and comparison.png."""
    e = cfg.evaluate
    run_dir = Path(cfg.paths.run_dir)
    dirs = model_dirs(cfg)
    labels = model_labels(dirs, e.labels)
    if e.isotropy.pooling not in POOLING:
        raise AfptError(f"evaluate.isotropy.pooling={e.isotropy.pooling!r} is unknown; expected one of {POOLING}")
    texts = heldout_texts(cfg) if (e.perplexity or e.isotropy.enabled) else {}
    tasks = prepare_tasks(cfg, run_dir)
    pl.seed_everything(cfg.seed, workers=True)
    hub_check = hub_checker()
    results = {label: evaluate_model(cfg, d, texts, tasks, hub_check) for label, d in zip(labels, dirs)}
    metrics: dict[str, Any] = {"models": results, "config": to_dict(e)}
    write_json(metrics, run_dir / "metrics.json")
    report = run_dir / "results.md"
    tmp = report.with_name(".results.md.tmp")
    tmp.write_text(markdown_report(results, cfg))
    tmp.replace(report)
    panels = chart_panels(results)
    if panels:
        plot_comparison(panels, labels, run_dir / "comparison.png")
    failed = sorted({t for r in results.values() for t in r["failed_tasks"]})
    if failed:
        log.error("tasks that did not run: %s (see results.md)", failed)
    log.info("evaluation written to %s", report)
    return {"failed_tasks": len(failed), **flat_metrics(results)}


def flat_metrics(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """``<model>/<section>/<name>/<metric>`` scalars, for sweepers and the pipeline."""
    return {
        f"{m}/{section}/{name}/{metric}": value
        for section, name, metric, values in summary_rows(results)
        for m, value in zip(results, values)
        if value is not None
    }
