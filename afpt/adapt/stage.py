"""``stage=adapt``: carry a pretrained model to new languages by vocabulary expansion or relearning.

Train a tokenizer on the new languages and merge it into the model's (old ids unchanged; the AFA recipe) or
use it alone (Chen et al.), initialise the new embedding rows (random, mean, CLP or FOCUS) or redraw every row,
and train what the freeze policy allows on a corpus capped at ``corpus_tokens``, keeping the weights of the
best validation loss.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig

from afpt.adapt.best import BestWeights
from afpt.adapt.corpus import TOKENIZER_MODES, adaptation_tokenizer, cap_blocks
from afpt.adapt.expansion import (
    POLICIES,
    REINITS,
    apply_policy,
    changed_frozen,
    expand_vocabulary,
    frozen_snapshot,
    prepare_helper,
    reinit_all_rows,
)
from afpt.adapt.focus import focus_new_rows
from afpt.adapt.initializers import HELPER_INITIALIZERS, INITIALIZERS
from afpt.app.stages import (
    build_optim,
    build_trainer,
    check_ckpt_path,
    init_from,
    publish_run,
    require_replicated,
    to_dict,
)
from afpt.artifacts.plots import plot_adaptation
from afpt.data import PretrainDataModule, load_corpus, load_tokenizer, pack_corpus, text_source
from afpt.errors import AfptError
from afpt.evaluate.metrics import batch_size_for, device_for, language_perplexities
from afpt.models import check_model_dir, is_tied, load_model, on_eval_device
from afpt.pretrain.module import CausalLMModule
from afpt.speed.throughput import throughput_summary


def check_protocol(a: DictConfig) -> None:
    """One clear error, naming the ``adapt.*`` key, for a tokenizer / reinit / policy / budget mix that cannot run."""
    if a.tokenizer not in TOKENIZER_MODES:
        raise AfptError(f"adapt.tokenizer={a.tokenizer!r} is unknown; expected one of {TOKENIZER_MODES}")
    if a.reinit not in REINITS:
        raise AfptError(f"adapt.reinit={a.reinit!r} is unknown; expected one of {REINITS}")
    if a.tokenizer == "replace" and a.reinit != "all_rows":
        raise AfptError(
            "adapt.tokenizer=replace needs adapt.reinit=all_rows: the new tokenizer's ids do not name the old rows"
        )
    if a.reinit == "all_rows" and a.policy == "new_rows_and_head":
        raise AfptError(
            "adapt.reinit=all_rows with adapt.policy=new_rows_and_head would freeze freshly drawn rows; "
            "use adapt.policy=embeddings, embeddings_and_head or full"
        )
    value = a.corpus_tokens
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise AfptError(f"adapt.corpus_tokens must be null or a positive number of tokens, got {value!r}")
    if not isinstance(a.keep_best, bool):
        raise AfptError(f"adapt.keep_best must be true or false, got {a.keep_best!r}")


def run(cfg: DictConfig) -> dict[str, Any]:
    """Adapt ``init_from`` to ``adapt.languages``; write ``model/``, ``metrics.json`` and ``adaptation.png``."""
    wall_start = time.perf_counter()
    a = cfg.adapt
    run_dir = Path(cfg.paths.run_dir)
    source = init_from(cfg, "adapt")
    if a.init not in INITIALIZERS:
        raise AfptError(f"adapt.init={a.init!r} is unknown; expected one of {INITIALIZERS}")
    if a.policy not in POLICIES:
        raise AfptError(f"adapt.policy={a.policy!r} is unknown; expected one of {tuple(POLICIES)}")
    if isinstance(a.token_budget, bool) or not isinstance(a.token_budget, (int, float)) or not a.token_budget >= 1:
        raise AfptError(f"adapt.token_budget must be a positive number of tokens, got {a.token_budget!r}")
    check_protocol(a)
    build_optim(cfg)
    optim = build_optim(cfg, a.optim, "adapt.optim")
    eval_device = device_for(a.eval_device)
    eval_batch = batch_size_for(a.eval_batch_size, eval_device)
    check_model_dir(source)
    ckpt_path = check_ckpt_path(cfg)
    base = load_tokenizer(source)
    replace = a.tokenizer == "replace"
    target = a.vocab_size or (len(base) if replace else len(base) + a.new_tokens)
    if target < len(base) and not replace:
        raise AfptError(f"adapt.vocab_size={target} is smaller than the model's vocabulary ({len(base)} tokens)")
    texts = text_source(to_dict(cfg.data))
    langs = list(a.languages or texts.languages("heldout_languages"))
    known = texts.known_languages()
    unknown = [lang for lang in langs if known is not None and lang not in known]
    if unknown:
        raise AfptError(f"adapt.languages {unknown} are not {cfg.data.source} languages; expected some of {known}")
    pl.seed_everything(cfg.seed, workers=True)
    corpus = load_corpus(cfg.data, langs)
    missing = [lang for lang in langs if len(corpus.validation.get(lang, [])) == 0]
    if missing:
        raise AfptError(f"adaptation languages {missing} have no held-out text")
    heldout = {lang: corpus.validation[lang]["text"][: a.eval_docs] for lang in langs}

    tokenizer, corpus = adaptation_tokenizer(
        base, corpus, run_dir / "tokenizer", a.tokenizer, target, a.tokenizer_sample_docs, a.corpus_tokens
    )
    model = load_model(source)
    if a.reinit == "all_rows" and not is_tied(model) and a.policy == "embeddings":
        raise AfptError(
            f"adapt.reinit=all_rows with adapt.policy=embeddings would freeze {source}'s untied output head after "
            "redrawing it; use adapt.policy=embeddings_and_head (or full)"
        )
    block = cfg.data.block_size
    # Scored as the evaluate stage scores held-out text (its context and batch), so "after" here is the adapted
    # model's number there.
    context = a.eval_max_length or model.config.max_position_embeddings
    with on_eval_device(model, eval_device.type):
        before = language_perplexities(model, base, heldout, context, eval_batch)
    train_blocks, val_blocks = pack_corpus(corpus, tokenizer, block, cfg.data.max_val_blocks)
    train_blocks = cap_blocks(train_blocks, a.corpus_tokens, block)
    unique = sum(len(ds) for ds in train_blocks.values()) * block

    # all_rows: every row is new (the policy's "old rows" are none).
    n_old = 0 if a.reinit == "all_rows" else len(base)
    generator = torch.Generator().manual_seed(cfg.seed)
    model.config.pad_token_id = tokenizer.pad_token_id
    if a.reinit == "all_rows":
        expansion = reinit_all_rows(model, len(tokenizer), generator)
    else:
        helper, overlap_ids, given = None, None, None
        if a.init in HELPER_INITIALIZERS:
            helper, overlap_ids = prepare_helper(a, tokenizer, train_blocks, n_old, cfg.seed)
        if a.init == "focus":
            texts = [t for ds in corpus.train.values() for t in ds["text"]]
            given = focus_new_rows(model, n_old, base, tokenizer, texts, run_dir, cfg.seed, **to_dict(a.focus))
        expansion = expand_vocabulary(
            model, n_old, len(tokenizer), a.init, generator, helper, overlap_ids, given_rows=given
        )
    trainable = apply_policy(model, a.policy, n_old)
    snapshot = frozen_snapshot(model, a.policy, n_old)

    tokens_per_step = cfg.data.batch_size * block * cfg.trainer.get("accumulate_grad_batches", 1)
    max_steps = max(1, math.ceil(a.token_budget / tokens_per_step))
    datamodule = PretrainDataModule(
        train_blocks,
        val_blocks,
        batch_size=cfg.data.batch_size,
        eval_batch_size=cfg.data.eval_batch_size,
        num_workers=cfg.data.num_workers,
        pin_memory=cfg.data.pin_memory,
        seed=cfg.seed,
    )
    module = CausalLMModule(model, **optim.as_kwargs())
    val_every = max(1, min(max_steps, a.val_every_n_steps))
    best = BestWeights()
    trainer = build_trainer(
        cfg, run_dir, [best], **{**to_dict(a.trainer), "max_steps": max_steps, "val_check_interval": val_every}
    )
    require_replicated(trainer, "adapt")
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    train_time = time.perf_counter() - start
    trainer.validate(module, datamodule=datamodule, verbose=False)  # the last step, if no check fell on it
    if a.keep_best:
        best.restore(module)
    val_texts = [t for lang in langs for t in corpus.validation[lang]["text"]]
    tokens_per_char = sum(map(len, tokenizer(val_texts)["input_ids"])) / max(1, sum(map(len, val_texts)))

    changed = changed_frozen(model, snapshot, n_old)
    if changed:
        raise RuntimeError(f"frozen tensors changed during adaptation: {changed}")
    with on_eval_device(model, eval_device.type):
        after = language_perplexities(model, tokenizer, heldout, context, eval_batch)
    metrics: dict[str, Any] = {
        "stage": "adapt",
        "init_from": str(source),
        "languages": langs,
        "init": a.init,
        "policy": a.policy,
        "tokenizer": a.tokenizer,
        "reinit": a.reinit,
        "corpus_tokens": unique,
        "epochs": round(trainer.global_step * tokens_per_step / unique, 2),
        "val_curve": best.curve,
        "val_tokens_per_char": tokens_per_char,
        "best_step": best.best_step,
        "best_val_loss": best.best_loss,
        "kept": "best" if a.keep_best else "last",
        "vocab_size_before": n_old,
        "vocab_size_after": len(tokenizer),
        **expansion,
        "trainable_parameters": trainable,
        "frozen_unchanged": True,
        "max_steps": trainer.max_steps,
        "global_step": trainer.global_step,
        "tokens_seen": trainer.global_step * tokens_per_step * trainer.world_size,
        "train_time_s": round(train_time, 2),
        "throughput": throughput_summary(trainer),
        "perplexity_docs": a.eval_docs,
        "perplexity_context": context,
        "before": before,
        "after": after,
        "wall_time_s": round(time.perf_counter() - wall_start, 2),
    }
    title = f"adaptation to {', '.join(langs)} (init={a.init}, policy={a.policy})"
    return publish_run(
        trainer,
        run_dir,
        model,
        tokenizer,
        metrics,
        lambda: plot_adaptation(
            run_dir, before, after, tokens_per_step, metrics["tokens_seen"], run_dir / "adaptation.png", title
        ),
    )
