"""Shared fixtures: a fresh run directory and a tiny pretrained model; the environment of every test."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(2)


@pytest.fixture
def tmp_run(tmp_path: Path) -> Path:
    """A fresh run directory."""
    return tmp_path / "run"


@pytest.fixture(scope="session")
def base_model(tmp_path_factory) -> Path:
    """A tiny model pretrained on the world for a few steps (shared by the evaluation tests)."""
    from helpers import compose_config

    from afpt.pretrain import stage as pretrain

    run = tmp_path_factory.mktemp("base")
    pretrain.run(compose_config(run, ["forgetting=none", "trainer.max_steps=10"]))
    return run / "model"
