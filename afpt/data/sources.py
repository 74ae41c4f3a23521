"""Text sources, one table of them for every stage: the embedded world, local files, or a hub dataset.

Every corpus passes through ``datasets``; each language becomes one ``Dataset`` with a ``text`` column.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import datasets
import pyarrow as pa
import pyarrow.parquet as pq

from afpt.data.store import Part
from afpt.data.world import World, WorldConfig
from afpt.errors import DataError

log = logging.getLogger("afpt")

FILE_BUILDERS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}

datasets.disable_progress_bars()


@dataclass
class Corpus:
    """Raw text per language and split: ``train[lang]`` and ``validation[lang]`` are Datasets."""

    train: dict[str, datasets.Dataset]
    validation: dict[str, datasets.Dataset] = field(default_factory=dict)


def world_from_config(cfg: Mapping[str, Any]) -> World:
    """Build the embedded world from the ``data.world`` config mapping."""
    try:
        return World(WorldConfig(**dict(cfg)))
    except TypeError as err:
        raise DataError(f"data.world: {err}") from err


def world_languages(cfg: Mapping[str, Any], key: str) -> list[str]:
    """The ``pretrain_languages`` or ``heldout_languages`` of a data config (``text_source(cfg).languages``)."""
    return text_source(cfg).languages(key)


def check_new_languages(cfg: Mapping[str, Any]) -> None:
    """Refuse a pretraining language list that includes one of ``data.new_languages``: a new language must not
    be pretrained on."""
    overlap = sorted(set(cfg.get("languages") or []) & set(cfg.get("new_languages") or []))
    if overlap:
        raise DataError(
            f"data.languages and data.new_languages share {overlap}: the new languages (adaptation and evaluation) "
            "must not be pretrained on; drop them from data.languages"
        )


SPLITS = ("train", "validation")


def load_corpus(
    cfg: Mapping[str, Any], languages: Sequence[str] | None = None, splits: Sequence[str] = SPLITS, key: str = "data"
) -> Corpus:
    """The corpus a ``data`` config describes, for ``languages`` (default: the config's own), in memory.

    For the small corpora of adaptation and evaluation: the documents of ``corpus_parts``, read whole. ``key``
    names the config in errors.
    """
    train_parts, val_parts = corpus_parts(cfg, languages, key)
    corpus = Corpus(
        *(
            {p.lang: _texts(list(p.documents(0))) for p in parts} if split in splits else {}
            for split, parts in zip(SPLITS, (train_parts, val_parts))
        )
    )
    for lang, ds in corpus.train.items():
        if len(ds) == 0:
            raise DataError(f"the training corpus for language {lang!r} is empty")
    return corpus


def _texts(texts: list[str]) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"text": texts})


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


def load_records(paths: Sequence[str], key: str) -> datasets.Dataset:
    """The records of local txt/jsonl/parquet files (one extension), through ``datasets``.

    A file that cannot be read (binary, not UTF-8, a malformed JSON line, not parquet) is one ``DataError``
    naming the file and the line.
    """
    suffixes = {Path(p).suffix.lower() for p in paths}
    for path in paths:
        if not Path(path).is_file():
            raise DataError(f"{key}: file {path!r} does not exist")
        if Path(path).stat().st_size == 0:
            raise DataError(f"{key}: file {path!r} is empty")
    if len(suffixes) != 1 or next(iter(suffixes)) not in FILE_BUILDERS:
        raise DataError(f"{key}: files must share one extension among {sorted(FILE_BUILDERS)}, got {sorted(suffixes)}")
    builder = FILE_BUILDERS[suffixes.pop()]
    for path in paths:
        if builder == "json" and not _has_a_line(path):
            raise DataError(f"{key}: file {path!r} holds no records")
    try:
        return datasets.load_dataset(builder, data_files=list(paths), split="train")
    except (datasets.exceptions.DatasetGenerationError, pa.ArrowException, ValueError) as err:
        for path in paths:  # find the file and line at fault; only read on this error path
            problem = _file_problem(path, builder)
            if problem:
                raise DataError(f"{key}: file {path!r} {problem}") from None
        cause = err.__cause__ or err
        raise DataError(
            f"{key}: files {list(paths)} cannot be read as {builder}: {str(cause).splitlines()[0]}"
        ) from None


def _has_a_line(path: str) -> bool:
    with open(path, errors="replace") as handle:
        return any(line.strip() for line in handle)


def _file_problem(path: str, builder: str) -> str | None:
    """Why ``path`` cannot be read as ``builder`` records (naming the line), or None."""
    if builder == "parquet":
        try:
            pq.read_metadata(path)
        except (pa.ArrowException, OSError) as err:
            return f"is not a parquet file ({err})"
        return None
    with open(path, "rb") as handle:
        if b"\0" in handle.read(1 << 16):
            return "is a binary file, not text (it holds NUL bytes)"
        handle.seek(0)
        for number, raw in enumerate(handle, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                return f"line {number} is not UTF-8 text (byte {err.start} of the line); re-encode the file as UTF-8"
            if builder != "json" or not line.strip() or path.endswith(".json"):
                continue
            try:
                record = json.loads(line)
            except ValueError as err:
                return f"line {number} is not valid JSON ({err.args[0]}); expected one JSON object per line"
            if not isinstance(record, dict):
                return f"line {number} is not a JSON object; expected one object per line"
    return None


def _first_missing(paths: Sequence[str], field_name: str) -> str:
    """Where the first record without text in ``field_name`` is: ``<file> line N`` or ``<file> record N``."""
    for path in paths:
        if path.endswith(".parquet"):
            column = pq.read_table(path, columns=[field_name]).column(0)
            for index, value in enumerate(column.to_pylist()):
                if value is None:
                    return f"{path} record {index}"
            continue
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                try:  # a .json file may be one array rather than a record per line
                    record = json.loads(line) if line.strip() else {field_name: ""}
                except ValueError:
                    continue
                if isinstance(record, dict) and record.get(field_name) is None:
                    return f"{path} line {number}"
    return str(list(paths))


def load_text_files(
    paths: list[str],
    key: str,
    text_field: str,
    max_dropped_fraction: float = 0.0,
    counts: dict[str, dict[str, int]] | None = None,
) -> datasets.Dataset:
    """Non-empty text of local txt/jsonl/parquet files (one extension), as a Dataset with a ``text`` column.

    jsonl/parquet records without ``text_field`` (missing or null) are dropped and counted in ``counts[key]``;
    more than ``max_dropped_fraction`` of them is an error naming the first one's file and line. A field that
    holds something other than strings is an error.
    """
    ds = load_records(paths, key)
    if FILE_BUILDERS[Path(paths[0]).suffix.lower()] != "text":
        if text_field not in ds.column_names:
            raise DataError(
                f"{key}: records have no field {text_field!r} (fields: {ds.column_names}); set data.text_field"
            )
        kind = ds.features[text_field]
        if getattr(kind, "dtype", None) not in ("string", "large_string"):
            raise DataError(
                f"{key}: field {text_field!r} of {paths[0] if len(paths) == 1 else paths} holds {kind}, not text; "
                "set data.text_field to the field that holds the documents"
            )
        dropped = ds.data.column(text_field).null_count
        if dropped:
            share = dropped / len(ds)
            if share > max_dropped_fraction:
                where = _first_missing(paths, text_field)
                raise DataError(
                    f"{key}: {dropped} of {len(ds)} records ({share:.1%}) have no {text_field!r}, the first at {where}; "
                    f"expected at most data.max_dropped_fraction={max_dropped_fraction}"
                )
        if counts is not None:
            counts[key] = {"records": len(ds), "dropped": dropped}
        ds = ds.rename_column(text_field, "text") if text_field != "text" else ds
    ds = ds.select_columns(["text"]).filter(lambda r: bool(r["text"] and r["text"].strip()))
    if len(ds) == 0:
        raise DataError(f"{key}: files {paths} hold no non-empty text")
    return ds


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


def hub_records(path: str, name: str | None, split: str, limit: int | None) -> list[dict[str, Any]]:
    """The first ``limit`` records (all when None) of a hub dataset, streamed."""
    stream = datasets.load_dataset(path, name, split=split, streaming=True)
    return list(stream if limit is None else stream.take(limit))


def heldout_texts(cfg: Mapping[str, Any], world: Mapping[str, Any]) -> dict[str, list[str]]:
    """Held-out documents per language from an ``evaluate.heldout`` config, through ``load_corpus``.

    ``world``: the world config of ``source=world``. Languages default to every language of the source.
    """
    langs, docs = list(cfg.get("languages") or []), cfg["docs"]
    source = source_class(cfg["source"], "evaluate.heldout.source")
    spec, langs, split = source.heldout_spec(cfg, world, langs)
    corpus = load_corpus(spec, langs, splits=(split,), key="evaluate.heldout")
    texts = {lang: getattr(corpus, split)[lang]["text"][:docs] for lang in langs}
    empty = [lang for lang, found in texts.items() if not any(t.strip() for t in found)]
    if empty:
        raise DataError(f"languages {empty} have no held-out text in evaluate.heldout (source={cfg['source']})")
    return texts


def corpus_parts(
    cfg: Mapping[str, Any], languages: Sequence[str] | None = None, key: str = "data"
) -> tuple[list[Part], list[Part]]:
    """(train, validation) parts of the corpus a ``data`` config describes, for the token store."""
    return text_source(cfg, key).parts(languages)


class TextSource:
    """Where a ``data`` config's text comes from (``data.source``): its parts per language and split.

    Subclasses are registered by name in ``SOURCES``; ``data.source`` names one, or gives a class's dotted
    path (a user's own source, built with the data config and its key).
    """

    def __init__(self, cfg: Mapping[str, Any], key: str = "data") -> None:
        self.cfg, self.key = cfg, key

    def parts(self, languages: Sequence[str] | None = None) -> tuple[list[Part], list[Part]]:
        """(train, validation) parts for ``languages`` (default: the config's own), each streaming its documents
        when the store asks for them."""
        raise NotImplementedError

    def languages(self, which: str) -> list[str]:
        """The ``pretrain_languages`` or ``heldout_languages`` (the new languages adaptation and evaluation use)."""
        raise DataError(
            f"data.source={self.cfg.get('source')!r}: name the new languages (data.new_languages=[...] for files, "
            "or adapt.languages=[...])"
        )

    def known_languages(self) -> list[str] | None:
        """Every language the source holds, where that is known without reading it (None: not known)."""
        return None

    @classmethod
    def heldout_spec(
        cls, cfg: Mapping[str, Any], world: Mapping[str, Any], langs: list[str]
    ) -> tuple[dict[str, Any], list[str], str]:
        """For an ``evaluate.heldout`` config: (the data config to load, its languages, the split holding the
        held-out text)."""
        raise NotImplementedError


class WorldSource(TextSource):
    """afpt's embedded synthetic world (``data.world``): every language generated, nothing downloaded."""

    def __init__(self, cfg: Mapping[str, Any], key: str = "data") -> None:
        super().__init__(cfg, key)
        self.world = world_from_config(cfg["world"])

    def parts(self, languages: Sequence[str] | None = None) -> tuple[list[Part], list[Part]]:
        """The world's documents per language, generated when read."""
        langs = list(languages or self.world.config.pretrain_languages)
        unknown = [lang for lang in langs if lang not in self.world.languages]
        if unknown:
            raise DataError(f"data.languages {unknown} are not world languages ({sorted(self.world.languages)})")
        identity = {"source": "world", "world": dict(self.cfg["world"])}

        def part(lang: str, split: str) -> Part:
            documents = lambda start: islice(self.world.iter_documents(lang, split), start, None)  # noqa: E731
            return Part(lang, split, {**identity, "lang": lang}, documents)

        return [part(lang, "train") for lang in langs], [part(lang, "validation") for lang in langs]

    def languages(self, which: str) -> list[str]:
        """The world's own pretraining or held-out languages."""
        return list(getattr(self.world.config, which))

    def known_languages(self) -> list[str]:
        """Both."""
        return self.languages("pretrain_languages") + self.languages("heldout_languages")

    @classmethod
    def heldout_spec(
        cls, cfg: Mapping[str, Any], world: Mapping[str, Any], langs: list[str]
    ) -> tuple[dict[str, Any], list[str], str]:
        """The world's validation documents (every world language by default)."""
        codes = [spec.code for spec in world_from_config(world).config.languages]
        langs = langs or codes
        unknown = [lang for lang in langs if lang not in codes]
        if unknown:
            raise DataError(f"evaluate.heldout.languages {unknown} have no held-out text in the world (it has {codes})")
        return {"source": "world", "world": world}, langs, "validation"


class FileSource(TextSource):
    """Local txt / jsonl / parquet files (``data.files``), checked when their parts are made."""

    def parts(self, languages: Sequence[str] | None = None) -> tuple[list[Part], list[Part]]:
        """Each language's files, read once here through ``datasets`` (which caches them: an unreadable file or
        too many records without text stops the run before any tokenizer or store work)."""
        return _file_parts(self.cfg, languages, self.key)

    def languages(self, which: str) -> list[str]:
        """``data.new_languages`` (held out) and the other languages of ``data.files`` (pretraining)."""
        if not self.cfg.get("new_languages"):
            return super().languages(which)
        new = list(self.cfg["new_languages"])
        files = as_file_map(self.cfg.get("files"), "data.files")
        return new if which == "heldout_languages" else [lang for lang in files if lang not in new]

    @classmethod
    def heldout_spec(
        cls, cfg: Mapping[str, Any], world: Mapping[str, Any], langs: list[str]
    ) -> tuple[dict[str, Any], list[str], str]:
        """The files are the held-out text (every language of ``evaluate.heldout.files`` by default)."""
        langs = langs or list(as_file_map(cfg.get("files"), "evaluate.heldout.files"))
        spec = {"source": "files", "files": cfg["files"], "validation_fraction": 0, "text_field": cfg["text_field"]}
        return spec, langs, "train"


class HubSource(TextSource):
    """A Hugging Face Hub dataset (``data.hub``), streamed: one config per language."""

    def parts(self, languages: Sequence[str] | None = None) -> tuple[list[Part], list[Part]]:
        """The first ``hub.val_docs`` documents of each language's stream held out, the rest for training."""
        return _hub_parts(self.cfg, languages)

    @classmethod
    def heldout_spec(
        cls, cfg: Mapping[str, Any], world: Mapping[str, Any], langs: list[str]
    ) -> tuple[dict[str, Any], list[str], str]:
        """The first ``evaluate.heldout.docs`` documents of each named language's stream."""
        if not langs:
            raise DataError("evaluate.heldout.languages is empty: name the hub languages to evaluate")
        return {"source": "hub", "hub": {**cfg["hub"], "val_docs": cfg["docs"], "max_docs": 0}}, langs, "validation"


SOURCES: dict[str, type[TextSource]] = {"world": WorldSource, "files": FileSource, "hub": HubSource}


def source_class(name: Any, key: str = "data.source") -> type[TextSource]:
    """The ``TextSource`` class ``name`` gives: a registered name, or a dotted path to a subclass."""
    if name in SOURCES:
        return SOURCES[name]
    if isinstance(name, str) and "." in name:
        from hydra.utils import get_class

        try:
            found = get_class(name)
        except Exception as err:
            raise DataError(f"{key}={name!r} cannot be imported: {err}") from None
        if isinstance(found, type) and issubclass(found, TextSource):
            return found
        raise DataError(f"{key}={name!r} must name a subclass of afpt.data.sources.TextSource")
    raise DataError(f"{key} must be one of {sorted(SOURCES)} or a TextSource class's dotted path, got {name!r}")


def text_source(cfg: Mapping[str, Any], key: str = "data") -> TextSource:
    """The source a ``data`` config describes, built."""
    return source_class(cfg.get("source"))(cfg, key)


def _file_identity(paths: Sequence[str], key: str) -> list[tuple[str, int, int]]:
    """(absolute path, size, modification time) of each file: a change to any file is a new corpus."""
    out = []
    for path in paths:
        if not Path(path).is_file():
            raise DataError(f"{key}: file {path!r} does not exist")
        stat = Path(path).stat()
        if stat.st_size == 0:
            raise DataError(f"{key}: file {path!r} is empty")
        out.append((str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns))
    return out


def _stream_texts(ds: datasets.Dataset, start: int) -> Iterator[str]:
    if start >= len(ds):
        return
    for batch in ds.select(range(start, len(ds))).iter(batch_size=1000):
        yield from batch["text"]


def _file_parts(cfg: Mapping[str, Any], languages: Sequence[str] | None, key: str) -> tuple[list[Part], list[Part]]:
    train_map = as_file_map(cfg.get("files"), f"{key}.files")
    val_map = as_file_map(cfg["validation_files"], f"{key}.validation_files") if cfg.get("validation_files") else {}
    new = list(cfg.get("new_languages") or [])
    langs = list(languages or [lang for lang in train_map if lang not in new])
    missing = [lang for lang in langs if lang not in train_map]
    if missing:
        raise DataError(f"{key}.files has no files for languages {missing}; it has {sorted(train_map)}")
    text_field, fraction, seed = (
        cfg.get("text_field", "text"),
        cfg.get("validation_fraction", 0.05),
        cfg.get("split_seed", 0),
    )
    max_dropped = float(cfg.get("max_dropped_fraction", 0.01))

    def checked(paths: list[str], file_key: str) -> tuple[dict[str, Any], dict[str, dict[str, int]]]:
        """The files' identity, and their record counts: read once here, so bad records stop the run first."""
        identity, counts = _file_identity(paths, file_key), {}
        load_text_files(paths, file_key, text_field, max_dropped, counts)
        for name, count in counts.items():
            if count["dropped"]:
                log.warning(
                    "%s: dropped %d of %d records without %r", name, count["dropped"], count["records"], text_field
                )
        return identity, counts

    train, validation = [], []
    for lang in langs:
        train_key = f"{key}.files[{lang}]"
        files, counts = checked(train_map[lang], train_key)
        identity = {"source": "files", "files": files, "text_field": text_field, "lang": lang}
        if lang in val_map:
            val_key = f"{key}.validation_files[{lang}]"
            val_files, val_counts = checked(val_map[lang], val_key)
            documents = FileDocuments(train_map[lang], train_key, text_field, max_dropped)
            train.append(Part(lang, "train", identity, documents, records=counts, size=documents.count))
            documents = FileDocuments(val_map[lang], val_key, text_field, max_dropped)
            validation.append(
                Part(
                    lang,
                    "validation",
                    {**identity, "files": val_files},
                    documents,
                    records=val_counts,
                    size=documents.count,
                )
            )
            continue
        identity = {**identity, "validation_fraction": fraction, "seed": seed}
        for split in SPLITS:
            docs = FileDocuments(train_map[lang], train_key, text_field, max_dropped, split, fraction, seed)
            part = Part(lang, split, identity, docs, records=counts, size=docs.count)
            (train if split == "train" else validation).append(part)
    return train, validation


class FileDocuments:
    """``documents(start)`` of local files (memory-mapped by ``datasets``), optionally one side of a seeded split;
    read from any ``start`` at the same cost, and counted without reading (``count``). The files are opened once
    per process (the token store counts them before its workers fork, so the workers inherit them open)."""

    def __init__(
        self,
        paths: list[str],
        key: str,
        text_field: str,
        max_dropped: float,
        split: str | None = None,
        fraction: float = 0.0,
        seed: int = 0,
    ) -> None:
        self.paths, self.key, self.text_field, self.max_dropped = paths, key, text_field, max_dropped
        self.split, self.fraction, self.seed = split, fraction, seed
        self._opened: datasets.Dataset | None = None

    def _dataset(self) -> datasets.Dataset:
        if self._opened is None:
            ds = load_text_files(self.paths, self.key, self.text_field, self.max_dropped)
            if self.split is not None:
                if self.fraction <= 0 or len(ds) < 2:
                    ds = ds if self.split == "train" else ds.select([])
                else:
                    halves = ds.train_test_split(test_size=max(1, int(len(ds) * self.fraction)), seed=self.seed)
                    ds = halves["train" if self.split == "train" else "test"]
            self._opened = ds
        return self._opened

    def __call__(self, start: int) -> Iterator[str]:
        """The documents from index ``start`` on."""
        return _stream_texts(self._dataset(), start)

    def count(self) -> int:
        """How many documents there are."""
        return len(self._dataset())


def _hub_parts(cfg: Mapping[str, Any], languages: Sequence[str] | None) -> tuple[list[Part], list[Part]]:
    hub = cfg["hub"]
    langs = list(languages or cfg.get("languages") or [])
    if not langs:
        raise DataError("data.languages is empty: name the hub languages to load")
    n_val, max_docs, max_tokens = hub.get("val_docs", 0), hub.get("max_docs"), hub.get("max_tokens")
    train, validation = [], []
    for lang in langs:
        name = hub["name_template"].format(lang=lang) if hub.get("name_template") else None
        identity = {
            "source": "hub",
            "path": hub["path"],
            "name": name,
            "split": hub.get("split", "train"),
            "text_field": hub.get("text_field", "text"),
            "val_docs": n_val,
            "lang": lang,
        }

        def documents(start: int, first: int = 0, stop: int | None = None, name=name) -> Iterator[str]:
            check_hub_reachable(f"hub dataset {hub['path']!r}")
            stream = datasets.load_dataset(hub["path"], name, split=hub.get("split", "train"), streaming=True)
            field = hub.get("text_field", "text")
            return islice((row[field] for row in stream), first + start, stop)

        validation.append(Part(lang, "validation", identity, lambda start, d=documents: d(start, 0, n_val)))
        stop = None if max_docs is None else n_val + max_docs
        train.append(
            Part(
                lang,
                "train",
                {**identity, "max_docs": max_docs},
                lambda start, d=documents, stop=stop: d(start, n_val, stop),
                max_tokens=max_tokens,
            )
        )
    return train, validation
