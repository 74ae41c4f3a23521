"""Summarise real-text pipelines (``experiment=real_text``): the AF vs baseline table and the adaptation curves.

    python3 experiments/real_text_report.py runs/real_text --out experiments/results/<date>_real_text

Reads every pipeline directory ``<root>/**/rt_<model>_s<steps>_k<K>_seed<n>`` (as ``real_text.sh`` names them):
its ``adapt_{af,baseline}/metrics.json`` (and the pretraining and instruction metrics beside it),
groups runs into cells by (model, pretraining steps, K), and writes ``summary.md`` and ``summary.csv`` (per new
language: per-character perplexity after adaptation, mean +- std over seeds for each arm, and the paired
difference baseline - AF in units of its standard error) and ``curves.png`` (validation curves of each new language
per character, AF vs baseline, one panel per language and cell). Every run found is in the table; a run whose
baseline (or AF) arm did not finish is listed as unpaired.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import statistics
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from afpt.artifacts.plots import validation_curve_per_char  # noqa: E402

CELL = re.compile(r"^rt_(?P<model>\w+?)_s(?P<steps>\d+)_k(?P<k>\d+)_seed(?P<seed>\d+)$")


def load(path: Path) -> dict | None:
    """A metrics.json, or None if that stage did not finish."""
    return json.loads(path.read_text()) if path.is_file() else None


def runs(root: Path) -> dict[tuple[str, int, int], dict[int, dict[str, dict | None]]]:
    """{(model, steps, K): {seed: {stage_arm: metrics or None}}} for every pipeline directory under ``root``."""
    out: dict = defaultdict(dict)
    for d in sorted(p for p in root.rglob("*") if p.is_dir() and CELL.search(p.name)):
        m = CELL.search(d.name)
        key = (m["model"], int(m["steps"]), int(m["k"]))
        stages = {
            f"{s}_{a}": load(d / f"{s}_{a}" / "metrics.json")
            for s in ("pretrain", "adapt", "instruct")
            for a in ("af", "baseline")
        }
        stages["dir"] = d
        out[key][int(m["seed"])] = stages
    return out


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def after_ppl_char(after: dict, lang: str) -> float:
    """One language's per-character perplexity after adaptation, or the mean over languages (``mean``)."""
    if lang == "mean":
        return statistics.fmean(v["ppl_char"] for v in after.values())
    return after[lang]["ppl_char"]


