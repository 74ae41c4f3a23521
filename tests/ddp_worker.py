"""Run by test_ddp.py: two CPU processes (gloo) train with ActiveForgetting; each rank saves its embeddings."""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from conftest import loader, tiny_llama

from afpt import ActiveForgetting, CausalLMModule


class SaveEmbeddingAfterReset(pl.Callback):
    """After every reset step, save this rank's embedding and its optimizer state."""

    def __init__(self, out: Path, forgetting: ActiveForgetting) -> None:
        self.out, self.forgetting, self.seen = out, forgetting, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if len(self.forgetting.history) > self.seen:
            self.seen = len(self.forgetting.history)
            weight = pl_module.model.get_input_embeddings().weight
            state = trainer.optimizers[0].state[weight]
            torch.save(
                {"emb": weight.detach().clone(), "exp_avg": state["exp_avg"].clone()},
                self.out / f"rank{trainer.global_rank}_step{trainer.global_step}.pt",
            )


def main(out: Path) -> None:
    pl.seed_everything(0)
    forgetting = ActiveForgetting(every_n_steps=2, check_sync=True)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=5,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[forgetting, SaveEmbeddingAfterReset(out, forgetting)],
    )
    # DDP keeps ranks equal only through averaged gradients: a reset that drew different values
    # on each rank would leave them apart for the rest of training.
    trainer.fit(CausalLMModule(tiny_llama(tied=True), lr=1e-2), train_dataloaders=loader())


if __name__ == "__main__":
    main(Path(sys.argv[1]))
