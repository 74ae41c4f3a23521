"""Packing documents into fixed blocks, the resumable training stream, and the pretraining data modules."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from itertools import count
from pathlib import Path
from typing import Any

import datasets
import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from transformers import PreTrainedTokenizerBase

from afpt.data.sources import Corpus, load_corpus
from afpt.data.tokenizer import load_tokenizer, tokenizer_for_run
from afpt.errors import DataError

# Loader processes for data.num_workers=auto on CUDA.
AUTO_WORKERS = 4


def pack(ds: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, block_size: int, name: str) -> datasets.Dataset:
    """Tokenise documents, join them with EOS and cut the stream into ``block_size`` blocks."""
    eos = tokenizer.eos_token_id

    def tokenize_and_group(batch: dict[str, list]) -> dict[str, list]:
        ids: list[int] = []
        for doc in tokenizer(batch["text"], add_special_tokens=False)["input_ids"]:
            ids.extend(doc)
            ids.append(eos)
        usable = len(ids) - len(ids) % block_size
        return {"input_ids": [ids[i : i + block_size] for i in range(0, usable, block_size)]}

    packed = ds.map(tokenize_and_group, batched=True, batch_size=1000, remove_columns=ds.column_names)
    if len(packed) == 0:
        total = sum(len(x) for x in tokenizer(ds["text"][:1000], add_special_tokens=False)["input_ids"])
        raise DataError(
            f"corpus {name!r} is too small for one block: about {total} tokens, data.block_size={block_size}"
        )
    return packed.with_format("torch")


def pack_corpus(
    corpus: Corpus, tokenizer: PreTrainedTokenizerBase, block_size: int, max_val_blocks: int
) -> tuple[dict[str, datasets.Dataset], dict[str, datasets.Dataset]]:
    """(train, validation) blocks per language; at most ``max_val_blocks`` validation blocks, none for empty ones."""
    train = {lang: pack(ds, tokenizer, block_size, f"train[{lang}]") for lang, ds in corpus.train.items()}
    val = {}
    for lang, ds in corpus.validation.items():
        if len(ds):
            blocks = pack(ds, tokenizer, block_size, f"validation[{lang}]")
            val[lang] = blocks.select(range(min(len(blocks), max_val_blocks)))
    return train, val


class BlockStream(IterableDataset):
    """An endless, seeded, resumable stream of packed blocks, sharded by rank and worker.

    Sample ``k`` of the global stream is block ``perm_e[k mod N]`` of epoch ``e = k // N``, with a
    permutation seeded by (seed, e). Rank ``r`` of ``W`` takes global batches ``r, r + W, ...``;
    DataLoader worker ``w`` of ``n`` takes every n-th of those. Setting ``start_batch`` resumes the
    stream exactly where an interrupted run stopped, whatever the number of workers.
    """

    def __init__(self, blocks: datasets.Dataset, batch_size: int, seed: int = 0) -> None:
        self.blocks = blocks
        self.batch_size = batch_size
        self.seed = seed
        self.start_batch = 0

    def _permutation(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.blocks), generator=generator)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        rank, world = 0, 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        n = len(self.blocks)
        epoch, perm = -1, None
        for local_batch in count(self.start_batch):
            if (local_batch - self.start_batch) % workers != worker:
                continue
            first = (local_batch * world + rank) * self.batch_size
            for k in range(first, first + self.batch_size):
                if k // n != epoch:
                    epoch, perm = k // n, self._permutation(k // n)
                yield {"input_ids": self.blocks[int(perm[k % n])]["input_ids"]}


class PretrainDataModule(pl.LightningDataModule):
    """Packed, mixed blocks for training and one validation loader per language."""

    def __init__(
        self,
        train_blocks: Mapping[str, datasets.Dataset],
        val_blocks: Mapping[str, datasets.Dataset],
        batch_size: int,
        mixture: Mapping[str, float] | None = None,
        eval_batch_size: int | None = None,
        num_workers: int | str = "auto",
        pin_memory: bool | str = "auto",
        seed: int = 0,
    ) -> None:
        super().__init__()
        if batch_size <= 0:
            raise DataError(f"data.batch_size must be a positive integer, got {batch_size!r}")
        if num_workers != "auto" and (
            isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0
        ):
            raise DataError(f"data.num_workers must be 'auto' or an integer >= 0, got {num_workers!r}")
        if pin_memory != "auto" and not isinstance(pin_memory, bool):
            raise DataError(f"data.pin_memory must be 'auto', true or false, got {pin_memory!r}")
        langs = list(train_blocks)
        weights = {lang: float((mixture or {}).get(lang, 1.0)) for lang in langs}
        unknown = sorted(set(mixture or {}) - set(langs))
        if unknown:
            raise DataError(f"data.mixture names languages {unknown} that have no training data ({langs})")
        if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
            raise DataError(f"data.mixture weights must be >= 0 with a positive sum, got {weights}")
        total = sum(weights.values())
        kept = [lang for lang in langs if weights[lang] > 0]
        mixed = (
            datasets.interleave_datasets(
                [train_blocks[lang] for lang in kept],
                probabilities=[weights[lang] / total for lang in kept],
                seed=seed,
                stopping_strategy="all_exhausted",
            )
            if len(kept) > 1
            else train_blocks[kept[0]]
        )
        self.train_stream = BlockStream(mixed.with_format("torch"), batch_size, seed)
        self.val_blocks = {lang: ds for lang, ds in val_blocks.items() if len(ds) > 0}
        self.train_names = langs
        self.val_names = list(self.val_blocks)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self._num_workers = num_workers
        self._pin_memory = pin_memory

    def _on_cuda(self) -> bool:
        trainer = getattr(self, "trainer", None)
        return trainer is not None and trainer.strategy.root_device.type == "cuda"

    @property
    def num_workers(self) -> int:
        """Loader processes: as configured, or for ``auto`` AUTO_WORKERS (at most the CPUs) on CUDA, else 0."""
        if self._num_workers != "auto":
            return self._num_workers
        return min(AUTO_WORKERS, os.cpu_count() or 1) if self._on_cuda() else 0

    @property
    def pin_memory(self) -> bool:
        """Pinned host memory: as configured, or for ``auto`` whenever the trainer runs on CUDA."""
        return self._on_cuda() if self._pin_memory == "auto" else self._pin_memory

    def train_dataloader(self) -> DataLoader:
        """The training stream, resumed at the trainer's position (optimizer steps x accumulation)."""
        if self.trainer is not None:
            self.train_stream.start_batch = self.trainer.global_step * self.trainer.accumulate_grad_batches
        return DataLoader(
            self.train_stream,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> list[DataLoader]:
        """One loader per language, in ``val_names`` order."""
        return [
            DataLoader(ds, batch_size=self.eval_batch_size, num_workers=self.num_workers, pin_memory=self.pin_memory)
            for ds in self.val_blocks.values()
        ]


class CorpusDataModule(PretrainDataModule):
    """A ``PretrainDataModule`` built from a ``data`` config mapping: corpus, tokenizer and packed blocks.

    The same mapping as Hydra's ``data`` group (``source``, ``world``/``files``/``hub``, ``block_size``,
    ``batch_size``, ...). The tokenizer comes from ``tokenizer_path`` (e.g. the model being continued),
    else ``data.tokenizer.path``, else it is trained with ``vocab_size`` tokens and cached in
    ``run_dir/tokenizer``. ``self.tokenizer`` holds it.
    """

    def __init__(
        self,
        data: Mapping[str, Any],
        vocab_size: int = 4096,
        run_dir: str = "runs/lightning",
        tokenizer_path: str | None = None,
        trust_remote_code: bool = False,
        seed: int = 0,
    ) -> None:
        data = dict(data)
        tok_cfg = dict(data.get("tokenizer") or {})
        corpus = load_corpus(data, data.get("languages"))
        if tokenizer_path:
            tokenizer = load_tokenizer(tokenizer_path, trust_remote_code)
        else:
            tokenizer = tokenizer_for_run(
                corpus,
                Path(run_dir) / "tokenizer",
                vocab_size,
                tok_cfg.get("path"),
                tok_cfg.get("sample_docs", 2000),
                trust_remote_code,
            )
        train, val = pack_corpus(corpus, tokenizer, data.get("block_size", 128), data.get("max_val_blocks", 64))
        super().__init__(
            train,
            val,
            batch_size=data.get("batch_size", 16),
            mixture=data.get("mixture"),
            eval_batch_size=data.get("eval_batch_size"),
            num_workers=data.get("num_workers", "auto"),
            pin_memory=data.get("pin_memory", "auto"),
            seed=seed,
        )
        self.tokenizer = tokenizer
