"""Summarise the plasticity study (``experiments/plasticity.sh``): the pretraining gate, adaptation under both
protocols, steps to the baseline's loss, and the validation curves per character.

    python3 experiments/plasticity_report.py OUT_DIR/runs --out OUT_DIR/report

Reads ``pre_<model>_<arm>_s<seed>/`` (arm: ``base`` or ``k<K>``) and ``ada_<model>_<arm>_s<seed>_<protocol>_<budget>/``
and writes ``report.md``, ``curves.png`` and ``runs.csv`` (one row per finished run, the numbers the tables use). Differences are paired by seed (the baseline of the same seed);
"SE units" is the mean difference over its standard error.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import re
import statistics
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from afpt.artifacts.io import atomic_write, read_metric, write_text  # noqa: E402

PRE = re.compile(r"^pre_(?P<model>[a-z0-9]+_[a-z0-9]+)_(?P<arm>base|k\d+)_s(?P<seed>\d+)$")
ADA = re.compile(
    r"^ada_(?P<model>[a-z0-9]+_[a-z0-9]+)_(?P<arm>base|k\d+)_s(?P<seed>\d+)_(?P<protocol>chen|afa)_(?P<budget>\d+)$"
)


def load(d: Path) -> dict | None:
    """A run's metrics.json, or None when it did not finish."""
    return json.loads((d / "metrics.json").read_text()) if (d / "metrics.json").is_file() else None


def stats(values: list[float]) -> str:
    """mean ± sample std (n)."""
    if not values:
        return "–"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.3f} ± {sd:.3f}"


def paired(diffs: list[float]) -> str:
    """Mean paired difference ± its standard error, and the mean in standard errors."""
    if len(diffs) < 2:
        return "– | –"
    se = statistics.stdev(diffs) / math.sqrt(len(diffs))
    units = statistics.fmean(diffs) / se if se > 0 else float("inf")
    return f"{statistics.fmean(diffs):+.3f} ± {se:.3f} | {units:+.1f}"


def arm_order(arm: str) -> tuple[int, int]:
    """The baseline first, then K ascending."""
    return (0, 0) if arm == "base" else (1, int(arm[1:]))


def per_char_curve(m: dict) -> list[tuple[int, float]]:
    """An adaptation run's validation curve in nats per character (loss per token x tokens per character)."""
    return [(step, loss * m["val_tokens_per_char"]) for step, loss in m["val_curve"]]


def steps_to(curve: list[tuple[int, float]], target: float) -> int | None:
    """The first validation step at which ``curve`` is at or below ``target``; None if never."""
    return next((step for step, value in curve if value <= target), None)


def run_rows(pre: dict, ada: dict) -> list[dict]:
    """One row per finished run: its cell, seed and the numbers the report's tables are made of."""
    rows = []
    for (model, arm), seeds in pre.items():
        for seed, (m, _) in sorted(seeds.items()):
            if m:
                rows.append(
                    {
                        "stage": "pretrain",
                        "model": model,
                        "arm": arm,
                        "seed": seed,
                        "resets": len(m["resets"]),
                        "steps": m["global_step"],
                        "val_loss": round(m["val/loss"], 4),
                        "train_time_s": m.get("train_time_s"),
                    }
                )
    for (model, arm, protocol, budget), seeds in ada.items():
        for seed, m in sorted(seeds.items()):
            if m:
                rows.append(
                    {
                        "stage": "adapt",
                        "model": model,
                        "arm": arm,
                        "seed": seed,
                        "protocol": protocol,
                        "corpus_tokens": budget,
                        "steps": m["global_step"],
                        "ppl_char_after": round(statistics.fmean(v["ppl_char"] for v in m["after"].values()), 4),
                        "best_step": m["best_step"],
                        "best_val_loss": round(m["best_val_loss"], 4),
                        "train_time_s": m.get("train_time_s"),
                    }
                )
    return rows


def write_csv(rows: list[dict], path: Path) -> None:
    """``rows`` as a CSV file with the union of their keys as columns, written atomically."""
    fields = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buf.getvalue())


