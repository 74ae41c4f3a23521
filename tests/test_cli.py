"""The command-line entries: afpt (Hydra), afpt-lightning, and an installed wheel."""

from __future__ import annotations

import subprocess
import sys

from afpt.lightning_cli import cli
from afpt.pretrain.forgetting import ActiveForgetting

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


def test_unknown_experiment_lists_the_existing_ones(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "afpt", "experiment=nope", f"hydra.run.dir={tmp_path}"], capture_output=True, text=True
    )
    assert proc.returncode != 0
    assert "experiment/nope" in proc.stderr and "afa_paper" in proc.stderr and "world_study" in proc.stderr


def test_lightning_cli_trains_with_forgetting(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = "{family: llama, hidden_size: 32, num_layers: 1, num_heads: 2, intermediate_size: 64, max_position_embeddings: 64}"
    data = "{source: world, world: {seed: 0, num_people: 20, train_docs_per_language: 60, val_docs_per_language: 8}, block_size: 32, batch_size: 4}"
    run = cli(
        [
            "fit",
            f"--model.model={model}",
            f"--data.data={data}",
            "--data.vocab_size=512",
            "--trainer.max_steps=6",
            "--trainer.accelerator=cpu",
            "--trainer.enable_progress_bar=false",
            "--trainer.logger=false",
            "--trainer.callbacks+=afpt.pretrain.forgetting.ActiveForgetting",
            "--trainer.callbacks.every_n_steps=2",
        ]
    )
    forgetting = next(c for c in run.trainer.callbacks if isinstance(c, ActiveForgetting))
    assert [r["step"] for r in forgetting.history] == [2, 4]
    assert run.trainer.global_step == 6
    assert run.model.model.get_input_embeddings().weight.shape[0] >= len(run.datamodule.tokenizer)