def table(cells) -> tuple[list[str], list[dict]]:
    """Markdown lines and CSV rows of the adaptation table, and a pretraining-loss table."""
    lines = [
        "| model | steps | K | language | n | AF ppl/char after | baseline ppl/char after | baseline - AF | SE units |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    rows = []
    for (model, steps, k), seeds in sorted(cells.items()):
        paired = {s: r for s, r in seeds.items() if r["adapt_af"] and r["adapt_baseline"]}
        langs = next(iter(paired.values()))["adapt_af"]["languages"] + ["mean"] if paired else []
        for lang in langs:
            af, base = [], []
            for r in paired.values():
                a, b = r["adapt_af"]["after"], r["adapt_baseline"]["after"]
                af.append(after_ppl_char(a, lang))
                base.append(after_ppl_char(b, lang))
            diffs = [b - a for a, b in zip(af, base)]
            (ma, sa), (mb, sb), (md, sd) = mean_std(af), mean_std(base), mean_std(diffs)
            se = sd / math.sqrt(len(diffs)) if len(diffs) > 1 else float("nan")
            units = md / se if se and se > 0 else float("nan")
            lines.append(
                f"| {model} | {steps} | {k} | {lang} | {len(diffs)} | {ma:.3f} ± {sa:.3f} | {mb:.3f} ± {sb:.3f} | "
                f"{md:+.3f} ± {sd:.3f} | {'–' if math.isnan(units) else f'{units:+.1f}'} |"
            )
            rows.append(
                {
                    "model": model,
                    "steps": steps,
                    "K": k,
                    "language": lang,
                    "n": len(diffs),
                    "af_mean": ma,
                    "af_std": sa,
                    "baseline_mean": mb,
                    "baseline_std": sb,
                    "diff_mean": md,
                    "diff_std": sd,
                    "diff_se_units": units,
                }
            )
        unpaired = sorted(s for s in seeds if s not in paired)
        if unpaired:
            lines.append(
                f"| {model} | {steps} | {k} | (seeds {unpaired}: an arm's adaptation did not finish) "
                "| 0 | – | – | – | – |"
            )
    lines += [
        "",
        "| model | steps | K | seed | AF val loss | baseline val loss | AF resets | pretraining tokens |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (model, steps, k), seeds in sorted(cells.items()):
        for seed, r in sorted(seeds.items()):
            af, base = r["pretrain_af"], r["pretrain_baseline"]
            lines.append(
                f"| {model} | {steps} | {k} | {seed} | {af['val/loss']:.3f} | "
                + (f"{base['val/loss']:.3f}" if base else "not finished")
                + f" | {len(af['resets'])} | {af['tokens_seen']:,} |"
            )
    return lines, rows


MODELS = (("pretrained", ""), ("adapted", "_adapted"), ("instructed", "_instructed"))


def evaluated(cells):
    """Per cell: (model, steps, K, the evaluate stage's per-model results of each seed that finished it, the new
    languages)."""
    for (model, steps, k), seeds in sorted(cells.items()):
        found = [load(r["dir"] / "evaluate" / "metrics.json") for _, r in sorted(seeds.items())]
        first = next((r for r in seeds.values() if r["adapt_af"]), None)
        new = set(first["adapt_af"]["languages"]) if first else set()
        yield model, steps, k, [m["models"] for m in found if m], new


def fmt(values: list[float], digits: int = 3) -> str:
    """``mean ± std`` of ``values``, or – when there are none."""
    if not values:
        return "–"
    m, sd = mean_std(values)
    return f"{m:.{digits}f} ± {sd:.{digits}f}"


def ratios(before: list[dict], after: list[dict], langs: list[str]) -> list[float]:
    """Per seed: per-character perplexity after / before, averaged over ``langs``."""
    return [
        statistics.fmean(y[lang]["ppl_char"] / x[lang]["ppl_char"] for lang in langs) for x, y in zip(before, after)
    ]


def retention(cells) -> list[str]:
    """Markdown: English per-character perplexity of each arm's pretrained, adapted and instructed model, and the
    ratios of adaptation and instruction tuning for English and (mean) for the other pretraining languages."""
    lines = [
        "| model | steps | K | arm | n | en pretrained | en adapted | en instructed | en adaptation | "
        "en instruction tuning | other pretraining languages: adaptation | instruction tuning |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for model, steps, k, evals, new in evaluated(cells):
        if not evals:
            lines.append(f"| {model} | {steps} | {k} | (no evaluate stage finished) | 0 | – | – | – | – | – | – | – |")
            continue
        for arm in ("af", "baseline"):
            ppl = {
                stage: [e[arm + suffix]["perplexity"] for e in evals if arm + suffix in e] for stage, suffix in MODELS
            }
            en = {stage: [p["en"]["ppl_char"] for p in ppl[stage]] for stage in ppl}
            others = sorted(set(ppl["pretrained"][0]) - new - {"en"})
            adapted, instructed = (ppl["pretrained"], ppl["adapted"]), (ppl["adapted"], ppl["instructed"])
            lines.append(
                f"| {model} | {steps} | {k} | {arm} | {len(evals)} | {fmt(en['pretrained'])} | {fmt(en['adapted'])} | "
                f"{fmt(en['instructed'])} | {fmt(ratios(*adapted, ['en']), 2)}x | "
                f"{fmt(ratios(*instructed, ['en']), 2)}x | {fmt(ratios(*adapted, others), 2)}x | "
                f"{fmt(ratios(*instructed, others), 2)}x |"
            )
    return lines


def isotropy(cells) -> list[str]:
    """Markdown: self-similarity of each model (mean over the measured pretraining and new languages): raw, the
    random-pair baseline and their difference, mean ± std over seeds."""
    lines = [
        "| model | steps | K | arm | model | n | pretraining langs: raw | baseline | raw - baseline | "
        "new langs: raw | baseline | raw - baseline |",
        "|---|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for model, steps, k, evals, new in evaluated(cells):
        if not evals:
            lines.append(f"| {model} | {steps} | {k} | (no evaluate stage finished) | | 0 | – | – | – | – | – | – |")
            continue
        for arm in ("af", "baseline"):
            for stage, suffix in MODELS:
                iso = [e[arm + suffix]["isotropy"] for e in evals if arm + suffix in e]
                cols = [
                    fmt([statistics.fmean(v[key] for lang, v in i.items() if (lang in new) == is_new) for i in iso])
                    for is_new in (False, True)
                    for key in ("self_similarity", "baseline", "self_similarity_adjusted")
                ]
                lines.append(f"| {model} | {steps} | {k} | {arm} | {stage} | {len(iso)} | " + " | ".join(cols) + " |")
    return lines


def curves(cells, out: Path) -> None:
    """``curves.png``: per-character validation perplexity of each new language during adaptation, AF vs baseline
    (mean over seeds; points at every validation, starting from the 'before' number)."""
    keys = [
        k for k, seeds in sorted(cells.items()) if any(r["adapt_af"] and r["adapt_baseline"] for r in seeds.values())
    ]
    if not keys:
        return
    langs = next(r for r in cells[keys[0]].values() if r["adapt_af"])["adapt_af"]["languages"]
    fig, axes = plt.subplots(len(keys), len(langs), figsize=(3.2 * len(langs), 2.6 * len(keys)), squeeze=False)
    for row, key in enumerate(keys):
        for col, lang in enumerate(langs):
            ax = axes[row][col]
            for arm, color in (("af", "tab:red"), ("baseline", "tab:blue")):
                series = defaultdict(list)
                for r in cells[key].values():
                    m = r[f"adapt_{arm}"]
                    if not m or not r["adapt_baseline" if arm == "af" else "adapt_af"]:
                        continue
                    end = m["after"][lang]
                    tokens_per_step = m["tokens_seen"] / max(1, m["global_step"])
                    series[0].append(m["before"][lang]["ppl_char"])
                    for tokens, value in validation_curve_per_char(
                        r["dir"] / f"adapt_{arm}", lang, end, tokens_per_step
                    ):
                        series[tokens].append(value)
                    series[m["tokens_seen"]].append(end["ppl_char"])
                xs = sorted(series)
                ax.plot(
                    [x / 1e6 for x in xs], [statistics.fmean(series[x]) for x in xs], color=color, label=arm, marker="."
                )
            ax.set_yscale("log")
            ax.set_title(f"{key[0]} {key[1]} steps: {lang}", fontsize=8)
            ax.tick_params(labelsize=7)
            if row == len(keys) - 1:
                ax.set_xlabel("adaptation tokens (M)", fontsize=7)
            if col == 0:
                ax.set_ylabel("ppl / char", fontsize=7)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    cells = runs(args.root)
    if not cells:
        parser.error(
            f"no real-text pipeline directories (rt_<model>_s<steps>_k<K>_seed<n>, as real_text.sh names them) under {args.root}"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    lines, rows = table(cells)
    lines += ["", *retention(cells), "", *isotropy(cells)]
    (args.out / "summary.md").write_text("\n".join(lines) + "\n")
    with open(args.out / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    curves(cells, args.out)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
