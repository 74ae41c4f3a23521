"""ChatML conversations: the template, loading instruction data, and assistant-only loss masks."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, RandomSampler
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.trainer_pt_utils import LengthGroupedSampler

from afpt.adapt.expansion import expand_vocabulary
from afpt.app.stages import to_dict
from afpt.data import (
    DataError,
    LoaderOptions,
    as_file_map,
    check_hub_reachable,
    hub_records,
    load_records,
    world_from_config,
)
from afpt.data.world import World
from afpt.models import on_eval_device

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
ROLES = ("system", "user", "assistant")
WORLD_SYSTEM_PROMPT = "You answer questions about the world in one sentence."


def ensure_chatml(
    tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel, seed: int = 0, pad_multiple: int = 64
) -> int:
    """Give the tokenizer ChatML special tokens and template; returns how many tokens were added.

    Added tokens get embedding rows from transformers' mean-resizing rule (``adapt.init=mean``), through the
    same vocabulary expansion as adaptation; a grown embedding is padded to ``pad_multiple`` rows, as in
    pretraining and adaptation, so the head's GEMMs keep aligned shapes.
    """
    missing = [t for t in (IM_START, IM_END) if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    n_tokens = len(tokenizer)
    rows = model.get_input_embeddings().weight.shape[0]
    if n_tokens > rows:
        expand_vocabulary(model, rows, n_tokens, "mean", torch.Generator().manual_seed(seed), pad_multiple=pad_multiple)
    tokenizer.chat_template = CHATML_TEMPLATE
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    model.generation_config.eos_token_id = [im_end, tokenizer.eos_token_id]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return len(missing)


def check_conversation(messages: Any, index: int) -> list[dict[str, str]]:
    """Validate one conversation, naming the record index and the problem."""
    if not isinstance(messages, Sequence) or not messages:
        raise DataError(f"record {index}: 'messages' must be a non-empty list of {{role, content}}")
    for turn, message in enumerate(messages):
        if (
            not isinstance(message, Mapping)
            or message.get("role") not in ROLES
            or not isinstance(message.get("content"), str)
        ):
            raise DataError(f"record {index}, message {turn}: expected role in {ROLES} and a string content")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"record {index}: the conversation has no assistant turn")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def messages_conversation(record: Mapping[str, Any], index: int) -> list[dict[str, str]]:
    """A ``messages`` record (a list of {role, content}), checked."""
    if "messages" not in record:
        raise DataError(f"record {index}: missing field 'messages'")
    return check_conversation(record["messages"], index)


def openorca_conversation(record: Mapping[str, Any], index: int) -> list[dict[str, str]]:
    """An OpenOrca record (system_prompt, question, response) as messages."""
    for key in ("question", "response"):
        if not isinstance(record.get(key), str) or not record[key].strip():
            raise DataError(f"record {index}: missing or empty field {key!r} (OpenOrca format)")
    system = record.get("system_prompt") or ""
    messages = [{"role": "system", "content": system}] if system.strip() else []
    return messages + [
        {"role": "user", "content": record["question"]},
        {"role": "assistant", "content": record["response"]},
    ]


# instruct.format: how a record becomes a conversation.
RECORD_FORMATS = {"openorca": openorca_conversation, "messages": messages_conversation}


def to_conversation(record: Mapping[str, Any], index: int, fmt: str) -> list[dict[str, str]]:
    """One record in the ``RECORD_FORMATS`` format ``fmt``, as messages."""
    return RECORD_FORMATS[fmt](record, index)


def world_conversations(world: World, heldout_fraction: float) -> tuple[list, list]:
    """The world's English questions as (train, held-out) conversations; held-out facts are every n-th one."""
    every = max(2, round(1 / heldout_fraction)) if heldout_fraction > 0 else 0
    train, heldout = [], []
    for i, (question, answer, _) in enumerate(world.qa_pairs("en")):
        conversation = [
            {"role": "system", "content": WORLD_SYSTEM_PROMPT},
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer},
        ]
        (heldout if every and i % every == 0 else train).append(conversation)
    return train, heldout


