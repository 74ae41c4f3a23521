"""``stage=instruct``: English instruction fine-tuning in ChatML, loss on assistant tokens only."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from omegaconf import DictConfig

from afpt.adapt.splice import vocabulary_parameters
from afpt.app.stages import (
    build_optim,
    build_trainer,
    check_ckpt_path,
    init_from,
    publish_run,
    require_replicated,
    scalar_metrics,
    to_dict,
)
from afpt.data import DataError, load_tokenizer
from afpt.errors import AfptError, check_number
from afpt.instruct.chat import (
    OVERFLOW,
    InstructDataModule,
    answer_metrics,
    conversations_for,
    encode_all,
    ensure_chatml,
)
from afpt.models import check_model_dir, load_model
from afpt.pretrain.module import CausalLMModule
from afpt.speed.throughput import throughput_summary


def run(cfg: DictConfig) -> dict[str, Any]:
    """Fine-tune ``init_from`` on instructions; write ``model/`` (with a ChatML template) and ``metrics.json``."""
    wall_start = time.perf_counter()
    i = cfg.instruct
    run_dir = Path(cfg.paths.run_dir)
    source = init_from(cfg, "instruct")
    if i.overflow not in OVERFLOW:
        raise AfptError(f"instruct.overflow={i.overflow!r} is unknown; expected one of {OVERFLOW}")
    check_number("instruct.epochs", i.epochs, least=1, integer=True)
    check_number("instruct.eval_questions", i.eval_questions, least=0, integer=True)
    if not (isinstance(i.heldout_fraction, (int, float)) and 0 <= i.heldout_fraction < 1):
        raise AfptError(f"instruct.heldout_fraction must be a number in [0, 1), got {i.heldout_fraction!r}")
    build_optim(cfg)
    optim = build_optim(cfg, i.optim, "instruct.optim")
    check_model_dir(source)
    ckpt_path = check_ckpt_path(cfg)
    pl.seed_everything(cfg.seed, workers=True)
    train_convs, heldout_convs = conversations_for(cfg)
    tokenizer = load_tokenizer(source)
    model = load_model(source)
    added = ensure_chatml(tokenizer, model, cfg.seed)
    if i.freeze_embeddings:  # Chen et al.'s English task tuning: the body learns, the embeddings (and head) stay
        for param in vocabulary_parameters(model):
            param.requires_grad_(False)
    max_length = i.max_length or model.config.max_position_embeddings
    train, overflow_train = encode_all(tokenizer, train_convs, max_length, i.overflow, i.train_on_prompt)
    val, overflow_val = encode_all(tokenizer, heldout_convs, max_length, i.overflow, False)
    if not train:
        raise DataError(f"no training conversation left ({overflow_train} longer than {max_length} tokens)")
    datamodule = InstructDataModule(
        train,
        val,
        i.batch_size,
        tokenizer.pad_token_id,
        cfg.seed,
        i.batching,
        i.pad_to_multiple_of,
        i.num_workers,
        i.pin_memory,
    )
    steps = i.epochs * math.ceil(len(train) / i.batch_size)
    module = CausalLMModule(model, **{**optim.as_kwargs(), "total_steps": steps, "dynamic_length": True})
    validation = {"check_val_every_n_epoch": 1, "limit_val_batches": 1.0 if val else 0}
    trainer = build_trainer(cfg, run_dir, [], **{**to_dict(i.trainer), **validation})
    require_replicated(trainer, "instruct")
    eval_convs = heldout_convs[: i.eval_questions]
    before = answer_metrics(model, tokenizer, eval_convs) if eval_convs else {}
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    train_time = time.perf_counter() - start
    after = answer_metrics(model, tokenizer, eval_convs) if eval_convs else {}
    metrics = {
        "stage": "instruct",
        "init_from": str(source),
        "source": i.source,
        "train_conversations": len(train),
        "heldout_conversations": len(val),
        "overflowed": {"train": overflow_train, "heldout": overflow_val},
        "overflow_rule": i.overflow,
        "max_length": max_length,
        "chatml_tokens_added": added,
        "global_step": trainer.global_step,
        "train_time_s": round(train_time, 2),
        "throughput": throughput_summary(trainer),
        "before": before,
        "after": after,
        **scalar_metrics(trainer),
        "wall_time_s": round(time.perf_counter() - wall_start, 2),
    }
    return publish_run(trainer, run_dir, model, tokenizer, metrics)
