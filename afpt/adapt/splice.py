"""``stage=splice``: one model from two, Chen et al.'s assembly step (``fb_sweep/splice_emb_body.py``).

The body (every weight but the token embeddings and an untied head) comes from ``splice.body_from``, e.g. a
model instruction-tuned in English with its embeddings frozen (``instruct.freeze_embeddings=true``); the token
embeddings, an untied head, the tokenizer and the vocabulary come from ``init_from``, e.g. the same pretrained
model relearned on a new language (``stage=adapt adapt.tokenizer=replace``). Both must share the architecture.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from transformers import PreTrainedModel

from afpt.app.stages import init_from
from afpt.artifacts.io import write_json
from afpt.data import load_tokenizer
from afpt.errors import AfptError
from afpt.models import check_model_dir, is_tied, load_model, save_model_dir, untied_head

SHAPE_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "tie_word_embeddings")


def vocabulary_parameters(model: PreTrainedModel) -> list[torch.nn.Parameter]:
    """The parameters that belong to a vocabulary: the input embedding and an untied head (weight, bias)."""
    head = untied_head(model)
    return [model.get_input_embeddings().weight] + ([] if head is None else list(head.parameters()))


@torch.no_grad()
def splice_models(body: PreTrainedModel, vocabulary: PreTrainedModel) -> PreTrainedModel:
    """``body`` with ``vocabulary``'s token embeddings (and untied head) in place of its own, resized to them."""
    b, v = body.config.to_dict(), vocabulary.config.to_dict()
    differ = [f"{k}: {b.get(k)} vs {v.get(k)}" for k in SHAPE_KEYS if b.get(k) != v.get(k)]
    if differ:
        raise AfptError(f"splice: the body and the embeddings come from different architectures ({'; '.join(differ)})")
    body.resize_token_embeddings(vocabulary.get_input_embeddings().weight.shape[0], mean_resizing=False)
    for target, source in zip(vocabulary_parameters(body), vocabulary_parameters(vocabulary)):
        target.copy_(source)
    for key in ("vocab_size", "pad_token_id", "bos_token_id", "eos_token_id"):
        setattr(body.config, key, getattr(vocabulary.config, key))
    return body


def run(cfg: DictConfig) -> dict[str, Any]:
    """Splice ``splice.body_from``'s body with ``init_from``'s embeddings; write ``model/`` and ``metrics.json``."""
    wall_start = time.perf_counter()
    vocabulary_dir = check_model_dir(init_from(cfg, "splice"))
    if not cfg.splice.body_from:
        raise AfptError("stage=splice needs splice.body_from=<the model directory whose body is kept>")
    body_dir = check_model_dir(cfg.splice.body_from)
    tokenizer = load_tokenizer(vocabulary_dir)
    model = splice_models(load_model(body_dir), load_model(vocabulary_dir))
    run_dir = Path(cfg.paths.run_dir)
    save_model_dir(model, tokenizer, run_dir / "model")
    metrics = {
        "stage": "splice",
        "body_from": str(body_dir),
        "embeddings_from": str(vocabulary_dir),
        "vocab_size": len(tokenizer),
        "tied_head": int(is_tied(model)),
        "wall_time_s": round(time.perf_counter() - wall_start, 2),
    }
    write_json(metrics, run_dir / "metrics.json")
    return metrics
