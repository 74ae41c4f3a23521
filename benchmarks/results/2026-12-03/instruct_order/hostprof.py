"""Diagnostic: cProfile the host over steps [start, start+n) of a Lightning run; writes $OUT/hostprof-<tag>.txt."""

import cProfile
import io
import os
import pstats
import time

import lightning.pytorch as pl
import torch


class HostProfile(pl.Callback):
    def __init__(self, tag: str, start: int = 60, n: int = 20):
        self.tag, self.start, self.n = tag, start, n
        self.prof = None
        self.t0 = None
        self.inside = 0.0
        self.tb = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.start and self.prof is None:
            torch.cuda.is_available() and torch.cuda.synchronize()
            self.prof = cProfile.Profile()
            self.t0 = time.perf_counter()
            self.prof.enable()
        self.tb = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.prof is None or self.t0 is None:
            return
        self.inside += time.perf_counter() - self.tb
        if trainer.global_step >= self.start + self.n:
            self.prof.disable()
            torch.cuda.is_available() and torch.cuda.synchronize()
            wall = time.perf_counter() - self.t0
            s = io.StringIO()
            print(
                f"{self.tag}: {self.n} steps, wall {1000 * wall / self.n:.1f} ms/step, inside batch hooks {1000 * self.inside / self.n:.1f} ms/step",
                file=s,
            )
            st = pstats.Stats(self.prof, stream=s)
            st.sort_stats("tottime").print_stats(35)
            st.sort_stats("cumulative").print_stats(60)
            os.makedirs(os.environ["OUT"], exist_ok=True)
            with open(os.path.join(os.environ["OUT"], f"hostprof-{self.tag}.txt"), "w") as f:
                f.write(s.getvalue())
            self.t0 = None
