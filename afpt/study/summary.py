"""Gather a multirun's jobs into one table: each metric's mean and spread over seeds, per setting."""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig


def collect(sweep_dir: Path) -> list[tuple[dict[str, str], dict[str, float]]]:
    """(overrides, top-level numeric metrics) of every finished job under ``sweep_dir``, in job order."""
    jobs = []
    for metrics_file in sorted(Path(sweep_dir).glob("*/metrics.json")):
        overrides_file = metrics_file.parent / ".hydra" / "overrides.yaml"
        overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.is_file() else []
        pairs = dict(str(o).split("=", 1) for o in overrides or [] if "=" in str(o))
        values = json.loads(metrics_file.read_text())
        numbers = {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        jobs.append((pairs, numbers))
    return jobs


def summarize(jobs: list[tuple[dict[str, str], dict[str, float]]], over: str = "seed") -> list[dict[str, Any]]:
    """One row per setting (the overrides that vary between jobs, ``over`` aside): n, each metric's mean and std."""
    cleaned = [({k.lstrip("+~"): v for k, v in o.items() if k.lstrip("+~") != over}, n) for o, n in jobs]
    varying = {k for o, _ in cleaned for k in o if len({other.get(k) for other, _ in cleaned}) > 1}
    groups: dict[tuple, list[dict[str, float]]] = defaultdict(list)
    for overrides, numbers in cleaned:
        groups[tuple(sorted((k, v) for k, v in overrides.items() if k in varying))].append(numbers)
    rows = []
    for key, runs in groups.items():
        row: dict[str, Any] = {"setting": " ".join(f"{k}={v}" for k, v in key) or "(all jobs)", "n": len(runs)}
        for metric in sorted({m for r in runs for m in r}):
            values = [r[metric] for r in runs if metric in r and math.isfinite(r[metric])]
            if not values:
                continue
            mean = sum(values) / len(values)
            std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
            row[metric] = (mean, std)
        rows.append(row)
    return rows


def _fmt(cell: Any) -> str:
    if isinstance(cell, tuple):
        return f"{cell[0]:.4g} ± {cell[1]:.2g}"
    return str(cell)


def write_summary(sweep_dir: Path, over: str = "seed") -> Path | None:
    """Write ``summary.md`` and ``summary.csv`` into ``sweep_dir`` (atomically); None if no job finished."""
    sweep_dir = Path(sweep_dir)
    jobs = collect(sweep_dir)
    rows = summarize(jobs, over)
    if not rows:
        return None
    common = sorted({f"{k}={v}" for o, _ in jobs for k, v in o.items() if all(p.get(k) == v for p, _ in jobs)})
    metrics = sorted({k for r in rows for k in r} - {"setting", "n"})
    lines = [
        f"# Sweep summary: {sweep_dir}",
        "",
        f"Mean ± sample standard deviation over `{over}` (n runs per setting).",
        "",
        "Overrides shared by every job: " + (" ".join(f"`{c}`" for c in common) or "none"),
        "",
        "| setting | n | " + " | ".join(metrics) + " |",
        "|---|---:|" + "---:|" * len(metrics),
    ]
    for row in rows:
        lines.append(f"| {row['setting']} | {row['n']} | " + " | ".join(_fmt(row.get(m, "–")) for m in metrics) + " |")
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["setting", "n", *(f"{m}{s}" for m in metrics for s in ("", "_std"))])
    for row in rows:
        cells = [row.get(m) for m in metrics]
        writer.writerow([row["setting"], row["n"], *(x for c in cells for x in (c if c else ("", "")))])
    for name, text in (("summary.md", "\n".join(lines) + "\n"), ("summary.csv", buffer.getvalue())):
        tmp = sweep_dir / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, sweep_dir / name)
    return sweep_dir / "summary.md"


class SweepSummary(Callback):
    """Hydra callback: after a multirun, write the summary table into the sweep directory."""

    def __init__(self, over: str = "seed") -> None:
        self.over = over

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Summarise every job of the finished multirun."""
        path = write_summary(Path(config.hydra.sweep.dir), self.over)
        if path:
            print(f"afpt: sweep summary written to {path}")


def main() -> None:
    """``afpt-summary <sweep dir>``: (re)write a sweep's summary table."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--over", default="seed", help="the override to average over (default: seed)")
    args = parser.parse_args()
    path = write_summary(args.sweep_dir, args.over)
    print(path.read_text() if path else f"no finished job (*/metrics.json) under {args.sweep_dir}")
