"""Tokens per second and model FLOPs utilisation (MFU), logged during real training runs."""

from __future__ import annotations

import time
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from afpt.forgetting import find_model

# Dense bf16 peak FLOP/s per GPU (no sparsity). Lightning's own table does not know the H200.
PEAK_BF16_FLOPS = {"H200": 989.4e12, "H100": 989.4e12, "A100": 312e12, "L40S": 362.05e12, "A10G": 70e12}


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak of a CUDA device from afpt's table, or None (CPU, unknown GPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


def flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    """Training FLOPs per token: 6 x (matmul parameters) + 12 x layers x hidden x seq.

    Matmul parameters are all parameters except the input embedding (a lookup), plus a tied output
    head, which is counted once among the parameters but still costs its own matmul.
    """
    config = model.config
    embedding = model.get_input_embeddings().weight
    params = sum(p.numel() for p in model.parameters()) - embedding.numel()
    head = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    if head is not None and head.weight is embedding:
        params += embedding.numel()
    layers = getattr(config, "num_hidden_layers", None) or config.n_layer
    hidden = getattr(config, "hidden_size", None) or config.n_embd
    return 6 * params + 12 * layers * hidden * seq_len


class TokenThroughput(Callback):
    """Log ``perf/tokens_per_s``, ``perf/step_ms`` and ``perf/mfu`` every ``window`` optimizer steps.

    Times whole windows, so the only host sync is one per window; the first window (warm-up,
    compilation) is logged but left out of ``summary()``.
    """

    def __init__(self, window: int = 50) -> None:
        super().__init__()
        self.window = window
        self.records: list[dict[str, float]] = []
        self._start: float | None = None
        self._start_step = 0
        self._tokens = 0

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        """Start the clock at the first batch, and count this micro-batch's tokens."""
        if self._start is None:
            self._sync(pl_module)
            self._start, self._start_step, self._tokens = time.perf_counter(), trainer.global_step, 0
        ids = batch["input_ids"] if isinstance(batch, dict) else batch[0]
        self._tokens += ids.numel() * trainer.world_size

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Close a window every ``window`` optimizer steps and log its throughput."""
        steps = trainer.global_step - self._start_step
        if steps < self.window or trainer.fit_loop.epoch_loop._should_accumulate():
            return
        self._sync(pl_module)
        elapsed = time.perf_counter() - self._start
        model = find_model(pl_module)
        tokens_per_s = self._tokens / elapsed
        record = {
            "step": trainer.global_step,
            "tokens_per_s": tokens_per_s,
            "step_ms": 1000 * elapsed / steps,
            "compiled_graphs": float(torch._dynamo.utils.counters["stats"]["unique_graphs"]),
        }
        peak = peak_flops(pl_module.device)
        if peak:
            seq = (batch["input_ids"] if isinstance(batch, dict) else batch[0]).shape[-1]
            record["mfu"] = tokens_per_s * flops_per_token(model, seq) / (peak * trainer.world_size)
        self.records.append(record)
        for key, value in record.items():
            if key != "step":
                pl_module.log(f"perf/{key}", value, on_step=True, on_epoch=False)
        self._start, self._start_step, self._tokens = time.perf_counter(), trainer.global_step, 0

    def summary(self) -> dict[str, float]:
        """Means of the windows after the first (steady state; all windows if there is only one), and
        ``recompiles_after_warmup``: graphs torch.compile built after the first window (resets included)."""
        steady = self.records[1:] or self.records
        keys = steady[0].keys() if steady else []
        out = {k: sum(r[k] for r in steady) / len(steady) for k in keys if k not in ("step", "compiled_graphs")}
        if self.records:
            out["recompiles_after_warmup"] = self.records[-1]["compiled_graphs"] - self.records[0]["compiled_graphs"]
        return out

    @staticmethod
    def _sync(pl_module: LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
