"""Timing and loss readings without a host sync: a sync would wait for every queued training step."""

from __future__ import annotations

import time
from typing import Any

import torch


class HostCopy:
    """A device scalar on its way to the host: copied without waiting, read once the copy has landed."""

    def __init__(self, value: torch.Tensor) -> None:
        value = value.detach()
        if value.device.type == "cuda":
            self._host = torch.empty((), dtype=value.dtype, pin_memory=True)
            self._host.copy_(value, non_blocking=True)
            self._done: torch.cuda.Event | None = torch.cuda.Event()
            self._done.record()
        else:
            self._host, self._done = value.clone(), None

    def ready(self) -> bool:
        """Whether the copy has landed."""
        return self._done is None or self._done.query()

    def value(self) -> float:
        """The value (waits for the copy if it has not landed)."""
        if self._done is not None:
            self._done.synchronize()
        return float(self._host)


class ResetTimer:
    """Times a reset without a host sync: GPU time between two CUDA events (wall time on CPU), plus the
    host time spent issuing it. A sync would also wait for every queued training step."""

    def __init__(self, device: torch.device) -> None:
        self._events: tuple[torch.cuda.Event, torch.cuda.Event] | None = None
        if device.type == "cuda":
            self._events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            self._events[0].record()
        self._start = time.perf_counter()

    def stop(self) -> tuple[float | ResetTimer, float]:
        """End the timing: (duration, or this timer while the GPU has not run the reset yet; host ms)."""
        host_ms = 1000 * (time.perf_counter() - self._start)
        if self._events is None:
            return host_ms, host_ms
        self._events[1].record()
        return self, host_ms

    def ready(self) -> bool:
        """Whether the GPU has run the reset."""
        return self._events is None or self._events[1].query()

    def value(self) -> float:
        """GPU milliseconds of the reset (waits for it if it has not run yet)."""
        self._events[1].synchronize()
        return self._events[0].elapsed_time(self._events[1])


def step_loss(outputs: Any, accumulate_grad_batches: int) -> torch.Tensor | None:
    """The micro-batch loss from ``training_step`` outputs, undoing Lightning's accumulation scaling."""
    loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
    if not torch.is_tensor(loss):
        return None
    return loss.detach() * accumulate_grad_batches


def settle(entries: list[dict[str, Any]], wait: bool) -> list[dict[str, Any]]:
    """Replace the ``HostCopy`` / ``ResetTimer`` values of ``entries`` by numbers once all of an entry's have
    landed (with ``wait``: at once); returns the entries that still hold some."""
    still = []
    for entry in entries:
        pending = {k: v for k, v in entry.items() if isinstance(v, (HostCopy, ResetTimer))}
        if wait or all(v.ready() for v in pending.values()):
            entry.update({k: v.value() for k, v in pending.items()})
        else:
            still.append(entry)
    return still
