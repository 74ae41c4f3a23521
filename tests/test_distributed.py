"""Active forgetting under DDP and FSDP2 with two CPU processes (gloo).

Lightning's FSDP (v1) strategy needs CUDA; it is checked on the GPU machine by
``benchmarks/throughput.py`` (``forgetting.check_sync=true`` in every distributed variant).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from afpt.forgetting import reinitialize_, reset_seed

HERE = Path(__file__).parent


def run_worker(out: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run(
        [sys.executable, str(HERE / "dist_worker.py"), str(out), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_every_rank_holds_the_seeded_embedding_and_zero_state_after_each_reset(tmp_path, strategy):
    result = run_worker(tmp_path, strategy)
    assert result.returncode == 0, result.stderr[-3000:]
    for step in (2, 4):
        # The reset is a pure function of (seed, reset index): the same tensor a single process draws.
        expected = torch.empty(96, 32)
        generator = torch.Generator().manual_seed(reset_seed(0, step // 2, "embedding"))
        reinitialize_(expected, generator, "normal", 0.02, pad_token_id=0)
        for rank in (0, 1):
            saved = torch.load(tmp_path / f"rank{rank}_step{step}.pt", weights_only=True)
            assert torch.equal(saved["emb"], expected), f"rank {rank} after the reset at step {step}"
            assert torch.count_nonzero(saved["exp_avg"]) == 0 and torch.count_nonzero(saved["exp_avg_sq"]) == 0
            # FSDP2 keeps half of the 96 x 32 embedding per rank; DDP the whole of it.
            assert saved["shard_numel"] == (96 * 32 if strategy == "ddp" else 96 * 32 // 2)
    assert sorted(p.name for p in tmp_path.glob("rank*.pt")) == [f"rank{r}_step{s}.pt" for r in (0, 1) for s in (2, 4)]
    for rank in (0, 1):
        assert torch.load(tmp_path / f"history{rank}.pt", weights_only=True)["verified"] == [True, True]


def test_check_sync_catches_ranks_that_draw_different_values(tmp_path):
    result = run_worker(tmp_path, "fsdp2", "mismatch")
    assert result.returncode != 0
    assert "ranks disagree after an embedding reset" in result.stderr
