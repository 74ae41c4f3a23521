"""Packing into blocks and the resumable stream."""

from __future__ import annotations

import datasets
import pytest
import torch
from torch.utils.data import DataLoader

from afpt.data import BlockStream, DataError, pack, train_tokenizer


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


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("num_workers", "many", "data.num_workers must be 'auto' or an integer >= 0"),
        ("num_workers", -1, "data.num_workers must be 'auto' or an integer >= 0"),
        ("pin_memory", "yes", "data.pin_memory must be 'auto', true or false"),
    ],
)
def test_bad_loader_settings_are_refused(key, value, message):
    import datasets

    from afpt.data import DataError, PretrainDataModule

    blocks = datasets.Dataset.from_dict({"input_ids": [[1, 2, 3, 4]] * 4})
    with pytest.raises(DataError, match=message):
        PretrainDataModule({"en": blocks}, {}, batch_size=2, **{key: value})
