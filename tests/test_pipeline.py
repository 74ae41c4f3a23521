"""The whole study, sweeps and their summary, experiments, and Lightning's own CLI, on tiny settings."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import afpt.conf
import pytest
from conftest import TINY, compose_config

import afpt.study.pipeline as pipeline
from afpt.lightning_cli import cli
from afpt.pretrain.forgetting import ActiveForgetting
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


def _mtimes(study: Path) -> dict[str, float]:
    return {p.parent.name: p.stat().st_mtime for p in study.glob("*/metrics.json")}


def test_pipeline_runs_every_stage_reports_and_resumes(tmp_path):
    study = tmp_path / "study"
    cfg = compose_config(study, [*FAST_STUDY])
    out = pipeline.run(cfg)
    stages = {f"{s}_{arm}" for s in ("pretrain", "adapt", "instruct") for arm in ("af", "baseline")} | {"evaluate"}
    assert stages <= set(_mtimes(study))
    af, base = (json.loads((study / f"pretrain_{a}" / "metrics.json").read_text()) for a in ("af", "baseline"))
    assert [r["step"] for r in af["resets"]] == [2, 4] and base["resets"] == []
    assert af["tokens_seen"] == base["tokens_seen"]  # everything but forgetting is equal
    evaluation = json.loads((study / "evaluate" / "metrics.json").read_text())
    models = ["baseline", "af", "baseline_adapted", "af_adapted", "baseline_instructed", "af_instructed"]
    assert set(evaluation["models"]) == set(models)
    assert "| language | metric | " + " | ".join(models) + " |" in (study / "evaluate" / "results.md").read_text()
    report = (study / "report" / "report.md").read_text()
    for section in ("## Pretraining", "## Adaptation", "## Instruction tuning", "## Evaluation of every model"):
        assert section in report
    for png in ("pretrain_af/loss.png", "adapt_af/adaptation.png", "evaluate/comparison.png"):
        assert (study / png).stat().st_size > 5_000
    for link in re.findall(r"!\[[^]]*\]\(([^)]+)\)", report):  # every plot the report links exists
        assert (study / "report" / link).is_file(), link
    assert "af/adapt/mean_ppl_char" in out and "adapt_ppl_char_gain" in out
    assert "eval/af_adapted/task/afpt_mc/acc" in out and "eval/baseline/isotropy/mean/self_similarity" in out

    # Started again: nothing reruns.
    before = _mtimes(study)
    pipeline.run(compose_config(study, [*FAST_STUDY]))
    assert _mtimes(study) == before

    # Interrupted in adapt_baseline (no metrics.json, a half-written dir): that stage and what follows rerun.
    (study / "adapt_baseline" / "metrics.json").unlink()
    (study / "adapt_baseline" / "model" / "model.safetensors").unlink()
    pipeline.run(compose_config(study, [*FAST_STUDY]))
    after = _mtimes(study)
    rerun = {name for name in after if after[name] != before.get(name)}
    assert rerun == {"adapt_baseline", "instruct_baseline", "evaluate"}


def test_pipeline_needs_forgetting_to_compare(tmp_path):
    from afpt.errors import AfptError

    with pytest.raises(AfptError, match="compares forgetting with none"):
        pipeline.run(compose_config(tmp_path, ["stage=pipeline", "forgetting=none"]))


@pytest.mark.slow
@pytest.mark.parametrize(
    "name", sorted(p.stem for p in (Path(afpt.conf.__file__).parent / "experiment").glob("*.yaml"))
)
def test_every_experiment_config_runs(tmp_path, name):
    """Each experiment composes; a fast run exercises it (the paper one pretrains on the world, on CPU)."""
    if name == "afa_paper":
        cfg = compose_config(tmp_path, [f"experiment={name}"], tiny=False)
        assert cfg.model.family == "mistral" and cfg.model.vocab_size == 32000 and not cfg.model.tie_word_embeddings
        assert cfg.forgetting.every_n_steps == 10000 and cfg.trainer.max_steps == 150000
        assert cfg.adapt.vocab_size == 48000 and cfg.data.source == "hub" and cfg.evaluate.heldout.source == "hub"
        assert cfg.optim.lr == 1e-4 and cfg.optim.weight_decay == 0.0 and cfg.optim.warmup_fraction == 0.1
        overrides = [
            f"experiment={name}",
            "stage=pretrain",
            "data=world",
            "trainer=cpu",
            "trainer.devices=1",
            "trainer.precision=32-true",
            "optim.compile=false",
            "optim.fused=false",
            "model.num_kv_heads=null",
            "model.max_position_embeddings=64",
            "data.block_size=32",
            "data.num_workers=0",
            "data.pin_memory=false",
            "callbacks.model_checkpoint.every_n_train_steps=3",
            "trainer.val_check_interval=3",
            *TINY,
        ]
        import afpt.pretrain.stage as pretrain

        metrics = pretrain.run(compose_config(tmp_path, overrides, tiny=False))
        assert metrics["global_step"] == 6
    else:
        cfg = compose_config(tmp_path, [f"experiment={name}"])
        assert cfg.stage.name == "pipeline"
        assert pipeline.run(compose_config(tmp_path, [f"experiment={name}", *FAST_STUDY]))["af/adapt/mean_ppl_char"] > 0


def test_unknown_experiment_lists_the_existing_ones(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "afpt", "experiment=nope", f"hydra.run.dir={tmp_path}"], capture_output=True, text=True
    )
    assert proc.returncode != 0
    assert "experiment/nope" in proc.stderr and "afa_paper" in proc.stderr and "world_study" in proc.stderr


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
