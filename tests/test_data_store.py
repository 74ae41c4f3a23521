"""The token store: built once and reused, in parallel and resumable, keyed by content, with clear errors."""

from __future__ import annotations

import json
import math
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from helpers import TINY, compose_config, run_afpt

import afpt.data.stage as prepare
import afpt.data.store as store_module
import afpt.pretrain.stage as pretrain
from afpt.data import CorpusDataModule, DataError, train_tokenizer
from afpt.data.blocks import mixture_weights
from afpt.data.store import pack_ids

WORLD = {"seed": 0, "num_people": 20, "train_docs_per_language": 60, "val_docs_per_language": 8}


def datamodule(tmp_path: Path, **data) -> CorpusDataModule:
    """A data module over a tiny world, its tokenizer cached in ``tmp_path/run`` and its store in ``tmp_path/store``."""
    config = {"source": "world", "world": WORLD, "block_size": 32, "batch_size": 4, "tokenizer": {"sample_docs": 60}}
    return CorpusDataModule(
        {**config, **data}, vocab_size=512, run_dir=str(tmp_path / "run"), store_dir=str(tmp_path / "store")
    )


def count_shards(monkeypatch) -> list[int]:
    """Count the shards tokenised in this process (num_proc=1)."""
    calls: list[int] = []
    real = store_module._tokenize_shard

    def counting(texts):
        calls.append(len(texts))
        return real(texts)

    monkeypatch.setattr(store_module, "_tokenize_shard", counting)
    return calls


def test_packing_joins_documents_with_eos_and_drops_the_remainder():
    blocks = pack_ids([[1, 2, 3], [4], [5]], eos=0, block_size=3, dtype=np.dtype(np.uint16))
    assert blocks.dtype == np.uint16 and blocks.tolist() == [[1, 2, 3], [0, 4, 0]]  # [5, eos] is dropped


def test_the_store_is_built_once_and_reused_by_a_second_data_module(tmp_path, monkeypatch):
    calls = count_shards(monkeypatch)
    first = datamodule(tmp_path, store={"num_proc": 1})
    first.setup()
    assert sum(calls) == 4 * 60 + 4 * 8  # every document of every part, once
    metas = sorted((tmp_path / "store").glob("*/meta.json"))
    assert len(metas) == 8 and all(json.loads(m.read_text())["dtype"] == "uint16" for m in metas)
    mtimes = [m.stat().st_mtime_ns for m in metas]
    second = datamodule(tmp_path, store={"num_proc": 1})  # a resume, another rank or another run
    second.setup()
    assert sum(calls) == 4 * 60 + 4 * 8 and [m.stat().st_mtime_ns for m in metas] == mtimes
    a, b = first.train_stream.blocks, second.train_stream.blocks
    assert len(a) == len(b) and all(torch.equal(a[i]["input_ids"], b[i]["input_ids"]) for i in range(len(a)))
    assert a[0]["input_ids"].dtype == torch.long and first.val_names == ["en", "xa", "xb", "xc"]


def test_parallel_shards_give_the_same_blocks_as_one_process(tmp_path):
    one = datamodule(tmp_path / "one", store={"num_proc": 1, "shard_docs": 7})
    many = datamodule(tmp_path / "many", store={"num_proc": 2, "shard_docs": 7})
    (tmp_path / "many" / "run").mkdir(parents=True)
    one.tokenizer.save_pretrained(tmp_path / "many" / "run" / "tokenizer")  # the same tokenizer file
    for dm in (one, many):
        dm.setup()
    part = one.train_parts[0]
    assert len(json.loads((one.store.path(part) / "meta.json").read_text())["shards"]) == math.ceil(60 / 7)
    a, b = one.store.load(part), many.store.load(many.train_parts[0])
    assert torch.equal(a[:]["input_ids"], b[:]["input_ids"])


