"""The data path's first room: text sources (the world, files, the hub), the tokenizer, and packed blocks."""

from afpt.data.blocks import BlockStream, CorpusDataModule, LoaderOptions, PretrainDataModule, pack, pack_corpus
from afpt.data.sources import (
    Corpus,
    as_file_map,
    check_hub_reachable,
    heldout_texts,
    hub_records,
    load_corpus,
    load_records,
    load_text_files,
    text_source,
    world_from_config,
    world_languages,
)
from afpt.data.tokenizer import SPECIAL_TOKENS, load_tokenizer, tokenizer_for_run, train_tokenizer
from afpt.errors import DataError

__all__ = [
    "SPECIAL_TOKENS",
    "BlockStream",
    "Corpus",
    "CorpusDataModule",
    "DataError",
    "LoaderOptions",
    "PretrainDataModule",
    "as_file_map",
    "check_hub_reachable",
    "heldout_texts",
    "hub_records",
    "load_corpus",
    "load_records",
    "load_text_files",
    "load_tokenizer",
    "pack",
    "pack_corpus",
    "text_source",
    "tokenizer_for_run",
    "train_tokenizer",
    "world_from_config",
    "world_languages",
]
