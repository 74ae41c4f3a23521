"""The prepared token store: each language's packed blocks, tokenised once, in parallel, onto disk.

A part (one language's train or validation documents of one source) is cut into shards of
``shard_docs`` documents; worker processes tokenise and pack each shard into ``block_size`` blocks
(uint16 where the vocabulary fits, else uint32), each an Arrow file. Where a part's documents can be read
from any index and are counted up front (local files), each worker reads its own shard and writes its own
file, and the main process only hands out shard numbers, every such part's in one queue, and counts what
comes back; otherwise (a stream, a token budget) the main process reads the documents and writes the files.
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
from contextlib import ExitStack
from dataclasses import dataclass, field
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
    size: Callable[[], int] | None = None
    """How many documents, where that is known without reading them and ``documents(start)`` is as cheap at any
    ``start`` (memory-mapped files): workers then read and write their own shards."""


@dataclass
class _Progress:
    """What one part's preparation has written so far."""

    part: Part
    partial: Path
    start: int
    """Shards written before this preparation began (a resume)."""
    docs: int = 0
    tokens: int = 0
    blocks: int = 0
    bytes_in: int = 0
    shards: int = 0
    remaining: int = 0
    started: float = field(default_factory=time.perf_counter)


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
    (documents, blocks, tokens before packing, UTF-8 bytes of text)."""
    part = _WORKER["parts"][part_index]
    texts = list(islice(part.documents(shard * shard_docs), shard_docs))
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
            with ExitStack() as locks:
                for part in sorted(missing, key=lambda p: str(self.path(p))):  # one order in every process
                    locks.enter_context(FileLock(str(self.path(part)) + ".lock"))
                todo = [i for i, p in enumerate(missing) if not (self.path(p) / "meta.json").is_file()]
                shared = [i for i in todo if self._workers_read(missing[i])]  # others may have finished some
                if shared:
                    self._build_shared(shared)
                for index in todo:
                    if index not in shared:
                        self._build(missing[index])
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

    def _workers_read(self, part: Part) -> bool:
        """Whether workers read and write the part's shards themselves: a part of known size, read from any
        index, with no token budget, and forked workers to do it."""
        return (
            part.size is not None
            and part.max_tokens is None
            and self.num_proc > 1
            and "fork" in get_all_start_methods()
        )

    def _open(self, part: Part) -> _Progress:
        """The part's ``<path>.partial/`` directory, its unbroken run of shards from the first kept (workers may
        have written later ones out of order before an interruption) and counted."""
        final = self.path(part)
        partial = final.with_name(final.name + ".partial")
        partial.mkdir(parents=True, exist_ok=True)
        for stale in partial.glob(".*"):  # a shard cut off mid-write
            stale.unlink()
        done = []
        while (partial / f"shard-{len(done):06d}.arrow").is_file():
            done.append(partial / f"shard-{len(done):06d}.arrow")
        for later in set(partial.glob("shard-*.arrow")) - set(done):
            later.unlink()
        progress = _Progress(part, partial, len(done), docs=len(done) * self.shard_docs)
        progress.blocks = sum(len(datasets.Dataset.from_file(str(shard))) for shard in done)
        log.info("store: preparing %s/%s into %s (%d shards done before)", part.lang, part.split, final, len(done))
        return progress

    def _build(self, part: Part) -> None:
        """Tokenise one part shard by shard, this process reading its documents, then commit it."""
        progress = self._open(part)
        budget = None if part.max_tokens is None else -(-part.max_tokens // self.block_size)
        texts = part.documents(progress.start * self.shard_docs)
        shards = iter(lambda: list(islice(texts, self.shard_docs)), [])
        for index, (n_docs, blocks, tokens, n_bytes) in enumerate(self._tokenized(shards), progress.start):
            if budget is not None:
                blocks = blocks[: max(0, budget - progress.blocks)]
            write_shard(progress.partial / f"shard-{index:06d}.arrow", blocks, self.dtype, self.block_size)
            self._count(progress, (n_docs, len(blocks), tokens, n_bytes))
            if budget is not None and progress.blocks >= budget:
                break
        self._commit(progress)

    def _build_shared(self, indices: list[int]) -> None:
        """Every missing shard of these parts (indices into ``_WORKER["parts"]``) through one queue of worker
        jobs, 2 x num_proc in flight: a worker reads its shard's documents and writes its Arrow file, this
        process counts what comes back, in order, and commits each part after its last shard, so no worker
        waits for one part's last shard before the next part's begin."""
        pool = self._worker_pool()
        jobs: deque = deque()
        progress = {}
        for index in indices:
            progress[index] = self._open(_WORKER["parts"][index])
            shards = range(progress[index].start, -(-progress[index].part.size() // self.shard_docs))
            progress[index].remaining = len(shards)
            jobs.extend((index, shard) for shard in shards)
            if not shards:
                self._commit(progress[index])
        pending: deque = deque()
        while jobs or pending:
            while jobs and len(pending) < 2 * self.num_proc:
                index, shard = jobs.popleft()
                if shard == progress[index].start:  # the part's clock starts with its first shard
                    progress[index].started = time.perf_counter()
                path = str(progress[index].partial / f"shard-{shard:06d}.arrow")
                pending.append((index, pool.submit(_prepare_shard, index, shard, self.shard_docs, path)))
            index, future = pending.popleft()
            self._count(progress[index], future.result())
            progress[index].remaining -= 1
            if progress[index].remaining == 0:
                self._commit(progress[index])

    def _count(self, progress: _Progress, shard: tuple[int, int, int, int]) -> None:
        """Add one shard's (documents, blocks, tokens, bytes) to its part's progress, and log it."""
        n_docs, n_blocks, tokens, n_bytes = shard
        progress.docs += n_docs
        progress.tokens += tokens
        progress.blocks += n_blocks
        progress.bytes_in += n_bytes
        progress.shards += 1
        elapsed = max(time.perf_counter() - progress.started, 1e-9)
        log.info(
            "store: %s/%s shard %d: %d docs, %d tokens in %d blocks, %.1f MB/s of text",
            progress.part.lang, progress.part.split, progress.start + progress.shards - 1, progress.docs,
            progress.blocks * self.block_size, progress.blocks, progress.bytes_in / elapsed / 1e6,
        )  # fmt: skip

    def _commit(self, progress: _Progress) -> None:
        """Write the part's metadata and rename its directory complete."""
        part, partial, final = progress.part, progress.partial, self.path(progress.part)
        names = sorted(p.name for p in partial.glob("shard-*.arrow"))
        if progress.docs and not progress.blocks:
            shutil.rmtree(partial)
            raise DataError(
                f"corpus {part.split}[{part.lang}] is too small for one block of data.block_size={self.block_size} "
                f"tokens ({progress.tokens} tokens in {progress.docs} documents)"
            )
        meta = {
            "version": STORE_VERSION,
            "lang": part.lang,
            "split": part.split,
            "source": part.identity,
            "tokenizer_sha256": self.tokenizer_hash,
            "block_size": self.block_size,
            "dtype": self.dtype.name,
            "blocks": progress.blocks,
            "tokens": progress.blocks * self.block_size,
            "docs": progress.docs,
            "shards": names,
            "bytes": sum((partial / n).stat().st_size for n in names),
            "prepare_s": round(time.perf_counter() - progress.started, 3),
        }
        (partial / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        log.info("store: %s/%s ready: %d blocks, %.1f MB at %s", part.lang, part.split, meta["blocks"],
                 meta["bytes"] / 1e6, final)  # fmt: skip

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
