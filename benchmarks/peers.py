"""afpt against public trainers' training steps, on the same Llama widths, in one process.

For each ``--models`` entry (afpt's model group: ``llama_124m``, ``llama_350m``, ...) and each ``--peers``
entry, trains ``--steps`` measured steps after ``--warmup`` steps at batch ``--batch`` x ``--seq`` tokens,
bf16, fused AdamW (lr 3e-3, betas 0.9/0.95, weight decay 0.1), gradient clipping at 1.0, and prints tokens/s
and MFU counted one way for every row (6 x matmul parameters, a tied head included, + 12 x layers x hidden x
seq per token, over afpt's dense-bf16 peak table):

- ``afpt``: ``afpt stage=pretrain`` with its defaults (forgetting on), through ``throughput.run_variant``;
  real data from the embedded world through afpt's loader.
- ``torchtitan`` (0.2.2, the last release that runs on a stable torch; 0.3.0 needs a nightly): its llama3
  ``Transformer`` at afpt's widths (its MLP rule gives afpt's widths; the head tied as afpt's, RoPE theta as
  afpt's, no Llama-3 RoPE scaling), set up as its single-GPU trainer does: every ``TransformerBlock`` compiled
  by its ``apply_compile``, its loss (``cross_entropy_loss``) compiled, ``torch.autocast`` bf16, SDPA causal
  attention. Random tokens, resident on the device.
- ``litgpt``: litgpt's ``GPT`` at afpt's widths (Llama blocks, the head tied by assignment), set up as
  ``litgpt pretrain`` does: its initialisation, compiled whole, autocast bf16, ``chunked_cross_entropy``. Random tokens.
- ``hf``: transformers' ``LlamaForCausalLM`` from the same config, ``torch.compile``, autocast bf16, the
  model's own loss. Random tokens, resident on the device.

The peers' versions are recorded with the rows (``--out``/peers.json). ``--device cpu --no-compile`` runs the
same code on a CPU at a tiny size (a smoke run; no MFU there).

``--profile`` splits 10 more steps' GPU time of every row by kernel category (afpt's ``KernelBreakdown``
categories), to see where a difference goes.

    python benchmarks/peers.py --models llama_124m llama_350m --steps 60 --batch 64
    python benchmarks/peers.py --models tiny --peers hf litgpt --steps 2 --warmup 1 --batch 2 --seq 64 \\
        --device cpu --no-compile
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from record import print_table, write_record
from throughput import VOCAB, run_variant

from afpt.app.stages import to_dict
from afpt.models import ModelConfig
from afpt.speed.throughput import kernel_times, peak_flops

PEERS = ("afpt", "torchtitan", "litgpt", "hf")
PROFILE_STEPS = 10
PROFILE_COLUMNS = ("matmul", "attention", "loss (softmax / cross-entropy)", "optimizer + grad clip", "other")
Built = tuple[Callable[[int], torch.Tensor], int, int]
"""A peer's training step (step index -> loss), its parameter count and its embedding's element count."""
LR, BETAS, WEIGHT_DECAY, CLIP = 3e-3, (0.9, 0.95), 0.1, 1.0


def widths(name: str) -> ModelConfig:
    """afpt's model group entry ``name``, as the ModelConfig it builds."""
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="afpt.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"model={name}"])
    return ModelConfig.from_mapping(to_dict(cfg.model))


def flops_per_token(params: int, embedding: int, tied: bool, layers: int, hidden: int, seq: int) -> float:
    """6 x matmul parameters (every parameter but the embedding lookup, a tied head counted as its own matmul)
    + 12 x layers x hidden x seq: afpt's count (``afpt.speed.throughput.flops_per_token``) from plain numbers."""
    return 6 * (params - embedding + (embedding if tied else 0)) + 12 * layers * hidden * seq


