"""Corpora, tokenizer training, packing into blocks, and a resumable training stream.

Every corpus passes through ``datasets``: the embedded world (generated in memory), local
text/jsonl/parquet files, or a hub dataset by name. Each language becomes one ``Dataset`` with a
``text`` column; packed blocks of all pretraining languages are mixed with configurable weights.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import datasets
import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from afpt.errors import AfptError
from afpt.world import World, WorldConfig

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
SPECIAL_TOKENS = (EOS_TOKEN, PAD_TOKEN, *CHATML_TOKENS)
BYTE_ALPHABET_SIZE = 256
# Loader processes for data.num_workers=auto on CUDA (what the GPU benchmarks ran with).
AUTO_WORKERS = 4
FILE_BUILDERS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}

datasets.disable_progress_bars()


class DataError(AfptError):
    """A corpus, file or data option that cannot be used, with the key or file that caused it."""


@dataclass
class Corpus:
    """Raw text per language and split: ``train[lang]`` and ``validation[lang]`` are Datasets."""

    train: dict[str, datasets.Dataset]
    validation: dict[str, datasets.Dataset] = field(default_factory=dict)


# --------------------------------------------------------------------------- sources
def world_from_config(cfg: Mapping[str, Any]) -> World:
    """Build the embedded world from the ``data.world`` config mapping."""
    try:
        return World(WorldConfig(**dict(cfg)))
    except TypeError as err:
        raise DataError(f"data.world: {err}") from err


def world_languages(cfg: Mapping[str, Any], key: str) -> list[str]:
    """The world's ``pretrain_languages`` or ``heldout_languages`` for a world data config."""
    if cfg.get("source") != "world":
        raise DataError(f"data.source={cfg.get('source')!r}: name the languages explicitly (adapt.languages=[...])")
    return list(getattr(world_from_config(cfg["world"]).config, key))


def load_corpus(cfg: Mapping[str, Any], languages: Sequence[str] | None = None) -> Corpus:
    """Load the corpus a ``data`` config describes, for ``languages`` (default: the config's own)."""
    source = cfg.get("source")
    loaders = {"world": _load_world, "files": _load_files, "hub": _load_hub}
    if source not in loaders:
        raise DataError(f"data.source must be one of {sorted(loaders)}, got {source!r}")
    corpus = loaders[source](cfg, languages)
    for lang, ds in corpus.train.items():
        if len(ds) == 0:
            raise DataError(f"the training corpus for language {lang!r} is empty")
    return corpus


def _load_world(cfg: Mapping[str, Any], languages: Sequence[str] | None) -> Corpus:
    world = world_from_config(cfg["world"])
    langs = list(languages or world.config.pretrain_languages)
    train = {lang: datasets.Dataset.from_dict({"text": world.documents(lang, "train")}) for lang in langs}
    validation = {lang: datasets.Dataset.from_dict({"text": world.documents(lang, "validation")}) for lang in langs}
    return Corpus(train, validation)


def as_file_map(value: Any, key: str) -> dict[str, list[str]]:
    """``data.files`` as {language: [paths]}: a path, a list of paths, or a mapping per language."""
    if value is None:
        raise DataError(f"{key} is empty; give a path, a list of paths, or {{language: paths}}")
    if isinstance(value, (str, os.PathLike)):
        return {"default": [str(value)]}
    if isinstance(value, Mapping):
        return {
            str(k): [str(v)] if isinstance(v, (str, os.PathLike)) else [str(p) for p in v] for k, v in value.items()
        }
    return {"default": [str(p) for p in value]}


def load_text_files(paths: list[str], key: str, text_field: str) -> datasets.Dataset:
    """Non-empty text of local txt/jsonl/parquet files (one extension), as a Dataset with a ``text`` column."""
    suffixes = {Path(p).suffix.lower() for p in paths}
    for path in paths:
        if not Path(path).is_file():
            raise DataError(f"{key}: file {path!r} does not exist")
        if Path(path).stat().st_size == 0:
            raise DataError(f"{key}: file {path!r} is empty")
    if len(suffixes) != 1 or next(iter(suffixes)) not in FILE_BUILDERS:
        raise DataError(f"{key}: files must share one extension among {sorted(FILE_BUILDERS)}, got {sorted(suffixes)}")
    builder = FILE_BUILDERS[suffixes.pop()]
    ds = datasets.load_dataset(builder, data_files=paths, split="train")
    if builder != "text":
        if text_field not in ds.column_names:
            raise DataError(
                f"{key}: records have no field {text_field!r} (fields: {ds.column_names}); set data.text_field"
            )
        ds = ds.rename_column(text_field, "text") if text_field != "text" else ds
    ds = ds.select_columns(["text"]).filter(lambda r: bool(r["text"] and r["text"].strip()))
    if len(ds) == 0:
        raise DataError(f"{key}: files {paths} hold no non-empty text")
    return ds