def load_conversations(cfg: Mapping[str, Any]) -> list[list[dict[str, str]]]:
    """Conversations from local jsonl/parquet files or a hub dataset, through ``datasets``."""
    fmt = cfg["format"]
    if fmt not in RECORD_FORMATS:
        raise DataError(f"instruct.format={fmt!r} is unknown; expected one of {sorted(RECORD_FORMATS)}")
    if cfg.get("files"):
        paths = [p for ps in as_file_map(cfg["files"], "instruct.files").values() for p in ps]
        ds = load_records(paths, "instruct.files")
    else:
        check_hub_reachable(f"instruct.hub={cfg['hub']!r}")
        ds = hub_records(cfg["hub"], None, cfg.get("split", "train"), cfg["max_records"])
    records = list(ds)[: cfg.get("max_records") or None]
    if not records:
        raise DataError("the instruction dataset is empty")
    return [to_conversation(r, i, fmt) for i, r in enumerate(records)]


def encode_conversation(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], train_on_prompt: bool = False
) -> dict[str, list[int]]:
    """Token ids of the rendered ChatML conversation and labels: -100 except on assistant replies.

    An assistant reply's label span is its content plus its ``<|im_end|>``; its header is masked.
    """
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans, cursor = [], 0
    for message in messages:
        header = f"{IM_START}{message['role']}\n"
        start = text.index(header, cursor) + len(header)
        end = text.index(IM_END, start) + len(IM_END)
        if message["role"] == "assistant":
            spans.append((start, end))
        cursor = end
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    labels = []
    for token_id, (a, b) in zip(encoded["input_ids"], encoded["offset_mapping"]):
        inside = any(s <= a and b <= e for s, e in spans)
        labels.append(token_id if train_on_prompt or inside else -100)
    return {"input_ids": encoded["input_ids"], "labels": labels}


class PadCollate:
    """Collate examples (token lists or 1-D tensors) by right-padding ids (pad) and labels (-100) to the batch's
    longest example, rounded up to ``pad_to_multiple_of`` (a few widths), and, with ``rows``, a short batch (an
    epoch's last) to ``rows`` rows of padding, so compiled training keeps one graph. A class, so loader worker
    processes can take it.

    The batch has no attention mask: the padding sits to the right of causal rows whose positions start at 0,
    so no real token attends to a pad, and pads carry label -100, so the loss equals the masked loss, and
    compiled training keeps sdpa's unmasked causal kernels. ``real_tokens`` (an int) counts the non-pad tokens.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int = 1, rows: int | None = None) -> None:
        self.pad_token_id, self.pad_to_multiple_of, self.rows = pad_token_id, pad_to_multiple_of, rows

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        """One right-padded batch."""
        longest = max(len(e["input_ids"]) for e in examples)
        width = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        rows = max(len(examples), self.rows or 0)
        ids = torch.full((rows, width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((rows, width), -100, dtype=torch.long)
        for row, e in enumerate(examples):
            n = len(e["input_ids"])
            ids[row, :n] = torch.as_tensor(e["input_ids"])
            labels[row, :n] = torch.as_tensor(e["labels"])
        return {"input_ids": ids, "labels": labels, "real_tokens": sum(len(e["input_ids"]) for e in examples)}


OVERFLOW = ("skip", "truncate")


def encode_all(tokenizer, conversations, max_length: int, overflow: str, train_on_prompt: bool):
    """Encode conversations; longer than ``max_length`` are skipped or cut (by ``overflow``). Returns (examples, n)."""
    examples, overflowed = [], 0
    for messages in conversations:
        example = encode_conversation(tokenizer, messages, train_on_prompt)
        if len(example["input_ids"]) > max_length:
            overflowed += 1
            if overflow == "skip":
                continue
            example = {k: v[:max_length] for k, v in example.items()}
            if all(label == -100 for label in example["labels"]):
                continue
        examples.append(example)
    return examples, overflowed


BATCHING = ("length_grouped", "random")


def as_tensors(examples: list[dict[str, Any]]) -> list[dict[str, torch.Tensor]]:
    """Each example's ``input_ids`` and ``labels`` as int32 tensors (half the memory of int64)."""
    return [{key: torch.as_tensor(e[key], dtype=torch.int32) for key in ("input_ids", "labels")} for e in examples]


