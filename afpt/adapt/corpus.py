"""The adaptation tokenizer (merged into the model's, or replacing it) and the capped adaptation corpus.

Chen et al. relearn embeddings from a small corpus of the new language (5M tokens in their low-data setting)
over many updates; ``corpus_tokens`` caps the unique training text the same way, apart from how many steps
train on it. Under a cap the tokenizer is trained on the capped documents only, so no text outside the budget
reaches the adapted model, not even through its vocabulary.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from afpt.adapt.vocab import merge_tokenizers, train_language_tokenizer
from afpt.artifacts.io import atomic_save
from afpt.data import load_tokenizer
from afpt.data.sources import Corpus

TOKENIZER_MODES = ("merge", "replace")
CORPUS_FILE = "adapt_corpus.json"


def _sample_texts(corpus: Corpus, sample_docs: int) -> list[str]:
    """The first ``sample_docs`` training documents of every language."""
    return [t for ds in corpus.train.values() for t in ds.select(range(min(sample_docs, len(ds))))["text"]]


def build_tokenizer(
    base: PreTrainedTokenizerBase, texts: list[str], mode: str, vocab_size: int
) -> PreTrainedTokenizerBase:
    """``merge``: a tokenizer trained on ``texts`` appended to ``base`` up to ``vocab_size`` tokens (old ids kept);
    ``replace``: the tokenizer trained on ``texts`` alone, ``vocab_size`` tokens, with ``base``'s pipeline."""
    new = train_language_tokenizer(base, texts, vocab_size)
    return merge_tokenizers(base, new, vocab_size) if mode == "merge" else new


def documents_within(corpus: Corpus, tokenizer: PreTrainedTokenizerBase, tokens_per_language: int) -> dict[str, int]:
    """Per language, how many leading training documents hold ``tokens_per_language`` tokens (the last one
    may overshoot; packing cuts the blocks to the cap)."""
    counts = {}
    for lang, ds in corpus.train.items():
        total, n = 0, 0
        for start in range(0, len(ds), 256):
            texts = list(ds.select(range(start, min(start + 256, len(ds))))["text"])
            for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
                if total >= tokens_per_language:
                    break
                total += len(ids) + 1  # + the EOS that joins documents
                n += 1
            if total >= tokens_per_language:
                break
        counts[lang] = max(n, 1)
    return counts


def adaptation_tokenizer(
    base: PreTrainedTokenizerBase,
    corpus: Corpus,
    cache_dir: Path,
    mode: str,
    vocab_size: int,
    sample_docs: int,
    corpus_tokens: int | None,
) -> tuple[PreTrainedTokenizerBase, Corpus]:
    """The adaptation tokenizer and the (capped) corpus it was trained on, cached in ``cache_dir`` (the tokenizer
    and the documents kept per language) so a resumed run gets both unchanged."""
    if (cache_dir / "tokenizer.json").is_file():
        kept = json.loads((cache_dir / CORPUS_FILE).read_text()) if (cache_dir / CORPUS_FILE).is_file() else None
        return load_tokenizer(cache_dir), _keep(corpus, kept)
    tokenizer, kept = build_tokenizer(base, _sample_texts(corpus, sample_docs), mode, vocab_size), None
    if corpus_tokens is not None:
        # The first tokenizer only measures where the cap falls; the run's tokenizer sees the kept text alone.
        kept = documents_within(corpus, tokenizer, math.ceil(corpus_tokens / len(corpus.train)))
        corpus = _keep(corpus, kept)
        tokenizer = build_tokenizer(base, _sample_texts(corpus, sample_docs), mode, vocab_size)

    def save(tmp: Path) -> None:
        tokenizer.save_pretrained(tmp)
        if kept is not None:
            (tmp / CORPUS_FILE).write_text(json.dumps(kept))

    atomic_save(save, cache_dir)
    return load_tokenizer(cache_dir), corpus


def _keep(corpus: Corpus, kept: dict[str, int] | None) -> Corpus:
    """``corpus`` with the first ``kept[lang]`` training documents per language (all of them for None)."""
    if kept is None:
        return corpus
    train = {lang: ds.select(range(min(kept[lang], len(ds)))) for lang, ds in corpus.train.items()}
    return Corpus(train=train, validation=corpus.validation)


def cap_blocks(train_blocks: dict, corpus_tokens: int | None, block_size: int) -> dict:
    """The leading blocks of each language that hold at most its share of ``corpus_tokens`` (at least one)."""
    if corpus_tokens is None:
        return train_blocks
    per_language = max(1, corpus_tokens // len(train_blocks) // block_size)
    return {lang: ds.select(range(min(per_language, len(ds)))) for lang, ds in train_blocks.items()}
