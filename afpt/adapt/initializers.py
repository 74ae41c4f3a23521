"""Initialisers for the embedding rows of new tokens: pure functions, seeded by a local generator.

Each takes the source matrix (rows of the old vocabulary) and returns the rows of the new tokens;
``clp`` and ``focus_helper`` also take the embeddings of a helper model that knows the new vocabulary;
``focus`` (the official FOCUS, fastText similarities) lives in ``afpt.adapt.focus``.
"""

from __future__ import annotations

import torch
from entmax import sparsemax

from afpt.errors import AfptError

INITIALIZERS = ("random", "mean", "clp", "focus", "focus_helper")
# The initialisers whose similarities come from afpt's helper decoder.
HELPER_INITIALIZERS = ("clp", "focus_helper")


def init_random(source: torch.Tensor, n_new: int, generator: torch.Generator, std: float = 0.02) -> torch.Tensor:
    """N(0, std) rows."""
    return torch.randn(n_new, source.shape[1], generator=generator) * std


def init_mean(source: torch.Tensor, n_new: int, generator: torch.Generator, epsilon: float = 1e-9) -> torch.Tensor:
    """transformers' mean resizing: rows drawn from N(mean, epsilon * covariance) of the old rows.

    Falls back to the mean itself when the scaled covariance is not positive definite, as transformers does.
    """
    old = source.float()
    mean = old.mean(dim=0)
    centered = old - mean
    covariance = centered.T @ centered / old.shape[0]
    factor, info = torch.linalg.cholesky_ex(epsilon * covariance)
    if int(info) != 0:
        return mean.expand(n_new, -1).clone()
    noise = torch.randn(n_new, old.shape[1], generator=generator)
    return mean + noise @ factor.T


def clp_weights(sims: torch.Tensor) -> torch.Tensor:
    """CLP-Transfer: cos / sum(cos) over all overlapping tokens."""
    return sims / sims.sum(dim=1, keepdim=True)


def focus_helper_weights(sims: torch.Tensor) -> torch.Tensor:
    """sparsemax(cos): a sparse convex combination (FOCUS's weighting over the helper decoder's embeddings)."""
    return sparsemax(sims, dim=1)


# The adapt.init values that weight overlapping tokens' rows, and how.
OVERLAP_WEIGHTS = {"clp": clp_weights, "focus_helper": focus_helper_weights}


def overlap_weights(helper_new: torch.Tensor, helper_overlap: torch.Tensor, method: str) -> torch.Tensor:
    """Weights (n_new x n_overlap) over overlapping tokens from cosine similarities in the helper space, by the
    ``OVERLAP_WEIGHTS`` entry ``method`` names."""
    if method not in OVERLAP_WEIGHTS:
        raise AfptError(f"adapt.init={method!r} has no overlap weights; expected one of {sorted(OVERLAP_WEIGHTS)}")
    sims = (
        torch.nn.functional.normalize(helper_new.float(), dim=1)
        @ torch.nn.functional.normalize(helper_overlap.float(), dim=1).T
    )
    return OVERLAP_WEIGHTS[method](sims)


def init_from_overlap(
    source: torch.Tensor,
    overlap_source_ids: torch.Tensor,
    helper_new: torch.Tensor,
    helper_overlap: torch.Tensor,
    method: str,
) -> torch.Tensor:
    """New rows as weighted sums of the source rows of overlapping tokens (CLP or FOCUS weights)."""
    if len(overlap_source_ids) == 0:
        raise AfptError(f"adapt.init={method}: the helper's vocabulary shares no token with the model's vocabulary")
    weights = overlap_weights(helper_new, helper_overlap, method)
    return weights @ source.float()[overlap_source_ids]


def init_new_rows(
    method: str,
    source: torch.Tensor,
    n_new: int,
    generator: torch.Generator,
    std: float = 0.02,
    helper_new: torch.Tensor | None = None,
    helper_overlap: torch.Tensor | None = None,
    overlap_source_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int]:
    """Rows for ``n_new`` new tokens by ``method``; returns (rows, rows that fell back to N(mean, std)).

    For ``clp``/``focus_helper``: ``helper_new`` holds the helper's embedding of each new token (a NaN row
    where the helper lacks the token), ``helper_overlap`` its embeddings of the overlapping tokens,
    whose source rows are ``overlap_source_ids``.
    """
    if method not in INITIALIZERS:
        raise AfptError(f"adapt.init={method!r} is unknown; expected one of {INITIALIZERS}")
    if method == "random":
        return init_random(source, n_new, generator, std), 0
    if method == "mean":
        return init_mean(source, n_new, generator), 0
    if method == "focus":
        raise AfptError("adapt.init=focus rows come from afpt.adapt.focus.focus_rows (given_rows)")
    if helper_new is None or not torch.isfinite(helper_new).all(dim=1).any():
        raise AfptError(f"adapt.init={method}: the helper's tokenizer covers none of the new tokens")
    rows = init_from_overlap(source, overlap_source_ids, helper_new, helper_overlap, method)
    bad = ~torch.isfinite(rows).all(dim=1)
    if bad.any():
        old = source.float()
        rows[bad] = old.mean(0) + old.std(0) * torch.randn(int(bad.sum()), old.shape[1], generator=generator)
    return rows, int(bad.sum())