def test_an_interrupted_preparation_resumes_at_its_first_missing_shard(tmp_path, monkeypatch):
    dm = datamodule(tmp_path, store={"num_proc": 1, "shard_docs": 10}, languages=["en"])
    real_write, written = store_module.write_shard, []

    def dying(path, blocks, dtype, block_size):
        if len(written) == 3:
            raise KeyboardInterrupt("killed")
        written.append(path.name)
        real_write(path, blocks, dtype, block_size)

    monkeypatch.setattr(store_module, "write_shard", dying)
    with pytest.raises(KeyboardInterrupt):
        dm.prepare_data()
    partial = dm.store.path(dm.train_parts[0]).with_name(dm.store.path(dm.train_parts[0]).name + ".partial")
    assert sorted(p.name for p in partial.glob("shard-*.arrow")) == written
    monkeypatch.setattr(store_module, "write_shard", real_write)
    calls = count_shards(monkeypatch)
    dm.prepare_data()
    assert calls[0] == 10 and sum(calls) == 60 - 30 + 8  # the three done shards are not tokenised again
    fresh = datamodule(tmp_path / "fresh", store={"num_proc": 1, "shard_docs": 10}, languages=["en"])
    (tmp_path / "fresh" / "run").mkdir(parents=True)
    dm.tokenizer.save_pretrained(tmp_path / "fresh" / "run" / "tokenizer")
    fresh.prepare_data()
    resumed, whole = dm.store.load(dm.train_parts[0]), fresh.store.load(fresh.train_parts[0])
    assert torch.equal(resumed[:]["input_ids"], whole[:]["input_ids"])


def files_datamodule(tmp_path: Path, corpus: Path, num_proc: int) -> CorpusDataModule:
    """A data module over one local text file (90 + 10 held-out documents, 9 per shard), one tokenizer file."""
    run = tmp_path / "run"
    if not (run / "tokenizer").is_dir():
        datamodule(tmp_path).tokenizer.save_pretrained(run / "tokenizer")
    config = {"source": "files", "files": {"en": str(corpus)}, "validation_fraction": 0.1, "block_size": 32}
    data = {**config, "batch_size": 4, "store": {"num_proc": num_proc, "shard_docs": 9}}
    return CorpusDataModule(data, vocab_size=512, run_dir=str(run), store_dir=str(tmp_path / f"store{num_proc}"))


def one_file_corpus(tmp_path: Path) -> Path:
    """A local text file of 100 one-line documents."""
    corpus = tmp_path / "en.txt"
    corpus.write_text("".join(f"document {i} tells of the river and the {i % 7} boats.\n" for i in range(100)))
    return corpus


def test_workers_read_and_write_their_own_shards_of_local_files(tmp_path, monkeypatch):
    corpus = one_file_corpus(tmp_path)
    calls = count_shards(monkeypatch)  # counts what this process tokenises; forked workers count in their own copy
    many = files_datamodule(tmp_path, corpus, num_proc=2)
    many.prepare_data()
    assert calls == []  # the main process tokenised nothing: the workers read their own shards
    one = files_datamodule(tmp_path, corpus, num_proc=1)
    one.prepare_data()
    assert sum(calls) == 100  # every document once, in this process
    for a, b in zip(one.train_parts + one.val_parts, many.train_parts + many.val_parts):
        meta_a, meta_b = (json.loads((dm.store.path(p) / "meta.json").read_text()) for dm, p in ((one, a), (many, b)))
        assert meta_a["shards"] == meta_b["shards"] and meta_a["blocks"] == meta_b["blocks"] > 0
        assert torch.equal(one.store.load(a)[:]["input_ids"], many.store.load(b)[:]["input_ids"])
    train_meta = json.loads((one.store.path(one.train_parts[0]) / "meta.json").read_text())
    assert len(meta_a["shards"]) == 2 and len(train_meta["shards"]) == 10  # validation: 10 documents, train: 90


