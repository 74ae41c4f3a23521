"""The prepared token store: each language's packed blocks, tokenised once, in parallel, onto disk.

A part (one language's train or validation documents of one source) is cut into shards of
``shard_docs`` documents; worker processes tokenise and pack each shard into ``block_size`` blocks
(uint16 where the vocabulary fits, else uint32), each an Arrow file. Where a part's documents can be read
from any index (local files), each worker reads its own shard and writes its own file, and the main process
only hands out shard numbers and counts what comes back; otherwise (a stream) the main process reads the
documents and writes the files.
The store of a part is keyed by its content: the tokenizer file's hash, the source's identity and the
block size. It is written under a temporary name, shard by shard (an interrupted preparation resumes
at its first missing shard), renamed when complete, and memory-mapped by every rank and every later
run. A file lock keeps a second writer (another rank, another job) waiting until the first is done.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from itertools import chain, islice
from multiprocessing import get_all_start_methods, get_context
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import torch
from datasets.arrow_writer import ArrowWriter
from filelock import FileLock

from afpt.errors import DataError

log = logging.getLogger("afpt")
STORE_VERSION = 1


@dataclass(frozen=True)
class Part:
    """One language's split of a source: its identity (what keys its store) and its documents."""

    lang: str
    split: str
    identity: dict[str, Any]
    documents: Callable[[int], Iterator[str]]
    """``documents(start)``: the part's documents from index ``start`` on, streamed."""
    max_tokens: int | None = None
    """Stop once this many tokens are stored (whole blocks); None: every document."""
    records: dict[str, dict[str, int]] | None = None
    """Files only: {config key: {"records": read, "dropped": without text}} of the files behind this part."""
    random_access: bool = False
    """``documents(start)`` is as cheap at any ``start`` (memory-mapped files): workers read their own shards."""


