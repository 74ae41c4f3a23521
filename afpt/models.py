"""Hugging Face decoders built from afpt's model configs, or loaded from a directory."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

import afpt.speed.attention  # noqa: F401  (registers the afpt_sdpa attention that compiled models train with)
from afpt.artifacts.io import atomic_save
from afpt.errors import AfptError


class ModelConfigError(AfptError):
    """A model config key or value that afpt cannot build a model from."""


TARGET = "afpt.models.ModelConfig"
"""The ``_target_`` of the ``model`` config group."""


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
        """Build from a config mapping (``conf/model/``'s, whose ``_target_`` names this class), naming any unknown
        key."""
        values = dict(values)
        target = values.pop("_target_", None)
        if target is not None and target != TARGET:
            from hydra.utils import get_class

            try:
                cls = get_class(target)
            except Exception as err:
                raise ModelConfigError(f"model._target_={target!r} cannot be imported: {err}") from None
            if not (isinstance(cls, type) and issubclass(cls, ModelConfig)):
                raise ModelConfigError(f"model._target_={target!r} must name {TARGET} or a subclass of it")
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


def check_model_dir(path: str | Path, trust_remote_code: bool = False) -> Path:
    """``path`` as a Path if it is a saved model directory afpt can load safely; else a clear error.

    Checked without loading the weights: a ``config.json`` of a Hugging Face architecture (custom code,
    ``auto_map``, only with ``trust_remote_code``) and readable ``*.safetensors`` headers.
    """
    path = Path(path)
    where = f"init_from={str(path)!r}"
    if not (path / "config.json").is_file():
        raise ModelConfigError(f"{where} is not a model directory (no config.json)")
    try:
        config = json.loads((path / "config.json").read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ModelConfigError(f"{where}: config.json is not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise ModelConfigError(f"{where}: config.json is not a JSON object")
    model_type, custom = config.get("model_type"), bool(config.get("auto_map"))
    if model_type not in CONFIG_MAPPING and not (custom and trust_remote_code):
        why = (
            " it names custom code (auto_map), which afpt runs only with model.trust_remote_code=true;"
            if custom
            else ""
        )
        raise ModelConfigError(
            f"{where}: config.json model_type={model_type!r} is not a Hugging Face architecture;{why} "
            "expected a decoder such as llama, mistral or gpt2"
        )
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        raise ModelConfigError(f"{where} holds no *.safetensors weights; afpt loads only safetensors")
    for file in weights:
        try:
            with safe_open(file, framework="pt"):
                pass
        except (SafetensorError, OSError) as err:
            raise ModelConfigError(f"{where}: {file.name} is not a readable safetensors file ({err})") from None
    return path


def load_model(
    path: str | Path,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
) -> PreTrainedModel:
    """Load a saved model directory (safetensors only), with a clear error if it is not one.

    ``attn_implementation``: None keeps Hugging Face's choice.
    """
    path = check_model_dir(path, trust_remote_code)
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    return AutoModelForCausalLM.from_pretrained(
        str(path), trust_remote_code=trust_remote_code, use_safetensors=True, **kwargs
    )


def count_parameters(model: PreTrainedModel) -> dict[str, int]:
    """Total parameters, and those outside the input embedding (the FLOPs-relevant count)."""
    total = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight.numel()
    return {"total": total, "non_embedding": total - embedding}


def is_tied(model: torch.nn.Module) -> bool:
    """True when the output head shares its weight tensor with the input embedding."""
    head = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    return head is not None and head.weight is model.get_input_embeddings().weight


def untied_head(model: torch.nn.Module) -> torch.nn.Module | None:
    """The output head module when it has weights of its own; None when it is tied or absent."""
    head = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    return None if head is None or is_tied(model) else head


def save_model_dir(
    model: PreTrainedModel, tokenizer, path: Path, state_dict: dict[str, torch.Tensor] | None = None
) -> Path:
    """Save a model and its tokenizer (if any) as one Hugging Face directory, atomically.

    ``state_dict``: the full weights gathered from a sharded model (FSDP); default: the model's own.
    """

    def save(tmp: Path) -> None:
        model.save_pretrained(tmp, state_dict=state_dict)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, obj in (("config.json", model), ("tokenizer_config.json", tokenizer)):
            _drop_auto_map(tmp / name, obj)

    return atomic_save(save, path)


def _drop_auto_map(path: Path, obj: Any) -> None:
    """Remove an ``auto_map`` an input model carried into a file that afpt's own (built-in) classes wrote, so
    the output never points a later ``trust_remote_code`` load at code afpt did not run."""
    if not path.is_file() or not type(obj).__module__.startswith("transformers."):
        return
    config = json.loads(path.read_text())
    if config.pop("auto_map", None) is not None:
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def on_eval_device(model: PreTrainedModel, device: str = "auto") -> Iterator[torch.device]:
    """Within, ``model`` is on the GPU when there is one (``device="auto"``) or on ``device``, in eval mode;
    afterwards it is back on the CPU in the mode it had."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    was_training = model.training
    model.to(device).eval()
    try:
        yield torch.device(device)
    finally:
        model.cpu().train(was_training)


def find_model(pl_module: torch.nn.Module) -> torch.nn.Module:
    """The module that owns the token embeddings: ``pl_module`` itself or its ``.model``."""
    for candidate in (pl_module, getattr(pl_module, "model", None)):
        if candidate is not None and callable(getattr(candidate, "get_input_embeddings", None)):
            return candidate
    raise TypeError(
        f"{type(pl_module).__name__} exposes no get_input_embeddings(), neither itself nor on its .model attribute; "
        "ActiveForgetting needs one of them"
    )
