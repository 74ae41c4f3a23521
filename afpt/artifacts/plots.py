"""PNG plots of training curves, written atomically."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

from afpt.artifacts.io import atomic_write, read_metric

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_loss_with_resets(run_dir: Path, reset_steps: Sequence[int], path: Path, title: str) -> Path:
    """A run's training (and validation) loss against optimizer steps, a dashed line at every reset."""
    train, val = read_metric(run_dir, "train/loss"), read_metric(run_dir, "val/loss")
    fig, ax = plt.subplots(figsize=(8, 4.5))
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss", markersize=4)
    for i, step in enumerate(reset_steps):
        ax.axvline(step, color="tab:red", linestyle="--", linewidth=0.8, label="embedding reset" if i == 0 else None)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.legend()
    return _save(fig, path)


def validation_curve_per_char(
    run_dir: Path, lang: str, end: dict[str, float], tokens_per_step: float
) -> list[tuple[float, float]]:
    """(adaptation tokens, per-character perplexity) of ``lang``'s validation blocks in a run's logs: per token
    there, turned per character with ``end``'s (the held-out documents') characters per token."""
    chars_per_token = math.log(end["ppl_token"]) / math.log(end["ppl_char"]) if end["ppl_char"] > 1 else 1.0
    return [(s * tokens_per_step, v ** (1 / chars_per_token)) for s, v in read_metric(run_dir, f"val/ppl/{lang}")]


def plot_adaptation(
    run_dir: Path,
    before: dict[str, dict[str, float]],
    after: dict[str, dict[str, float]],
    tokens_per_step: float,
    total_tokens: float,
    path: Path,
    title: str,
) -> Path:
    """Per-character perplexity of each new language against adaptation tokens: the stage's own before/after
    numbers (held-out documents, the values of its metrics and the report) as the end points, and the validation
    curve in between (validation blocks, per token in the logs, turned per character with the held-out
    documents' characters per token under the merged tokenizer)."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    curves, top = {}, 0.0
    for lang, end in after.items():
        curves[lang] = validation_curve_per_char(run_dir, lang, end, tokens_per_step)
        top = max([top, end["ppl_char"], *(v for _, v in curves[lang])])
    top *= 1.6  # a linear axis over the adapted range; a "before" above it is drawn at the top, its value written
    for i, (lang, end) in enumerate(after.items()):
        color = f"C{i}"
        if curves[lang]:
            ax.plot(
                *zip(*curves[lang]), "o-", color=color, markersize=3, linewidth=1, label=f"{lang}: validation blocks"
            )
        start = before[lang]["ppl_char"]
        ends = [(0, min(start, top)), (total_tokens, end["ppl_char"])]
        ax.plot(*zip(*ends), "s", color=color, markersize=7, label=f"{lang}: held-out documents, before / after")
        ax.annotate(f"{end['ppl_char']:.3f}", ends[1], textcoords="offset points", xytext=(6, 0), color=color)
        ax.annotate(
            f"before: {start:.3g}" + (" (off the axis)" if start > top else ""),
            ends[0],
            textcoords="offset points",
            xytext=(8, -4 - 12 * i),
            color=color,
            fontsize=8,
        )
    ax.set_ylim(0, top * 1.05)
    ax.set_xlabel("adaptation tokens")
    ax.set_ylabel("perplexity per character")
    ax.set_title(title)
    ax.legend(fontsize="small", loc="upper right")
    return _save(fig, path)


def plot_comparison(panels: dict[str, dict[str, list[float | None]]], models: Sequence[str], path: Path) -> Path:
    """Grouped bar charts, one panel per metric: a group per language or task, a bar per model."""
    fig, axes = plt.subplots(
        len(panels), 1, figsize=(max(6.0, 1.2 * max(map(len, panels.values()))), 3.2 * len(panels))
    )
    axes = [axes] if len(panels) == 1 else list(axes)
    width = 0.8 / len(models)
    for ax, (title, groups) in zip(axes, panels.items()):
        names = list(groups)
        cap = _perplexity_cap(groups) if title.startswith("perplexity") else math.inf
        clipped = False
        for i, model in enumerate(models):
            values = [groups[name][i] if groups[name][i] is not None else float("nan") for name in names]
            xs = [x + (i - (len(models) - 1) / 2) * width for x in range(len(names))]
            bars = ax.bar(xs, [min(v, cap) for v in values], width, label=model, color=f"C{i}")
            for bar, value in zip(bars, values):  # clipped: hatched, its value written on it
                if value > cap:
                    clipped = True
                    bar.set_hatch("//")
                    ax.annotate(
                        f"{value:.2g}",
                        (bar.get_x() + bar.get_width() / 2, cap * 0.97),
                        ha="center",
                        va="top",
                        rotation=90,
                        fontsize=7,
                    )
        ax.set_xticks(
            range(len(names)), names, rotation=30 if len(names) > 6 else 0, ha="right" if len(names) > 6 else "center"
        )
        ax.set_title(f"{title} (hatched: clipped at {cap:.3g})" if clipped else title)
        ax.legend(fontsize="small")
    return _save(fig, path)


def _perplexity_cap(groups: dict[str, list[float | None]]) -> float:
    """A linear axis's top for perplexity bars: every value within 10x of the lower quartile is drawn whole, the
    rest (an unadapted model's huge perplexity on a new language) is clipped, so the others stay readable."""
    values = sorted(v for vs in groups.values() for v in vs if v is not None and math.isfinite(v))
    if not values:
        return math.inf
    q1 = values[len(values) // 4]
    return 1.2 * max(v for v in values if v <= 10 * q1)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120))
    plt.close(fig)
    return path
