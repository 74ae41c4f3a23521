"""``stage=evaluate``: per-language perplexity, isotropy and lm-eval tasks for one model or several side by side."""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig, ListConfig

from afpt.app.stages import init_from, to_dict
from afpt.artifacts.io import write_json, write_text
from afpt.artifacts.plots import plot_comparison
from afpt.data import DataError, check_hub_reachable, heldout_texts, load_tokenizer, world_from_config
from afpt.errors import AfptError
from afpt.evaluate.harness import (
    WORLD_GROUPS,
    check_include_path,
    check_tasks,
    parse_tasks,
    run_tasks,
    task_manager,
    write_world_tasks,
)
from afpt.evaluate.metrics import batch_size_for, device_for, isotropy, language_perplexities
from afpt.evaluate.report import chart_panels, flat_metrics, markdown_report
from afpt.models import check_model_dir, load_model

log = logging.getLogger("afpt")

POOLING = ("mean", "last")
TASK_HINT = "Run it where the Hub is reachable or with its dataset in the datasets cache; the other tasks still ran."


def model_dirs(cfg: DictConfig) -> list[str]:
    """``init_from`` as a list of model directories (one path, or a list for a side-by-side comparison)."""
    value = init_from(cfg, "evaluate")
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
    manager = task_manager(include, [spec.name for spec in specs])
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


def evaluate_model(
    cfg: DictConfig,
    path: str,
    texts: dict[str, list[str]],
    iso_langs: list[str],
    tasks,
    hub_check,
    device: torch.device,
    batch_size: int,
) -> dict[str, Any]:
    """Perplexity per language, isotropy in ``iso_langs``, then the tasks, for the model in ``path`` (on ``device``)."""
    e = cfg.evaluate
    tokenizer = load_tokenizer(path)
    model = load_model(path).to(device).eval()
    max_length = e.heldout.max_length or model.config.max_position_embeddings
    result: dict[str, Any] = {"path": str(path), "perplexity": {}, "isotropy": {}, "tasks": {}, "failed_tasks": {}}
    if e.perplexity:
        result["perplexity"] = language_perplexities(model, tokenizer, texts, max_length, batch_size)
    if e.isotropy.enabled:
        i = e.isotropy
        for lang in iso_langs:
            docs = texts[lang]
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
            batch_size=batch_size,
            max_length=max_length,
            limit=e.limit,
            apply_chat_template=e.apply_chat_template,
            bootstrap_iters=e.bootstrap_iters,
            seed=cfg.seed,
            hub_check=hub_check,
        )
    return result


def isotropy_languages(iso: DictConfig, texts: dict[str, list[str]]) -> list[str]:
    """The languages ``evaluate.isotropy.languages`` names (null: every held-out language; one name: that one), each
    checked to have at least ``isotropy.contexts`` documents, before any model is scored."""
    for key in ("words", "contexts"):
        value = iso[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 2:
            raise AfptError(f"evaluate.isotropy.{key} must be an integer of at least 2, got {value!r}")
    if iso.languages is None:
        langs = list(texts)
    else:
        langs = [iso.languages] if isinstance(iso.languages, str) else list(iso.languages)
    unknown = [lang for lang in langs if lang not in texts]
    if unknown:
        raise AfptError(f"evaluate.isotropy.languages {unknown} have no held-out text; expected some of {list(texts)}")
    few = {lang: len(texts[lang]) for lang in langs if len(texts[lang]) < iso.contexts}
    if few:
        raise AfptError(
            f"evaluate.isotropy: held-out documents per language {few} are fewer than evaluate.isotropy.contexts="
            f"{iso.contexts} (a word must occur in that many); set evaluate.isotropy.languages, lower the contexts "
            "or add documents"
        )
    return langs


def run(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate every model of ``init_from``; write metrics.json, results.md and comparison.png."""
    wall_start = time.perf_counter()
    e = cfg.evaluate
    run_dir = Path(cfg.paths.run_dir)
    dirs = model_dirs(cfg)
    labels = model_labels(dirs, e.labels)
    if e.isotropy.pooling not in POOLING:
        raise AfptError(f"evaluate.isotropy.pooling={e.isotropy.pooling!r} is unknown; expected one of {POOLING}")
    device = device_for(e.device)
    batch_size = batch_size_for(e.batch_size, device)
    texts = heldout_texts(to_dict(e.heldout), to_dict(cfg.data.world)) if (e.perplexity or e.isotropy.enabled) else {}
    iso_langs = isotropy_languages(e.isotropy, texts) if e.isotropy.enabled else []
    tasks = prepare_tasks(cfg, run_dir)
    pl.seed_everything(cfg.seed, workers=True)
    hub_check = hub_checker()
    results = {
        label: evaluate_model(cfg, d, texts, iso_langs, tasks, hub_check, device, batch_size)
        for label, d in zip(labels, dirs)
    }
    metrics: dict[str, Any] = {
        "models": results,
        "config": to_dict(e),
        "device": str(device),
        "wall_time_s": round(time.perf_counter() - wall_start, 2),
    }
    write_json(metrics, run_dir / "metrics.json")
    report = write_text(run_dir / "results.md", markdown_report(results, e.isotropy.layer))
    panels = chart_panels(results)
    if panels:
        plot_comparison(panels, labels, run_dir / "comparison.png")
    failed = sorted({t for r in results.values() for t in r["failed_tasks"]})
    if failed:
        log.error("tasks that did not run: %s (see results.md)", failed)
    log.info("evaluation written to %s", report)
    return {"failed_tasks": len(failed), **flat_metrics(results)}
