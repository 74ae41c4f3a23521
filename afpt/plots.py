"""PNG plots of training curves, written atomically."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

from afpt.io import atomic_write, read_metric

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


def plot_curves(curves: dict[str, list[tuple[float, float]]], path: Path, xlabel: str, ylabel: str, title: str) -> Path:
    """One line per named curve (e.g. per language), written atomically."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, points in curves.items():
        if points:
            ax.plot(*zip(*points), "o-", label=name, markersize=3)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend()
    return _save(fig, path)


def plot_run_curves(
    run_dir: Path, keys: dict[str, str], x_per_step: float, path: Path, xlabel: str, ylabel: str, title: str
) -> Path:
    """One line per ``{label: logged metric}`` of a run's CSV logs, steps scaled by ``x_per_step`` (e.g. tokens)."""
    curves = {label: [(s * x_per_step, v) for s, v in read_metric(run_dir, key)] for label, key in keys.items()}
    return plot_curves(curves, path, xlabel, ylabel, title)


def plot_comparison(panels: dict[str, dict[str, list[float | None]]], models: Sequence[str], path: Path) -> Path:
    """Grouped bar charts, one panel per metric: a group per language or task, a bar per model."""
    fig, axes = plt.subplots(
        len(panels), 1, figsize=(max(6.0, 1.2 * max(map(len, panels.values()))), 3.2 * len(panels))
    )
    axes = [axes] if len(panels) == 1 else list(axes)
    width = 0.8 / len(models)
    for ax, (title, groups) in zip(axes, panels.items()):
        names = list(groups)
        for i, model in enumerate(models):
            values = [groups[name][i] if groups[name][i] is not None else float("nan") for name in names]
            ax.bar([x + (i - (len(models) - 1) / 2) * width for x in range(len(names))], values, width, label=model)
        ax.set_xticks(
            range(len(names)), names, rotation=30 if len(names) > 6 else 0, ha="right" if len(names) > 6 else "center"
        )
        ax.set_title(title)
        if title.startswith("perplexity"):
            ax.set_yscale("log")
        ax.legend(fontsize="small")
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120))
    plt.close(fig)
    return path
