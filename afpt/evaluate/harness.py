"""Benchmark tasks through lm-evaluation-harness: standard tasks by name, afpt's world tasks as local YAML."""

from __future__ import annotations

import difflib
import json
import logging
import os
import random
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from afpt.data.world import World
from afpt.errors import AfptError

log = logging.getLogger("afpt")

WORLD_GROUPS = ("afpt_mc", "afpt_translate")
# Task definitions shipped with afpt for tasks lm-eval lacks (FLORES-200 En->X for the paper's languages).
PACKAGED_TASKS = Path(__file__).parent / "lm_eval_tasks"


class TaskError(AfptError):
    """A task name, task file or task option that cannot be used."""


@dataclass(frozen=True)
class TaskSpec:
    """One task (or group) to run: its lm-eval name and an optional few-shot count overriding the default."""

    name: str
    num_fewshot: int | None = None


def parse_tasks(entries: Sequence[Any] | None, default_fewshot: int | None) -> list[TaskSpec]:
    """``evaluate.tasks`` entries (a name, or ``{name, num_fewshot}``) as TaskSpecs."""
    specs = []
    for i, entry in enumerate(entries or []):
        if isinstance(entry, str):
            specs.append(TaskSpec(entry, default_fewshot))
        elif isinstance(entry, Mapping) and isinstance(entry.get("name"), str):
            unknown = set(entry) - {"name", "num_fewshot"}
            if unknown:
                raise TaskError(f"evaluate.tasks[{i}] has unknown keys {sorted(unknown)}; expected name, num_fewshot")
            specs.append(TaskSpec(entry["name"], entry.get("num_fewshot", default_fewshot)))
        else:
            raise TaskError(f"evaluate.tasks[{i}]={entry!r}: expected a task name or {{name: ..., num_fewshot: ...}}")
    return specs


def _write_yaml(data: dict[str, Any], path: Path) -> None:
    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))


