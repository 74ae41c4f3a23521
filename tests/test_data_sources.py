"""Text sources through real ``datasets``, and the run's tokenizer."""

from __future__ import annotations

import json
import time

import datasets
import pytest

from afpt.data import DataError, check_hub_reachable, load_corpus, train_tokenizer
from afpt.data.sources import TextSource
from afpt.data.store import Part


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
        {
            "source": "files",
            "files": {"fi": str(path)},
            "text_field": "body",
            "validation_fraction": 0.1,
            "split_seed": 0,
        }
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


def test_the_held_out_split_does_not_depend_on_the_training_seed(tmp_path):
    from helpers import compose_config

    path = tmp_path / "corpus.txt"
    path.write_text("".join(f"document {i} about the sea and the hills.\n" for i in range(200)))
    held_out = []
    for seed in (0, 1, 2):
        cfg = compose_config(tmp_path / f"s{seed}", ["data=files", f"data.files={{fi: {path}}}", f"seed={seed}"])
        held_out.append(load_corpus(cfg.data).validation["fi"]["text"])
    assert held_out[0] == held_out[1] == held_out[2] and len(held_out[0]) == 10
    other = compose_config(tmp_path / "o", ["data=files", f"data.files={{fi: {path}}}", "data.split_seed=1"])
    assert load_corpus(other.data).validation["fi"]["text"] != held_out[0]  # the split's own seed does move it


def test_new_languages_stay_out_of_pretraining_and_are_adaptations_default(tmp_path):
    from helpers import compose_config

    from afpt.data import CorpusDataModule, world_languages

    files = {}
    for lang in ("en", "fi", "sw"):
        files[lang] = tmp_path / f"{lang}.txt"
        files[lang].write_text("".join(f"{lang} document {i} about the sea.\n" for i in range(40)))
    mapping = "{" + ", ".join(f"{k}: {v}" for k, v in files.items()) + "}"
    cfg = compose_config(tmp_path / "run", ["data=files", f"data.files={mapping}", "data.new_languages=[sw]"])
    assert world_languages(cfg.data, "heldout_languages") == ["sw"]
    assert world_languages(cfg.data, "pretrain_languages") == ["en", "fi"]
    module = CorpusDataModule(cfg.data, run_dir=tmp_path / "run", vocab_size=512, seed=0)
    assert module.train_names == ["en", "fi"]
    bad = compose_config(
        tmp_path / "bad",
        ["data=files", f"data.files={mapping}", "data.new_languages=[sw]"] + ["data.languages=[en,sw]"],
    )
    with pytest.raises(DataError, match=r"data.languages and data.new_languages share \['sw'\]"):
        CorpusDataModule(bad.data, run_dir=tmp_path / "bad", vocab_size=512, seed=0)


class TwoDocuments(TextSource):
    """A user's own text source: two documents per language and split."""

    def parts(self, languages=None):
        def part(lang, split):
            docs = [f"{lang} {split} one", f"{lang} {split} two"]
            return Part(lang, split, {"source": "two", "lang": lang}, lambda start: iter(docs[start:]))

        langs = list(languages or ["en"])
        return [part(lang, "train") for lang in langs], [part(lang, "validation") for lang in langs]


def test_data_source_names_a_registered_source_or_a_user_s_class():
    corpus = load_corpus({"source": f"{__name__}.TwoDocuments"}, ["en", "fi"])
    assert corpus.train["fi"]["text"] == ["fi train one", "fi train two"]
    assert corpus.validation["en"]["text"] == ["en validation one", "en validation two"]
    with pytest.raises(DataError, match=r"data.source must be one of \['files', 'hub', 'world'\] or a TextSource"):
        load_corpus({"source": "nowhere"})
    with pytest.raises(DataError, match="data.source='collections.OrderedDict' must name a subclass of"):
        load_corpus({"source": "collections.OrderedDict"})
    with pytest.raises(DataError, match="data.source='afpt.nowhere.Source' cannot be imported"):
        load_corpus({"source": "afpt.nowhere.Source"})
