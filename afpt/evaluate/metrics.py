"""Held-out perplexity (per token, character and byte) and Ethayarajh's self-similarity isotropy."""

from __future__ import annotations

import math
import random
import re
from collections import defaultdict

import torch
from torchmetrics.aggregation import SumMetric
from torchmetrics.text import Perplexity
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from afpt.errors import AfptError

WORD = re.compile(r"\w+")


def _device(model: PreTrainedModel) -> torch.device:
    return next(model.parameters()).device


# evaluate.batch_size=auto: documents (and lm-eval requests) per batch on each device.
AUTO_BATCH = {"cuda": 64, "cpu": 16}


def device_for(setting: str) -> torch.device:
    """The device held-out text is scored on: CUDA when available, unless ``evaluate.device=cpu``."""
    return torch.device("cuda" if torch.cuda.is_available() and setting != "cpu" else "cpu")


def batch_size_for(setting: int | str, device: torch.device) -> int:
    """``evaluate.batch_size``, or for ``auto`` a batch that fills the device (64 on CUDA, 16 on CPU)."""
    if setting == "auto":
        return AUTO_BATCH.get(device.type, AUTO_BATCH["cpu"])
    if isinstance(setting, bool) or not isinstance(setting, int) or setting < 1:
        raise AfptError(f"evaluate.batch_size must be a positive integer or 'auto', got {setting!r}")
    return setting


@torch.no_grad()
def text_nll(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: list[str], max_length: int, batch_size: int = 16
) -> dict[str, float]:
    """Held-out likelihood of ``texts``: each document scored after an EOS prefix, cut to ``max_length`` tokens.

    Returns the summed NLL (nats), the token, character and UTF-8 byte counts of the scored tokens, and
    perplexity per token (torchmetrics ``Perplexity``), per character and per byte. Only the per-character and
    per-byte numbers compare across tokenizers.
    """
    device = _device(model)
    was_training = model.training
    model.eval()
    ppl = Perplexity(ignore_index=-100).to(device)
    nll, chars, nbytes = (SumMetric().to(device) for _ in range(3))
    for start in range(0, len(texts), batch_size):
        docs = [
            tokenizer(t, add_special_tokens=False)["input_ids"][: max_length - 1]
            for t in texts[start : start + batch_size]
        ]
        docs = [d for d in docs if d]
        if not docs:
            continue
        width = max(len(d) for d in docs) + 1
        ids = torch.full((len(docs), width), tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full_like(ids, -100)
        mask = torch.zeros_like(ids)
        for row, doc in enumerate(docs):
            ids[row, : len(doc) + 1] = torch.tensor([tokenizer.eos_token_id, *doc])
            labels[row, 1 : len(doc) + 1] = torch.tensor(doc)
            mask[row, : len(doc) + 1] = 1
            text = tokenizer.decode(doc)
            chars.update(len(text))
            nbytes.update(len(text.encode("utf-8")))
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits[:, :-1].float()
        target = labels[:, 1:].to(device)
        ppl.update(logits, target)
        nll.update(torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="sum"))
    model.train(was_training)
    total, n_tokens = float(nll.compute()), int(ppl.count)
    n_chars, n_bytes = int(chars.compute()), int(nbytes.compute())
    return {
        "nll": total,
        "tokens": n_tokens,
        "chars": n_chars,
        "bytes": n_bytes,
        "ppl_token": float(ppl.compute()) if n_tokens else math.nan,
        "ppl_char": math.exp(total / n_chars) if n_chars else math.nan,
        "ppl_byte": math.exp(total / n_bytes) if n_bytes else math.nan,
    }


def language_perplexities(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: dict[str, list[str]],
    max_length: int,
    batch_size: int = 16,
) -> dict[str, dict[str, float]]:
    """``text_nll`` of each language's held-out documents."""
    return {lang: text_nll(model, tokenizer, docs, max_length, batch_size) for lang, docs in texts.items()}


# --------------------------------------------------------------------------- isotropy
def self_similarity(vectors: dict[str, torch.Tensor]) -> float:
    """Mean over words of the mean pairwise cosine between one word's contextual vectors (rows of each tensor)."""
    scores = []
    for word, rows in vectors.items():
        if rows.shape[0] < 2:
            raise ValueError(f"word {word!r} has {rows.shape[0]} context(s); self-similarity needs at least 2")
        unit = torch.nn.functional.normalize(rows.double(), dim=-1)
        cos = unit @ unit.T
        n = rows.shape[0]
        scores.append(float((cos.sum() - cos.diagonal().sum()) / (n * (n - 1))))
    return sum(scores) / len(scores)