def _write_jsonl(rows: list[dict[str, Any]], path: Path) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_world_tasks(
    world: World,
    out_dir: Path,
    mc_languages: Sequence[str],
    translation_languages: Sequence[str],
    *,
    mc_items: int | None = None,
    mc_choices: int = 4,
    translation_items: int = 100,
    translation_shots: int = 4,
    max_gen_toks: int = 64,
    seed: int = 0,
) -> Path:
    """Write afpt's world tasks as lm-eval task YAML plus JSONL data into ``out_dir`` (replaced atomically).

    ``afpt_mc_<lang>``: cloze multiple choice over the world's facts, asked in ``lang`` (acc, acc_norm).
    ``afpt_translate_<lang>``: English -> ``lang`` sentence translation with ``translation_shots`` examples
    drawn from facts outside the test items (BLEU, chrF). Groups ``afpt_mc`` and ``afpt_translate`` hold them.
    """
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for lang in mc_languages:
        items = world.multiple_choice(lang, num_choices=mc_choices, seed=seed)
        items = random.Random(f"{seed}-mc-{lang}").sample(items, min(mc_items or len(items), len(items)))
        _write_jsonl(items, tmp / f"mc_{lang}.jsonl")
        _write_yaml(
            {
                "task": f"afpt_mc_{lang}",
                "dataset_path": "json",
                "dataset_kwargs": {"data_files": {"test": str(out_dir / f"mc_{lang}.jsonl")}},
                "test_split": "test",
                "output_type": "multiple_choice",
                "doc_to_text": "{{question}}",
                "doc_to_choice": "{{choices}}",
                "doc_to_target": "label",
                "target_delimiter": " ",
                "metric_list": [
                    {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                    {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
                ],
                "metadata": {"version": 1.0},
            },
            tmp / f"afpt_mc_{lang}.yaml",
        )
    for lang in translation_languages:
        pairs = [{"source": s, "target": t} for s, t in world.translation_pairs(lang)]
        random.Random(f"{seed}-translate-{lang}").shuffle(pairs)
        _write_jsonl(pairs[:translation_items], tmp / f"translate_{lang}_test.jsonl")
        _write_jsonl(pairs[translation_items:], tmp / f"translate_{lang}_shots.jsonl")
        _write_yaml(
            {
                "task": f"afpt_translate_{lang}",
                "dataset_path": "json",
                "dataset_kwargs": {
                    "data_files": {
                        "test": str(out_dir / f"translate_{lang}_test.jsonl"),
                        "train": str(out_dir / f"translate_{lang}_shots.jsonl"),
                    }
                },
                "test_split": "test",
                "fewshot_split": "train",
                "num_fewshot": translation_shots,
                "output_type": "generate_until",
                "doc_to_text": f"English: {{{{source}}}}\n{lang}:",
                "doc_to_target": "{{target}}",
                "target_delimiter": " ",
                "fewshot_delimiter": "\n\n",
                "generation_kwargs": {"until": ["\n"], "max_gen_toks": max_gen_toks, "do_sample": False},
                "metric_list": [
                    {"metric": "bleu", "aggregation": "bleu", "higher_is_better": True},
                    {"metric": "chrf", "aggregation": "chrf", "higher_is_better": True},
                ],
                "metadata": {"version": 1.0},
            },
            tmp / f"afpt_translate_{lang}.yaml",
        )
    groups = {
        "afpt_mc": ([f"afpt_mc_{lang}" for lang in mc_languages], [("acc", True), ("acc_norm", True)]),
        "afpt_translate": (
            [f"afpt_translate_{lang}" for lang in translation_languages],
            [("bleu", False), ("chrf", False)],
        ),
    }
    for group, (members, metrics) in groups.items():
        if members:
            _write_yaml(
                {
                    "group": group,
                    "task": members,
                    "aggregate_metric_list": [
                        {"metric": m, "aggregation": "mean", "weight_by_size": by_size} for m, by_size in metrics
                    ],
                    "metadata": {"version": 1.0},
                },
                tmp / f"_{group}.yaml",
            )
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return out_dir


def check_include_path(path: str | os.PathLike) -> Path:
    """A user's directory of lm-eval task YAML: it must exist and hold no empty YAML file."""
    root = Path(path)
    if not root.is_dir():
        raise TaskError(f"evaluate.include_path={str(path)!r} is not a directory of lm-eval task YAML files")
    files = sorted(root.rglob("*.yaml"))
    if not files:
        raise TaskError(f"evaluate.include_path={str(path)!r} holds no *.yaml task file")
    for file in files:
        if not file.read_text().strip():
            raise TaskError(f"task file {str(file)!r} is empty; expected an lm-eval task definition")
    return root


def task_manager(include_paths: Sequence[Path], names: Iterable[str] | None = None):
    """An lm-eval TaskManager over afpt's packaged tasks and ``include_paths``, and lm-eval's standard tasks unless
    every one of ``names`` is among the former (indexing the standard tasks reads thousands of YAML files)."""
    from lm_eval.tasks import TaskManager

    paths = [str(PACKAGED_TASKS), *(str(p) for p in include_paths)]
    if names is not None:
        local = TaskManager(include_path=paths, include_defaults=False)
        if set(names) <= set(local.all_tasks):
            return local
    return TaskManager(include_path=paths)


def _local(manager, name: str, include_paths: Sequence[Path]) -> bool:
    path = Path(manager.task_index[name].yaml_path or "")
    return any(path.is_relative_to(p) for p in include_paths)


def check_tasks(specs: Sequence[TaskSpec], manager, include_paths: Sequence[Path]) -> None:
    """Every name must be an lm-eval task, group or tag (listing close matches); local data files must hold data."""
    known = manager.all_tasks
    for spec in specs:
        if spec.name not in known:
            close = difflib.get_close_matches(spec.name, known, n=5, cutoff=0.6)
            hint = f"; close matches: {close}" if close else "; list them with `lm-eval ls tasks`"
            raise TaskError(f"evaluate.tasks: unknown task {spec.name!r}{hint}")
    for name in known:
        if not _local(manager, name, include_paths):
            continue
        files = (manager.task_index[name].cfg or {}).get("dataset_kwargs", {}).get("data_files") or {}
        for file in files.values() if isinstance(files, Mapping) else [files]:
            for f in [file] if isinstance(file, str) else file:
                if not Path(f).is_file() or Path(f).stat().st_size == 0:
                    raise TaskError(f"task {name!r}: data file {f!r} is missing or empty")


def flatten_results(results: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """lm-eval's ``results`` as {task: {metric: value}}, ``metric,filter`` keys shortened and stderr kept."""
    out: dict[str, dict[str, float]] = {}
    for task, values in results.items():
        row = {}
        for key, value in values.items():
            if "," not in key or not isinstance(value, (int, float)):
                continue
            metric, filt = key.split(",", 1)
            row[metric if filt == "none" else f"{metric}[{filt}]"] = float(value)
        out[task] = row
    return out


def run_tasks(
    model,
    tokenizer,
    specs: Sequence[TaskSpec],
    manager,
    include_paths: Sequence[Path],
    *,
    batch_size: int,
    max_length: int,
    limit: int | float | None,
    apply_chat_template: bool,
    bootstrap_iters: int,
    seed: int,
    hub_check,
) -> tuple[dict[str, dict[str, float]], dict[str, str]]:
    """Run each task on the in-memory model; a task that fails is reported by name and the others still run.

    Returns ({task: {metric: value}}, {task: error message}). ``hub_check(name)`` raises when a standard
    task's dataset cannot be downloaded, so an offline run fails fast instead of retrying for minutes.
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(
        pretrained=model,
        tokenizer=tokenizer,
        batch_size=batch_size,
        max_length=max_length,
        device=str(next(model.parameters()).device),
    )
    scores: dict[str, dict[str, float]] = {}
    failures: dict[str, str] = {}
    for spec in specs:
        try:
            if not _local(manager, spec.name, include_paths):
                hub_check(spec.name)
            out = lm_eval.simple_evaluate(
                model=lm,
                tasks=[spec.name],
                num_fewshot=spec.num_fewshot,
                limit=limit,
                task_manager=manager,
                apply_chat_template=apply_chat_template,
                bootstrap_iters=bootstrap_iters,
                log_samples=False,
                random_seed=seed,
                numpy_random_seed=seed,
                torch_random_seed=seed,
                fewshot_random_seed=seed,
            )
        except Exception as err:  # noqa: BLE001 - one failing task must not stop the others
            failures[spec.name] = f"{type(err).__name__}: {err}"
            log.error("task %r failed: %s", spec.name, failures[spec.name])
            continue
        scores.update(flatten_results(out["results"]))
    return scores, failures
