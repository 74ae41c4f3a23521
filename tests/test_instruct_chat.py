"""ChatML: the template, assistant-only labels, ChatML tokens, and instruction records."""

from __future__ import annotations

import json
import random

import datasets
import pytest
import torch
from helpers import CONVERSATION, tiny_llama
from transformers import AutoTokenizer

from afpt.data import DataError, train_tokenizer
from afpt.instruct.chat import (
    CHATML_TEMPLATE,
    InstructDataModule,
    PadCollate,
    encode_conversation,
    ensure_chatml,
    load_conversations,
)


@pytest.fixture(scope="module")
def tokenizer():
    tok = train_tokenizer([m["content"] for m in CONVERSATION] * 20, vocab_size=320)
    tok.chat_template = CHATML_TEMPLATE
    return tok


def test_chatml_template_renders_the_exact_string(tokenizer):
    assert tokenizer.apply_chat_template(CONVERSATION[:3], tokenize=False, add_generation_prompt=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nWhere does Niran live?<|im_end|>\n"
        "<|im_start|>assistant\nNiran lives in Zikopo.<|im_end|>\n"
    )
    assert tokenizer.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True).endswith(
        "<|im_end|>\n<|im_start|>assistant\n"
    )


def test_labels_cover_exactly_the_assistant_replies(tokenizer):
    example = encode_conversation(tokenizer, CONVERSATION)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    spans, current = [], []
    for token, label in zip(example["input_ids"], example["labels"]):
        if label != -100:
            assert label == token
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    if current:
        spans.append(current)
    assert [tokenizer.decode(s) for s in spans] == ["Niran lives in Zikopo.<|im_end|>", "Niran eats plums.<|im_end|>"]
    assert all(s[-1] == im_end for s in spans)
    everything = encode_conversation(tokenizer, CONVERSATION, train_on_prompt=True)
    assert everything["labels"] == everything["input_ids"]


