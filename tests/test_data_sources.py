"""Text sources through real ``datasets``, and the run's tokenizer."""

from __future__ import annotations

import json
import time

import datasets
import pytest

from afpt.data import DataError, check_hub_reachable, load_corpus, train_tokenizer


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
