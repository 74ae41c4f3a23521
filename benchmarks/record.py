"""What every benchmark does with its rows: record them as JSON, and print them as a Markdown table."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def device_name() -> str:
    """The CUDA device's name, or ``cpu``."""
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def write_record(path: Path, args: argparse.Namespace, rows: list[dict]) -> None:
    """Record the rows measured so far, with the device, date and arguments (rewritten after every row, so a
    cut-off run keeps what it measured)."""
    record = {"device": device_name(), "date": time.strftime("%Y-%m-%d"), "args": vars(args), "rows": rows}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2))


PROFILE_EXTRA_STEPS = 12


def with_profile(cfg, steps: int, run_dir: str):
    """``cfg`` (a composed afpt config) with ``KernelBreakdown`` over 10 steps from step ``steps + 1``, writing
    ``run_dir/profile.json``: the run goes PROFILE_EXTRA_STEPS past the measured steps, so no window is slowed."""
    from omegaconf import open_dict

    with open_dict(cfg):
        cfg.callbacks.profile = {"_target_": "afpt.speed.throughput.KernelBreakdown", "dirpath": run_dir}
        cfg.callbacks.profile.update(start_step=steps + 1, steps=10, top=40)
    return cfg


def print_table(rows: list[dict], cols: list[str]) -> None:
    """One Markdown row per measured row (its first column names it); a failed row shows its error after its
    leading text columns (what names it: model, peer, stage)."""
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for row in rows:
        if "error" in row:
            names = [str(row[cols[0]])]
            for col in cols[1:]:
                if not isinstance(row.get(col), str):
                    break
                names.append(row[col])
            print(f"| {' | '.join(names)} | failed: {row['error'][-300:]!r} |")
            continue
        cells = [f"{row.get(c):.4g}" if isinstance(row.get(c), float) else str(row.get(c)) for c in cols]
        print("| " + " | ".join(cells) + " |")