def test_every_part_s_shards_share_one_queue_of_worker_jobs(tmp_path, monkeypatch):
    corpus = one_file_corpus(tmp_path)
    dm = files_datamodule(tmp_path, corpus, num_proc=2)
    submitted, real_submit = [], ProcessPoolExecutor.submit

    def submit(pool, fn, part_index, shard, *args):
        parts = store_module._WORKER["parts"]
        submitted.append((parts[part_index].split, shard, [(dm.store.path(p) / "meta.json").is_file() for p in parts]))
        return real_submit(pool, fn, part_index, shard, *args)

    monkeypatch.setattr(ProcessPoolExecutor, "submit", submit)
    dm.prepare_data()
    assert [(split, shard) for split, shard, _ in submitted] == [("train", i) for i in range(10)] + [
        ("validation", 0),
        ("validation", 1),
    ]  # every shard once, none past a part's end
    first_validation = next(committed for split, _, committed in submitted if split == "validation")
    assert first_validation == [False, False]  # handed out while the train part's last shards were still in flight
    assert all((dm.store.path(p) / "meta.json").is_file() for p in dm.train_parts + dm.val_parts)


def test_a_resume_drops_shards_written_after_a_missing_one(tmp_path):
    corpus = one_file_corpus(tmp_path)
    whole = files_datamodule(tmp_path, corpus, num_proc=2)
    whole.prepare_data()
    part = whole.train_parts[0]
    final = whole.store.path(part)
    partial = final.with_name(final.name + ".partial")
    partial.mkdir()
    for shard in ("shard-000000.arrow", "shard-000002.arrow"):  # a worker finished shard 2 before shard 1 died
        (partial / shard).write_bytes((final / shard).read_bytes())
    expected = whole.store.load(part)[:]["input_ids"]
    (final / "meta.json").unlink()
    whole.prepare_data()
    assert torch.equal(whole.store.load(part)[:]["input_ids"], expected)
    assert json.loads((final / "meta.json").read_text())["docs"] == 90


def test_two_runs_share_one_store_and_a_resume_reuses_it(tmp_path):
    store = tmp_path / "store"
    for name in ("first", "second"):
        cfg = compose_config(tmp_path / name, ["trainer.max_steps=2", "forgetting=none"])
        cfg.paths.store_dir = str(store)
        pretrain.run(cfg)
    assert len(list(store.glob("*/meta.json"))) == 8  # one store per part for both runs (same tokenizer file)


def test_temperature_weights_follow_the_formula():
    sizes = {"en": 1000, "sw": 10}
    for alpha in (0.3, 1.0):
        weights = mixture_weights(sizes, alpha=alpha)
        total = 1000**alpha + 10**alpha
        assert weights == pytest.approx({"en": 1000**alpha / total, "sw": 10**alpha / total})
    assert mixture_weights(sizes) == {"en": 1.0, "sw": 1.0}
    assert mixture_weights(sizes, {"sw": 3.0}) == {"en": 1.0, "sw": 3.0}


def test_temperature_sampling_draws_languages_in_proportion(tmp_path):
    dm = datamodule(tmp_path, mixture_alpha=1.0, store={"num_proc": 1}, world={**WORLD, "train_docs_per_language": 200})
    dm.setup()
    sizes = {p.lang: len(dm.store.load(p)) for p in dm.train_parts}
    assert dm.weights == pytest.approx({lang: n / sum(sizes.values()) for lang, n in sizes.items()})


