"""Learning-rate schedule shapes shared by the module and the forgetting callback."""

from __future__ import annotations

import math

DECAYS = ("cosine", "linear", "constant")


def lr_factor(
    step: int, total_steps: int, warmup_steps: int, min_lr_ratio: float = 0.0, decay: str = "cosine"
) -> float:
    """Multiplier of the peak learning rate at ``step``: linear warmup, then the chosen decay."""
    if decay not in DECAYS:
        raise ValueError(f"unknown decay {decay!r}; expected one of {DECAYS}")
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if decay == "constant" or total_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if decay == "linear":
        shape = 1.0 - progress
    else:
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_lr_ratio + (1.0 - min_lr_ratio) * shape


def episode_step(step: int, total_steps: int, every_n_steps: int) -> int:
    """Chen et al.'s embedding step: the whole schedule compressed into each K-step episode."""
    return (step * max(1, total_steps // every_n_steps)) % max(1, total_steps)
