"""Multirun sweeps and their summary."""

from __future__ import annotations

import json

from helpers import TINY, run_afpt

from afpt.study.summary import write_summary


def test_multirun_jobs_do_not_collide_and_are_summarised(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_afpt(
        "-m", *TINY, "trainer.max_steps=4", "forgetting.every_n_steps=2,3", "seed=0,1", f"hydra.sweep.dir={sweep}"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert jobs == ["0", "1", "2", "3"] and all((sweep / j / "model" / "model.safetensors").is_file() for j in jobs)
    summary = (sweep / "summary.md").read_text()
    assert "| forgetting.every_n_steps=2 | 2 |" in summary and "| forgetting.every_n_steps=3 | 2 |" in summary
    losses = [json.loads((sweep / j / "metrics.json").read_text())["val/loss"] for j in jobs]
    assert len(set(losses)) == 4  # seeds and K really differ
    assert write_summary(sweep) == sweep / "summary.md"
