"""Held-out likelihood of raw text, counted per token and per character."""

from __future__ import annotations

import math

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase


@torch.no_grad()
def text_nll(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: list[str], max_length: int, batch_size: int = 16
) -> dict[str, float]:
    """Summed next-token NLL of each document after an EOS prefix, with its token and character counts.

    Documents longer than ``max_length`` tokens are cut; only the characters of the scored tokens count.
    Perplexity per character is comparable across tokenizers; perplexity per token is not.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll, n_tokens, n_chars = 0.0, 0, 0
    for start in range(0, len(texts), batch_size):
        docs = [
            tokenizer(t, add_special_tokens=False)["input_ids"][: max_length - 1]
            for t in texts[start : start + batch_size]
        ]
        docs = [d for d in docs if d]
        width = max(len(d) for d in docs) + 1
        ids = torch.full((len(docs), width), tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full_like(ids, -100)
        mask = torch.zeros_like(ids)
        for row, doc in enumerate(docs):
            ids[row, : len(doc) + 1] = torch.tensor([tokenizer.eos_token_id, *doc])
            labels[row, 1 : len(doc) + 1] = torch.tensor(doc)
            mask[row, : len(doc) + 1] = 1
            n_chars += len(tokenizer.decode(doc))
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1).to(device), reduction="sum"
        )
        nll += float(loss)
        n_tokens += int((labels[:, 1:] != -100).sum())
    model.train(was_training)
    return {
        "nll": nll,
        "tokens": n_tokens,
        "chars": n_chars,
        "ppl_token": math.exp(nll / max(1, n_tokens)),
        "ppl_char": math.exp(nll / max(1, n_chars)),
    }
