"""Scaling of afpt's real pretraining CLI over GPUs: one GPU, DDP, FSDP and FSDP2, forgetting on and checked.

Each setting runs ``python -m afpt stage=pretrain`` as a user would (Lightning launches the ranks),
with ``forgetting.check_sync=true``: after every reset each rank gathers the embedding through its
sharding, checks it holds exactly the seeded values and that its shard of the optimizer state is zero,
and the run fails otherwise. Prints a table (throughput per GPU against one GPU, resets verified,
recompiles) and writes it as JSON under ``--out`` (default: $OUT or benchmarks/).

    python benchmarks/scaling.py --gpus 2 --settings 1gpu ddp fsdp fsdp2 -- model=llama_124m optim.compile=true

A setting may carry its own overrides after colons, e.g. ``ddp:trainer.strategy.comm_hook=bf16`` or
``fsdp2:trainer.strategy.prefetch=1:trainer.strategy.reduce_dtype=bfloat16``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from record import device_name, print_table, write_record

DEVICE = device_name()
SETTINGS = {
    "1gpu": ["trainer=gpu", "trainer.devices=1"],
    "ddp": ["trainer=ddp"],
    "fsdp": ["trainer=fsdp"],
    "fsdp2": ["trainer=fsdp2"],
}


def run_setting(
    name: str, gpus: int, steps: int, every_k: int, run_dir: Path, extra: list[str], profile: bool = False
) -> dict:
    base, *own = name.split(":")
    devices = 1 if base == "1gpu" else gpus
    # The profiled steps come after the measured ones, so the profiler slows no throughput window.
    profiling = [
        "+callbacks.profile._target_=afpt.speed.throughput.KernelBreakdown",
        f"+callbacks.profile.dirpath={run_dir}",
        f"+callbacks.profile.start_step={steps + 1}",
        "+callbacks.profile.steps=10",
    ]
    command = [
        sys.executable,
        "-m",
        "afpt",
        "stage=pretrain",
        *SETTINGS[base],
        f"trainer.devices={devices}",
        f"trainer.max_steps={steps + 12 if profile else steps}",
        f"trainer.val_check_interval={steps}",
        "trainer.limit_val_batches=2",
        "trainer.enable_progress_bar=false",
        "logger=none",
        "callbacks.model_checkpoint=null",
        f"callbacks.throughput.window={max(10, steps // 6)}",
        f"forgetting.every_n_steps={every_k}",
        "forgetting.check_sync=true",
        "data.world.train_docs_per_language=4000",
        "data.world.val_docs_per_language=400",
        "data.tokenizer.sample_docs=4000",
        "data.num_workers=4",
        "data.pin_memory=true",
        f"paths.run_dir={run_dir}",
        *(profiling if profile else []),
        *extra,
        *own,
    ]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    (run_dir.parent / f"{run_dir.name}.log").write_text(result.stdout[-20000:] + result.stderr[-20000:])
    if result.returncode != 0:
        return {"setting": name, "gpus": devices, "error": result.stderr[-1500:], "wall_s": wall}
    metrics = json.loads((run_dir / "metrics.json").read_text())
    perf, resets = metrics["throughput"], metrics["resets"]
    return {
        "setting": name,
        "gpus": devices,
        "command": " ".join(command[1:]),
        "tokens_per_s": perf.get("tokens_per_s"),
        "per_gpu": perf.get("tokens_per_s", 0) / devices,
        "mfu": perf.get("mfu"),
        "step_ms": perf.get("step_ms"),
        "peak_mem_GB": metrics["peak_memory_gb"],
        "resets": len(resets),
        "resets_verified": sum(r.get("verify_ms") is not None for r in resets),
        "reset_ms_max": max((r["duration_ms"] for r in resets), default=0.0),
        "reset_host_ms_max": max((r["host_ms"] for r in resets), default=0.0),
        "reset_overhead_pct": 100 * sum(r["duration_ms"] for r in resets) / 1000 / metrics["train_time_s"],
        "recompiles_after_warmup": perf.get("recompiles_after_warmup"),
        "recompile_limit_hits": perf.get("recompile_limit_hits"),
        "val_loss": metrics.get("val/loss"),
        "wall_s": wall,
        "profile": json.loads((run_dir / "profile.json").read_text()) if profile else None,
    }


def parse_setting(text: str) -> str:
    """A setting name (``1gpu``, ``ddp``, ``fsdp``, ``fsdp2``), optionally with ``:``-separated overrides."""
    if text.split(":")[0] not in SETTINGS:
        raise argparse.ArgumentTypeError(f"setting {text!r} must start with one of {list(SETTINGS)}")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), type=parse_setting)
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--every-k", type=int, default=50)
    parser.add_argument("--profile", action="store_true", help="split 10 extra steps' GPU time by kernel category")
    parser.add_argument("--out", default=os.environ.get("OUT", str(Path(__file__).parent)))
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every setting (after --)")
    args = parser.parse_args()
    out = Path(args.out)
    rows = []
    for setting in args.settings:  # the file is rewritten after each setting, so a cut-off run keeps its rows
        rows.append(
            run_setting(
                setting,
                args.gpus,
                args.steps,
                args.every_k,
                out / "scaling_runs" / setting.replace(":", "_").replace("=", "-").replace("/", "-"),
                args.overrides,
                args.profile,
            )
        )
        write_record(out / "scaling.json", args, rows)
    single = next((r["per_gpu"] for r in rows if r["setting"].startswith("1gpu") and "error" not in r), None)
    for row in rows:
        if single and "error" not in row:
            row["per_gpu_vs_1gpu_pct"] = 100 * row["per_gpu"] / single
    write_record(out / "scaling.json", args, rows)
    cols = [
        "setting",
        "gpus",
        "tokens_per_s",
        "per_gpu",
        "per_gpu_vs_1gpu_pct",
        "mfu",
        "step_ms",
        "peak_mem_GB",
        "resets",
        "resets_verified",
        "reset_ms_max",
        "reset_host_ms_max",
        "reset_overhead_pct",
        "recompiles_after_warmup",
        "recompile_limit_hits",
        "val_loss",
    ]
    print(f"device: {DEVICE} x {args.gpus}, {args.steps} steps, K={args.every_k}, overrides: {args.overrides}")
    print_table(rows, cols)
    if args.profile:
        for row in rows:
            if row.get("profile"):
                print(row["setting"], json.dumps(row["profile"]))


if __name__ == "__main__":
    main()
