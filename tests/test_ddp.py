"""Active forgetting under DDP with two CPU processes (gloo)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch


def test_every_rank_holds_the_same_embedding_after_each_reset(tmp_path):
    here = Path(__file__).parent
    env = {**os.environ, "PYTHONPATH": f"{here}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    result = subprocess.run(
        [sys.executable, str(here / "ddp_worker.py"), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for step in (2, 4):
        rank0 = torch.load(tmp_path / f"rank0_step{step}.pt", weights_only=True)
        rank1 = torch.load(tmp_path / f"rank1_step{step}.pt", weights_only=True)
        assert torch.equal(rank0["emb"], rank1["emb"]), f"ranks differ after the reset at step {step}"
        assert torch.count_nonzero(rank0["exp_avg"]) == 0 and torch.count_nonzero(rank1["exp_avg"]) == 0
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == [f"rank{r}_step{s}.pt" for r in (0, 1) for s in (2, 4)]
