"""Test helpers: the tiny overrides, composed real configs, tiny real models and a real Trainer run."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, open_dict
from torch.utils.data import DataLoader, Dataset
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from afpt.artifacts.checkpoints import AtomicCheckpointIO

# Overrides that make any composed config run in seconds on 2 CPU cores.
TINY = [
    "model.vocab_size=512",
    "model.hidden_size=32",
    "model.num_layers=1",
    "model.num_heads=2",
    "model.num_kv_heads=null",
    "model.intermediate_size=64",
    "model.max_position_embeddings=64",
    "data.world.num_people=20",
    "data.world.train_docs_per_language=60",
    "data.world.val_docs_per_language=8",
    "data.block_size=32",
    "data.batch_size=4",
    "data.max_val_blocks=4",
    "data.tokenizer.sample_docs=60",
    "trainer.max_steps=6",
    "trainer.val_check_interval=3",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "trainer.accelerator=cpu",
    "++forgetting.every_n_steps=2",
    "callbacks.model_checkpoint.every_n_train_steps=3",
]


def compose_config(tmp_path: Path, overrides: list[str] = (), tiny: bool = True) -> DictConfig:
    """The real afpt config, composed (with tiny sizes unless ``tiny=False``) and a run dir under ``tmp_path``."""
    GlobalHydra.instance().clear()
    tiny_overrides = list(TINY if tiny else [])
    if {"forgetting=none", "forgetting=probabilistic_temporary"} & set(overrides):  # no every_n_steps to set
        tiny_overrides = [o for o in tiny_overrides if not o.startswith("++forgetting.")]
    with initialize_config_module(config_module="afpt.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*tiny_overrides, *overrides])
    with open_dict(cfg):
        cfg.paths.run_dir = str(tmp_path)
        cfg.paths.store_dir = str(tmp_path / "store")
    return cfg


class RandomTokens(Dataset):
    """Seeded random token blocks: a real dataset for real Trainer runs."""

    def __init__(self, vocab: int, length: int = 16, size: int = 64, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.data = torch.randint(0, vocab, (size, length), generator=generator)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.data[i]}


def tiny_llama(tied: bool, vocab: int = 96, layers: int = 1) -> LlamaForCausalLM:
    """A small Llama (one layer by default) with 96 tokens and a pad token (id 0)."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=2,
        max_position_embeddings=32,
        tie_word_embeddings=tied,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config)


class UserGPT2(pl.LightningModule):
    """A user's own LightningModule around a tied GPT-2, not afpt's module."""

    def __init__(self, vocab: int = 96, lr: float = 1e-2, fused: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=32, n_layer=1, n_head=2, n_positions=32))
        self.lr = lr
        self.fused = fused

    def training_step(self, batch, batch_idx):
        return self.model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr, fused=self.fused)


def loader(vocab: int = 96, batch_size: int = 4) -> DataLoader:
    """A real DataLoader over random tokens."""
    return DataLoader(RandomTokens(vocab), batch_size=batch_size, shuffle=False)


def quiet_trainer(**kwargs) -> pl.Trainer:
    """A real Trainer (one CPU device unless ``kwargs`` say otherwise) with no logger, checkpoints, progress bar,
    model summary or sanity validation."""
    defaults = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
    }
    return pl.Trainer(**{**defaults, **kwargs})


def fit(module: pl.LightningModule, callbacks: list, max_steps: int, **trainer_kwargs) -> pl.Trainer:
    """A real CPU Trainer run over random tokens with no logging or checkpoints."""
    trainer = quiet_trainer(max_steps=max_steps, callbacks=callbacks, **trainer_kwargs)
    trainer.fit(module, train_dataloaders=loader())
    return trainer


def run_afpt(*args: str, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    """``python -m afpt <args>`` as a user runs it, with its output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "afpt", *args], capture_output=True, text=True, timeout=timeout, **kwargs
    )


def afpt_cli(capsys, *args: str) -> tuple[int, str]:
    """The ``afpt`` command run in this process (as the console script runs it): (exit status, stderr)."""
    from afpt.app.cli import main

    GlobalHydra.instance().clear()
    argv, root = sys.argv, logging.getLogger()
    handlers, level = list(root.handlers), root.level
    sys.argv = ["afpt", *args]
    try:
        main()
        code = 0
    except SystemExit as done:
        code = done.code or 0
    finally:  # Hydra configured logging for its run (files in the run dir, the captured streams): undo it
        sys.argv = argv
        GlobalHydra.instance().clear()
        for handler in root.handlers:
            if handler not in handlers:
                handler.close()
        root.handlers, root.level = handlers, level
        for name in ("afpt", "lightning", "lightning.pytorch"):
            logging.getLogger(name).handlers = []
    return code, capsys.readouterr().err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    """Exit 2, one ``afpt: error:`` line that holds every needle, and no traceback."""
    lines = [line for line in err.splitlines() if line.startswith("afpt: error:")]
    assert code == 2, err[-2000:]
    assert len(lines) == 1, err[-2000:]
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


# A ChatML conversation with every role, shared by the instruct tests.
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Where does Niran live?"},
    {"role": "assistant", "content": "Niran lives in Zikopo."},
    {"role": "user", "content": "And what does Niran eat?"},
    {"role": "assistant", "content": "Niran eats plums."},
]


class KillAt(pl.Callback):
    """Kill this process with SIGKILL (no clean-up of any kind) after optimizer step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class DieMidWrite(AtomicCheckpointIO):
    """afpt's checkpoint writer that, at step ``step``, writes half the file under its temporary name and then
    dies by SIGKILL: a kill during the checkpoint write."""

    def __init__(self, step: int) -> None:
        super().__init__()
        self.step = step

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        if checkpoint["global_step"] != self.step:
            return super().save_checkpoint(checkpoint, path, storage_options)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        tmp = Path(path).with_name(f".{Path(path).name}.tmp-{os.getpid()}")
        tmp.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        os.kill(os.getpid(), signal.SIGKILL)


class SleepEachStep(pl.Callback):
    """Sleep after every training step: a run slow enough for a test to signal it mid-fit (weights unchanged)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        time.sleep(self.seconds)


def wandb_offline_run(run_dir: Path) -> dict[str, dict[str, Any]]:
    """What an offline wandb run stored in its ``run-*.wandb`` file (a LevelDB-style log of protobuf records,
    the file ``wandb sync`` uploads): the last ``config``, ``history`` and ``summary`` value of every key, as JSON.
    Config arrives in config records or, when given before the run record was written, inside that record."""
    from wandb.proto import wandb_internal_pb2

    (path,) = run_dir.glob("run-*.wandb")
    data, pos, chunk, block = path.read_bytes(), 7, b"", 32768  # a 7-byte file header, then 32 KiB blocks
    stored: dict[str, dict[str, Any]] = {"config": {}, "history": {}, "summary": {}}
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a record header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        payload, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        chunk = payload if kind in (1, 2) else chunk + payload  # full, first | middle, last
        if kind not in (1, 4):
            continue
        record = wandb_internal_pb2.Record()
        record.ParseFromString(chunk)
        kind_name = record.WhichOneof("record_type")
        if kind_name == "run":  # config given before the run record was written travels inside it
            for item in record.run.config.update:
                stored["config"][item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
        if kind_name in stored:
            items = {"config": record.config.update, "history": record.history.item, "summary": record.summary.update}
            for item in items[kind_name]:
                stored[kind_name][item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return stored
