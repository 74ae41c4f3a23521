"""The benchmark scripts run on CPU as a user would run them (their GPU numbers live in benchmarks/README.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"


@pytest.mark.slow
def test_interconnect_measures_every_collective_and_size(tmp_path):
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "interconnect.py"), "--gpus", "2", "--sizes-mb", "0.5", "2"]
        + ["--iters", "2", "--port", "29531", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((tmp_path / "interconnect.json").read_text())
    assert record["device"] == "cpu" and record["args"]["gpus"] == 2
    ops = {(row["op"], row["size_MB"]) for row in record["rows"]}
    assert ops == {(op, size) for op in ("all_gather", "reduce_scatter", "all_reduce") for size in (0.5, 2.0)}
    assert all(row["ms"] > 0 and row["bus_GBps"] > 0 for row in record["rows"])
    assert "| all_reduce | 2 |" in result.stdout
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.slow
def test_stages_measures_adapt_and_instruct_against_pretraining_with_profiles(tmp_path):
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "stages.py"), "--models", "tiny", "--steps", "12", "--batch", "4"]
        + ["--seq", "64", "--max-turns", "4", "--profile", "--out", str(tmp_path)]
        + ["--instruct-variants", "turns=400 instruct.pad_to_multiple_of=64"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((tmp_path / "stages-cpu.json").read_text())["rows"]
    assert [row["stage"] for row in rows] == [
        "pretrain",
        "adapt",
        "instruct",
        "instruct turns=400 instruct.pad_to_multiple_of=64",
    ]
    assert all(row["tokens_per_s"] > 0 and row["profile"]["wall_ms_per_step"] > 0 for row in rows)
    assert rows[1]["frozen_unchanged"] is True
    assert rows[1]["x_pretrain"] == pytest.approx(rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"])
    assert rows[2]["x_pretrain"] == pytest.approx(rows[2]["real_tokens_per_s"] / rows[0]["tokens_per_s"])
    # 400 turns overflow every row: all are cut to the full 64 tokens, so nothing is padding.
    assert rows[3]["padding_fraction"] == 0 < rows[2]["padding_fraction"]
    assert "| tiny | instruct |" in result.stdout and "ms per step" in result.stdout


@pytest.mark.slow
def test_stages_without_instruct_measures_pretraining_and_adaptation_only(tmp_path):
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "stages.py"), "--models", "tiny", "--steps", "12", "--batch", "4"]
        + ["--seq", "64", "--no-instruct", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((tmp_path / "stages-cpu.json").read_text())["rows"]
    assert [row["stage"] for row in rows] == ["pretrain", "adapt"]
    assert rows[1]["x_pretrain"] == pytest.approx(rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"])
    assert "| tiny | adapt |" in result.stdout and "instruct" not in result.stdout


@pytest.mark.slow
def test_stages_diagnostics_time_every_instruct_step_and_profile_the_host(tmp_path):
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "stages.py"), "--models", "tiny", "--steps", "10", "--batch", "4"]
        + ["--seq", "64", "--max-turns", "4", "--step-times", "--host-profile", "2", "3", "--out", str(tmp_path)]
        + ["--instruct-variants", "instruct.pad_to_multiple_of=64"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((tmp_path / "stages-cpu.json").read_text())["rows"]
    assert [row["stage"] for row in rows] == [
        "pretrain",
        "adapt",
        "instruct",
        "instruct instruct.pad_to_multiple_of=64",
    ]
    assert "step_ms_each" not in rows[0] and "step_ms_each" not in rows[1]
    for row in rows[2:]:
        # one time per step after the first, each a positive host wall time
        assert len(row["step_ms_each"]) == row["steps"] - 1 and all(t > 0 for t in row["step_ms_each"])
    profiles = sorted(tmp_path.glob("hostprof-*.txt"))
    assert [p.name for p in profiles] == ["hostprof-tiny_2.txt", "hostprof-tiny_3.txt"]
    assert all(p.read_text().startswith("3 steps from 2: wall ") for p in profiles)
    assert "function calls" in profiles[0].read_text()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--no-instruct", "--step-times"], "need instruct, which --no-instruct leaves out"),
        (["--host-profile", "2", "0"], "--host-profile START N: START >= 0 and N >= 1"),
    ],
)
def test_stages_refuses_diagnostics_it_cannot_run(tmp_path, args, message):
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "stages.py"), *args, "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_peers_measures_afpt_and_each_peer_in_one_process_and_names_a_peer_that_cannot_run(tmp_path):
    env = {**os.environ, "PYTHONPATH": ""}  # the peers torchtitan and litgpt are not installed here
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "peers.py"), "--models", "tiny", "--peers", "afpt", "hf", "torchtitan"]
        + ["--steps", "3", "--warmup", "1", "--batch", "2", "--seq", "64", "--device", "cpu", "--no-compile"]
        + ["--profile", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((tmp_path / "peers.json").read_text())
    afpt, hf, titan = record["rows"]
    assert afpt["peer"] == "afpt" and hf["peer"] == "hf" and titan["peer"] == "torchtitan"
    assert afpt["tokens_per_s"] > 0 and hf["tokens_per_s"] > 0 and hf["loss"] > 0
    assert hf["afpt_vs_this"] == pytest.approx(afpt["tokens_per_s"] / hf["tokens_per_s"])
    assert titan["error"].startswith("ModuleNotFoundError") and titan["torchtitan"] == "not installed"
    assert hf["profile"]["kernel_ms_per_step"]["matmul"] > 0 and afpt["profile"]["wall_ms_per_step"] > 0
    assert '| tiny | torchtitan | failed: "ModuleNotFoundError' in result.stdout and "| tiny | hf |" in result.stdout