def optimizer_for(model: torch.nn.Module, device: torch.device) -> tuple[torch.optim.Optimizer, Callable[[], None]]:
    """Fused AdamW (on CUDA) with weight decay on matrices, and a warmup schedule; (optimizer, step function)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=LR, betas=BETAS, fused=device.type == "cuda")
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 10))

    def step() -> None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)

    return optimizer, step


def timed(
    train_step: Callable[[int], torch.Tensor], warmup: int, steps: int, device: torch.device
) -> tuple[float, float]:
    """(seconds for ``steps`` steps after ``warmup`` steps, the last loss)."""
    for i in range(warmup):
        train_step(i)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for i in range(steps):
        loss = train_step(warmup + i)
    last = float(loss)  # waits for the device
    return time.perf_counter() - start, last


def profiled(train_step: Callable[[int], torch.Tensor], first: int, steps: int, device: torch.device) -> dict:
    """GPU time of ``steps`` more steps split by kernel category as ``afpt.speed.throughput.KernelBreakdown`` splits
    afpt's: per step, the wall time, the busy time (union of kernels), each category and the top kernels."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        torch.cuda.synchronize(device)
    with torch.profiler.profile(activities=activities) as profiler:
        start = time.perf_counter()
        for i in range(steps):
            loss = train_step(first + i)
        float(loss)
        wall_ms = 1000 * (time.perf_counter() - start)
    categories, kernels, busy = kernel_times(profiler, device.type == "cuda", wall_ms)
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:40]
    return {
        "steps": steps,
        "wall_ms_per_step": wall_ms / steps,
        "busy_ms_per_step": busy / steps,
        "kernel_ms_per_step": {k: v / steps for k, v in sorted(categories.items(), key=lambda kv: -kv[1])},
        "top_kernels_ms_per_step": {name[:160]: ms / steps for name, ms in top},
    }


def random_batches(vocab: int, batch: int, seq: int, device: torch.device, n: int = 4) -> list[torch.Tensor]:
    """``n`` batches of random token ids (``seq`` + 1 per row), resident on the device."""
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(vocab, (batch, seq + 1), generator=generator).to(device) for _ in range(n)]


def build_torchtitan(cfg: ModelConfig, vocab: int, batch: int, seq: int, device, compiled: bool) -> Built:
    """torchtitan's llama3 ``Transformer`` at ``cfg``'s widths, trained as torchtitan's single-device trainer trains
    it: every ``TransformerBlock`` compiled by its ``apply_compile``, its summed ``cross_entropy_loss`` compiled and
    divided by the token count, ``torch.autocast`` bf16, SDPA causal attention. RoPE without Llama-3 scaling
    (factor 1). torchtitan has no tied-head option: the head is tied by assignment before its initialisation
    (whose last draw, the head's, is then the tied matrix's)."""
    from torchtitan.components.loss import cross_entropy_loss
    from torchtitan.config.job_config import Compile
    from torchtitan.models.llama3 import Transformer, TransformerModelArgs
    from torchtitan.models.llama3.infra.parallelize import apply_compile
    from torchtitan.models.llama3.model.args import RoPEScalingArgs

    args = TransformerModelArgs(
        dim=cfg.hidden_size,
        n_layers=cfg.num_layers,
        n_heads=cfg.num_heads,
        n_kv_heads=cfg.num_kv_heads,
        vocab_size=vocab,
        rope_theta=cfg.rope_theta,
        rope_scaling_args=RoPEScalingArgs(scaling_factor=1.0),
        max_seq_len=seq,
        attn_type="sdpa",
    )
    with torch.device("meta"):
        model = Transformer(args)
    width = model.layers["0"].feed_forward.w1.out_features
    if width != (cfg.intermediate_size or 4 * cfg.hidden_size):
        raise ValueError(f"torchtitan's MLP width {width} differs from {cfg.name}'s {cfg.intermediate_size}")
    model.to_empty(device=device)
    if cfg.tie_word_embeddings:  # after to_empty, which gives every module its own tensor
        model.output.weight = model.tok_embeddings.weight
    with torch.no_grad():
        model.init_weights(buffer_device=device)
    model.train()
    loss_fn = cross_entropy_loss
    if compiled:
        apply_compile(model, Compile(enable=True))
        loss_fn = torch.compile(cross_entropy_loss)
    _, optimizer_step = optimizer_for(model, device)
    batches = random_batches(vocab, batch, seq, device)

    def train_step(i: int) -> torch.Tensor:
        tokens = batches[i % len(batches)]
        inputs, labels = tokens[:, :-1], tokens[:, 1:]
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = loss_fn(model(inputs), labels) / labels.numel()
        loss.backward()
        optimizer_step()
        return loss.detach()

    return train_step, sum(p.numel() for p in model.parameters()), model.tok_embeddings.weight.numel()


