"""logger=wandb and logger=mlflow in their offline modes: a real pretraining run, read back from what the
tracker stored (config, metrics incl. forgetting/* and perf/*, plots and metrics.json as artifacts)."""

from __future__ import annotations

import json

import pytest
from helpers import compose_config, wandb_offline_run

import afpt.pretrain.stage as pretrain
from afpt.errors import AfptError

# Throughput every 2 steps, so perf/* reaches the tracker in a 6-step run.
RUN = ["callbacks.throughput.window=2"]


def test_mlflow_stores_config_metrics_and_artifacts(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)  # afpt allows the local file store itself
    store = f"file:{tmp_path / 'mlruns'}"
    run_dir = tmp_path / "run"
    pretrain.run(compose_config(run_dir, ["logger=mlflow", f"logger.mlflow.tracking_uri={store}", *RUN]))
    client = mlflow.tracking.MlflowClient(tracking_uri=store)
    (run,) = client.search_runs([client.get_experiment_by_name("afpt").experiment_id])
    assert run.data.params["run_dir"] == str(run_dir) and run.data.params["optim/lr"] == "0.003"
    assert run.data.tags["run_dir"] == str(run_dir)
    # A file store names metrics with "." for "/" (val/loss and val/loss/en cannot both be files there).
    assert run.data.metrics["forgetting.resets"] == 2 and run.data.metrics["perf.tokens_per_s"] > 0
    assert "val.loss" in run.data.metrics and "val.loss.en" in run.data.metrics
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"loss.png", "metrics.json"}


def test_wandb_offline_stores_config_metrics_and_artifacts(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "run"
    pretrain.run(compose_config(run_dir, ["logger=wandb", *RUN]))
    wandb.teardown()  # the wandb service writes the run file in the background; this waits until it has
    (offline,) = (run_dir / "wandb").glob("offline-run-*")
    stored = wandb_offline_run(offline)
    assert stored["config"]["run_dir"] == str(run_dir) and stored["config"]["optim"]["lr"] == 0.003
    history = stored["history"]
    assert history["forgetting/resets"] == 2 and history["perf/tokens_per_s"] > 0 and "val/loss/en" in history
    assert history["plots/loss/_type"] == "image-file" and (offline / "files" / history["plots/loss/path"]).is_file()
    assert json.loads((offline / "files" / "metrics.json").read_text())["resets"][0]["step"] == 2


def test_a_tracker_without_its_package_is_one_clear_error(tmp_path, monkeypatch):
    import afpt.artifacts.tracking

    monkeypatch.setitem(afpt.artifacts.tracking.TRACKER_PACKAGES, "WandbLogger", ("afpt_no_such_package", "wandb"))
    with pytest.raises(
        AfptError, match=r"logger.wandb needs the afpt_no_such_package package: pip install 'afpt\[wandb\]'"
    ):
        pretrain.run(compose_config(tmp_path, ["logger=wandb"]))
    assert not (tmp_path / "model").exists()
