"""Adaptation stage: carry a pretrained model to new languages by vocabulary expansion.

Train a tokenizer on the new languages, merge it into the model's (old ids unchanged), initialise the
new embedding rows (random, mean, CLP or FOCUS), and train what the freeze policy allows.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig

from afpt.data import PretrainDataModule, atomic_save, load_corpus, load_tokenizer, pack, world_languages
from afpt.errors import AfptError
from afpt.evaluation import text_nll
from afpt.initializers import INITIALIZERS, init_new_rows
from afpt.models import ModelConfig, build_model, check_model_dir, load_model, padded_vocab
from afpt.module import CausalLMModule
from afpt.plots import plot_curves, read_metric_csv
from afpt.stages.common import build_trainer, check_ckpt_path, require_replicated, to_dict, write_json
from afpt.vocab import canonical_token, is_byte_level, merge_tokenizers, train_language_tokenizer

POLICIES = ("new_rows_and_head", "embeddings", "full")


def merged_tokenizer_for_run(base, corpus, cache_dir: Path, vocab_size: int, sample_docs: int):
    """The merged tokenizer, cached in the run directory so a resumed run gets the same one."""
    if (cache_dir / "tokenizer.json").is_file():
        return load_tokenizer(cache_dir)
    texts = [t for ds in corpus.train.values() for t in ds.select(range(min(sample_docs, len(ds))))["text"]]
    new = train_language_tokenizer(base, texts, vocab_size)
    merged = merge_tokenizers(base, new, vocab_size)
    atomic_save(merged.save_pretrained, cache_dir)
    return merged


def train_helper(cfg: DictConfig, tokenizer, train_blocks: dict, seed: int) -> torch.Tensor:
    """Train a small decoder on the adaptation corpus with the merged tokenizer; return its input embeddings."""
    helper_cfg = ModelConfig(
        name="helper",
        family="llama",
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        num_layers=cfg.num_layers,
        num_heads=cfg.num_heads,
        intermediate_size=4 * cfg.hidden_size,
        pad_vocab_to_multiple_of=1,
    )
    pl.seed_everything(seed)
    model = build_model(helper_cfg, len(tokenizer), {"pad_token_id": tokenizer.pad_token_id})
    datamodule = PretrainDataModule(train_blocks, {}, batch_size=cfg.batch_size, seed=seed)
    trainer = pl.Trainer(
        max_steps=cfg.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        accelerator="auto",
        devices=1,
    )
    trainer.fit(CausalLMModule(model, lr=cfg.lr, warmup_fraction=0.1, compile=False), datamodule=datamodule)
    return model.get_input_embeddings().weight.detach().float().cpu()


def helper_rows(helper: torch.Tensor, helper_tokenizer, tokenizer, ids: list[int]) -> torch.Tensor:
    """The helper's row for each token id of ``tokenizer`` (matched as canonical text), NaN where it has none."""
    helper_byte_level = is_byte_level(helper_tokenizer)
    index = {canonical_token(t, helper_byte_level): i for t, i in helper_tokenizer.get_vocab().items()}
    byte_level = is_byte_level(tokenizer)
    rows = torch.full((len(ids), helper.shape[1]), float("nan"))
    for row, token in enumerate(tokenizer.convert_ids_to_tokens(ids)):
        i = index.get(canonical_token(token, byte_level))
        if i is not None and i < helper.shape[0]:
            rows[row] = helper[i]
    return rows


@torch.no_grad()
def expand_vocabulary(
    model,
    n_old: int,
    n_new_total: int,
    init: str,
    generator: torch.Generator,
    helper=None,
    overlap_ids: list[int] | None = None,
    pad_multiple: int = 64,
) -> dict[str, int]:
    """Resize embeddings (and an untied head) to the merged vocabulary and initialise the new rows."""
    rows_before = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(max(rows_before, padded_vocab(n_new_total, pad_multiple)), mean_resizing=False)
    tied = model.get_output_embeddings() is not None and (
        model.get_output_embeddings().weight is model.get_input_embeddings().weight
    )
    matrices = [model.get_input_embeddings().weight] + ([] if tied else [model.get_output_embeddings().weight])
    std = float(getattr(model.config, "initializer_range", 0.02))
    new_ids = list(range(n_old, n_new_total))
    fallbacks = 0
    for weight in matrices:
        source = weight[:n_old].float().cpu()
        kwargs = {}
        if init in ("clp", "focus"):
            kwargs = {
                "helper_new": helper["new"],
                "helper_overlap": helper["overlap"],
                "overlap_source_ids": torch.tensor(overlap_ids),
            }
        rows, fell_back = init_new_rows(init, source, len(new_ids), generator, std, **kwargs)
        weight[n_old:n_new_total] = rows.to(weight.dtype)
        fallbacks += fell_back
    return {"new_tokens": len(new_ids), "fallback_rows": fallbacks, "tied_head": int(tied)}