def build_hf(cfg: ModelConfig, vocab: int, batch: int, seq: int, device, compiled: bool) -> Built:
    """transformers' LlamaForCausalLM at ``cfg``'s widths, compiled whole, its own loss."""
    from afpt.models import build_model

    model = build_model(cfg, vocab, {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": None}).to(device)
    model.train()
    forward = torch.compile(model) if compiled else model
    _, optimizer_step = optimizer_for(model, device)
    batches = random_batches(model.config.vocab_size, batch, seq, device)

    def train_step(i: int) -> torch.Tensor:
        tokens = batches[i % len(batches)]
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = forward(input_ids=tokens[:, :-1], labels=tokens[:, :-1], use_cache=False).loss
        loss.backward()
        optimizer_step()
        return loss.detach()

    return train_step, sum(p.numel() for p in model.parameters()), model.get_input_embeddings().weight.numel()


def build_litgpt(cfg: ModelConfig, vocab: int, batch: int, seq: int, device, compiled: bool) -> Built:
    """litgpt's GPT at ``cfg``'s widths (a Llama: RMSNorm, SwiGLU, RoPE), trained as ``litgpt pretrain`` trains it:
    its GPT-NeoX initialisation, the model compiled whole, autocast bf16 (its ``bf16-mixed``), its
    ``chunked_cross_entropy`` outside the compiled model. litgpt has no tied-head option: the head is tied by
    assignment, as afpt's."""
    from lightning import Fabric
    from litgpt.config import Config
    from litgpt.model import GPT
    from litgpt.pretrain import initialize_weights
    from litgpt.utils import chunked_cross_entropy

    config = Config(
        name=cfg.name,
        block_size=seq,
        vocab_size=vocab,
        padded_vocab_size=vocab,
        n_layer=cfg.num_layers,
        n_head=cfg.num_heads,
        n_embd=cfg.hidden_size,
        n_query_groups=cfg.num_kv_heads or cfg.num_heads,
        rotary_percentage=1.0,
        parallel_residual=False,
        bias=False,
        norm_class_name="RMSNorm",
        mlp_class_name="LLaMAMLP",
        intermediate_size=cfg.intermediate_size or 4 * cfg.hidden_size,
        rope_base=int(cfg.rope_theta),
    )
    model = GPT(config).to(device)
    initialize_weights(Fabric(accelerator=device.type, devices=1), model, config.n_layer, config.n_embd)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.transformer.wte.weight
    model.train()
    forward = torch.compile(model) if compiled else model
    _, optimizer_step = optimizer_for(model, device)
    batches = random_batches(vocab, batch, seq, device)

    def train_step(i: int) -> torch.Tensor:
        tokens = batches[i % len(batches)]
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = forward(tokens[:, :-1])
        loss = chunked_cross_entropy(logits, tokens[:, 1:])
        loss.backward()
        optimizer_step()
        return loss.detach()

    return train_step, sum(p.numel() for p in model.parameters()), model.transformer.wte.weight.numel()


def versions() -> dict[str, str]:
    """The installed versions of the stack and the peers."""
    found = {}
    for package in ("torch", "transformers", "lightning", "torchtitan", "litgpt", "afpt"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["llama_124m", "llama_350m"])
    parser.add_argument("--peers", nargs="+", choices=PEERS, default=list(PEERS))
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=15, help="steps before timing (compilation, autotuning)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--no-compile", action="store_true", help="the peers eager (a CPU smoke run)")
    parser.add_argument(
        "--profile", action="store_true", help=f"split {PROFILE_STEPS} more steps' GPU time by kernel category"
    )
    parser.add_argument("--out", default=os.environ.get("OUT", str(Path(__file__).parent)))
    args = parser.parse_args()
    device = torch.device(args.device)
    rows: list[dict] = []
    for name in args.models:
        cfg = widths(name)
        vocab = VOCAB.get(name, 4096)
        for peer in args.peers:
            torch._dynamo.reset()
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            row = {"model": name, "peer": peer, **versions()}
            try:
                row.update(measure(peer, name, cfg, vocab, args, device))
            except Exception as err:  # a peer that cannot run here is a row saying why; the others still run
                row["error"] = f"{type(err).__name__}: {err}"
            if device.type == "cuda":
                row["peak_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
            rows.append(row)
            afpt = {r["model"]: r["tokens_per_s"] for r in rows if r["peer"] == "afpt" and r.get("tokens_per_s")}
            for r in rows:
                if r["model"] in afpt and r.get("tokens_per_s"):
                    r["afpt_vs_this"] = afpt[r["model"]] / r["tokens_per_s"]
            write_record(Path(args.out) / "peers.json", args, rows)
    print_table(
        rows,
        [
            "model",
            "peer",
            "tokens_per_s",
            "mfu",
            "loss",
            "afpt_vs_this",
            "peak_gb",
            "torchtitan",
            "litgpt",
            "transformers",
        ],
    )
    if args.profile:
        profiles = [{**r, **r["profile"], **r["profile"]["kernel_ms_per_step"]} for r in rows if "profile" in r]
        print_table(profiles, ["model", "peer", "wall_ms_per_step", "busy_ms_per_step", *PROFILE_COLUMNS])


def measure(peer: str, name: str, cfg: ModelConfig, vocab: int, args: argparse.Namespace, device) -> dict:
    """tokens/s, MFU and the last loss of one peer at one model; with ``--profile``, the GPU time of
    PROFILE_STEPS more steps by kernel category."""
    if peer == "afpt":
        extra = [] if device.type == "cuda" else ["trainer=cpu", "data.num_workers=0", "data.pin_memory=false"]
        steps = args.warmup + args.steps
        row = run_variant(
            f"{name}+auto+bs{args.batch}", steps, args.batch, args.seq, max(steps, 2) // 2, extra, args.profile
        )
        out = {"tokens_per_s": row["tokens_per_s"], "mfu": row["mfu"], "loss": row["val_loss"]}
        return {**out, "profile": row["profile"]} if args.profile else out
    build = {"torchtitan": build_torchtitan, "litgpt": build_litgpt, "hf": build_hf}[peer]
    train_step, params, embedding = build(cfg, vocab, args.batch, args.seq, device, not args.no_compile)
    seconds, loss = timed(train_step, args.warmup, args.steps, device)
    tokens_per_s = args.batch * args.seq * args.steps / seconds
    flops = flops_per_token(params, embedding, cfg.tie_word_embeddings, cfg.num_layers, cfg.hidden_size, args.seq)
    peak = peak_flops(device)
    row = {"tokens_per_s": tokens_per_s, "mfu": tokens_per_s * flops / peak if peak else None, "loss": loss}
    if args.profile:
        row["profile"] = profiled(train_step, args.warmup + args.steps, PROFILE_STEPS, device)
    return row


if __name__ == "__main__":
    main()