def test_a_hub_dataset_streams_into_the_store_within_its_token_budget(tmp_path, monkeypatch):
    """The hub path with a local streaming dataset standing in for the Hub (no network here)."""
    texts = [f"document {i} " + "word " * (i % 7) for i in range(500)]

    def local_stream(path, name, split, streaming):
        assert streaming and (path, name, split) == ("wiki", "en", "train")
        return datasets.Dataset.from_dict({"text": texts}).to_iterable_dataset()

    monkeypatch.setattr(datasets, "load_dataset", local_stream)
    monkeypatch.setattr("afpt.data.sources.check_hub_reachable", lambda *a, **k: None)
    hub = {"path": "wiki", "name_template": "{lang}", "split": "train", "text_field": "text", "val_docs": 20}
    data = {"source": "hub", "languages": ["en"], "hub": {**hub, "max_docs": None, "max_tokens": 320}}
    dm = CorpusDataModule(
        {**data, "block_size": 32, "tokenizer": {"sample_docs": 100}},
        vocab_size=300,
        run_dir=str(tmp_path / "run"),
        store_dir=str(tmp_path / "store"),
    )
    dm.setup()
    train, (val,) = dm.train_stream.blocks, dm.val_blocks.values()
    assert len(train) == 10  # 320 tokens: whole blocks up to the budget, streamed after the validation docs
    meta = json.loads((dm.store.path(dm.val_parts[0]) / "meta.json").read_text())
    assert meta["docs"] == 20 and len(val) == meta["blocks"]


def test_bad_store_settings_are_one_clear_error(tmp_path):
    with pytest.raises(DataError, match="data.store.num_proc must be null or an integer >= 1"):
        datamodule(tmp_path, store={"num_proc": 0}).prepare_data()
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    dm = CorpusDataModule(
        {"source": "world", "world": WORLD, "block_size": 32, "tokenizer": {"sample_docs": 60}},
        vocab_size=512,
        run_dir=str(tmp_path / "run"),
        store_dir=str(blocker / "store"),
    )
    with pytest.raises(DataError, match="paths.store_dir=.* is not writable"):
        dm.prepare_data()
    with pytest.raises(DataError, match=r"data.languages \['zz'\] are not world languages"):
        datamodule(tmp_path, languages=["zz"])


def test_a_store_built_with_another_tokenizer_is_named_when_one_is_required(tmp_path):
    datamodule(tmp_path / "a", store={"num_proc": 1}).prepare_data()
    other = datamodule(tmp_path / "b", store={"num_proc": 1, "require_prepared": True})
    (tmp_path / "b").mkdir(exist_ok=True)
    other.store_dir = tmp_path / "a" / "store"
    train_tokenizer(["something else entirely"] * 50, 300).save_pretrained(tmp_path / "b" / "run" / "tokenizer")
    with pytest.raises(
        DataError, match=r"not in the store .* for this tokenizer .*built otherwise: en-train-\w+ \(tokenizer"
    ):
        other.prepare_data()


def test_the_prepare_stage_fills_the_store_that_pretraining_then_reuses(tmp_path):
    store = tmp_path / "store"
    result = run_afpt(
        *TINY, "stage=prepare", "name=prep", f"paths.store_dir={store}", f"hydra.run.dir={tmp_path / 'prep'}"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| en | train | 60 |" in result.stdout and "training tokens" in result.stdout
    metrics = json.loads((tmp_path / "prep" / "metrics.json").read_text())
    assert metrics["dtype"] == "uint16" and metrics["tokens"] > 0
    cfg = compose_config(tmp_path / "train", ["trainer.max_steps=2", "data.store.require_prepared=true"])
    cfg.paths.store_dir = str(store)
    pretrain.run(cfg)  # same corpus, same deterministic tokenizer: nothing to tokenise


def test_store_size_per_token_with_a_small_vocabulary(tmp_path):
    cfg = compose_config(tmp_path, ["stage=prepare", "data.world.train_docs_per_language=400", "data.store.num_proc=1"])
    metrics = prepare.run(cfg)
    train = [p for p in metrics["parts"] if p["split"] == "train"]
    assert all(p["bytes_per_token"] <= 2.1 for p in train), train


@pytest.mark.slow
def test_every_rank_of_a_ddp_run_reuses_one_preparation(tmp_path):
    store = tmp_path / "store"
    result = run_afpt(
        *TINY,
        "trainer=ddp_cpu",
        "trainer.max_steps=2",
        "logger=none",
        f"paths.store_dir={store}",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert log.count("store: preparing en/train") == 1 and log.count("ready:") == 8
    assert len(list(store.glob("*/meta.json"))) == 8
