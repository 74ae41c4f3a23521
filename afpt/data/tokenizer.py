"""The run's tokenizer: byte-level BPE trained with afpt's special tokens, or loaded from a directory."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

from filelock import FileLock
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from afpt.artifacts.io import atomic_save
from afpt.data.store import file_hash
from afpt.errors import DataError

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
    texts: Callable[[], Iterable[str]],
    cache_dir: Path,
    vocab_size: int,
    path: str | None = None,
    trust_remote_code: bool = False,
) -> tuple[PreTrainedTokenizerBase, Path]:
    """The run's tokenizer and the directory it loads from: a given one, else the one cached in the run,
    else one trained on ``texts()`` and cached there.

    Every process loads it from the directory, so a resumed run, every DDP rank and the token store see
    the same file; a lock keeps a second process waiting while the first trains it.
    """
    if path:
        return load_tokenizer(path, trust_remote_code), Path(path)
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache_dir) + ".lock"):
        if not (cache_dir / "tokenizer.json").is_file():
            atomic_save(train_tokenizer(texts(), vocab_size).save_pretrained, cache_dir)
    return load_tokenizer(cache_dir), cache_dir


def tokenizer_sha256(tokenizer: PreTrainedTokenizerBase, directory: Path) -> str:
    """SHA-256 of the tokenizer's own file (``tokenizer.json``), or of its serialised backend when it has none."""
    file = Path(directory) / "tokenizer.json"
    if file.is_file():
        return file_hash(file)
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()
