"""``stage=pretrain``: train a decoder on a multilingual corpus, with or without active forgetting."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig

from afpt.app.stages import (
    build_forgetting,
    build_optim,
    build_trainer,
    check_batches,
    check_ckpt_path,
    publish_run,
    scalar_metrics,
    to_dict,
)
from afpt.artifacts.io import metric_csvs, read_json
from afpt.artifacts.plots import plot_loss_with_resets
from afpt.data import CorpusDataModule
from afpt.models import ModelConfig, build_model, check_model_dir, count_parameters, load_model
from afpt.pretrain.module import CausalLMModule
from afpt.speed.distributed import full_model_state_dict, layout
from afpt.speed.throughput import throughput_summary


def run(cfg: DictConfig) -> dict[str, Any]:
    """Pretrain as ``cfg`` says; write ``model/``, ``metrics.json``, logs and a loss plot to the run dir."""
    wall_start = time.perf_counter()
    run_dir = Path(cfg.paths.run_dir)
    pl.seed_everything(cfg.seed, workers=True)
    model_cfg = ModelConfig.from_mapping(to_dict(cfg.model))
    ckpt_path = check_ckpt_path(cfg)
    init_from = cfg.get("init_from")
    positions = model_cfg.max_position_embeddings
    if init_from:
        config = read_json(check_model_dir(init_from, model_cfg.trust_remote_code) / "config.json")
        positions = config.get("max_position_embeddings") or config.get("n_positions")
    check_batches(cfg.data, positions)
    # Every setting is checked before the tokenizer and the store: a bad one fails with nothing written.
    optim = build_optim(cfg)
    forgetting = build_forgetting(cfg.get("forgetting"))
    trainer = build_trainer(cfg, run_dir, [forgetting] if forgetting else [])
    datamodule = CorpusDataModule(
        to_dict(cfg.data),
        vocab_size=model_cfg.vocab_size,
        run_dir=str(run_dir),
        tokenizer_path=init_from,
        trust_remote_code=model_cfg.trust_remote_code,
        seed=cfg.seed,
        store_dir=cfg.paths.store_dir,
    )
    tokenizer = datamodule.tokenizer
    # Before the trainer starts: a data error stops the run here, and ranks launched by the trainer find
    # the store complete (Lightning's own prepare_data on local rank 0 then has nothing left to do).
    datamodule.prepare_data()
    if init_from:
        model = load_model(init_from, model_cfg.trust_remote_code, model_cfg.attn_implementation)
    else:
        special = {k: getattr(tokenizer, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        model = build_model(model_cfg, len(tokenizer), special)
    module = CausalLMModule(model, **optim.as_kwargs())

    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    train_time = time.perf_counter() - start
    if layout(trainer) != "fsdp":
        # Lightning's FSDP (v1) cannot validate after fit (the root parameters stay sharded); its
        # metrics come from the validation at the end of fit.
        trainer.validate(module, datamodule=datamodule, verbose=False)
    tokens_per_step = trainer.accumulate_grad_batches * trainer.world_size * cfg.data.batch_size * cfg.data.block_size
    metrics: dict[str, Any] = {
        "stage": "pretrain",
        "forgetting": getattr(forgetting, "label", type(forgetting).__name__) if forgetting else "none",
        "model": model_cfg.name,
        "global_step": trainer.global_step,
        "tokens_seen": trainer.global_step * tokens_per_step,
        "train_time_s": round(train_time, 2),
        "parameters": count_parameters(model),
        "languages": datamodule.train_names,
        "records": datamodule.record_counts,
        "resets": forgetting.history if forgetting else [],
        "throughput": throughput_summary(trainer),
        "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
        **scalar_metrics(trainer),
    }
    state_dict = full_model_state_dict(trainer, module)  # a collective under FSDP: every rank calls
    metrics["wall_time_s"] = round(time.perf_counter() - wall_start, 2)
    title = f"pretraining {metrics['model']}, forgetting={metrics['forgetting']}"
    steps = [r["step"] for r in metrics["resets"]]
    return publish_run(
        trainer,
        run_dir,
        module.model,
        tokenizer,
        metrics,
        lambda: metric_csvs(run_dir) and plot_loss_with_resets(run_dir, steps, run_dir / "loss.png", title),
        state_dict,
    )
