"""The run's tokenizer: byte-level BPE trained with afpt's special tokens, or loaded from a directory."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from afpt.data.sources import Corpus
from afpt.errors import DataError
from afpt.io import atomic_save

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
SPECIAL_TOKENS = (EOS_TOKEN, PAD_TOKEN, *CHATML_TOKENS)
BYTE_ALPHABET_SIZE = 256


def train_tokenizer(texts: Iterator[str] | Sequence[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer with afpt's special tokens (EOS, PAD and ChatML markers)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    minimum = len(SPECIAL_TOKENS) + BYTE_ALPHABET_SIZE
    if vocab_size < minimum:
        raise DataError(
            f"model.vocab_size={vocab_size} is smaller than the {len(SPECIAL_TOKENS)} special tokens plus the "
            f"{BYTE_ALPHABET_SIZE}-byte alphabet of a byte-level BPE tokenizer (at least {minimum})"
        )
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=list(CHATML_TOKENS),
    )


def load_tokenizer(path: str | os.PathLike, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Load a tokenizer directory with a clear error when it holds none; adds a pad token if missing."""
    if not (Path(path) / "tokenizer_config.json").is_file() and not (Path(path) / "tokenizer.json").is_file():
        raise DataError(f"{path!r} holds no tokenizer (no tokenizer.json or tokenizer_config.json)")
    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tokenizer_for_run(
    corpus: Corpus,
    cache_dir: Path,
    vocab_size: int,
    path: str | None,
    sample_docs: int,
    trust_remote_code: bool = False,
) -> PreTrainedTokenizerBase:
    """The run's tokenizer: a given directory, else the one cached in the run, else a new one.

    Caching it in the run directory keeps a resumed run, and every DDP rank, on the same tokenizer.
    """
    if path:
        return load_tokenizer(path, trust_remote_code)
    if (cache_dir / "tokenizer.json").is_file():
        return load_tokenizer(cache_dir)

    def texts() -> Iterator[str]:
        for ds in corpus.train.values():
            yield from ds.select(range(min(sample_docs, len(ds))))["text"]

    tokenizer = train_tokenizer(texts(), vocab_size)
    atomic_save(tokenizer.save_pretrained, cache_dir)
    return tokenizer