def apply_policy(model, policy: str, n_old: int) -> dict[str, int]:
    """Freeze what the policy freezes; mask the gradient of old embedding rows for ``new_rows_and_head``.

    Returns the trainable parameter count per group.
    """
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight if model.get_output_embeddings() is not None else None
    tied = head is embedding
    for param in model.parameters():
        param.requires_grad_(policy == "full")
    if policy in ("new_rows_and_head", "embeddings"):
        embedding.requires_grad_(True)
    if policy == "new_rows_and_head" and head is not None:
        head.requires_grad_(True)
    if policy == "new_rows_and_head":
        mask = torch.zeros(embedding.shape[0], 1, dtype=embedding.dtype, device=embedding.device)
        mask[n_old:] = 1
        embedding.register_hook(lambda grad: grad * mask.to(grad.device, grad.dtype))
    counts = {"embedding_rows": 0, "head": 0, "body": 0}
    rows = embedding.shape[0] - n_old if policy == "new_rows_and_head" else embedding.shape[0]
    counts["embedding_rows"] = rows * embedding.shape[1] if embedding.requires_grad else 0
    if head is not None and not tied and head.requires_grad:
        counts["head"] = head.numel()
    counts["body"] = sum(
        p.numel() for p in model.parameters() if p.requires_grad and p is not embedding and p is not head
    )
    return counts


def frozen_snapshot(model, policy: str, n_old: int) -> dict[str, torch.Tensor]:
    """Copies of everything the policy promises not to change."""
    embedding = model.get_input_embeddings().weight
    snap = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    if policy == "new_rows_and_head":
        snap["<old embedding rows>"] = embedding[:n_old].detach().clone()
    return snap


def changed_frozen(model, snapshot: dict[str, torch.Tensor], n_old: int) -> list[str]:
    """Names of promised-frozen tensors that changed (should be empty)."""
    params = dict(model.named_parameters())
    changed = []
    for name, before in snapshot.items():
        now = model.get_input_embeddings().weight[:n_old] if name == "<old embedding rows>" else params[name]
        if not torch.equal(now.detach().cpu(), before.cpu()):
            changed.append(name)
    return changed


