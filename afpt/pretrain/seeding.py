"""The seed of one reset's generator: a function of (seed, reset index, tensor name) alone."""

from __future__ import annotations

import hashlib


def reset_seed(seed: int, reset_index: int, name: str) -> int:
    """A 63-bit seed that depends only on (seed, reset index, tensor name): same on every rank."""
    digest = hashlib.sha256(f"afpt-reset:{seed}:{reset_index}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)