def file_hash(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 where every id fits, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def pack_ids(docs: list[list[int]], eos: int, block_size: int, dtype: np.dtype) -> np.ndarray:
    """Documents joined, each followed by EOS, and cut into ``block_size`` blocks (the remainder dropped)."""
    lengths = [len(d) + 1 for d in docs]
    ids = np.empty(sum(lengths), dtype=dtype)
    at = 0
    for doc, n in zip(docs, lengths):
        ids[at : at + n - 1] = doc
        ids[at + n - 1] = eos
        at += n
    usable = len(ids) - len(ids) % block_size
    return ids[:usable].reshape(-1, block_size)


_WORKER: dict[str, Any] = {}


def _init_worker(tokenizer_json: str, eos: int, block_size: int, dtype: str, threads: bool) -> None:
    """Load the tokenizer once per worker process."""
    if not threads:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from tokenizers import Tokenizer

    _WORKER.update(tokenizer=Tokenizer.from_str(tokenizer_json), eos=eos, block_size=block_size, dtype=np.dtype(dtype))


def _tokenize_shard(texts: list[str]) -> tuple[int, np.ndarray, int, int]:
    """(documents, blocks, tokens before packing, UTF-8 bytes of text) of one shard, in a worker."""
    encodings = _WORKER["tokenizer"].encode_batch(texts, add_special_tokens=False)
    docs = [e.ids for e in encodings]
    blocks = pack_ids(docs, _WORKER["eos"], _WORKER["block_size"], _WORKER["dtype"])
    return len(texts), blocks, sum(map(len, docs)) + len(docs), sum(len(t.encode("utf-8", "ignore")) for t in texts)


def _prepare_shard(part_index: int, shard: int, shard_docs: int, path: str) -> tuple[int, int, int, int]:
    """In a worker: read shard ``shard`` of part ``part_index`` itself, tokenise it and write it to ``path``;
    (documents, blocks, tokens before packing, UTF-8 bytes of text). A shard past the end writes nothing."""
    part = _WORKER["parts"][part_index]
    texts = list(islice(part.documents(shard * shard_docs), shard_docs))
    if not texts:
        return 0, 0, 0, 0
    n_docs, blocks, tokens, n_bytes = _tokenize_shard(texts)
    write_shard(Path(path), blocks, _WORKER["dtype"], _WORKER["block_size"])
    return n_docs, len(blocks), tokens, n_bytes


def write_shard(path: Path, blocks: np.ndarray, dtype: np.dtype, block_size: int) -> None:
    """One shard as an Arrow file, written under a temporary name and renamed."""
    features = datasets.Features({"input_ids": datasets.Sequence(datasets.Value(dtype.name), length=block_size)})
    flat = pa.array(np.ascontiguousarray(blocks, dtype=dtype).reshape(-1))
    table = pa.table({"input_ids": pa.FixedSizeListArray.from_arrays(flat, block_size)})
    tmp = path.with_name(f".{path.name}.tmp")
    writer = ArrowWriter(features=features, path=str(tmp))
    writer.write_table(table)
    writer.finalize()
    os.replace(tmp, path)


def check_store_options(num_proc: int | None, shard_docs: int) -> None:
    """One clear error for a ``data.store`` option the store cannot use."""
    if num_proc is not None and (isinstance(num_proc, bool) or not isinstance(num_proc, int) or num_proc < 1):
        raise DataError(f"data.store.num_proc must be null or an integer >= 1, got {num_proc!r}")
    if isinstance(shard_docs, bool) or not isinstance(shard_docs, int) or shard_docs < 1:
        raise DataError(f"data.store.shard_docs must be an integer >= 1, got {shard_docs!r}")


class TokenStore:
    """Packed blocks of every part, prepared once under ``root`` for one tokenizer and block size.

    Args:
        root: the store's folder (``paths.store_dir``), shared by every run.
        tokenizer: a fast tokenizer; ``tokenizer_sha256``, the hash of its file, keys the store.
        block_size: tokens per block.
        num_proc: worker processes (None: every CPU; 1: tokenise in this process).
        shard_docs: documents per shard (one tokenisation job, and the unit an interrupted preparation
            resumes at).
        require_prepared: refuse to tokenise: every part must already be in the store.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        tokenizer,
        tokenizer_sha256: str,
        block_size: int,
        num_proc: int | None = None,
        shard_docs: int = 2000,
        require_prepared: bool = False,
    ) -> None:
        check_store_options(num_proc, shard_docs)
        self.root = Path(root)
        self.tokenizer = tokenizer
        self.tokenizer_hash = tokenizer_sha256
        self.block_size = block_size
        self.num_proc = num_proc or os.cpu_count() or 1
        self.shard_docs = shard_docs
        self.require_prepared = require_prepared
        self.dtype = token_dtype(len(tokenizer))
        self._pool: ProcessPoolExecutor | None = None

    def path(self, part: Part) -> Path:
        """Where the part's store lives: ``<root>/<lang>-<split>-<key>``."""
        key = {
            "version": STORE_VERSION,
            "tokenizer_sha256": self.tokenizer_hash,
            "block_size": self.block_size,
            "shard_docs": self.shard_docs,
            "max_tokens": part.max_tokens,
            "source": part.identity,
        }
        digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]
        return self.root / f"{part.lang}-{part.split}-{digest}"

    def prepare(self, parts: list[Part]) -> list[dict[str, Any]]:
        """Make sure every part is in the store (tokenising the missing ones in parallel); their metadata."""
        missing = [p for p in parts if not (self.path(p) / "meta.json").is_file()]
        if missing and self.require_prepared:
            names = ", ".join(f"{p.lang}/{p.split}" for p in missing)
            raise DataError(
                f"data.store.require_prepared=true, but {names} are not in the store {self.root} for this tokenizer "
                f"(sha256 {self.tokenizer_hash[:12]}) and block size {self.block_size}; run "
                f"`afpt stage=prepare` with the same data and tokenizer, or set data.store.require_prepared=false"
                + self._others(missing[0])
            )
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".probe-{os.getpid()}"
            probe.touch()
            probe.unlink()
        except OSError as err:
            raise DataError(f"paths.store_dir={str(self.root)!r} is not writable: {err}") from err
        _WORKER["parts"] = missing  # forked workers find a part's documents here (nothing is pickled)
        try:
            for part in missing:
                with FileLock(str(self.path(part)) + ".lock"):
                    if not (self.path(part) / "meta.json").is_file():  # another process may have finished it
                        self._build(part, missing.index(part))
        finally:
            _WORKER.pop("parts", None)
            if self._pool is not None:
                self._pool.shutdown(cancel_futures=True)
                self._pool = None
        return [json.loads((self.path(p) / "meta.json").read_text()) for p in parts]

    def _others(self, part: Part) -> str:
        """A hint naming stores of the same part built with other settings (another tokenizer, say)."""
        others = []
        for meta_file in sorted(self.root.glob(f"{part.lang}-{part.split}-*/meta.json")):
            meta = json.loads(meta_file.read_text())
            if meta.get("source") == part.identity:
                others.append(
                    f"{meta_file.parent.name} (tokenizer {meta['tokenizer_sha256'][:12]}, block {meta['block_size']})"
                )
        return f"; the store holds this part built otherwise: {', '.join(others)}" if others else ""

    def load(self, part: Part) -> datasets.Dataset | None:
        """The part's blocks, memory-mapped, as int64 torch tensors (``input_ids``); None for a part without
        documents (an empty validation split)."""
        path = self.path(part)
        meta = json.loads((path / "meta.json").read_text())
        if not meta["shards"]:
            return None
        shards = [datasets.Dataset.from_file(str(path / name)) for name in meta["shards"]]
        blocks = datasets.concatenate_datasets(shards) if len(shards) > 1 else shards[0]
        return blocks.with_format("torch", dtype=torch.long)

    def _build(self, part: Part, part_index: int) -> None:
        """Tokenise one part into ``<path>.partial/`` shard by shard, then rename it complete."""
        final = self.path(part)
        partial = final.with_name(final.name + ".partial")
        partial.mkdir(parents=True, exist_ok=True)
        for stale in partial.glob(".*"):  # a shard cut off mid-write
            stale.unlink()
        done = []  # the unbroken run of shards from the first; workers may have written later ones out of order
        while (partial / f"shard-{len(done):06d}.arrow").is_file():
            done.append(partial / f"shard-{len(done):06d}.arrow")
        for later in set(partial.glob("shard-*.arrow")) - set(done):
            later.unlink()
        start_shard = len(done)
        stats = {"docs": start_shard * self.shard_docs, "tokens": 0, "blocks": 0, "bytes_in": 0}
        for shard in done:
            stats["blocks"] += len(datasets.Dataset.from_file(str(shard)))
        budget = None if part.max_tokens is None else -(-part.max_tokens // self.block_size)
        started = time.perf_counter()
        log.info("store: preparing %s/%s into %s (%d shards done before)", part.lang, part.split, final, start_shard)
        index = start_shard
        for n_docs, n_blocks, tokens, n_bytes in self._shards(part, part_index, partial, start_shard, budget, stats):
            index += 1
            stats["docs"] += n_docs
            stats["tokens"] += tokens
            stats["blocks"] += n_blocks
            stats["bytes_in"] += n_bytes
            elapsed = max(time.perf_counter() - started, 1e-9)
            log.info(
                "store: %s/%s shard %d: %d docs, %d tokens in %d blocks, %.1f MB/s of text",
                part.lang, part.split, index - 1, stats["docs"], stats["blocks"] * self.block_size,
                stats["blocks"], stats["bytes_in"] / elapsed / 1e6,
            )  # fmt: skip
            if budget is not None and stats["blocks"] >= budget:
                break
        names = sorted(p.name for p in partial.glob("shard-*.arrow"))
        if stats["docs"] and not stats["blocks"]:
            shutil.rmtree(partial)
            raise DataError(
                f"corpus {part.split}[{part.lang}] is too small for one block of data.block_size={self.block_size} "
                f"tokens ({stats['tokens']} tokens in {stats['docs']} documents)"
            )
        meta = {
            "version": STORE_VERSION,
            "lang": part.lang,
            "split": part.split,
            "source": part.identity,
            "tokenizer_sha256": self.tokenizer_hash,
            "block_size": self.block_size,
            "dtype": self.dtype.name,
            "blocks": stats["blocks"],
            "tokens": stats["blocks"] * self.block_size,
            "docs": stats["docs"],
            "shards": names,
            "bytes": sum((partial / n).stat().st_size for n in names),
            "prepare_s": round(time.perf_counter() - started, 3),
        }
        (partial / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        log.info("store: %s/%s ready: %d blocks, %.1f MB at %s", part.lang, part.split, meta["blocks"],
                 meta["bytes"] / 1e6, final)  # fmt: skip

    def _shards(
        self, part: Part, part_index: int, partial: Path, start: int, budget: int | None, stats: dict[str, int]
    ) -> Iterator[tuple[int, int, int, int]]:
        """Write the part's shards from ``start`` on into ``partial``, in order; (documents, blocks, tokens, bytes)
        of each. Workers read and write their own shards where the part allows it; otherwise this process
        reads the documents and writes what the workers tokenised (cut at the token ``budget``)."""
        parallel = part.random_access and budget is None and self.num_proc > 1 and "fork" in get_all_start_methods()
        if parallel and next(iter(part.documents((start + 1) * self.shard_docs)), None) is not None:
            yield from self._worker_shards(part_index, partial, start)
            return
        texts = part.documents(start * self.shard_docs)
        shards = iter(lambda: list(islice(texts, self.shard_docs)), [])
        for index, (n_docs, blocks, tokens, n_bytes) in enumerate(self._tokenized(shards), start):
            if budget is not None:
                blocks = blocks[: max(0, budget - stats["blocks"])]
            write_shard(partial / f"shard-{index:06d}.arrow", blocks, self.dtype, self.block_size)
            yield n_docs, len(blocks), tokens, n_bytes

    def _worker_shards(self, part_index: int, partial: Path, start: int) -> Iterator[tuple[int, int, int, int]]:
        """Shard numbers handed to the workers (2 x num_proc ahead), results taken in order until a shard comes
        back short: the part's end (shards handed out past it write nothing)."""
        pool = self._worker_pool()
        pending: deque = deque()
        shard, ended = start, False
        while not ended or pending:
            while not ended and len(pending) < 2 * self.num_proc:
                path = str(partial / f"shard-{shard:06d}.arrow")
                pending.append(pool.submit(_prepare_shard, part_index, shard, self.shard_docs, path))
                shard += 1
            result = pending.popleft().result()
            if result[0]:
                yield result
            ended = ended or result[0] < self.shard_docs

    def _worker_pool(self) -> ProcessPoolExecutor:
        """The preparation's worker processes (started once), each with the tokenizer loaded."""
        if self._pool is None:
            worker_args = (self.tokenizer.backend_tokenizer.to_str(), self.tokenizer.eos_token_id, self.block_size)
            context = get_context("fork" if "fork" in get_all_start_methods() else "spawn")
            self._pool = ProcessPoolExecutor(
                self.num_proc, context, _init_worker, (*worker_args, self.dtype.name, False)
            )
        return self._pool

    def _tokenized(self, shards: Iterator[list[str]]) -> Iterator[tuple[int, np.ndarray, int, int]]:
        """``_tokenize_shard`` of each non-empty shard, in order.

        A part of one shard, or ``num_proc=1``, is tokenised in this process; otherwise by ``num_proc``
        forked workers (one pool for the whole preparation), with at most 2 x num_proc shards in flight,
        so memory stays bounded.
        """
        first, second = next(shards, None), next(shards, None)
        worker_args = (self.tokenizer.backend_tokenizer.to_str(), self.tokenizer.eos_token_id, self.block_size)
        if first is None:
            return
        if second is None or self.num_proc == 1:
            _init_worker(*worker_args, self.dtype.name, threads=False)
            for texts in chain([first], [] if second is None else chain([second], shards)):
                yield _tokenize_shard(texts)
            return
        pool = self._worker_pool()
        pending: deque = deque()
        for texts in chain([first, second], shards):
            pending.append(pool.submit(_tokenize_shard, texts))
            if len(pending) >= 2 * self.num_proc:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
