"""Which embedding rows a reset re-initialises: every row, a seeded random fraction, or a Bernoulli draw per row.

A selection is drawn from the reset's own generator, (seed, reset index), so every rank and a resumed run pick the
same rows. ``reset_optimizer_rows_`` zeroes those rows of the optimizer state, ``blend_rows`` builds the new value.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from afpt.pretrain.seeding import reset_seed
from afpt.speed.distributed import local, local_rows


@dataclass(frozen=True)
class AllRows:
    """A full reset: the whole matrix (and its optimizer state) is redrawn."""

    subset = False

    def draw(self, n_rows: int, seed: int, reset_index: int) -> torch.Tensor | None:
        """None: every row."""
        return None


@dataclass(frozen=True)
class FractionOfRows:
    """Exactly ``round(fraction * n_rows)`` rows, a seeded random choice per reset (partial forgetting)."""

    fraction: float
    subset = True

    def draw(self, n_rows: int, seed: int, reset_index: int) -> torch.Tensor:
        """The chosen rows, sorted."""
        generator = torch.Generator().manual_seed(reset_seed(seed, reset_index, "rows"))
        return torch.randperm(n_rows, generator=generator)[: round(self.fraction * n_rows)].sort().values


@dataclass(frozen=True)
class BernoulliRows:
    """Each row independently with ``probability`` (afpt's own variant), so the count varies from reset to reset."""

    probability: float
    subset = True

    def draw(self, n_rows: int, seed: int, reset_index: int) -> torch.Tensor:
        """The drawn rows, sorted."""
        generator = torch.Generator().manual_seed(reset_seed(seed, reset_index, "rows"))
        return torch.nonzero(torch.rand(n_rows, generator=generator) < self.probability).flatten()


def row_selection(
    fraction: float = 1.0, row_probability: float | None = None
) -> AllRows | FractionOfRows | BernoulliRows:
    """The selection that ``forgetting.fraction`` and ``forgetting.row_probability`` describe."""
    if row_probability is not None:
        return BernoulliRows(float(row_probability))
    return FractionOfRows(float(fraction)) if fraction < 1.0 else AllRows()


def reset_rows(
    n_rows: int, fraction: float, seed: int, reset_index: int, row_probability: float | None = None
) -> torch.Tensor | None:
    """The rows one reset re-initialises, sorted; None for a full reset (``row_selection(...).draw``)."""
    return row_selection(fraction, row_probability).draw(n_rows, seed, reset_index)


@torch.no_grad()
def reset_optimizer_rows_(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], rows: torch.Tensor) -> None:
    """Zero the rows ``rows`` of every per-element state tensor (Adam's moments) of ``params``, in place.

    Per-tensor entries (Adam's ``step``) are left alone: the other rows keep training on the same step count.
    Under FSDP2 each rank zeroes the reset rows that fall in its own shard.
    """
    for param in params:
        for value in (optimizer.state.get(param) or {}).values():
            if torch.is_tensor(value) and value.shape == param.shape:
                local(value)[local_rows(value, rows)] = 0


def blend_rows(current: torch.Tensor, fresh: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``current`` with ``rows`` taken from ``fresh`` (a 1-D bias: the same entries)."""
    out = current.clone()
    out[rows.to(out.device)] = fresh[rows.to(fresh.device)]
    return out
