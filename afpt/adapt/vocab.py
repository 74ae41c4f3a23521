"""Vocabulary expansion: train a tokenizer on a new language and merge it into the model's one."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable
from functools import lru_cache

from tokenizers import Tokenizer
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from afpt.errors import AfptError

WORD_START_MARKERS = ("\u0120", "\u2581")  # byte-level BPE "Ġ" and SentencePiece "▁"


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's bytes-to-unicode table used by byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def canonical_token(token: str, byte_level: bool) -> str:
    """A token as plain text with one word-start marker "▁", so byte-level BPE and SentencePiece
    vocabularies can be matched token for token."""
    if byte_level:
        table = _byte_decoder()
        if all(ch in table for ch in token):
            token = bytes(table[ch] for ch in token).decode("utf-8", errors="replace")
        token = "\u2581" + token[1:] if token.startswith(" ") else token
    elif token.startswith(WORD_START_MARKERS):
        token = "\u2581" + token[1:]
    return token


def is_byte_level(tokenizer: PreTrainedTokenizerBase) -> bool:
    """True when the tokenizer's pre-tokenizer is byte-level (GPT-2 style)."""
    return "ByteLevel" in tokenizer.backend_tokenizer.to_str()[:20000]


def train_language_tokenizer(
    base: PreTrainedTokenizerBase, texts: Iterable[str], vocab_size: int
) -> PreTrainedTokenizerBase:
    """A new tokenizer trained on ``texts`` with the same pipeline (normalizer, pre-tokenizer, model) as ``base``."""
    return base.train_new_from_iterator(texts, vocab_size=vocab_size)


def merge_tokenizers(
    base: PreTrainedTokenizerBase, new: PreTrainedTokenizerBase, vocab_size: int
) -> PreTrainedTokenizerBase:
    """Append ``new``'s tokens (in its merge order) to ``base`` until the vocabulary reaches ``vocab_size``.

    Every old token keeps its id, and every old merge keeps its priority: new merges come after all old
    ones, so text the base tokenizer already covered encodes as before (unless a new merge joins two
    of its leftover pieces, which cannot happen across scripts).
    """
    if len(base) > vocab_size:
        raise AfptError(f"adapt.vocab_size={vocab_size} is smaller than the model's vocabulary ({len(base)} tokens)")
    base_json = json.loads(base.backend_tokenizer.to_str())
    new_json = json.loads(new.backend_tokenizer.to_str())
    if base_json["model"]["type"] != "BPE" or new_json["model"]["type"] != "BPE":
        raise AfptError("vocabulary merging supports BPE tokenizers (byte-level or SentencePiece-BPE) only")
    vocab: dict[str, int] = base_json["model"]["vocab"]
    specials = {t["content"] for t in new_json.get("added_tokens", [])}
    next_id = max([*vocab.values(), *(t["id"] for t in base_json.get("added_tokens", []))]) + 1
    added: set[str] = set()
    for token, _ in sorted(new_json["model"]["vocab"].items(), key=lambda item: item[1]):
        if next_id >= vocab_size:
            break
        if token in vocab or token in specials:
            continue
        vocab[token] = next_id
        added.add(token)
        next_id += 1
    merges = base_json["model"]["merges"]
    for merge in new_json["model"]["merges"]:
        left, right = merge if isinstance(merge, list) else merge.split(" ", 1)
        if left + right in added and left in vocab and right in vocab:
            merges.append(merge)
    merged_backend = Tokenizer.from_str(json.dumps(base_json))
    with tempfile.TemporaryDirectory() as tmp:
        base.save_pretrained(tmp)
        merged_backend.save(f"{tmp}/tokenizer.json")
        merged = AutoTokenizer.from_pretrained(tmp)
    return merged