def evaluate_languages(model, tokenizer, corpus, langs, max_length: int, docs: int) -> dict[str, dict[str, float]]:
    """Per-language held-out perplexity per token and per character."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    out = {lang: text_nll(model, tokenizer, corpus.validation[lang]["text"][:docs], max_length) for lang in langs}
    model.cpu()
    return out


def run(cfg: DictConfig) -> dict[str, Any]:
    """Adapt ``init_from`` to ``adapt.languages``; write ``model/``, ``metrics.json`` and ``adaptation.png``."""
    a = cfg.adapt
    run_dir = Path(cfg.paths.run_dir)
    init_from = cfg.get("init_from") or cfg.model.get("init_from")
    if not init_from:
        raise AfptError("stage=adapt needs init_from=<a pretrained model directory>")
    if a.init not in INITIALIZERS:
        raise AfptError(f"adapt.init={a.init!r} is unknown; expected one of {INITIALIZERS}")
    if a.policy not in POLICIES:
        raise AfptError(f"adapt.policy={a.policy!r} is unknown; expected one of {POLICIES}")
    check_model_dir(init_from)
    ckpt_path = check_ckpt_path(cfg.get("ckpt_path"))
    base = load_tokenizer(init_from)
    target = a.vocab_size or len(base) + a.new_tokens
    if target < len(base):
        raise AfptError(f"adapt.vocab_size={target} is smaller than the model's vocabulary ({len(base)} tokens)")
    langs = list(a.languages or world_languages(cfg.data, "heldout_languages"))
    pl.seed_everything(cfg.seed, workers=True)
    corpus = load_corpus(cfg.data, langs)
    missing = [lang for lang in langs if len(corpus.validation.get(lang, [])) == 0]
    if missing:
        raise AfptError(f"adaptation languages {missing} have no held-out text")

    merged = merged_tokenizer_for_run(base, corpus, run_dir / "tokenizer", target, a.tokenizer_sample_docs)
    model = load_model(init_from)
    block = cfg.data.block_size
    before = evaluate_languages(model, base, corpus, langs, block, a.eval_docs)

    train_blocks = {lang: pack(ds, merged, block, f"train[{lang}]") for lang, ds in corpus.train.items()}
    val_blocks = {lang: pack(ds, merged, block, f"validation[{lang}]") for lang, ds in corpus.validation.items()}
    val_blocks = {lang: ds.select(range(min(len(ds), cfg.data.max_val_blocks))) for lang, ds in val_blocks.items()}

    n_old = len(base)
    helper, overlap_ids = None, None
    if a.init in ("clp", "focus"):
        helper, overlap_ids = prepare_helper(a, merged, train_blocks, n_old, cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    expansion = expand_vocabulary(model, n_old, len(merged), a.init, generator, helper, overlap_ids)
    model.config.pad_token_id = merged.pad_token_id
    trainable = apply_policy(model, a.policy, n_old)
    snapshot = frozen_snapshot(model, a.policy, n_old)

    tokens_per_step = cfg.data.batch_size * block * cfg.trainer.get("accumulate_grad_batches", 1)
    max_steps = max(1, math.ceil(a.token_budget / tokens_per_step))
    datamodule = PretrainDataModule(
        train_blocks,
        val_blocks,
        batch_size=cfg.data.batch_size,
        eval_batch_size=cfg.data.get("eval_batch_size"),
        num_workers=cfg.data.num_workers,
        pin_memory=cfg.data.pin_memory,
        seed=cfg.seed,
    )
    optim = to_dict(cfg.optim)
    if optim.get("compile") == "auto":  # compiled adaptation is not measured: auto means eager here
        optim["compile"] = False
    module = CausalLMModule(model, **{**optim, "lr": a.lr, "embedding_weight_decay": 0.0})
    cfg_trainer = cfg.copy()
    cfg_trainer.trainer.max_steps = max_steps
    cfg_trainer.trainer.val_check_interval = max(1, min(max_steps, a.val_every_n_steps))
    trainer = build_trainer(cfg_trainer, run_dir, [])
    require_replicated(trainer, "adapt")
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    train_time = time.perf_counter() - start

    changed = changed_frozen(model, snapshot, n_old)
    if changed:
        raise RuntimeError(f"frozen tensors changed during adaptation: {changed}")
    after = evaluate_languages(model, merged, corpus, langs, block, a.eval_docs)
    metrics: dict[str, Any] = {
        "stage": "adapt",
        "init_from": str(init_from),
        "languages": langs,
        "init": a.init,
        "policy": a.policy,
        "vocab_size_before": n_old,
        "vocab_size_after": len(merged),
        **expansion,
        "trainable_parameters": trainable,
        "frozen_unchanged": True,
        "global_step": trainer.global_step,
        "tokens_seen": trainer.global_step * tokens_per_step * trainer.world_size,
        "train_time_s": round(train_time, 2),
        "before": before,
        "after": after,
    }
    if trainer.is_global_zero:
        atomic_save(lambda tmp: (model.save_pretrained(tmp), merged.save_pretrained(tmp)), run_dir / "model")
        write_json(metrics, run_dir / "metrics.json")
        csv_files = sorted(run_dir.glob("logs/**/metrics.csv"), key=lambda p: p.stat().st_mtime)
        curves = {
            lang: [(s * tokens_per_step, v) for s, v in read_metric_csv(csv_files, f"val/ppl/{lang}")] for lang in langs
        }
        plot_curves(
            curves,
            run_dir / "adaptation.png",
            "adaptation tokens",
            "validation perplexity (per token)",
            f"adaptation to {', '.join(langs)} (init={a.init}, policy={a.policy})",
        )
    return metrics


def prepare_helper(a: DictConfig, merged, train_blocks: dict, n_old: int, seed: int):
    """Helper embeddings for the new tokens and for the old tokens seen in the adaptation corpus."""
    if a.helper.path:
        helper_model = load_model(check_model_dir(a.helper.path))
        helper_tok = load_tokenizer(a.helper.path)
        helper = helper_model.get_input_embeddings().weight.detach().float()
    else:
        helper, helper_tok = train_helper(a.helper, merged, train_blocks, seed), merged
    seen = torch.zeros(len(merged), dtype=torch.bool)
    for ds in train_blocks.values():
        seen[torch.unique(ds[:]["input_ids"].flatten())] = True
    specials = set(merged.all_special_ids)
    candidates = [i for i in range(n_old) if seen[i] and i not in specials]
    overlap_rows = helper_rows(helper, helper_tok, merged, candidates)
    keep = torch.isfinite(overlap_rows).all(dim=1)
    overlap_ids = [i for i, k in zip(candidates, keep.tolist()) if k]
    new_rows = helper_rows(helper, helper_tok, merged, list(range(n_old, len(merged))))
    return {"new": new_rows, "overlap": overlap_rows[keep]}, overlap_ids