class InstructDataModule(LoaderOptions, pl.LightningDataModule):
    """Shuffled, right-padded conversations for training; held-out ones for validation. Every batch has
    ``batch_size`` rows (a short last one is filled with padding rows, which the loss ignores).

    ``batching``: ``length_grouped`` (transformers' ``LengthGroupedSampler``: batches of similar lengths drawn
    from shuffled mega-batches, so little padding) or ``random`` (plain shuffling). ``num_workers`` and
    ``pin_memory``: as the ``data`` group's (``auto``: 4 loader processes and pinned memory on CUDA; pinned
    batches let the host run a step ahead of the GPU, pageable ones make every copy wait for the GPU).
    """

    def __init__(
        self,
        train: list,
        val: list,
        batch_size: int,
        pad_token_id: int,
        seed: int,
        batching: str = "length_grouped",
        pad_to_multiple_of: int = 1,
        num_workers: int | str = 0,
        pin_memory: bool | str = "auto",
    ) -> None:
        super().__init__()
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise DataError(f"instruct.batch_size must be a positive integer, got {batch_size!r}")
        if batching not in BATCHING:
            raise DataError(f"instruct.batching={batching!r} is unknown; expected one of {BATCHING}")
        if isinstance(pad_to_multiple_of, bool) or not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of < 1:
            raise DataError(f"instruct.pad_to_multiple_of must be a positive integer, got {pad_to_multiple_of!r}")
        self.loader_options(num_workers, pin_memory, "instruct")
        # Held as int32 tensors: collating copies slices, instead of building tensors from Python lists.
        self.train, self.val = as_tensors(train), as_tensors(val)
        self.batch_size, self.seed, self.batching = batch_size, seed, batching
        self.collate = PadCollate(pad_token_id, pad_to_multiple_of, rows=batch_size)
        self.val_names = ["heldout"]

    def _loader(self, examples: list, **kwargs: Any) -> DataLoader:
        return DataLoader(
            examples,
            batch_size=self.batch_size,
            collate_fn=self.collate,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            **kwargs,
        )

    def train_dataloader(self) -> DataLoader:
        """Training conversations, reshuffled every epoch from a seeded generator."""
        generator = torch.Generator().manual_seed(self.seed)
        if self.batching == "random":
            sampler = RandomSampler(self.train, generator=generator)
        else:
            lengths = [len(e["input_ids"]) for e in self.train]
            sampler = LengthGroupedSampler(self.batch_size, lengths=lengths, generator=generator)
        return self._loader(self.train, sampler=sampler, persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> DataLoader:
        """Held-out conversations."""
        return self._loader(self.val)


@torch.no_grad()
def answer_metrics(model, tokenizer, conversations: list, max_new_tokens: int = 32) -> dict[str, float]:
    """Mean log-likelihood per token of the gold reply, and greedy exact match, on held-out conversations."""
    with on_eval_device(model) as device:
        return _answer_metrics(model, tokenizer, conversations, max_new_tokens, device)


def _answer_metrics(model, tokenizer, conversations: list, max_new_tokens: int, device) -> dict[str, float]:
    total_logp, total_tokens, exact = 0.0, 0, 0
    for messages in conversations:
        example = encode_conversation(tokenizer, messages)
        ids = torch.tensor([example["input_ids"]], device=device)
        labels = torch.tensor([example["labels"]], device=device)
        logits = model(input_ids=ids, use_cache=False).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        target = labels[:, 1:]
        mask = target != -100
        total_logp += float(logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)[mask].sum())
        total_tokens += int(mask.sum())
        prompt = tokenizer.apply_chat_template(
            messages[:-1], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        out = model.generate(
            **{k: v.to(device) for k, v in prompt.items()}, max_new_tokens=max_new_tokens, do_sample=False
        )
        reply = tokenizer.decode(out[0, prompt["input_ids"].shape[1] :]).split(IM_END)[0].strip()
        exact += int(reply == messages[-1]["content"].strip())
    return {
        "answer_logprob_per_token": total_logp / max(1, total_tokens),
        "exact_match": exact / max(1, len(conversations)),
        "questions": len(conversations),
    }


def conversations_for(cfg: DictConfig) -> tuple[list, list]:
    """(train, held-out) conversations: the world's English questions, or a dataset split by seed."""
    i = cfg.instruct
    if i.source == "world":
        return world_conversations(world_from_config(cfg.data.world), i.heldout_fraction)
    conversations = load_conversations(to_dict(i))
    random.Random(cfg.seed).shuffle(conversations)
    n_heldout = int(len(conversations) * i.heldout_fraction)
    return conversations[n_heldout:], conversations[:n_heldout]
