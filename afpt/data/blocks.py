"""Packing documents into fixed blocks, the resumable training stream, and the pretraining data modules."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from itertools import count, islice
from pathlib import Path
from typing import Any

import datasets
import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from transformers import PreTrainedTokenizerBase

from afpt.data.sources import Corpus, check_new_languages, corpus_parts
from afpt.data.store import TokenStore, check_store_options, pack_ids, token_dtype
from afpt.data.tokenizer import tokenizer_for_run, tokenizer_sha256
from afpt.errors import DataError

# Loader processes for data.num_workers=auto on CUDA.
AUTO_WORKERS = 4


def pack(ds: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, block_size: int, name: str) -> datasets.Dataset:
    """Tokenise documents in memory, join them with EOS and cut them into ``block_size`` blocks (``pack_ids``,
    as the token store does), for the small corpora of adaptation."""
    eos, dtype = tokenizer.eos_token_id, token_dtype(len(tokenizer))

    def tokenize_and_group(batch: dict[str, list]) -> dict[str, Any]:
        docs = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        return {"input_ids": pack_ids(docs, eos, block_size, dtype)}

    packed = ds.map(tokenize_and_group, batched=True, batch_size=1000, remove_columns=ds.column_names)
    if len(packed) == 0:
        total = sum(len(x) for x in tokenizer(ds["text"][:1000], add_special_tokens=False)["input_ids"])
        raise DataError(
            f"corpus {name!r} is too small for one block: about {total} tokens, data.block_size={block_size}"
        )
    return packed.with_format("torch", dtype=torch.long)


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


def mixture_weights(
    sizes: Mapping[str, int], weights: Mapping[str, float] | None = None, alpha: float | None = None
) -> dict[str, float]:
    """Sampling weight per language: ``weights`` (missing languages weigh 1), or with ``alpha`` temperature
    sampling p_l proportional to n_l ** alpha over the languages' sizes (alpha = 1: natural proportions;
    0.3 as in XLM-R and mT5); neither: uniform."""
    langs = list(sizes)
    unknown = sorted(set(weights or {}) - set(langs))
    if unknown:
        raise DataError(f"data.mixture names languages {unknown} that have no training data ({langs})")
    if alpha is not None:
        total = sum(n**alpha for n in sizes.values())
        return {lang: sizes[lang] ** alpha / total for lang in langs}
    out = {lang: float((weights or {}).get(lang, 1.0)) for lang in langs}
    if any(w < 0 for w in out.values()) or sum(out.values()) <= 0:
        raise DataError(f"data.mixture weights must be >= 0 with a positive sum, got {out}")
    return out


class LoaderOptions:
    """``num_workers`` and ``pin_memory`` of a data module's loaders, each an int/bool or ``auto``: for ``auto``,
    AUTO_WORKERS processes (at most the CPUs) and pinned host memory when the trainer runs on CUDA, else none."""

    def loader_options(self, num_workers: int | str, pin_memory: bool | str, group: str) -> None:
        """Check and keep the two options (``group``: the config group named in errors)."""
        if num_workers != "auto" and (
            isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0
        ):
            raise DataError(f"{group}.num_workers must be 'auto' or an integer >= 0, got {num_workers!r}")
        if pin_memory != "auto" and not isinstance(pin_memory, bool):
            raise DataError(f"{group}.pin_memory must be 'auto', true or false, got {pin_memory!r}")
        self._num_workers, self._pin_memory = num_workers, pin_memory

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


class PretrainDataModule(LoaderOptions, pl.LightningDataModule):
    """Packed, mixed blocks for training and one validation loader per language."""

    def __init__(
        self,
        train_blocks: Mapping[str, datasets.Dataset] | None,
        val_blocks: Mapping[str, datasets.Dataset] | None,
        batch_size: int,
        mixture: Mapping[str, float] | None = None,
        eval_batch_size: int | None = None,
        num_workers: int | str = "auto",
        pin_memory: bool | str = "auto",
        seed: int = 0,
        mixture_alpha: float | None = None,
    ) -> None:
        super().__init__()
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise DataError(f"data.batch_size must be a positive integer, got {batch_size!r}")
        if mixture_alpha is not None and mixture:
            raise DataError("data.mixture and data.mixture_alpha are both set: give weights or a temperature, not both")
        if mixture_alpha is not None and not (isinstance(mixture_alpha, (int, float)) and 0 < mixture_alpha <= 1):
            raise DataError(f"data.mixture_alpha must be in (0, 1] (1: natural proportions), got {mixture_alpha!r}")
        self.mixture, self.mixture_alpha, self.seed = mixture, mixture_alpha, seed
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.loader_options(num_workers, pin_memory, "data")
        if train_blocks is not None:
            self.use_blocks(train_blocks, val_blocks or {})

    def use_blocks(self, train_blocks: Mapping[str, datasets.Dataset], val_blocks: Mapping[str, datasets.Dataset]):
        """Mix the training blocks of every language into one stream (weights, or temperature sampling)."""
        langs = list(train_blocks)
        self.weights = mixture_weights(
            {lang: len(ds) for lang, ds in train_blocks.items()}, self.mixture, self.mixture_alpha
        )
        total = sum(self.weights.values())
        kept = [lang for lang in langs if self.weights[lang] > 0]
        mixed = (
            datasets.interleave_datasets(
                [train_blocks[lang] for lang in kept],
                probabilities=[self.weights[lang] / total for lang in kept],
                seed=self.seed,
                stopping_strategy="all_exhausted",
            )
            if len(kept) > 1
            else train_blocks[kept[0]]
        )
        self.train_stream = BlockStream(mixed.with_format("torch", dtype=torch.long), self.batch_size, self.seed)
        self.val_blocks = {lang: ds for lang, ds in val_blocks.items() if len(ds) > 0}
        self.train_names = langs
        self.val_names = list(self.val_blocks)

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
    """A ``PretrainDataModule`` over the token store, built from a ``data`` config mapping.

    The same mapping as Hydra's ``data`` group (``source``, ``world``/``files``/``hub``, ``block_size``,
    ``batch_size``, ``store``, ...). Nothing heavy happens at construction. ``tokenizer`` comes from
    ``tokenizer_path`` (e.g. the model being continued), else ``data.tokenizer.path``, else it is trained
    with ``vocab_size`` tokens on a sample of the corpus and cached in ``run_dir/tokenizer``.
    ``prepare_data`` (local rank 0) fills the token store under ``store_dir`` (default ``run_dir/store``);
    ``setup`` (every rank) memory-maps it.
    """

    def __init__(
        self,
        data: Mapping[str, Any],
        vocab_size: int = 4096,
        run_dir: str = "runs/lightning",
        tokenizer_path: str | None = None,
        trust_remote_code: bool = False,
        seed: int = 0,
        store_dir: str | None = None,
    ) -> None:
        data = dict(data)
        super().__init__(
            None,
            None,
            batch_size=data.get("batch_size", 16),
            mixture=data.get("mixture"),
            eval_batch_size=data.get("eval_batch_size"),
            num_workers=data.get("num_workers", "auto"),
            pin_memory=data.get("pin_memory", "auto"),
            seed=seed,
            mixture_alpha=data.get("mixture_alpha"),
        )
        self.data = data
        check_new_languages(data)
        self.train_parts, self.val_parts = corpus_parts(data, data.get("languages"))
        self.train_names = [p.lang for p in self.train_parts]
        # Local files: {config key: {"records", "dropped"}} of every file set read (see load_text_files).
        self.record_counts = {k: v for p in self.train_parts + self.val_parts for k, v in (p.records or {}).items()}
        self.vocab_size, self.run_dir = vocab_size, Path(run_dir)
        self.tokenizer_path = tokenizer_path or dict(data.get("tokenizer") or {}).get("path")
        self.trust_remote_code = trust_remote_code
        self.store_dir = Path(store_dir or Path(run_dir) / "store")
        self._tokenizer: tuple[PreTrainedTokenizerBase, Path] | None = None
        self._store: TokenStore | None = None
        self.store_options = dict(data.get("store") or {})
        check_store_options(self.store_options.get("num_proc"), self.store_options.get("shard_docs", 2000))

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The run's tokenizer (trained on the first ``data.tokenizer.sample_docs`` documents per language)."""
        if self._tokenizer is None:
            sample = int(dict(self.data.get("tokenizer") or {}).get("sample_docs", 2000))
            texts = lambda: (t for part in self.train_parts for t in islice(part.documents(0), sample))  # noqa: E731
            self._tokenizer = tokenizer_for_run(
                texts, self.run_dir / "tokenizer", self.vocab_size, self.tokenizer_path, self.trust_remote_code
            )
        return self._tokenizer[0]

    @property
    def store(self) -> TokenStore:
        """The token store for this run's tokenizer and block size."""
        if self._store is None:
            options = self.store_options
            tokenizer = self.tokenizer
            self._store = TokenStore(
                self.store_dir,
                tokenizer,
                tokenizer_sha256(tokenizer, self._tokenizer[1]),
                self.data.get("block_size", 128),
                num_proc=options.get("num_proc"),
                shard_docs=options.get("shard_docs", 2000),
                require_prepared=bool(options.get("require_prepared", False)),
            )
        return self._store

    def prepare_data(self) -> None:
        """Tokenise every part that is not in the store yet (Lightning calls this on local rank 0 only)."""
        self.store.prepare(self.train_parts + self.val_parts)

    def setup(self, stage: str | None = None) -> None:
        """Memory-map the store's blocks (preparing what is missing, under the store's lock) and mix them."""
        if getattr(self, "train_stream", None) is not None:
            return
        self.prepare_data()
        train = {p.lang: self.store.load(p) for p in self.train_parts}
        empty = [lang for lang, blocks in train.items() if blocks is None]
        if empty:
            raise DataError(f"the training corpus for languages {empty} is empty")
        max_val = self.data.get("max_val_blocks", 64)
        val = {}
        for part in self.val_parts:
            blocks = self.store.load(part)
            if blocks is not None:
                val[part.lang] = blocks.select(range(min(len(blocks), max_val)))
        self.use_blocks(train, val)
