"""Vocabulary expansion: new embedding rows (random, mean, CLP, FOCUS) or every row redrawn, and the freeze
policies that say what adaptation trains."""

from __future__ import annotations

from dataclasses import dataclass

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

from afpt.adapt.initializers import HELPER_INITIALIZERS, init_new_rows
from afpt.adapt.vocab import canonical_token, is_byte_level
from afpt.data import PretrainDataModule, load_tokenizer
from afpt.models import ModelConfig, build_model, check_model_dir, is_tied, load_model, padded_vocab, untied_head
from afpt.pretrain.module import CausalLMModule


@dataclass(frozen=True)
class Policy:
    """What an adaptation policy (``adapt.policy``) trains: the body, the embedding (with a tied head), an untied
    head; ``only_new_rows``: the embedding's old rows stay as they are (their gradient is zeroed)."""

    body: bool
    embedding: bool
    head: bool
    only_new_rows: bool = False


POLICIES = {
    "new_rows_and_head": Policy(body=False, embedding=True, head=True, only_new_rows=True),
    "embeddings": Policy(body=False, embedding=True, head=False),
    "embeddings_and_head": Policy(body=False, embedding=True, head=True),
    "full": Policy(body=True, embedding=True, head=True),
}
REINITS = ("new_rows", "all_rows")


def train_helper(cfg, tokenizer, train_blocks: dict, seed: int) -> torch.Tensor:
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


def prepare_helper(a, merged, train_blocks: dict, n_old: int, seed: int):
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
    given_rows: torch.Tensor | None = None,
) -> dict[str, int]:
    """Resize embeddings (and an untied head) to ``n_new_total`` rows (padded) and initialise rows
    ``n_old..n_new_total`` from rows ``:n_old`` by ``init`` (see ``afpt.adapt.initializers``).

    ``given_rows``: the new rows already computed (``init=focus``), the embedding's columns first and an
    untied head's after them."""
    rows_before = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(max(rows_before, padded_vocab(n_new_total, pad_multiple)), mean_resizing=False)
    head = untied_head(model)
    matrices = [model.get_input_embeddings().weight] + ([] if head is None else [head.weight])
    std = float(getattr(model.config, "initializer_range", 0.02))
    kwargs = {}
    if init in HELPER_INITIALIZERS:
        kwargs = {
            "helper_new": helper["new"],
            "helper_overlap": helper["overlap"],
            "overlap_source_ids": torch.tensor(overlap_ids),
        }
    fallbacks = 0
    for k, weight in enumerate(matrices):
        if given_rows is not None:
            width = weight.shape[1]
            rows, fell_back = given_rows[:, k * width : (k + 1) * width], 0
        else:
            rows, fell_back = init_new_rows(
                init, weight[:n_old].float().cpu(), n_new_total - n_old, generator, std, **kwargs
            )
        weight[n_old:n_new_total] = rows.to(weight.dtype)
        fallbacks += fell_back
    return {"new_tokens": n_new_total - n_old, "fallback_rows": fallbacks, "tied_head": int(is_tied(model))}


@torch.no_grad()
def reinit_all_rows(model, n_tokens: int, generator: torch.Generator, pad_multiple: int = 64) -> dict[str, int]:
    """Resize the embedding (and an untied head) to ``n_tokens`` rows (padded) and redraw every row from
    N(0, initializer_range), the padding row zero: Chen et al.'s relearning start (``manual_reset_emb.py``)."""
    model.resize_token_embeddings(padded_vocab(n_tokens, pad_multiple), mean_resizing=False)
    std = float(getattr(model.config, "initializer_range", 0.02) or 0.02)
    pad = model.config.pad_token_id
    head = untied_head(model)
    for weight in [model.get_input_embeddings().weight] + ([] if head is None else [head.weight]):
        values = torch.randn(weight.shape, generator=generator) * std
        if pad is not None and weight is model.get_input_embeddings().weight:
            values[pad] = 0
        weight.copy_(values.to(weight.device, weight.dtype))
    if head is not None and getattr(head, "bias", None) is not None:
        head.bias.zero_()
    return {"new_tokens": n_tokens, "fallback_rows": 0, "tied_head": int(is_tied(model))}


