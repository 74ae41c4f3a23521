"""Run by test_speed_distributed.py: two CPU processes (gloo) train with ActiveForgetting under DDP, FSDP or FSDP2.

After each reset every rank saves the full embedding it sees (gathered through any sharding), its own
shard of the embedding's optimizer state, and its shard of the embedding parameter.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from helpers import loader, quiet_trainer, tiny_llama
from torch.distributed.fsdp import FSDPModule

from afpt import ActiveForgetting, CausalLMModule
from afpt.speed.distributed import FSDP2Strategy, ddp_strategy, fsdp_strategy, full_parameters, full_value, local
from afpt.speed.throughput import compile_health

# DDP with bf16-compressed all-reduce in small buckets; FSDP2 with bf16 reduce-scatter and explicit
# prefetching (its model is untied with two layers, so embedding and head are FSDP units of their own).
STRATEGIES = {
    "ddp": lambda: ddp_strategy(comm_hook="bf16", bucket_cap_mb=1, gradient_as_bucket_view=True),
    "fsdp": fsdp_strategy,
    "fsdp2": lambda: FSDP2Strategy(reduce_dtype="bfloat16", prefetch=1),
}


class SaveEmbeddingAfterReset(pl.Callback):
    """After every reset step, save this rank's view of the embedding and its optimizer state."""

    def __init__(self, out: Path, forgetting: ActiveForgetting) -> None:
        self.out, self.forgetting, self.seen = out, forgetting, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if len(self.forgetting.history) > self.seen:
            self.seen = len(self.forgetting.history)
            weight = pl_module.model.get_input_embeddings().weight
            state = trainer.optimizers[0].state[weight]
            with full_parameters(trainer, writeback=False):
                full = full_value(pl_module.model.get_input_embeddings().weight).detach().clone()
            torch.save(
                {
                    "emb": full,
                    "shard_numel": local(weight).numel(),
                    "exp_avg": local(state["exp_avg"]).clone(),
                    "exp_avg_sq": local(state["exp_avg_sq"]).clone(),
                    "fsdp_units": sorted(n for n, m in pl_module.model.named_modules() if isinstance(m, FSDPModule)),
                    "comm_hook": getattr(getattr(trainer.strategy, "_ddp_comm_hook", None), "__name__", None),
                },
                self.out / f"rank{trainer.global_rank}_step{trainer.global_step}.pt",
            )


class SeedPerRank(ActiveForgetting):
    """A broken setup: each rank seeds its resets differently, which check_sync must catch."""

    def setup(self, trainer, pl_module, stage):
        super().setup(trainer, pl_module, stage)
        self.seed = trainer.global_rank


def main(
    out: Path,
    strategy: str,
    mismatch: bool,
    compile: bool,
    fraction: float = 1.0,
    row_probability: float | None = None,
    episodes: bool = False,
) -> None:
    pl.seed_everything(0)
    if compile:  # 4 layers against a limit of 2: each must still run compiled (afpt raises the limit)
        torch._dynamo.config.recompile_limit = 2
    forgetting = (SeedPerRank if mismatch else ActiveForgetting)(
        every_n_steps=2, check_sync=True, fraction=fraction, row_probability=row_probability, save_before_reset=episodes
    )
    trainer = quiet_trainer(
        devices=2,
        strategy=STRATEGIES[strategy](),
        max_steps=5,
        default_root_dir=out,
        limit_val_batches=2,
        num_sanity_val_steps=2,  # Lightning's default: the compiled run builds its eval graphs here
        callbacks=[forgetting, SaveEmbeddingAfterReset(out, forgetting)],
    )
    # Ranks stay equal only if every rank drew the same values and wrote its own shard of them.
    model = tiny_llama(tied=True) if strategy == "ddp" else tiny_llama(tied=False, layers=4 if compile else 2)
    # Compiled: validate too, so eval-mode graphs are built for every layer as well.
    trainer.fit(
        CausalLMModule(model, lr=1e-2, compile=compile),
        train_dataloaders=loader(),
        val_dataloaders=loader() if compile else None,
    )
    record = {"verified": [h["verify_ms"] is not None for h in forgetting.history], **compile_health()}
    torch.save(
        {**record, "graphs": torch._dynamo.utils.counters["stats"]["unique_graphs"]},
        out / f"history{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    main(
        Path(sys.argv[1]),
        sys.argv[2],
        mismatch="mismatch" in sys.argv[3:],
        compile="compile" in sys.argv[3:],
        fraction=0.25 if "partial" in sys.argv[3:] else 1.0,
        row_probability=0.3 if "probabilistic" in sys.argv[3:] else None,
        episodes="episodes" in sys.argv[3:],
    )
