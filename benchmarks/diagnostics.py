"""Host-side diagnostics for a benchmark's Lightning runs: every step's wall time, and a cProfile of a window of steps.

Both are plain Lightning callbacks; ``stages.py --step-times`` and ``--host-profile START N`` add them to its
instruct runs through the ``callbacks`` config group.
"""

from __future__ import annotations

import cProfile
import io
import json
import pstats
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

from afpt.artifacts.io import write_json, write_text


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class StepTimes(pl.Callback):
    """Every training step's host wall time in ms (a new batch width shows as one slow step), written as a JSON
    list to ``path`` when training ends."""

    def __init__(self, path: str):
        self.path = Path(path)
        self.last: float | None = None
        self.times: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self.last is not None:
            self.times.append(round(1000 * (now - self.last), 1))
        self.last = now

    def on_train_end(self, trainer, pl_module) -> None:
        write_json({"step_ms": self.times}, self.path)


class HostProfile(pl.Callback):
    """cProfile of the host over optimizer steps [``start``, ``start + n``), written as text to ``path``: the wall
    time per step, the time inside the batch hooks, and the top functions by own and cumulative time."""

    def __init__(self, path: str, start: int = 60, n: int = 20):
        self.path, self.start, self.n = Path(path), start, n
        self.profiler: cProfile.Profile | None = None
        self.began = self.batch_began = 0.0
        self.inside = 0.0
        self.done = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.start and self.profiler is None:
            _sync()
            self.profiler = cProfile.Profile()
            self.began = time.perf_counter()
            self.profiler.enable()
        self.batch_began = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.profiler is None or self.done:
            return
        self.inside += time.perf_counter() - self.batch_began
        if trainer.global_step >= self.start + self.n:
            self.profiler.disable()
            _sync()
            wall = time.perf_counter() - self.began
            out = io.StringIO()
            out.write(
                f"{self.n} steps from {self.start}: wall {1000 * wall / self.n:.1f} ms/step, "
                f"inside batch hooks {1000 * self.inside / self.n:.1f} ms/step\n"
            )
            stats = pstats.Stats(self.profiler, stream=out)
            stats.sort_stats("tottime").print_stats(35)
            stats.sort_stats("cumulative").print_stats(60)
            write_text(self.path, out.getvalue())
            self.done = True


def read_step_times(path: str | Path) -> list[float] | None:
    """The step times a ``StepTimes`` callback wrote, or None if it wrote none."""
    path = Path(path)
    return json.loads(path.read_text())["step_ms"] if path.is_file() else None