def main() -> None:
    """Write report.md, curves.png and runs.csv."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    pre, ada = defaultdict(dict), defaultdict(dict)
    for d in sorted(p for p in args.root.iterdir() if p.is_dir()):
        if m := PRE.match(d.name):
            pre[(m["model"], m["arm"])][int(m["seed"])] = (load(d), d)
        elif m := ADA.match(d.name):
            ada[(m["model"], m["arm"], m["protocol"], int(m["budget"]))][int(m["seed"])] = load(d)
    lines = ["# The plasticity study", "", "## Pretraining gate", ""]
    lines += [
        "Validation loss (per token, the pretraining languages) at the end of pretraining (an episode end: no reset "
        "after the last step) and at the last episode end of the first half; AF - baseline paired by seed.",
        "",
        "| model | arm | resets | n | val loss, end | AF - baseline, end | SE units | val loss, mid-run episode end |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for model, arm in sorted(pre, key=lambda k: (k[0], arm_order(k[1]))):
        runs = {s: v for s, v in pre[(model, arm)].items() if v[0]}
        base = {s: v for s, v in pre.get((model, "base"), {}).items() if v[0]}
        end = {s: m["val/loss"] for s, (m, _) in runs.items()}
        mids = []
        for _, d in runs.values():
            curve = read_metric(d, "val/loss")
            half = max(s for s, _ in curve) // 2 if curve else 0
            mids += [v for s, v in curve if s == max((t for t, _ in curve if t <= half), default=-1)]
        diffs = [end[s] - base[s][0]["val/loss"] for s in end if s in base] if arm != "base" else []
        resets = len(next(iter(runs.values()))[0]["resets"]) if runs else 0
        lines.append(
            f"| {model} | {arm} | {resets} | {len(end)} | {stats(list(end.values()))} | "
            f"{paired(diffs) if diffs else '– | –'} | {stats(mids)} |"
        )
    lines += ["", "## Adaptation", ""]
    lines += [
        "Per-character perplexity after adaptation, mean over the new languages' held-out pages (the adapt stage's "
        "`after`), mean ± std over seeds; baseline - AF paired by seed (positive: forgetting helped). Steps to the "
        "baseline: the first validation step at which the AF model's validation loss per character reaches the "
        "baseline's best (mean over seeds; `never` counts the seeds that did not within the budget), beside the "
        "baseline's own best step.",
        "",
        "| model | protocol | unique tokens | arm | n | AF ppl/char | baseline ppl/char | baseline - AF | SE units | "
        "AF steps to baseline best | baseline best step |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    curves = defaultdict(dict)
    for key in sorted(ada, key=lambda k: (k[0], k[2], k[3], arm_order(k[1]))):
        model, arm, protocol, budget = key
        runs = {s: m for s, m in ada[key].items() if m}
        base = {s: m for s, m in ada.get((model, "base", protocol, budget), {}).items() if m}
        curves[(model, protocol, budget)][arm] = [per_char_curve(m) for m in runs.values()]
        if arm == "base":
            continue
        ppl = {s: statistics.fmean(v["ppl_char"] for v in m["after"].values()) for s, m in runs.items()}
        bppl = {s: statistics.fmean(v["ppl_char"] for v in m["after"].values()) for s, m in base.items()}
        diffs = [bppl[s] - ppl[s] for s in ppl if s in bppl]
        reach, never = [], 0
        for s, m in runs.items():
            if s in base:
                step = steps_to(per_char_curve(m), min(v for _, v in per_char_curve(base[s])))
                if step is None:
                    never += 1
                else:
                    reach.append(step)
        reached = f"{statistics.fmean(reach):.0f}" if reach else "–"
        best = f"{statistics.fmean(m['best_step'] for m in base.values()):.0f}" if base else "–"
        lines.append(
            f"| {model} | {protocol} | {budget:,} | {arm} | {len(ppl)} | {stats(list(ppl.values()))} | "
            f"{stats([bppl[s] for s in ppl if s in bppl])} | {paired(diffs)} | {reached} (never: {never}) | {best} |"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    panels = sorted(curves)
    if panels:
        cols = min(4, len(panels))
        rows = math.ceil(len(panels) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.5 * rows), squeeze=False)
        for ax, panel in zip(axes.flat, panels):
            for arm, runs in sorted(curves[panel].items(), key=lambda kv: arm_order(kv[0])):
                steps = sorted({s for c in runs for s, _ in c})
                mean = [statistics.fmean(v for c in runs for t, v in c if t == s) for s in steps]
                ax.plot(steps, mean, label="baseline" if arm == "base" else f"AF {arm}")
            ax.set_title(f"{panel[0]} {panel[1]} {panel[2]:,} tokens", fontsize=9)
            ax.set_xlabel("adaptation step")
            ax.set_ylabel("val loss, nats/char")
            ax.legend(fontsize=7)
        for ax in list(axes.flat)[len(panels) :]:
            ax.axis("off")
        fig.tight_layout()
        atomic_write(args.out / "curves.png", lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
        lines += ["", "![validation curves per character](curves.png)"]
    write_csv(run_rows(pre, ada), args.out / "runs.csv")
    write_text(args.out / "report.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
