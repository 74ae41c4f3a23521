"""Corpora through datasets, tokenizer training, packing, and the resumable stream."""

from __future__ import annotations

import json
import time

import datasets
import pytest
import torch
from torch.utils.data import DataLoader

from afpt.data import BlockStream, DataError, check_hub_reachable, load_corpus, pack, train_tokenizer


@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".parquet"])
def test_local_files_load_through_datasets(tmp_path, suffix):
    docs = [f"document number {i} about the sea." for i in range(40)]
    path = tmp_path / f"corpus{suffix}"
    if suffix == ".txt":
        path.write_text("\n".join(docs) + "\n")
    elif suffix == ".jsonl":
        path.write_text("".join(json.dumps({"body": d}) + "\n" for d in docs))
    else:
        datasets.Dataset.from_dict({"body": docs}).to_parquet(str(path))
    corpus = load_corpus(
        {"source": "files", "files": {"fi": str(path)}, "text_field": "body", "validation_fraction": 0.1, "seed": 0}
    )
    assert len(corpus.train["fi"]) == 36 and len(corpus.validation["fi"]) == 4
    assert set(corpus.train["fi"]["text"]) | set(corpus.validation["fi"]["text"]) == set(docs)


def test_jsonl_without_the_text_field_names_the_field(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"content": "x"}) + "\n")
    with pytest.raises(DataError, match="no field 'text'"):
        load_corpus({"source": "files", "files": str(path)})


def test_hub_name_offline_fails_at_once(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "https://127.0.0.1:9")
    start = time.perf_counter()
    with pytest.raises(DataError, match="hub dataset 'wikimedia/wikipedia'.*offline"):
        check_hub_reachable("hub dataset 'wikimedia/wikipedia'")
    assert time.perf_counter() - start < 5
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match="HF_HUB_OFFLINE"):
        load_corpus({"source": "hub", "languages": ["sw"], "hub": {"path": "wikimedia/wikipedia"}})


def test_tokenizer_has_special_tokens_and_round_trips():
    texts = ["Niran keeps a hawk.", "Ξιςαξ σονε διτεξο.", "заща Нисан сини."] * 50
    tok = train_tokenizer(texts, vocab_size=300)
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token == "<|pad|>"
    assert tok.convert_tokens_to_ids("<|im_start|>") != tok.unk_token_id
    for text in texts[:3]:
        assert tok.decode(tok(text)["input_ids"]) == text
    with pytest.raises(DataError, match="model.vocab_size=10 is smaller"):
        train_tokenizer(texts, vocab_size=10)


def test_packing_makes_full_blocks_separated_by_eos():
    tok = train_tokenizer(["one two three four five six"] * 20, vocab_size=280)
    ds = datasets.Dataset.from_dict({"text": ["one two three", "four five six"] * 10})
    blocks = pack(ds, tok, block_size=8, name="t")
    assert all(len(b) == 8 for b in blocks["input_ids"])
    flat = torch.cat(list(blocks["input_ids"]))
    assert (flat == tok.eos_token_id).sum() >= 5
    with pytest.raises(DataError, match="too small for one block"):
        pack(ds.select([0]), tok, block_size=1000, name="tiny")


def _stream(n_blocks=10, start=0, workers=0, batches=7):
    blocks = datasets.Dataset.from_dict({"input_ids": [[i, i] for i in range(n_blocks)]}).with_format("torch")
    stream = BlockStream(blocks, batch_size=3, seed=5)
    stream.start_batch = start
    out = []
    for batch in DataLoader(stream, batch_size=3, num_workers=workers):
        out.append(batch["input_ids"][:, 0].tolist())
        if len(out) == batches:
            return out
    return out


def test_stream_covers_every_block_each_epoch_and_resumes_exactly():
    full = _stream(batches=10)
    flat = [i for b in full for i in b]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))
    assert _stream(start=4, batches=6) == full[4:]


def test_stream_order_does_not_depend_on_workers():
    assert _stream(workers=2, batches=6) == _stream(workers=0, batches=6)
