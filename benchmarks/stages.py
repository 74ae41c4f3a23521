"""Adaptation and instruction tuning against pretraining, tokens/s of the same model measured in one process.

For each model: ``afpt stage=pretrain`` for ``--steps`` steps (compiled on CUDA, forgetting on), then
``afpt stage=adapt`` of the model it saved for the same number of steps at the same batch and sequence
length (the default policy: the body frozen, so its weight-gradient GEMMs are not run; compiled on CUDA
by default). Both stages read the embedded world; the embedding is the tokenizer's (padded to 64), so
the adapted model's is larger (the merged vocabulary), which costs adaptation, not pretraining. Then
``afpt stage=instruct`` of the adapted model on multi-turn ChatML conversations built from the world's English
questions (a random 2 to ``--max-turns`` turns each, so lengths vary up to the sequence length; ``--instruct-batch``
conversations per step (default ``--batch``), length-grouped and right-padded, compiled on CUDA), for about ``--steps`` steps; its
``x_pretrain`` is real (non-pad) tokens/s over pretraining tokens/s. Each ``--instruct-variants`` entry runs
instruct once more on the same adapted model: space-separated Hydra overrides for that run, where ``turns=N``
sets its most turns (``turns=400`` makes every conversation longer than the sequence, so every row is truncated
to full width, as pretraining's). A variant is a later instruct run of the same process: on a GPU each batch
width costs ~0.1 s the first time the process sees it, so a variant on the same chats measured up to 1.45x
faster than the first run (benchmarks/README.md); compare variants with each other, and run ~400 steps for a
steady rate. Prints a table and writes the rows as JSON to ``--out`` (default: $OUT or benchmarks/).

    python benchmarks/stages.py --models llama_124m mistral_400m --steps 200 --batch 64
    python benchmarks/stages.py --steps 120 --instruct-variants "turns=400" "instruct.pin_memory=true"
    python benchmarks/stages.py --models mistral_400m --steps 120 --no-instruct --profile
    python benchmarks/stages.py --steps 100 --step-times --host-profile 60 20 --instruct-variants "instruct.pin_memory=false"

``--step-times`` adds every instruct step's host wall time (ms) to its row (``step_ms_each``); ``--host-profile START
N`` writes a cProfile of instruct steps [START, START+N) of each instruct run to ``--out`` (``hostprof-<run>.txt``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from diagnostics import read_step_times
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from omegaconf import open_dict
from record import PROFILE_EXTRA_STEPS, device_name, print_table, with_profile, write_record
from throughput import print_profiles

import afpt.adapt.stage as adapt
import afpt.instruct.stage as instruct
import afpt.pretrain.stage as pretrain
from afpt.data import world_from_config


def config(overrides: list[str], run_dir: str):
    """The composed afpt config with ``overrides``, writing to ``run_dir``."""
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="afpt.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.run_dir = run_dir
        cfg.paths.store_dir = str(Path(run_dir) / "store")
    return cfg


def conversations(cfg, count: int, max_turns: int, seed: int) -> list[dict]:
    """``count`` multi-turn ChatML conversations (``messages`` records) of 2 to ``max_turns`` world Q&A turns."""
    pairs = list(world_from_config(cfg.data.world).qa_pairs("en"))
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        turns = []
        for question, answer, _ in rng.sample(pairs, rng.randint(2, max_turns)):
            turns += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        out.append({"messages": turns})
    return out


def split_variant(variant: str, default_turns: int) -> tuple[int, list[str]]:
    """An ``--instruct-variants`` entry as (most turns, Hydra overrides); ValueError for a bad ``turns=N``."""
    words = variant.split()
    turns = [w for w in words if w.startswith("turns=")]
    for word in turns:
        if not (word[6:].isdigit() and int(word[6:]) >= 2):
            raise ValueError(f"--instruct-variants {variant!r}: {word} must be turns=N with N >= 2")
    return (int(turns[-1][6:]) if turns else default_turns), [w for w in words if w not in turns]


def measure(
    model: str,
    steps: int,
    batch: int,
    seq: int,
    max_turns: int,
    instruct_batch: int,
    extra: list[str],
    profile: bool = False,
    save: Callable[[list[dict]], None] = lambda rows: None,
    instruct_variants: tuple[str, ...] = (),
    instruct_runs: bool = True,
    step_times: bool = False,
    host_profile: tuple[int, int] | None = None,
    out: str | None = None,
) -> list[dict]:
    """Pretrain, adapt, then instruction-tune ``model`` (once, then once per ``instruct_variants`` entry); one
    row per run (``profile``: with its kernel split), handed to ``save`` as each run ends, so a run cut off
    keeps what it measured. ``instruct_runs=False`` stops after adaptation; ``step_times`` and ``host_profile``
    (start, steps) add ``diagnostics``' callbacks to the instruct runs (the profile is written to ``out``)."""
    run = steps + PROFILE_EXTRA_STEPS if profile else steps
    common = [
        f"model={model}",
        "trainer=gpu" if torch.cuda.is_available() else "trainer=cpu",
        "trainer.enable_progress_bar=false",
        "trainer.limit_val_batches=2",
        "logger=none",
        "callbacks.model_checkpoint=null",
        f"callbacks.throughput.window={max(10, steps // 5)}",
        f"data.block_size={seq}",
        f"data.batch_size={batch}",
        "data.world.train_docs_per_language=4000",
        "data.world.val_docs_per_language=200",
        "data.num_workers=4",
        *extra,
    ]
    rows: list[dict] = []

    def run_stage(stage: str, runner: Callable[[object], dict], cfg, run_dir: str) -> None:
        cfg = with_profile(cfg, steps, run_dir) if profile else cfg
        if stage.startswith("instruct"):
            cfg = with_diagnostics(cfg, run_dir, step_times, host_profile, out, f"{model}_{len(rows)}")
        torch._dynamo.reset()
        start = time.perf_counter()
        metrics = runner(cfg)
        rows.append(row(model, stage, metrics, time.perf_counter() - start))
        if times := read_step_times(Path(run_dir) / "step_times.json"):
            rows[-1]["step_ms_each"] = times
        if profile:
            rows[-1]["profile"] = json.loads((Path(run_dir) / "profile.json").read_text())
        measured = rows[-1]["tokens_per_s" if stage == "adapt" else "real_tokens_per_s"]
        if stage != "pretrain" and measured and rows[0]["tokens_per_s"]:  # None: no window after warm-up
            rows[-1]["x_pretrain"] = measured / rows[0]["tokens_per_s"]
        save(rows)

    with tempfile.TemporaryDirectory() as root:
        pre_dir, ada_dir = str(Path(root) / "pretrain"), str(Path(root) / "adapt")
        cfg = config([*common, f"trainer.max_steps={run}", f"trainer.val_check_interval={steps}"], pre_dir)
        run_stage("pretrain", pretrain.run, cfg, pre_dir)
        cfg = config(
            [
                *common,
                f"init_from={pre_dir}/model",
                f"adapt.token_budget={run * batch * seq}",
                f"adapt.val_every_n_steps={steps}",
                "adapt.eval_docs=20",
            ],
            ada_dir,
        )
        run_stage("adapt", adapt.run, cfg, ada_dir)
        for variant in ("", *instruct_variants) if instruct_runs else ():
            turns, overrides = split_variant(variant, max_turns)
            chats = Path(root) / f"chats-{turns}.jsonl"
            chats.write_text(
                "".join(
                    json.dumps(c) + "\n" for c in conversations(cfg, (run + 2 * profile) * instruct_batch, turns, 0)
                )
            )
            run_dir = str(Path(root) / f"instruct{len(rows)}")
            cfg = config(
                [
                    *common,
                    f"init_from={ada_dir}/model",
                    "instruct.source=dataset",
                    "instruct.format=messages",
                    f"instruct.files={chats}",
                    f"instruct.max_length={seq}",
                    "instruct.overflow=truncate",
                    f"instruct.batch_size={instruct_batch}",
                    "instruct.epochs=1",
                    "instruct.heldout_fraction=0.01",
                    "instruct.eval_questions=0",
                    *overrides,
                ],
                run_dir,
            )
            run_stage(f"instruct {variant}".strip(), instruct.run, cfg, run_dir)
    return rows


