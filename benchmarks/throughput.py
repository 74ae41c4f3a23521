"""Throughput of afpt's real pretraining path (``afpt stage=pretrain`` with forgetting on).

Runs each variant through ``afpt.pretrain.stage.run`` on the embedded world (the embedding padded to
the model config's vocabulary, so the logits cost what they cost with a real tokenizer), then prints a
table: tokens/s, MFU (afpt's dense-bf16 peak table), step time, peak memory, reset time, and
torch.compile graph counts. Writes the rows as JSON to ``--out`` (default: $OUT or benchmarks/).

    python benchmarks/throughput.py --variants llama_124m llama_124m+compile llama_350m+compile+fusedce+bs32

A variant is a model config plus levers joined by ``+``: ``compile``, ``fusedce`` / ``ligerce``
(optim.loss=fused_linear_ce / liger_ce), ``bs<N>`` (batch size), ``bf16true`` (trainer.precision=bf16-true), ``cudnn`` /
``flash`` / ``efficient`` (optim.sdpa_backend), ``ckpt`` (optim.activation_checkpointing),
``cudagraphs`` / ``autotune`` (optim.compile_mode=reduce-overhead / max-autotune-no-cudagraphs),
``cdt`` / ``twopass`` (inductor's coordinate_descent_tuning / online_softmax=false, through
optim.compile_options),
``fp8`` / ``fp8rw`` (optim.fp8=true: torchao float8 in the decoder layers, tensorwise / rowwise), ``fp8auto``
(FP8 in the linears torchao's size filter keeps: optim.fp8_linears=auto), ``flex`` (model.attn_implementation=flex_attention; otherwise afpt's default sdpa, which trains compiled
as ``afpt_sdpa``), ``norope`` (optim.rotary_tables=false), ``auto`` (optim.compile left at afpt's
default ``auto`` instead of the ``compile`` flag's true / false).
``--profile`` adds ``afpt.speed.throughput.KernelBreakdown`` and splits the GPU time of 10 extra steps, run
after the measured ones, by kernel category (attention, matmul, loss, optimizer, other, idle).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from omegaconf import open_dict
from record import PROFILE_EXTRA_STEPS, device_name, print_table, with_profile, write_record

import afpt.pretrain.stage as pretrain

VOCAB = {
    "llama_124m": 50304,
    "llama_350m": 50304,
    "gpt2_124m": 50304,
    "mistral_400m": 32000,
    "mistral_1b6": 32000,
    "tiny": 4096,
}


SDPA = ("cudnn", "flash", "efficient")
# Variant flags that pick optim.loss.
LOSS_FLAGS = {"fusedce": "fused_linear_ce", "ligerce": "liger_ce"}
# Variant flags that set inductor options (optim.compile_options).
INDUCTOR_FLAGS = {"cdt": "coordinate_descent_tuning:true", "twopass": "online_softmax:false"}


def run_variant(
    variant: str, steps: int, batch: int, seq: int, every_k: int, extra: list[str], profile: bool = False
) -> dict:
    model, *flags = variant.split("+")
    batch = next((int(f[2:]) for f in flags if f.startswith("bs")), batch)
    options = [option for flag, option in INDUCTOR_FLAGS.items() if flag in flags]
    overrides = [
        f"model={model}",
        f"model.pad_vocab_to_multiple_of={VOCAB.get(model, 64)}",
        "trainer=gpu",
        f"trainer.max_steps={steps}",
        f"trainer.val_check_interval={steps}",
        "trainer.limit_val_batches=2",
        "trainer.enable_progress_bar=false",
        "trainer.log_every_n_steps=50",
        "logger=none",
        f"data.block_size={seq}",
        f"data.batch_size={batch}",
        "data.world.train_docs_per_language=4000",
        "data.world.val_docs_per_language=400",
        "data.tokenizer.sample_docs=4000",
        "data.num_workers=4",
        "data.pin_memory=true",
        f"forgetting.every_n_steps={every_k}",
        "callbacks.model_checkpoint=null",
        f"callbacks.throughput.window={max(10, steps // 6)}",
        *([] if "auto" in flags else [f"optim.compile={'compile' in flags}"]),
        f"optim.loss={next((loss for flag, loss in LOSS_FLAGS.items() if flag in flags), 'hf')}",
        *(["trainer.precision=bf16-true"] if "bf16true" in flags else []),
        *[f"optim.sdpa_backend={f}" for f in flags if f in SDPA],
        *(["optim.activation_checkpointing=true"] if "ckpt" in flags else []),
        f"model.attn_implementation={'flex_attention' if 'flex' in flags else 'sdpa'}",
        *(["optim.rotary_tables=false"] if "norope" in flags else []),
        *(["optim.fp8=true"] if {"fp8", "fp8rw", "fp8auto"} & set(flags) else []),
        *(["optim.fp8_recipe=rowwise"] if "fp8rw" in flags else []),
        *(["optim.fp8_linears=auto"] if "fp8auto" in flags else []),
        *(["optim.compile_mode=reduce-overhead"] if "cudagraphs" in flags else []),
        *(["optim.compile_mode=max-autotune-no-cudagraphs"] if "autotune" in flags else []),
        *([f"optim.compile_options={{{','.join(options)}}}"] if options else []),
        *extra,
    ]
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="afpt.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    with open_dict(cfg), tempfile.TemporaryDirectory() as run_dir:
        cfg.paths.run_dir = run_dir
        if profile:
            cfg.trainer.max_steps = steps + PROFILE_EXTRA_STEPS
            with_profile(cfg, steps, run_dir)
        torch._dynamo.reset()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        metrics = pretrain.run(cfg)
        wall = time.perf_counter() - start
        breakdown = json.loads((Path(run_dir) / "profile.json").read_text()) if profile else None
    counters = torch._dynamo.utils.counters
    resets = metrics["resets"]
    train_time = metrics["train_time_s"]
    return {
        "variant": variant,
        "params_M": metrics["parameters"]["total"] / 1e6,
        "steps": steps,
        "val_loss": metrics.get("val/loss"),
        "tokens_per_s": metrics["throughput"].get("tokens_per_s"),
        "mfu": metrics["throughput"].get("mfu"),
        "step_ms": metrics["throughput"].get("step_ms"),
        "peak_mem_GB": metrics["peak_memory_gb"],
        "resets": len(resets),
        "reset_ms_max": max((r["duration_ms"] for r in resets), default=0.0),
        "reset_host_ms_max": max((r["host_ms"] for r in resets), default=0.0),
        "reset_overhead_pct": 100 * sum(r["duration_ms"] for r in resets) / 1000 / train_time,
        "unique_graphs": counters["stats"]["unique_graphs"],
        "recompiles_after_warmup": metrics["throughput"].get("recompiles_after_warmup"),
        "recompile_limit_hits": metrics["throughput"].get("recompile_limit_hits"),
        "graph_breaks": sum(counters["graph_break"].values()),
        "fit_s": train_time,
        "wall_s": wall,
        "profile": breakdown,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=["llama_124m", "llama_124m+compile"])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--every-k", type=int, default=100)
    parser.add_argument("--profile", action="store_true", help="split 10 steps' GPU time by kernel category")
    parser.add_argument("--out", default=os.environ.get("OUT", str(Path(__file__).parent)))
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every variant")
    args = parser.parse_args()
    device = device_name()
    out = Path(args.out) / "throughput.json"
    rows = []
    for variant in args.variants:  # the file is rewritten after each variant, so a cut-off run keeps its rows
        try:
            rows.append(
                run_variant(variant, args.steps, args.batch, args.seq, args.every_k, args.overrides, args.profile)
            )
        except Exception as err:  # a failing lever (out of memory, a compile error) must not lose the others
            rows.append({"variant": variant, "error": f"{type(err).__name__}: {err}"[-1500:]})
        write_record(out, args, rows)
    cols = [
        "variant",
        "params_M",
        "tokens_per_s",
        "mfu",
        "step_ms",
        "peak_mem_GB",
        "resets",
        "reset_ms_max",
        "reset_host_ms_max",
        "reset_overhead_pct",
        "unique_graphs",
        "recompiles_after_warmup",
        "recompile_limit_hits",
        "graph_breaks",
    ]
    print(f"device: {device}, batch {args.batch} x {args.seq}, {args.steps} steps, K={args.every_k}")
    print_table(rows, cols)
    if args.profile:
        print_profiles([row for row in rows if "error" not in row])


def print_profiles(rows: list[dict]) -> None:
    """Where the time of a step goes: per-category kernel time (ms and % of the step), then idle."""
    names = sorted({k for r in rows for k in r["profile"]["kernel_ms_per_step"]})
    cols = [*names, "idle"]
    print("\nms per step (% of the step) by kernel category, 10 profiled steps (streams overlap)")
    print("| variant | step ms | " + " | ".join(cols) + " | host gap ms | host syncs/step |")
    print("|" + "---|" * (len(cols) + 4))
    for row in rows:
        prof = row["profile"]
        wall = prof["wall_ms_per_step"]
        values = {**prof["kernel_ms_per_step"], "idle": prof["idle_ms_per_step"]}
        cells = [f"{values.get(c, 0):.1f} ({100 * values.get(c, 0) / wall:.0f}%)" for c in cols]
        print(
            f"| {row['variant']} | {wall:.1f} | "
            + " | ".join(cells)
            + f" | {prof['host_gap_ms_per_batch']:.2f} | {prof.get('host_syncs_per_step', 0):.1f} |"
        )
    for row in rows:
        print(f"\ntop kernels, {row['variant']} (ms per step):")
        for name, ms in list(row["profile"].get("top_kernels_ms_per_step", {}).items())[:12]:
            print(f"  {ms:7.2f}  {name}")
        for site, n in row["profile"].get("sync_sites", {}).items():
            print(f"  implicit host sync x{n}: {site}")
        for launcher, ms in row["profile"].get("idle_ms_per_step_by_launcher", {}).items():
            print(f"  idle {ms:6.2f} ms per step before a kernel launched in: {launcher[:100]}")


if __name__ == "__main__":
    main()