class _NewRowsLinear(torch.autograd.Function):
    """``hidden @ weight.T`` whose weight gradient is computed for rows ``n_old..`` only (the rest are zeros)."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, n_old: int) -> torch.Tensor:
        out = F.linear(hidden, weight)  # under autocast, in autocast's dtype, as nn.Linear computes it
        ctx.save_for_backward(hidden.to(out.dtype), weight)
        ctx.n_old = n_old
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        hidden, weight = ctx.saved_tensors
        grad_hidden = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_hidden = grad @ weight.to(grad.dtype)
        if ctx.needs_input_grad[1]:
            # From a row 64-aligned in memory (the slice of the logits' gradient is a GEMM operand, and a
            # misaligned start sends cuBLAS to a slow kernel); the few old rows past that start are then zeroed.
            start = ctx.n_old // 64 * 64
            new = (grad.flatten(0, -2)[:, start:].t() @ hidden.flatten(0, -2)).to(weight.dtype)
            new[: ctx.n_old - start] = 0
            grad_weight = torch.cat((weight.new_zeros(start, weight.shape[1]), new))
        return grad_hidden, grad_weight, None


class NewRowsHead(nn.Module):
    """A tied output head that computes its weight gradient for the new rows only.

    The ``new_rows_and_head`` policy trains the rows from ``n_old`` on; the old rows' gradient is zeroed anyway,
    so the head's weight-gradient GEMM skips them. The forward and the hidden-state gradient are the full
    head's; ``weight`` stays the embedding's own parameter, so the model saves and reloads as before.
    """

    def __init__(self, weight: nn.Parameter, n_old: int):
        super().__init__()
        self.weight, self.n_old = weight, n_old

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits over the whole vocabulary."""
        return _NewRowsLinear.apply(hidden, self.weight, self.n_old)


def apply_policy(model, policy: str, n_old: int) -> dict[str, int]:
    """Freeze what the ``POLICIES`` entry ``policy`` freezes; where only new rows train, mask the gradient of the
    old embedding rows, and a tied head (without bias) becomes a ``NewRowsHead``.

    Returns the trainable parameter count per group.
    """
    what = POLICIES[policy]
    embedding = model.get_input_embeddings().weight
    head_module = model.get_output_embeddings()
    head = None if head_module is None else head_module.weight
    for param in model.parameters():
        param.requires_grad_(what.body)
    embedding.requires_grad_(what.embedding)
    if what.head and head is not None:
        head.requires_grad_(True)
        if getattr(head_module, "bias", None) is not None:
            head_module.bias.requires_grad_(True)
    if what.only_new_rows:
        # Zero the old rows by slicing, on the gradient's own device: a row mask kept from here would sit on
        # the CPU and be copied to the GPU at every backward, a copy that stalls the host on the GPU.
        embedding.register_hook(lambda grad: torch.cat((grad.new_zeros(n_old, *grad.shape[1:]), grad[n_old:])))
        if is_tied(model) and getattr(head_module, "bias", None) is None:
            model.set_output_embeddings(NewRowsHead(embedding, n_old))
    counts = {"embedding_rows": 0, "head": 0, "body": 0}
    rows = embedding.shape[0] - n_old if what.only_new_rows else embedding.shape[0]
    counts["embedding_rows"] = rows * embedding.shape[1] if embedding.requires_grad else 0
    head_params = [] if head_module is None or is_tied(model) else list(head_module.parameters())
    counts["head"] = sum(p.numel() for p in head_params if p.requires_grad)
    counts["body"] = sum(
        p.numel()
        for p in model.parameters()
        if p.requires_grad and p is not embedding and not any(p is h for h in head_params)
    )
    return counts


def frozen_snapshot(model, policy: str, n_old: int) -> dict[str, torch.Tensor]:
    """Copies of everything the policy promises not to change."""
    embedding = model.get_input_embeddings().weight
    snap = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    if POLICIES[policy].only_new_rows:
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