def with_diagnostics(cfg, run_dir: str, step_times: bool, host_profile, out: str | None, tag: str):
    """``cfg`` with the ``diagnostics`` callbacks asked for: step times into ``run_dir``, the host profile of
    ``host_profile`` = (start, steps) into ``out``."""
    with open_dict(cfg):
        if step_times:
            cfg.callbacks.step_times = {"_target_": "diagnostics.StepTimes", "path": f"{run_dir}/step_times.json"}
        if host_profile:
            cfg.callbacks.host_profile = {
                "_target_": "diagnostics.HostProfile",
                "path": str(Path(out or run_dir) / f"hostprof-{tag}.txt"),
                "start": host_profile[0],
                "n": host_profile[1],
            }
    return cfg


def row(model: str, stage: str, metrics: dict, wall: float) -> dict:
    """One table row from a stage's metrics."""
    throughput = metrics.get("throughput", {})
    return {
        "model": model,
        "stage": stage,
        "steps": metrics["global_step"],
        "tokens_per_s": throughput.get("tokens_per_s"),
        "real_tokens_per_s": throughput.get("real_tokens_per_s"),
        "padding_fraction": throughput.get("padding_fraction"),
        "step_ms": throughput.get("step_ms"),
        "recompiles_after_warmup": throughput.get("recompiles_after_warmup"),
        "steady_windows": throughput.get("steady_windows"),
        "graph_breaks": throughput.get("graph_breaks"),
        "device_mallocs_per_window": throughput.get("device_mallocs"),
        "frozen_unchanged": metrics.get("frozen_unchanged"),
        "x_pretrain": 1.0 if stage == "pretrain" else None,
        "fit_s": metrics["train_time_s"],
        "wall_s": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["llama_124m"])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--max-turns", type=int, default=40, help="most Q&A turns in one instruct conversation")
    parser.add_argument("--instruct-batch", type=int, help="conversations per instruct step (default: --batch)")
    parser.add_argument("--out", default=os.environ.get("OUT", str(Path(__file__).parent)))
    parser.add_argument("--profile", action="store_true", help="split 10 more steps' GPU time by kernel category")
    parser.add_argument("--no-instruct", action="store_true", help="stop after adaptation (pretrain and adapt only)")
    parser.add_argument(
        "--instruct-variants",
        nargs="*",
        default=[],
        help='more instruct runs of the adapted model, each "OVERRIDE ..." (turns=N: most turns in its conversations)',
    )
    parser.add_argument("--step-times", action="store_true", help="every instruct step's host wall time in its row")
    parser.add_argument(
        "--host-profile",
        nargs=2,
        type=int,
        metavar=("START", "N"),
        help="cProfile instruct steps [START, START+N) into --out/hostprof-<run>.txt",
    )
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every stage")
    args = parser.parse_args()
    if args.no_instruct and (args.instruct_variants or args.step_times or args.host_profile):
        parser.error(
            "--instruct-variants, --step-times and --host-profile need instruct, which --no-instruct leaves out"
        )
    if args.host_profile and (args.host_profile[0] < 0 or args.host_profile[1] < 1):
        parser.error(f"--host-profile START N: START >= 0 and N >= 1, got {args.host_profile}")
    for variant in args.instruct_variants:
        try:
            split_variant(variant, args.max_turns)
        except ValueError as err:
            parser.error(str(err))
    rows: list[dict] = []
    out = Path(args.out) / f"stages-{device_name().replace(' ', '_')}.json"
    for model in args.models:
        instruct_batch = args.instruct_batch or args.batch
        rows += measure(
            model,
            args.steps,
            args.batch,
            args.seq,
            args.max_turns,
            instruct_batch,
            args.overrides,
            args.profile,
            save=lambda measured, before=list(rows): write_record(out, args, before + measured),
            instruct_variants=tuple(args.instruct_variants),
            instruct_runs=not args.no_instruct,
            step_times=args.step_times,
            host_profile=tuple(args.host_profile) if args.host_profile else None,
            out=args.out,
        )
    columns = ["model", "stage", "steps", "tokens_per_s", "real_tokens_per_s", "padding_fraction", "step_ms"]
    print_table(rows, [*columns, "x_pretrain", "recompiles_after_warmup", "steady_windows"])
    if args.profile:
        print_profiles([{**r, "variant": f"{r['model']} {r['stage']}"} for r in rows])


if __name__ == "__main__":
    main()
