"""Multirun sweeps and their summary."""

from __future__ import annotations

import json
import subprocess
import sys

from helpers import TINY

from afpt.study.summary import write_summary

FAST_STUDY = [
    "stage=pipeline",
    "adapt.token_budget=1024",
    "adapt.new_tokens=64",
    "adapt.tokenizer_sample_docs=60",
    "adapt.eval_docs=4",
    "adapt.val_every_n_steps=4",
    "instruct.epochs=1",
    "instruct.eval_questions=2",
    "instruct.max_length=256",
    "model.max_position_embeddings=256",
    "evaluate.heldout.docs=8",
    "evaluate.isotropy.words=4",
    "evaluate.isotropy.contexts=2",
    "evaluate.isotropy.baseline_pairs=50",
    "evaluate.world_tasks.mc_items=8",
    "evaluate.world_tasks.translation_items=2",
    "evaluate.world_tasks.translation_shots=1",
    "evaluate.world_tasks.max_gen_toks=4",
    "evaluate.bootstrap_iters=0",
]


def test_multirun_jobs_do_not_collide_and_are_summarised(tmp_path):
    sweep = tmp_path / "sweep"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "afpt",
            "-m",
            *TINY,
            "trainer.max_steps=4",
            "forgetting.every_n_steps=2,3",
            "seed=0,1",
            f"hydra.sweep.dir={sweep}",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert jobs == ["0", "1", "2", "3"] and all((sweep / j / "model" / "model.safetensors").is_file() for j in jobs)
    summary = (sweep / "summary.md").read_text()
    assert "| forgetting.every_n_steps=2 | 2 |" in summary and "| forgetting.every_n_steps=3 | 2 |" in summary
    losses = [json.loads((sweep / j / "metrics.json").read_text())["val/loss"] for j in jobs]
    assert len(set(losses)) == 4  # seeds and K really differ
    assert write_summary(sweep) == sweep / "summary.md"
