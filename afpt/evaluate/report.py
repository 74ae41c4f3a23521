"""The evaluation report: every model's numbers in one table per section, chart panels, and flat metrics."""

from __future__ import annotations

import math
from typing import Any


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


def format_value(value: float | None) -> str:
    """A table cell: 4 decimals below 10, 2 above, 3 significant digits from 1e5, and – for a missing value."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if abs(value) >= 1e5:
        return f"{value:.3g}"
    return f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"


def markdown_tables(results: dict[str, dict[str, Any]], isotropy_layer: int, level: int = 2) -> list[str]:
    """Markdown lines: one table per section (headings at ``level``), models side by side, and failed tasks."""
    labels = list(results)
    rows = summary_rows(results)
    titles = {
        "perplexity": "Held-out perplexity (lower is better; only per-char/per-byte compare across tokenizers)",
        "isotropy": (
            f"Isotropy at hidden layer {isotropy_layer}: self-similarity (lower is more isotropic), the "
            "random-pair baseline (the space's anisotropy) and their difference; a lower difference alone can "
            "come from a higher baseline, so read it beside the raw value"
        ),
        "task": "lm-evaluation-harness tasks",
    }
    heading = "#" * level
    lines = []
    for section, title in titles.items():
        section_rows = [r for r in rows if r[0] == section]
        if not section_rows:
            continue
        first = "task" if section == "task" else "language"
        lines += [f"{heading} {title}", "", f"| {first} | metric | " + " | ".join(labels) + " |"]
        lines.append("|---|---|" + "---:|" * len(labels))
        for _, name, metric, values in section_rows:
            lines.append(f"| {name} | {metric} | " + " | ".join(format_value(v) for v in values) + " |")
        lines.append("")
    failed = {(m, t): err for m in labels for t, err in results[m]["failed_tasks"].items()}
    if failed:
        lines += [f"{heading} Tasks that did not run", ""]
        lines += [f"- `{t}` ({m}): {err}" for (m, t), err in failed.items()]
        lines.append("")
    return lines


def markdown_report(results: dict[str, dict[str, Any]], isotropy_layer: int) -> str:
    """``results.md``: the models, then every table."""
    models = "Models: " + ", ".join(f"`{m}` ({r['path']})" for m, r in results.items())
    return "\n".join(["# afpt evaluation", "", models, "", *markdown_tables(results, isotropy_layer)])


def chart_panels(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, list[float | None]]]:
    """Bar-chart panels {title: {group: one value per model}}: per-char perplexity, isotropy and task scores."""
    panels: dict[str, dict[str, list[float | None]]] = {}
    for section, name, metric, values in summary_rows(results):
        if section == "perplexity" and metric == "ppl_char":
            panels.setdefault("perplexity per character", {})[name] = values
        elif section == "isotropy" and metric == "self_similarity":
            panels.setdefault("self-similarity", {})[name] = values
        elif section == "isotropy" and metric == "self_similarity_adjusted":
            panels.setdefault("self-similarity minus baseline", {})[name] = values
        elif section == "task":
            panels.setdefault(metric, {})[name] = values
    return panels


def flat_metrics(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """``<model>/<section>/<name>/<metric>`` scalars, for sweepers and the pipeline."""
    return {
        f"{m}/{section}/{name}/{metric}": value
        for section, name, metric, values in summary_rows(results)
        for m, value in zip(results, values)
        if value is not None
    }
