"""The attention patch: afpt_sdpa drops the mask only for plain causal rows; rotary tables."""

from __future__ import annotations

import torch
from helpers import fit, loader, tiny_llama
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.masking_utils import sdpa_mask

from afpt import CausalLMModule
from afpt.speed.attention import CAUSAL_SDPA, RotaryTable, one_sequence_per_row, use_rotary_tables


def traced(model, **inputs) -> tuple[list, torch.Tensor]:
    """The nodes of the graph torch.compile traces for ``model(**inputs)``, and the logits."""
    nodes = []

    def backend(gm, example_inputs):
        nodes.extend(gm.graph.nodes)
        return gm

    torch._dynamo.reset()
    logits = torch.compile(model, backend=backend)(**inputs, use_cache=False).logits
    return nodes, logits


def sdpa_calls(model, **inputs) -> tuple[list[dict], torch.Tensor]:
    """The keyword arguments of every sdpa call in the traced graph of ``model(**inputs)``, and the logits."""
    nodes, logits = traced(model, **inputs)
    return [n.kwargs for n in nodes if n.target is torch.nn.functional.scaled_dot_product_attention], logits


def test_models_default_to_sdpa_and_keep_a_named_attention(tmp_path):
    from afpt.models import ModelConfig, build_model, load_model

    def attention(family: str, **kwargs) -> str:
        cfg = ModelConfig(family=family, vocab_size=64, hidden_size=32, num_heads=4, **kwargs)
        return build_model(cfg, 64, {}).config._attn_implementation

    assert attention("llama") == attention("mistral", num_kv_heads=2) == attention("gpt2") == "sdpa"
    assert attention("llama", attn_implementation="eager") == "eager"
    tiny_llama(tied=True).save_pretrained(tmp_path / "m")
    assert load_model(tmp_path / "m", attn_implementation="eager").config._attn_implementation == "eager"


def test_compiled_causal_sdpa_drops_the_mask_only_for_plain_rows():
    """Under torch.compile HF always materialises the mask; afpt_sdpa drops it for rows declared plain."""
    model = tiny_llama(tied=True, layers=2)
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    padding = torch.ones_like(ids)
    padding[0, :5] = 0
    reference = {mask: model(input_ids=ids, attention_mask=mask, use_cache=False).logits for mask in (None, padding)}
    stock, _ = sdpa_calls(model, input_ids=ids)
    assert stock[0]["attn_mask"] is not None and not stock[0]["is_causal"]

    model.set_attn_implementation(CAUSAL_SDPA)
    with one_sequence_per_row():
        plain, logits = sdpa_calls(model, input_ids=ids)
        padded, padded_logits = sdpa_calls(model, input_ids=ids, attention_mask=padding)
    undeclared, _ = sdpa_calls(model, input_ids=ids)
    assert len(plain) == 2 and all(c["attn_mask"] is None and c["is_causal"] for c in plain)
    assert padded[0]["attn_mask"] is not None and undeclared[0]["attn_mask"] is not None
    torch.testing.assert_close(logits, reference[None])
    torch.testing.assert_close(padded_logits[0, 5:], reference[padding][0, 5:])


def test_compiled_training_builds_no_attention_mask(monkeypatch):
    """A compiled fit (real inductor) switches sdpa models to afpt_sdpa and never builds a mask."""
    import afpt.speed.attention

    built = []

    def recording_sdpa_mask(**kwargs):
        built.append(kwargs["q_length"])
        return sdpa_mask(**kwargs)

    monkeypatch.setattr(afpt.speed.attention, "sdpa_mask", recording_sdpa_mask)
    torch._dynamo.reset()
    module = CausalLMModule(tiny_llama(tied=True), compile=True)
    trainer = fit(module, [], max_steps=2)
    trainer.validate(module, dataloaders=loader(), verbose=False)
    assert module.model.config._attn_implementation == CAUSAL_SDPA
    assert isinstance(module.model.model.rotary_emb, RotaryTable)
    assert built == []
    assert torch.isfinite(trainer.callback_metrics["val/loss"])


def test_rotary_tables_serve_the_same_cos_sin_without_recomputing_them():
    """Inside one_sequence_per_row the traced graph has no sin/cos; the logits stay bit-identical."""
    model = tiny_llama(tied=True, layers=2)
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    reference = model(input_ids=ids, use_cache=False).logits
    trig = (torch.sin, torch.cos, torch.Tensor.sin, torch.Tensor.cos, "sin", "cos")
    stock, _ = traced(model, input_ids=ids)
    assert any(n.target in trig for n in stock)

    assert use_rotary_tables(model) and isinstance(model.model.rotary_emb, RotaryTable)
    with one_sequence_per_row():
        tabled, logits = traced(model, input_ids=ids)
        longer, _ = traced(model, input_ids=torch.randint(0, 96, (1, 40)))  # past the 32-row table
    undeclared, undeclared_logits = traced(model, input_ids=ids)
    assert not any(n.target in trig for n in tabled)
    assert any(n.target in trig for n in longer) and any(n.target in trig for n in undeclared)
    assert torch.equal(logits, reference) and torch.equal(undeclared_logits, reference)
    assert not any("cos" in key or "sin" in key for key in model.state_dict())


def test_rotary_tables_can_be_turned_off_and_skip_models_without_rope():
    module = CausalLMModule(tiny_llama(tied=True), rotary_tables=False)
    fit(module, [], max_steps=1)
    assert not isinstance(module.model.model.rotary_emb, RotaryTable)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=96, n_positions=32, n_embd=32, n_layer=1, n_head=2))
    assert not use_rotary_tables(gpt2)
