"""A callback that writes each training step's wall time (ms) to $OUT/steps-<tag>.json at the end of the run."""

import json
import os
import time

import lightning.pytorch as pl


class StepTimes(pl.Callback):
    """Time every training step, host side (a new batch width shows as one slow step)."""

    def __init__(self, tag: str):
        self.tag, self.t, self.times = tag, None, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        now = time.perf_counter()
        if self.t is not None:
            self.times.append(round(1000 * (now - self.t), 1))
        self.t = now

    def on_train_end(self, trainer, pl_module):
        with open(os.path.join(os.environ["OUT"], f"steps-{self.tag}.json"), "w") as f:
            json.dump(self.times, f)
