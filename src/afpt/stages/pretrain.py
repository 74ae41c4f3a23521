"""Pretraining stage: train a decoder on a multilingual corpus, with or without active forgetting."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig

from afpt.data import CorpusDataModule, atomic_save
from afpt.distributed import full_state_dict, layout
from afpt.models import ModelConfig, build_model, check_model_dir, count_parameters, load_model
from afpt.module import CausalLMModule
from afpt.plots import plot_loss_with_resets, read_metric_csv
from afpt.stages.common import (
    build_forgetting,
    build_trainer,
    check_ckpt_path,
    scalar_metrics,
    to_dict,
    write_json,
)
from afpt.throughput import TokenThroughput


def run(cfg: DictConfig) -> dict[str, Any]:
    """Pretrain as ``cfg`` says; write ``model/``, ``metrics.json``, logs and a loss plot to the run dir."""
    run_dir = Path(cfg.paths.run_dir)
    pl.seed_everything(cfg.seed, workers=True)
    model_cfg = ModelConfig.from_mapping(to_dict(cfg.model))
    ckpt_path = check_ckpt_path(cfg.get("ckpt_path"))
    if model_cfg.init_from:
        check_model_dir(model_cfg.init_from)
    forgetting = build_forgetting(cfg.forgetting, cfg.seed)  # a bad setting fails before data preparation
    datamodule = CorpusDataModule(
        to_dict(cfg.data),
        vocab_size=model_cfg.vocab_size,
        run_dir=str(run_dir),
        tokenizer_path=model_cfg.init_from,
        trust_remote_code=model_cfg.trust_remote_code,
        seed=cfg.seed,
    )
    tokenizer = datamodule.tokenizer

    if model_cfg.init_from:
        model = load_model(model_cfg.init_from, model_cfg.trust_remote_code, model_cfg.attn_implementation)
    else:
        special = {
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        }
        model = build_model(model_cfg, len(tokenizer), special)
    module = CausalLMModule(model, **to_dict(cfg.optim))
    trainer = build_trainer(cfg, run_dir, [forgetting] if forgetting else [])

    parameters = count_parameters(model)
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    train_time = time.perf_counter() - start
    if layout(trainer) != "fsdp":
        # Lightning's FSDP (v1) cannot validate after fit (the root parameters stay sharded); its
        # metrics come from the validation at the end of fit.
        trainer.validate(module, datamodule=datamodule, verbose=False)

    metrics: dict[str, Any] = {
        "stage": "pretrain",
        "forgetting": cfg.forgetting.name,
        "model": model_cfg.name,
        "global_step": trainer.global_step,
        "tokens_seen": trainer.global_step
        * trainer.accumulate_grad_batches
        * trainer.world_size
        * cfg.data.batch_size
        * cfg.data.block_size,
        "train_time_s": round(train_time, 2),
        "parameters": parameters,
        "languages": datamodule.train_names,
        "resets": forgetting.history if forgetting else [],
        "throughput": next((c.summary() for c in trainer.callbacks if isinstance(c, TokenThroughput)), {}),
        "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
        **scalar_metrics(trainer),
    }
    state_dict = full_state_dict(trainer, trainer.strategy.model)  # a collective under FSDP: every rank calls
    if trainer.is_global_zero:
        if state_dict is not None:
            state_dict = {k.removeprefix("model."): v for k, v in state_dict.items() if k.startswith("model.")}
        save_artifacts(run_dir, module, tokenizer, trainer, metrics, cfg, state_dict)
    return metrics


def save_artifacts(
    run_dir: Path,
    module: CausalLMModule,
    tokenizer,
    trainer: pl.Trainer,
    metrics: dict[str, Any],
    cfg: DictConfig,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> None:
    """``model/`` (safetensors + tokenizer), ``metrics.json`` and ``loss.png``, each written atomically.

    ``state_dict``: the full weights gathered from a sharded model (FSDP); default: the module's own.
    """

    def save(tmp: Path) -> None:
        module.model.save_pretrained(tmp, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)

    atomic_save(save, run_dir / "model")
    write_json(metrics, run_dir / "metrics.json")
    csv_files = sorted(Path(run_dir).glob("logs/**/metrics.csv"), key=lambda p: p.stat().st_mtime)
    if csv_files:
        plot_loss_with_resets(
            read_metric_csv(csv_files, "train/loss"),
            read_metric_csv(csv_files, "val/loss"),
            [r["step"] for r in metrics["resets"]],
            run_dir / "loss.png",
            f"pretraining {metrics['model']}, forgetting={metrics['forgetting']}",
        )
