"""Print a chat completion from a saved model: ``afpt stage=generate init_from=<dir> prompt="..."``."""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig

from afpt.data import load_tokenizer
from afpt.errors import AfptError
from afpt.instruct.chat import IM_END
from afpt.models import check_model_dir, load_model


def run(cfg: DictConfig) -> dict[str, Any]:
    """Answer ``prompt`` (with an optional ``stage.system`` message) and print the reply."""
    init_from = cfg.init_from
    if not init_from or not cfg.get("prompt"):
        raise AfptError('stage=generate needs init_from=<model dir> and prompt="..."')
    check_model_dir(init_from)
    tokenizer = load_tokenizer(init_from)
    if not tokenizer.chat_template:
        raise AfptError(f"{init_from!r} has no chat template; instruction-tune it first (stage=instruct)")
    model = load_model(init_from).eval()
    messages = ([{"role": "system", "content": cfg.stage.system}] if cfg.stage.system else []) + [
        {"role": "user", "content": cfg.prompt}
    ]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    torch.manual_seed(cfg.seed)
    with torch.no_grad():
        out = model.generate(
            **inputs,
            max_new_tokens=cfg.stage.max_new_tokens,
            do_sample=cfg.stage.temperature > 0,
            temperature=cfg.stage.temperature or None,
        )
    reply = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :]).split(IM_END)[0].strip()
    print(reply)
    return {"stage": "generate", "prompt": cfg.prompt, "reply": reply}