def random_pair_baseline(vectors: dict[str, torch.Tensor], pairs: int, seed: int) -> float:
    """Mean cosine between contextual vectors of two different, uniformly drawn words: the anisotropy baseline."""
    words = sorted(vectors)
    if len(words) < 2:
        raise ValueError("the anisotropy baseline needs vectors of at least 2 words")
    rng = random.Random(seed)
    total = 0.0
    for _ in range(pairs):
        a, b = rng.sample(words, 2)
        u = vectors[a][rng.randrange(vectors[a].shape[0])].double()
        v = vectors[b][rng.randrange(vectors[b].shape[0])].double()
        total += float(torch.nn.functional.cosine_similarity(u, v, dim=0))
    return total / pairs


def sample_occurrences(
    tokenizer: PreTrainedTokenizerBase, texts: list[str], words: int, contexts: int, max_length: int, seed: int
) -> dict[str, list[tuple[int, list[int]]]]:
    """Draw ``words`` word types that occur in at least ``contexts`` documents, and ``contexts`` documents each.

    A word is a ``\\w+`` match; each chosen occurrence is (document index, the token positions it covers) in the
    document tokenized without special tokens and cut to ``max_length - 1`` tokens. One occurrence per document.
    """
    by_word: dict[str, dict[int, list[int]]] = defaultdict(dict)
    for doc_index, text in enumerate(texts):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = enc["offset_mapping"][: max_length - 1]
        for match in WORD.finditer(text):
            if match.group() in by_word and doc_index in by_word[match.group()]:
                continue
            positions = [i for i, (s, e) in enumerate(offsets) if s < match.end() and e > match.start()]
            if positions and offsets[positions[-1]][1] >= match.end():
                by_word[match.group()][doc_index] = positions
    eligible = sorted(w for w, docs in by_word.items() if len(docs) >= contexts)
    rng = random.Random(seed)
    chosen = rng.sample(eligible, min(words, len(eligible)))
    return {w: [(d, by_word[w][d]) for d in rng.sample(sorted(by_word[w]), contexts)] for w in sorted(chosen)}


@torch.no_grad()
def contextual_vectors(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    occurrences: dict[str, list[tuple[int, list[int]]]],
    layer: int,
    max_length: int,
    pooling: str = "mean",
) -> dict[str, torch.Tensor]:
    """Each sampled word's vectors at hidden-state ``layer`` (0: embeddings, -1: last), one row per context.

    A word split into several tokens is pooled by ``mean`` of its tokens or by its ``last`` token.
    """
    device = _device(model)
    was_training = model.training
    model.eval()
    needed = sorted({d for occ in occurrences.values() for d, _ in occ})
    states: dict[int, torch.Tensor] = {}
    for d in needed:
        ids = tokenizer(texts[d], add_special_tokens=False)["input_ids"][: max_length - 1]
        ids = torch.tensor([[tokenizer.eos_token_id, *ids]], device=device)
        hidden = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
        if not -len(hidden) <= layer < len(hidden):
            raise ValueError(f"layer={layer} is out of range: the model has hidden states 0..{len(hidden) - 1}")
        states[d] = hidden[layer][0, 1:].float().cpu()
    model.train(was_training)
    out = {}
    for word, occ in occurrences.items():
        rows = [states[d][pos].mean(0) if pooling == "mean" else states[d][pos[-1]] for d, pos in occ]
        out[word] = torch.stack(rows)
    return out


def isotropy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    *,
    layer: int = -1,
    words: int = 50,
    contexts: int = 10,
    baseline_pairs: int = 1000,
    pooling: str = "mean",
    max_length: int = 512,
    seed: int = 0,
) -> dict[str, float]:
    """Self-similarity of contextual vectors (Ethayarajh 2019), the random-pair baseline, and their difference."""
    occurrences = sample_occurrences(tokenizer, texts, words, contexts, max_length, seed)
    if len(occurrences) < 2:
        raise ValueError(
            f"fewer than 2 words occur in {contexts} or more of the {len(texts)} held-out documents (within "
            f"{max_length} tokens); use more documents or fewer contexts"
        )
    vectors = contextual_vectors(model, tokenizer, texts, occurrences, layer, max_length, pooling)
    sim = self_similarity(vectors)
    baseline = random_pair_baseline(vectors, baseline_pairs, seed)
    return {
        "self_similarity": sim,
        "baseline": baseline,
        "self_similarity_adjusted": sim - baseline,
        "words": len(vectors),
        "contexts": contexts,
    }