def _load_files(cfg: Mapping[str, Any], languages: Sequence[str] | None) -> Corpus:
    train_map = as_file_map(cfg.get("files"), "data.files")
    val_map = as_file_map(cfg["validation_files"], "data.validation_files") if cfg.get("validation_files") else {}
    text_field = cfg.get("text_field", "text")
    langs = list(languages or train_map)
    missing = [lang for lang in langs if lang not in train_map]
    if missing:
        raise DataError(f"data.files has no files for languages {missing}; it has {sorted(train_map)}")
    train, validation = {}, {}
    for lang in langs:
        ds = load_text_files(train_map[lang], f"data.files[{lang}]", text_field)
        if lang in val_map:
            train[lang], validation[lang] = (
                ds,
                load_text_files(val_map[lang], f"data.validation_files[{lang}]", text_field),
            )
        else:
            train[lang], validation[lang] = _split_validation(
                ds, cfg.get("validation_fraction", 0.05), cfg.get("seed", 0)
            )
    return Corpus(train, validation)


def _split_validation(ds: datasets.Dataset, fraction: float, seed: int) -> tuple[datasets.Dataset, datasets.Dataset]:
    if fraction <= 0 or len(ds) < 2:
        return ds, ds.select([])
    split = ds.train_test_split(test_size=max(1, int(len(ds) * fraction)), seed=seed)
    return split["train"], split["test"]


def check_hub_reachable(what: str, timeout: float = 3.0, hint: str | None = None) -> None:
    """Fail at once, naming ``what`` needs the Hub, when the Hugging Face Hub cannot be reached."""
    from huggingface_hub import constants

    hint = hint or "Use local files (data=files data.files=...) or the embedded world (data=world)."
    if constants.HF_HUB_OFFLINE or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        raise DataError(f"{what} needs the Hugging Face Hub, but HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set. {hint}")
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
    except OSError as err:
        raise DataError(
            f"{what} needs the Hugging Face Hub, but {constants.ENDPOINT} cannot be reached ({err}); you seem to be "
            f"offline. {hint}"
        ) from err


def _load_hub(cfg: Mapping[str, Any], languages: Sequence[str] | None) -> Corpus:
    hub = cfg["hub"]
    langs = list(languages or cfg.get("languages") or [])
    if not langs:
        raise DataError("data.languages is empty: name the hub languages to load")
    check_hub_reachable(f"hub dataset {hub['path']!r}")
    train, validation = {}, {}
    for lang in langs:
        name = hub.get("name_template", "{lang}").format(lang=lang) if hub.get("name_template") else None
        stream = datasets.load_dataset(hub["path"], name, split=hub.get("split", "train"), streaming=True)
        field_name = hub.get("text_field", "text")
        texts = [row[field_name] for _, row in zip(range(hub["max_docs"] + hub["val_docs"]), stream)]
        if not texts:
            raise DataError(f"hub dataset {hub['path']!r} ({name}) returned no documents for language {lang!r}")
        train[lang] = datasets.Dataset.from_dict({"text": texts[hub["val_docs"] :]})
        validation[lang] = datasets.Dataset.from_dict({"text": texts[: hub["val_docs"]]})
    return Corpus(train, validation)


# --------------------------------------------------------------------------- tokenizer
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


def atomic_save(save_fn, target: str | os.PathLike) -> Path:
    """Write a directory through ``save_fn(tmp_dir)`` and rename it to ``target`` when complete."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    tmp.chmod(0o755)
    try:
        save_fn(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return target


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


# --------------------------------------------------------------------------- packing
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
        block = data.get("block_size", 128)
        train = {lang: pack(ds, tokenizer, block, f"train[{lang}]") for lang, ds in corpus.train.items()}
        val = {}
        for lang, ds in corpus.validation.items():
            if len(ds):
                blocks = pack(ds, tokenizer, block, f"validation[{lang}]")
                val[lang] = blocks.select(range(min(len(blocks), data.get("max_val_blocks", 64))))
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
