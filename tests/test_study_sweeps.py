"""Multirun sweeps and their summary."""

from __future__ import annotations

import json

import pytest
from helpers import TINY, run_afpt

from afpt.study.summary import write_summary


@pytest.mark.slow
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


@pytest.mark.slow
def test_submitit_local_launcher_runs_each_job_in_its_own_process_and_summarises(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    sweep = tmp_path / "sweep"
    proc = run_afpt(
        "-m", "hydra/launcher=submitit_local", *TINY, "trainer.max_steps=2", "seed=0,1", f"hydra.sweep.dir={sweep}"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "validated against ConfigStore schema" not in proc.stderr
    # submitit ran each job as its own process, with its log and result under .submitit/<job id>/
    assert len(list(sweep.glob(".submitit/*/*_result.pkl"))) == 2
    losses = {json.loads((sweep / j / "metrics.json").read_text())["val/loss"] for j in ("0", "1")}
    assert len(losses) == 2 and "| (all jobs) | 2 |" in (sweep / "summary.md").read_text()


def test_submitit_slurm_resources_follow_the_trainer(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="afpt.conf", version_base="1.3"):
        cfg = compose(
            config_name="config",
            overrides=["hydra/launcher=submitit_slurm", "trainer=fsdp2", "trainer.devices=4", "trainer.num_nodes=2"],
            return_hydra_config=True,
        )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.gpus_per_node, launcher.tasks_per_node, launcher.nodes) == (4, 4, 2)
