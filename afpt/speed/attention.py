"""The attention patch: plain causal rows train on sdpa's unmasked (flash / cuDNN) kernels under
``torch.compile``, and rotary cos/sin come from a table computed once."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

CAUSAL_SDPA = "afpt_sdpa"
"""Attention implementation afpt trains compiled sdpa models with (see ``causal_sdpa_mask``)."""

_one_sequence_per_row = False


@contextlib.contextmanager
def one_sequence_per_row() -> Iterator[None]:
    """Declare that, within, every input row is one causal sequence at positions 0..L-1.

    No padding and no packed documents with restarting positions: afpt's pretraining batches, which pass
    neither an attention mask nor position ids. ``causal_sdpa_mask`` then drops the mask.
    """
    global _one_sequence_per_row
    previous, _one_sequence_per_row = _one_sequence_per_row, True
    try:
        yield
    finally:
        _one_sequence_per_row = previous


def causal_sdpa_mask(
    *,
    q_length: int,
    kv_length: int,
    q_offset: Any = 0,
    kv_offset: int = 0,
    attention_mask: Any = None,
    local_size: int | None = None,
    **kwargs: Any,
) -> Any:
    """Hugging Face's ``sdpa_mask``, but no mask at all for plain causal rows under ``torch.compile``.

    sdpa runs its flash and cuDNN kernels only without a mask (``is_causal=True``). Hugging Face drops the
    mask only outside tracing: a compiled model cannot read its position ids to rule out packed
    sequences, so with torch < 2.14 it always gets a materialised ``batch x 1 x seq x seq`` mask and sdpa
    falls back to its masked kernels. Inside ``one_sequence_per_row()`` the caller has ruled packing out;
    the mask is then dropped when nothing else shapes it (no padding mask, no cache offset, no sliding
    window, as many queries as keys). Every other call goes to ``sdpa_mask`` unchanged. The flag is a
    module global, so a compiled graph is guarded on it.
    """
    if (
        _one_sequence_per_row
        and attention_mask is None
        and local_size is None
        and isinstance(q_offset, int)
        and q_offset == 0
        and kv_offset == 0
        and q_length == kv_length
    ):
        return None
    return sdpa_mask(
        q_length=q_length,
        kv_length=kv_length,
        q_offset=q_offset,
        kv_offset=kv_offset,
        attention_mask=attention_mask,
        local_size=local_size,
        **kwargs,
    )


class RotaryTable(torch.nn.Module):
    """A rotary embedding whose cos/sin for positions ``0..n-1`` are computed once, then sliced.

    Wraps a Hugging Face rotary embedding (``forward(x, position_ids) -> (cos, sin)``). The table comes
    from the wrapped module's own forward, so its RoPE type and scaling hold. Inside
    ``one_sequence_per_row()`` the positions of ``L`` tokens are ``0..L-1``, and the table's first ``L``
    rows are returned. Anywhere else, or past the table, the wrapped module runs as before. Under
    ``torch.compile`` this keeps inductor from recomputing fp32 ``sin`` / ``cos`` inside every fused
    RoPE kernel of the forward and backward passes.
    """

    def __init__(self, rotary: torch.nn.Module, positions: int) -> None:
        super().__init__()
        self.rotary = rotary
        inv_freq = rotary.inv_freq
        probe = torch.zeros(0, dtype=torch.float32, device=inv_freq.device)
        cos, sin = rotary(probe, torch.arange(positions, device=inv_freq.device)[None])
        self.cos = torch.nn.Buffer(cos[0], persistent=False)
        self.sin = torch.nn.Buffer(sin[0], persistent=False)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)`` for ``position_ids``, each ``batch x L x head_dim`` in ``x``'s dtype."""
        length = position_ids.shape[-1]
        if not _one_sequence_per_row or length > self.cos.shape[0]:
            return self.rotary(x, position_ids)
        return self.cos[None, :length].to(x.dtype), self.sin[None, :length].to(x.dtype)


def use_rotary_tables(model: PreTrainedModel) -> bool:
    """Put a ``RotaryTable`` (as long as the model's ``max_position_embeddings``) in place of its RoPE.

    Returns whether the model has a rotary embedding (``base_model.rotary_emb``) now served by a table.
    """
    base = model.base_model
    rotary = getattr(base, "rotary_emb", None)
    positions = getattr(model.config, "max_position_embeddings", None)
    if rotary is None or positions is None or not hasattr(rotary, "inv_freq"):
        return False
    if not isinstance(rotary, RotaryTable):
        base.rotary_emb = RotaryTable(rotary, positions)
    return True


AttentionInterface.register(CAUSAL_SDPA, sdpa_attention_forward)
AttentionMaskInterface.register(CAUSAL_SDPA, causal_sdpa_mask)
