"""Hugging Face decoders built from afpt's model configs, or loaded from a directory."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AttentionInterface,
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from afpt.errors import AfptError

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


class ModelConfigError(AfptError):
    """A model config key or value that afpt cannot build a model from."""


@dataclass
class ModelConfig:
    """Architecture of a decoder; one YAML file per size under ``conf/model/``."""

    name: str = "tiny"
    """Short name used in run and report names."""
    family: str = "llama"
    """Architecture family: llama, mistral or gpt2."""
    vocab_size: int = 4096
    """Target vocabulary of a newly trained tokenizer; the embedding follows the tokenizer."""
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int | None = None
    """Key/value heads for grouped-query attention (llama, mistral); default: num_heads."""
    intermediate_size: int | None = None
    """MLP width; default: 4 x hidden_size."""
    max_position_embeddings: int = 1024
    tie_word_embeddings: bool = True
    """Share the input embedding with the output head."""
    initializer_range: float = 0.02
    """Std of the initial weights; also the default std of a forgetting reset."""
    rope_theta: float = 10000.0
    pad_vocab_to_multiple_of: int = 64
    """Round the embedding rows up to a multiple of this (faster matmuls on GPUs)."""
    attn_implementation: str = "sdpa"
    """Attention kernel: sdpa, flex_attention, eager, flash_attention_2 (compiled sdpa trains as afpt_sdpa)."""
    init_from: str | None = None
    """Load a saved model directory instead of building a new model."""
    trust_remote_code: bool = False
    """Allow custom model code from init_from (off unless you turn it on)."""

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ModelConfigError(f"model.family={self.family!r} is unknown; expected one of {sorted(FAMILIES)}")
        for key in ("vocab_size", "hidden_size", "num_layers", "num_heads", "max_position_embeddings"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ModelConfigError(f"model.{key} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ModelConfigError(
                f"model.hidden_size={self.hidden_size} is not divisible by model.num_heads={self.num_heads}"
            )

    @classmethod
    def from_mapping(cls, values: dict[str, Any]) -> ModelConfig:
        """Build from a config mapping, naming any unknown key."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ModelConfigError(f"unknown model config keys {unknown}; known keys: {sorted(known)}")
        return cls(**values)


def _llama_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    return {
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size or 4 * cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads or cfg.num_heads,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rope_theta": cfg.rope_theta,
    }


def _gpt2_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    return {
        "n_embd": cfg.hidden_size,
        "n_inner": cfg.intermediate_size or 4 * cfg.hidden_size,
        "n_layer": cfg.num_layers,
        "n_head": cfg.num_heads,
        "n_positions": cfg.max_position_embeddings,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
    }


FAMILIES: dict[str, tuple[type[PretrainedConfig], Any]] = {
    "llama": (LlamaConfig, _llama_kwargs),
    "mistral": (MistralConfig, lambda cfg: {**_llama_kwargs(cfg), "sliding_window": None}),
    "gpt2": (GPT2Config, _gpt2_kwargs),
}


def padded_vocab(n_tokens: int, multiple: int) -> int:
    """``n_tokens`` rounded up to a multiple of ``multiple``."""
    return -(-n_tokens // max(1, multiple)) * max(1, multiple)


def build_model(cfg: ModelConfig, n_tokens: int, special_ids: dict[str, int | None]) -> PreTrainedModel:
    """A freshly initialised decoder whose embedding covers ``n_tokens`` (padded)."""
    config_cls, to_kwargs = FAMILIES[cfg.family]
    config = config_cls(
        vocab_size=padded_vocab(n_tokens, cfg.pad_vocab_to_multiple_of),
        tie_word_embeddings=cfg.tie_word_embeddings,
        initializer_range=cfg.initializer_range,
        **special_ids,
        **to_kwargs(cfg),
    )
    return AutoModelForCausalLM.from_config(config, attn_implementation=cfg.attn_implementation)


def check_model_dir(path: str | Path) -> Path:
    """``path`` as a Path if it is a saved model directory with safetensors weights; else a clear error."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ModelConfigError(f"init_from={str(path)!r} is not a model directory (no config.json)")
    if not any(path.glob("*.safetensors")):
        raise ModelConfigError(f"init_from={str(path)!r} holds no *.safetensors weights; afpt loads only safetensors")
    return path


def load_model(
    path: str | Path,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
) -> PreTrainedModel:
    """Load a saved model directory (safetensors only), with a clear error if it is not one.

    ``attn_implementation``: None keeps Hugging Face's choice.
    """
    path = check_model_dir(path)
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    return AutoModelForCausalLM.from_pretrained(
        str(path), trust_remote_code=trust_remote_code, use_safetensors=True, **kwargs
    )


def count_parameters(model: PreTrainedModel) -> dict[str, int]:
    """Total parameters, and those outside the input embedding (the FLOPs-relevant count)."""
    total = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight.numel()
    return {"total": total, "non_embedding": total - embedding}
