"""Instruction fine-tuning stage: English instructions in ChatML, loss on assistant tokens only."""

from __future__ import annotations

import math
import random
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig, open_dict
from torch.utils.data import DataLoader

from afpt.chat import (
    IM_END,
    encode_conversation,
    ensure_chatml,
    load_conversations,
    pad_collate,
    world_conversations,
)
from afpt.data import DataError, atomic_save, load_tokenizer, world_from_config
from afpt.errors import AfptError
from afpt.models import check_model_dir, load_model
from afpt.module import CausalLMModule
from afpt.stages.common import build_trainer, check_ckpt_path, require_replicated, to_dict, write_json

OVERFLOW = ("skip", "truncate")


def encode_all(tokenizer, conversations, max_length: int, overflow: str, train_on_prompt: bool):
    """Encode conversations; longer than ``max_length`` are skipped or cut (by ``overflow``). Returns (examples, n)."""
    examples, overflowed = [], 0
    for messages in conversations:
        example = encode_conversation(tokenizer, messages, train_on_prompt)
        if len(example["input_ids"]) > max_length:
            overflowed += 1
            if overflow == "skip":
                continue
            example = {k: v[:max_length] for k, v in example.items()}
            if all(label == -100 for label in example["labels"]):
                continue
        examples.append(example)
    return examples, overflowed


class InstructDataModule(pl.LightningDataModule):
    """Shuffled, padded conversations for training; held-out ones for validation."""

    def __init__(self, train: list, val: list, batch_size: int, pad_token_id: int, seed: int) -> None:
        super().__init__()
        self.train, self.val, self.batch_size, self.seed = train, val, batch_size, seed
        self.collate = pad_collate(pad_token_id)
        self.val_names = ["heldout"]

    def train_dataloader(self) -> DataLoader:
        """Training conversations, reshuffled every epoch from a seeded generator."""
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            self.train, batch_size=self.batch_size, shuffle=True, generator=generator, collate_fn=self.collate
        )

    def val_dataloader(self) -> DataLoader:
        """Held-out conversations."""
        return DataLoader(self.val, batch_size=self.batch_size, collate_fn=self.collate)


@torch.no_grad()
def answer_metrics(model, tokenizer, conversations: list, max_new_tokens: int = 32) -> dict[str, float]:
    """Mean log-likelihood per token of the gold reply, and greedy exact match, on held-out conversations."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    total_logp, total_tokens, exact = 0.0, 0, 0
    for messages in conversations:
        example = encode_conversation(tokenizer, messages)
        ids = torch.tensor([example["input_ids"]], device=device)
        labels = torch.tensor([example["labels"]], device=device)
        logits = model(input_ids=ids, use_cache=False).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        target = labels[:, 1:]
        mask = target != -100
        total_logp += float(logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)[mask].sum())
        total_tokens += int(mask.sum())
        prompt = tokenizer.apply_chat_template(
            messages[:-1], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        out = model.generate(
            **{k: v.to(device) for k, v in prompt.items()}, max_new_tokens=max_new_tokens, do_sample=False
        )
        reply = tokenizer.decode(out[0, prompt["input_ids"].shape[1] :]).split(IM_END)[0].strip()
        exact += int(reply == messages[-1]["content"].strip())
    model.cpu().train()
    return {
        "answer_logprob_per_token": total_logp / max(1, total_tokens),
        "exact_match": exact / max(1, len(conversations)),
        "questions": len(conversations),
    }


def conversations_for(cfg: DictConfig) -> tuple[list, list]:
    """(train, held-out) conversations: the world's English questions, or a dataset split by seed."""
    i = cfg.instruct
    if i.source == "world":
        return world_conversations(world_from_config(cfg.data.world), i.heldout_fraction)
    conversations = load_conversations(to_dict(i))
    random.Random(cfg.seed).shuffle(conversations)
    n_heldout = int(len(conversations) * i.heldout_fraction)
    return conversations[n_heldout:], conversations[:n_heldout]


def run(cfg: DictConfig) -> dict[str, Any]:
    """Fine-tune ``init_from`` on instructions; write ``model/`` (with a ChatML template) and ``metrics.json``."""
    i = cfg.instruct
    run_dir = Path(cfg.paths.run_dir)
    init_from = cfg.get("init_from") or cfg.model.get("init_from")
    if not init_from:
        raise AfptError("stage=instruct needs init_from=<a model directory>")
    if i.overflow not in OVERFLOW:
        raise AfptError(f"instruct.overflow={i.overflow!r} is unknown; expected one of {OVERFLOW}")
    check_model_dir(init_from)
    ckpt_path = check_ckpt_path(cfg.get("ckpt_path"))
    pl.seed_everything(cfg.seed, workers=True)
    train_convs, heldout_convs = conversations_for(cfg)
    tokenizer = load_tokenizer(init_from)
    model = load_model(init_from)
    added = ensure_chatml(tokenizer, model, cfg.seed)
    max_length = i.max_length or model.config.max_position_embeddings
    train, overflow_train = encode_all(tokenizer, train_convs, max_length, i.overflow, i.train_on_prompt)
    val, overflow_val = encode_all(tokenizer, heldout_convs, max_length, i.overflow, False)
    if not train:
        raise DataError(f"no training conversation left ({overflow_train} longer than {max_length} tokens)")
    eval_convs = heldout_convs[: i.eval_questions]
    before = answer_metrics(model, tokenizer, eval_convs) if eval_convs else {}

    datamodule = InstructDataModule(train, val, i.batch_size, tokenizer.pad_token_id, cfg.seed)
    steps = i.epochs * math.ceil(len(train) / i.batch_size)
    module = CausalLMModule(
        model,
        lr=i.lr,
        weight_decay=i.weight_decay,
        embedding_weight_decay=i.weight_decay,
        warmup_fraction=i.warmup_fraction,
        decay=i.decay,
        min_lr_ratio=0.0,
        total_steps=steps,
        grad_clip=cfg.optim.grad_clip,
        fused=cfg.optim.fused,
        compile=False,  # variable-length chat batches; compiled instruction tuning is not measured
    )
    cfg_trainer = cfg.copy()
    with open_dict(cfg_trainer):
        cfg_trainer.trainer.max_steps = -1
        cfg_trainer.trainer.max_epochs = i.epochs
        cfg_trainer.trainer.val_check_interval = 1.0
        cfg_trainer.trainer.check_val_every_n_epoch = 1 if val else None
        cfg_trainer.trainer.limit_val_batches = 1.0 if val else 0
    trainer = build_trainer(cfg_trainer, run_dir, [])
    require_replicated(trainer, "instruct")
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    after = answer_metrics(model, tokenizer, eval_convs) if eval_convs else {}
    metrics = {
        "stage": "instruct",
        "init_from": str(init_from),
        "source": i.source,
        "train_conversations": len(train),
        "heldout_conversations": len(val),
        "overflowed": {"train": overflow_train, "heldout": overflow_val},
        "overflow_rule": i.overflow,
        "max_length": max_length,
        "chatml_tokens_added": added,
        "global_step": trainer.global_step,
        "train_time_s": round(time.perf_counter() - start, 2),
        "before": before,
        "after": after,
        **{k: float(v) for k, v in trainer.callback_metrics.items()},
    }
    if trainer.is_global_zero:
        atomic_save(lambda tmp: (model.save_pretrained(tmp), tokenizer.save_pretrained(tmp)), run_dir / "model")
        write_json(metrics, run_dir / "metrics.json")
    return metrics
