"""The command-line entries: afpt (Hydra), afpt-lightning, and an installed wheel."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import TINY, run_afpt

from afpt.app.lightning_cli import cli
from afpt.pretrain.forgetting import ActiveForgetting


def test_unknown_experiment_lists_the_existing_ones(tmp_path):
    proc = run_afpt("experiment=nope", f"hydra.run.dir={tmp_path}")
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


@pytest.mark.slow
def test_a_wheel_installs_and_runs_from_another_directory(tmp_path):
    """``pip install .`` (not editable) into a fresh venv that sees this Python's packages; the installed
    ``afpt`` finds its configs (``pkg://afpt.conf``) from an unrelated directory."""
    root = Path(__file__).resolve().parents[1]
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    python = venv / "bin" / "python"
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--no-deps", str(root)],
        capture_output=True,
        text=True,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    located = subprocess.run(
        [str(python), "-c", "import afpt, afpt.conf; print(afpt.__file__); print(afpt.conf.__file__)"],
        cwd=elsewhere,
        capture_output=True,
        text=True,
    )
    assert str(venv) in located.stdout and str(root) not in located.stdout, located.stdout
    installed_conf = Path(located.stdout.splitlines()[1]).parent
    shipped = {p.relative_to(installed_conf) for p in installed_conf.rglob("*.yaml")}
    assert shipped == {p.relative_to(root / "conf") for p in (root / "conf").rglob("*.yaml")}  # nested groups too
    run = subprocess.run(
        [str(venv / "bin" / "afpt"), *TINY, "stage=pretrain", "trainer.max_steps=5", "hydra.run.dir=run"],
        cwd=elsewhere,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert (elsewhere / "run" / "model" / "model.safetensors").is_file()
    assert json.loads((elsewhere / "run" / "metrics.json").read_text())["global_step"] == 5


HEAVY = ("torch", "lightning", "transformers", "datasets")


def imported_modules(*argv: str, env: dict[str, str] | None = None) -> set[str]:
    """The top-level modules a fresh ``python3 -X importtime`` process imports for ``argv``."""
    import os

    result = subprocess.run(
        [sys.executable, "-X", "importtime", *argv],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return {line.rsplit("|", 1)[1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}


@pytest.mark.parametrize(
    ("argv", "env"),
    [
        (["-m", "afpt", "--help"], None),
        (["-m", "afpt", "stage=adapt", "--cfg", "job"], None),
        (["-m", "afpt", "-sc", "query=bash"], {"COMP_LINE": "afpt stage=pre", "COMP_POINT": "14"}),
        (["-c", "import afpt"], None),
    ],
)
def test_help_config_and_completion_import_no_heavy_library(argv, env):
    assert not imported_modules(*argv, env=env) & set(HEAVY)


def test_the_package_face_loads_its_classes_on_first_use():
    code = "import sys, afpt; assert 'torch' not in sys.modules; print(afpt.ActiveForgetting.__module__)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "afpt.pretrain.forgetting"
    assert ActiveForgetting.__name__ in __import__("afpt").__all__


@pytest.mark.parametrize(
    "debug",
    ["fdr", "limit", pytest.param("overfit", marks=pytest.mark.slow), pytest.param("profiler", marks=pytest.mark.slow)],
)
def test_every_debug_config_runs_the_pretrain_stage_as_its_name_says(tmp_path, debug):
    from helpers import TINY, compose_config

    import afpt.pretrain.stage as pretrain

    sizes = [o for o in TINY if o.startswith(("model.", "data."))]
    cfg = compose_config(tmp_path, [*sizes, f"debug={debug}"], tiny=False)
    assert cfg.trainer.accelerator == "cpu" and cfg.trainer.detect_anomaly and cfg.data.num_workers == 0
    metrics = pretrain.run(cfg)
    resets = [r["step"] for r in metrics["resets"]]
    if debug == "fdr":  # one batch, nothing logged, no step checkpoint
        assert metrics["global_step"] == 1 and not list(tmp_path.glob("logs/*/metrics.csv"))
        assert not list(tmp_path.glob("checkpoints/step*.ckpt"))
    elif debug == "overfit":  # the same 3 batches for 60 steps, no forgetting, no step checkpoints
        assert metrics["global_step"] == 60 and resets == [] and cfg.trainer.overfit_batches == 3
        assert not list(tmp_path.glob("checkpoints/step*.ckpt"))
    elif debug == "limit":  # 20 steps crossing a reset, validation and checkpoints every 10 steps
        assert metrics["global_step"] == 20 and resets == [10]
        assert sorted(p.name for p in (tmp_path / "checkpoints").glob("*.ckpt")) == ["last.ckpt", "step20.ckpt"]
    else:
        report = (tmp_path / "fit-profile.txt").read_text()
        assert "run_training_batch" in report and metrics["global_step"] == 20
    assert (tmp_path / "model" / "model.safetensors").is_file()


@pytest.mark.slow
def test_the_console_shows_each_line_once_without_known_noise_and_ends_with_a_summary(tmp_path):
    from helpers import TINY

    proc = run_afpt(*TINY, "name=console", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    both = proc.stdout + proc.stderr
    assert both.count("Seed set to 0") == 1  # Hydra's handler only, not Lightning's second one
    for noise in ("💡 Tip", "LeafSpec", "Writing model shards", "Failed to load", "is an Enum subclass"):
        assert noise not in both, noise
    tail = proc.stdout.strip().splitlines()[-2:]
    assert tail[0] == f"afpt pretrain: done, run directory {tmp_path / 'runs' / 'console'}"
    assert tail[1].startswith("validation loss: ")
    # Bad input into the same run: one error line on the console, and the run's log file keeps it too.
    bad = run_afpt(*TINY, "name=console", "optim.lr=0", cwd=tmp_path)
    message = "optim.lr must be a number > 0, got 0"
    assert bad.returncode == 2 and (bad.stdout + bad.stderr).count(message) == 1, bad.stdout + bad.stderr
    assert f"afpt: error: {message}" in bad.stderr
    assert message in (tmp_path / "runs" / "console" / "cli.log").read_text()