def test_chatml_tokens_are_added_when_missing():
    tok = AutoTokenizer.from_pretrained(_plain_tokenizer_dir())
    model = tiny_llama(tied=False, vocab=len(tok))
    rows = len(tok)
    assert ensure_chatml(tok, model) == 2
    assert model.get_input_embeddings().weight.shape[0] == -(-len(tok) // 64) * 64 > rows
    assert ensure_chatml(tok, model) == 0  # present tokens: nothing added, nothing resized
    assert model.get_input_embeddings().weight.shape[0] == -(-len(tok) // 64) * 64
    ids = tok.apply_chat_template(CONVERSATION[:2], add_generation_prompt=True)
    ids = ids if isinstance(ids, list) else ids["input_ids"]
    assert tok.convert_tokens_to_ids("<|im_start|>") in ids


def _plain_tokenizer_dir():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel()
    backend.train_from_iterator(
        ["plain text without chat tokens"] * 10,
        trainers.BpeTrainer(
            vocab_size=300, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<eos>")
    import tempfile

    path = tempfile.mkdtemp()
    tok.save_pretrained(path)
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_openorca_and_messages_load_from_local_files(tmp_path, suffix):
    orca = [{"system_prompt": "", "question": f"q{i}", "response": f"a{i}"} for i in range(3)]
    chats = [{"messages": CONVERSATION} for _ in range(2)]
    for name, records in (("orca", orca), ("chat", chats)):
        path = tmp_path / f"{name}{suffix}"
        if suffix == ".jsonl":
            path.write_text("".join(json.dumps(r) + "\n" for r in records))
        else:
            datasets.Dataset.from_list(records).to_parquet(str(path))
    orca_convs = load_conversations({"format": "openorca", "files": str(tmp_path / f"orca{suffix}")})
    assert orca_convs[1] == [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}]
    chat_convs = load_conversations({"format": "messages", "files": str(tmp_path / f"chat{suffix}")})
    assert chat_convs[0] == CONVERSATION


@pytest.mark.parametrize(
    ("records", "fmt", "message"),
    [
        ([{"question": "q"}], "openorca", "record 0: missing or empty field 'response'"),
        (
            [{"messages": CONVERSATION}, {"messages": CONVERSATION[:2]}],
            "messages",
            "record 1: the conversation has no assistant",
        ),
        ([{"messages": [{"role": "robot", "content": "x"}]}], "messages", "record 0, message 0"),
    ],
)
def test_bad_records_name_index_and_field(tmp_path, records, fmt, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(DataError, match=message):
        load_conversations({"format": fmt, "files": str(path)})


def _examples(lengths: list[int], seed: int = 0) -> list[dict[str, list[int]]]:
    """Conversations of the given token lengths: random ids, the second half labelled (the 'reply')."""
    rng = random.Random(seed)
    out = []
    for n in lengths:
        ids = [rng.randrange(3, 96) for _ in range(n)]
        out.append({"input_ids": ids, "labels": [-100] * (n // 2) + ids[n // 2 :]})
    return out


def test_right_padding_without_a_mask_gives_the_masked_loss():
    """The collate drops the attention mask: causal rows padded on the right score their real tokens the same."""
    model = tiny_llama(tied=True).eval()
    batch = PadCollate(pad_token_id=0, pad_to_multiple_of=16)(_examples([5, 23, 11]))
    assert batch["input_ids"].shape == (3, 32) and "attention_mask" not in batch
    assert batch["real_tokens"] == 5 + 23 + 11
    mask = (torch.arange(32)[None] < torch.tensor([[5], [23], [11]])).long()
    with torch.no_grad():
        unmasked = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
        masked = model(input_ids=batch["input_ids"], attention_mask=mask, labels=batch["labels"]).loss
    assert torch.allclose(unmasked, masked, atol=1e-6)


def test_length_grouped_batches_pad_less_than_random_ones():
    """Length-grouped batching (the default) draws the same conversations with far fewer pad tokens."""
    rng = random.Random(0)
    examples = _examples([rng.randint(8, 250) for _ in range(2000)])
    padding = {}
    for batching in ("length_grouped", "random"):
        module = InstructDataModule(examples, [], batch_size=16, pad_token_id=0, seed=0, batching=batching)
        batches = list(module.train_dataloader())
        assert sum(b["input_ids"].shape[0] for b in batches) == len(examples)
        padding[batching] = 1 - sum(b["real_tokens"] for b in batches) / sum(b["input_ids"].numel() for b in batches)
    assert padding["length_grouped"] < 0.1 and padding["random"] > 0.3, padding
    with pytest.raises(DataError, match="instruct.batching='sorted'"):
        InstructDataModule(examples, [], 16, 0, 0, batching="sorted")
    with pytest.raises(DataError, match="instruct.pad_to_multiple_of must be a positive integer, got 0"):
        InstructDataModule(examples, [], 16, 0, 0, pad_to_multiple_of=0)


def test_module_batches_equal_the_collate_of_the_token_lists():
    """The module keeps conversations as int32 tensors; its batches are the int64 batches of the token lists."""
    rng = random.Random(3)
    examples = _examples([rng.randint(8, 60) for _ in range(40)])
    module = InstructDataModule(examples, examples[:5], 8, 0, 0, batching="random")
    assert module.pin_memory is False  # auto: pinned only when the trainer runs on CUDA
    sampler_order = list(module.train_dataloader().sampler)
    collate = PadCollate(0, 1, rows=8)
    for i, batch in enumerate(module.train_dataloader()):
        expected = collate([examples[j] for j in sampler_order[8 * i : 8 * i + 8]])
        assert batch["input_ids"].dtype == batch["labels"].dtype == torch.int64
        assert torch.equal(batch["input_ids"], expected["input_ids"])
        assert torch.equal(batch["labels"], expected["labels"])
        assert batch["real_tokens"] == expected["real_tokens"]


def test_loader_workers_give_the_same_batches():
    """Worker processes (``instruct.num_workers``) take the collate function and yield the same batches in order."""
    rng = random.Random(1)
    examples = _examples([rng.randint(8, 60) for _ in range(200)])
    batches = {}
    for workers in (0, 2):
        module = InstructDataModule(examples, [], 16, 0, 0, num_workers=workers, pin_memory=False)
        batches[workers] = [(b["input_ids"], b["labels"], b["real_tokens"]) for b in module.train_dataloader()]
    assert len(batches[0]) == len(batches[2]) == 13
    for (ids0, labels0, real0), (ids2, labels2, real2) in zip(batches[0], batches[2]):
        assert torch.equal(ids0, ids2) and torch.equal(labels0, labels2) and real0 == real2
    with pytest.raises(DataError, match="instruct.num_workers must be 'auto' or an integer >= 0, got -1"):
        InstructDataModule(examples, [], 16, 0, 0, num_workers=-1)
    with pytest.raises(DataError, match="instruct.pin_memory must be 'auto', true or false, got 'yes'"):
        InstructDataModule(examples, [], 16, 0, 0, pin_memory="yes")


def test_compiled_instruct_training_builds_one_graph_for_every_width_and_the_short_last_batch():
    """Varying widths and an epoch's short last batch (filled with padding rows) share one compiled graph."""
    from helpers import quiet_trainer

    from afpt.pretrain.module import CausalLMModule
    from afpt.speed.throughput import graphs

    rng = random.Random(2)
    examples = _examples([rng.randint(8, 60) for _ in range(37)])  # 4 batches of 8, then 5 rows
    datamodule = InstructDataModule(examples, [], 8, 0, 0, pad_to_multiple_of=16)
    batches = list(datamodule.train_dataloader())
    assert [b["input_ids"].shape[0] for b in batches] == [8] * 5
    assert len({b["input_ids"].shape[1] for b in batches}) > 1
    assert sum(b["real_tokens"] for b in batches) == sum(len(e["input_ids"]) for e in examples)
    built = {}
    for dynamic in (True, False):
        torch._dynamo.reset()
        before = graphs()
        module = CausalLMModule(tiny_llama(tied=True), compile=True, dynamic_length=dynamic, lr=1e-3)
        quiet_trainer(max_epochs=1).fit(module, datamodule=datamodule)
        built[dynamic] = graphs() - before
    assert built == {True: 1, False: 2}, built
