"""Active forgetting under DDP and FSDP2 with two CPU processes (gloo).

Lightning's FSDP (v1) strategy needs CUDA; it is checked on the GPU machine by
``benchmarks/scaling.py`` (``forgetting.check_sync=true`` in every multi-GPU setting).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from afpt.pretrain.forgetting import reinitialize_, reset_seed

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


@pytest.mark.parametrize("strategy", [pytest.param("ddp", marks=pytest.mark.slow), "fsdp2"])
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
            if strategy == "ddp":  # trainer.strategy.comm_hook=bf16
                assert saved["comm_hook"] == "bf16_compress_hook" and saved["fsdp_units"] == []
            else:  # untied: the embedding and the head are FSDP units of their own, next to each layer
                units = ["", "lm_head", "model.embed_tokens", "model.layers.0", "model.layers.1"]
                assert saved["fsdp_units"] == units and saved["comm_hook"] is None
    assert sorted(p.name for p in tmp_path.glob("rank*.pt")) == [f"rank{r}_step{s}.pt" for r in (0, 1) for s in (2, 4)]
    for rank in (0, 1):
        assert torch.load(tmp_path / f"history{rank}.pt", weights_only=True)["verified"] == [True, True]


@pytest.mark.parametrize(
    ("strategy", "mode", "fraction", "row_probability"),
    [
        ("ddp", "partial", 0.25, None),
        pytest.param("ddp", "probabilistic", 1.0, 0.3, marks=pytest.mark.slow),
        pytest.param("fsdp2", "partial", 0.25, None, marks=pytest.mark.slow),
    ],
)
def test_a_partial_reset_draws_the_same_rows_and_values_on_every_rank(
    tmp_path, strategy, mode, fraction, row_probability
):
    from safetensors.torch import load_file

    from afpt.pretrain.forgetting import reset_rows

    result = run_worker(tmp_path, strategy, mode, "episodes")
    assert result.returncode == 0, result.stderr[-3000:]
    for step in (2, 4):
        rows = reset_rows(96, fraction, 0, step // 2, row_probability)
        kept = torch.ones(96, dtype=torch.bool)
        kept[rows] = False
        assert 0 < len(rows) < 96
        fresh = torch.empty(96, 32)
        generator = torch.Generator().manual_seed(reset_seed(0, step // 2, "embedding"))
        reinitialize_(fresh, generator, "normal", 0.02, pad_token_id=0)
        ranks = [torch.load(tmp_path / f"rank{r}_step{step}.pt", weights_only=True) for r in (0, 1)]
        assert torch.equal(ranks[0]["emb"], ranks[1]["emb"])
        assert torch.equal(ranks[0]["emb"][rows], fresh[rows])
        # DDP: each rank holds the whole state; FSDP2: rank 0 rows 0-47, rank 1 rows 48-95.
        exp_avg = ranks[0]["exp_avg"] if strategy == "ddp" else torch.cat([r["exp_avg"] for r in ranks])
        assert exp_avg.shape == (96, 32)
        assert torch.count_nonzero(exp_avg[rows]) == 0 and torch.count_nonzero(exp_avg[kept]) > 0
        # The episode saved just before the reset: the whole matrix, the kept rows as they stayed.
        episode = load_file(tmp_path / "episodes" / f"step{step}" / "model.safetensors")["model.embed_tokens.weight"]
        assert episode.shape == (96, 32) and torch.equal(episode[kept], ranks[0]["emb"][kept])
        assert not torch.equal(episode[rows], fresh[rows])
    for rank in (0, 1):  # check_sync verified the drawn values and the zeroed rows on both ranks
        assert torch.load(tmp_path / f"history{rank}.pt", weights_only=True)["verified"] == [True, True]


@pytest.mark.slow
def test_compiled_fsdp2_compiles_every_layer_past_the_recompile_limit(tmp_path):
    """FSDP2's hooks make torch.compile compile each layer as its own frame; none may fall back to eager."""
    result = run_worker(tmp_path, "fsdp2", "compile")
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in (0, 1):
        record = torch.load(tmp_path / f"history{rank}.pt", weights_only=True)
        assert record["recompile_limit_hits"] == 0 and record["verified"] == [True, True]
        assert record["graphs"] >= 4  # one graph per decoder layer at least


@pytest.mark.slow
def test_check_sync_catches_ranks_that_draw_different_values(tmp_path):
    result = run_worker(tmp_path, "fsdp2", "mismatch")
    assert result.returncode != 0
    assert "ranks disagree after an embedding reset" in result.stderr


@pytest.mark.slow
def test_pretrain_stage_under_fsdp2_saves_the_full_model_and_resumes(tmp_path):
    """The real CLI on two CPU processes: resets verified, one full safetensors model, and a resume."""
    from afpt.models import load_model

    run = tmp_path / "run"
    base = [sys.executable, "-m", "afpt", "stage=pretrain", "model=tiny", "trainer=fsdp2", "trainer.accelerator=cpu"]
    base += ["trainer.precision=32-true", "trainer.val_check_interval=3", "trainer.enable_progress_bar=false"]
    base += ["forgetting.every_n_steps=2", "forgetting.check_sync=true", "logger=none", f"hydra.run.dir={run}"]
    first = subprocess.run([*base, "trainer.max_steps=4"], capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert [(r["step"], r["verify_ms"] is not None) for r in metrics["resets"]] == [(2, True)]
    model = load_model(run / "model")
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    embedding = model.get_input_embeddings().weight
    assert embedding.shape == checkpoint["model.model.embed_tokens.weight"].shape == (4096, 128)
    assert torch.equal(embedding, checkpoint["model.model.embed_tokens.weight"])

    resumed = subprocess.run(
        [*base, "trainer.max_steps=6", f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    steps = [r["step"] for r in json.loads((run / "metrics.json").read_text())["resets"]]
    assert steps == [2, 4]
