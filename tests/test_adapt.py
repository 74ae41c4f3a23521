"""Adaptation: tokenizer merge, the four initialisers, freeze policies, and an end-to-end run."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from conftest import compose_config, fit, tiny_llama
from transformers import AutoModelForCausalLM, AutoTokenizer

import afpt.adapt.stage as adapt
import afpt.pretrain.stage as pretrain
from afpt import CausalLMModule
from afpt.adapt.expansion import apply_policy, changed_frozen, expand_vocabulary, frozen_snapshot
from afpt.adapt.initializers import init_from_overlap, init_mean, init_new_rows, init_random, overlap_weights
from afpt.adapt.vocab import canonical_token, merge_tokenizers, train_language_tokenizer
from afpt.data import train_tokenizer
from afpt.data.world import World
from afpt.errors import AfptError


@pytest.fixture(scope="module")
def world():
    return World()


@pytest.fixture(scope="module")
def base_tokenizer(world):
    return train_tokenizer([d for lang in ("en", "xa", "xb", "xc") for d in world.documents(lang, count=300)], 1024)


def test_merge_keeps_old_ids_reaches_size_and_shortens_new_text(world, base_tokenizer):
    new = train_language_tokenizer(base_tokenizer, world.documents("xd", count=300), 1024)
    merged = merge_tokenizers(base_tokenizer, new, 1536)
    assert len(merged) == 1536
    old_vocab = base_tokenizer.get_vocab()
    assert all(merged.get_vocab()[t] == i for t, i in old_vocab.items())
    for text in world.documents("en", "validation", count=10) + world.documents("xb", "validation", count=10):
        assert merged(text)["input_ids"] == base_tokenizer(text)["input_ids"]
        assert merged.decode(merged(text)["input_ids"]) == text
    xd = world.documents("xd", "validation", count=10)
    assert sum(len(merged(t)["input_ids"]) for t in xd) < 0.3 * sum(len(base_tokenizer(t)["input_ids"]) for t in xd)
    assert all(merged.decode(merged(t)["input_ids"]) == t for t in xd)
    with pytest.raises(AfptError, match="adapt.vocab_size=100 is smaller"):
        merge_tokenizers(base_tokenizer, new, 100)


def test_word_start_markers_match_across_bpe_flavours():
    assert (
        canonical_token("\u0120cat", byte_level=True) == canonical_token("\u2581cat", byte_level=False) == "\u2581cat"
    )
    assert canonical_token("Î¾", byte_level=True) == "ξ"


def test_random_and_mean_initialisers():
    source = torch.tensor([[1.0, 2.0], [3.0, 6.0], [5.0, 4.0]])
    a = init_random(source, 4, torch.Generator().manual_seed(0), std=0.5)
    torch.randn(10)
    random.random()
    b = init_random(source, 4, torch.Generator().manual_seed(0), std=0.5)
    assert torch.equal(a, b) and a.shape == (4, 2)
    rows = init_mean(source, 5, torch.Generator().manual_seed(0))
    assert torch.allclose(rows, torch.tensor([3.0, 4.0]).expand(5, 2), atol=1e-3)


def test_clp_is_the_normalised_cosine_average():
    source = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    helper_overlap = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    helper_new = torch.tensor([[2.0, 0.0]])
    cos = torch.tensor([1.0, 0.0, 1 / math.sqrt(2)])
    expected = cos / cos.sum()
    rows = init_from_overlap(source, torch.tensor([0, 1, 2]), helper_new, helper_overlap, "clp")
    assert torch.allclose(rows[0], expected)


def test_focus_uses_sparse_convex_sparsemax_weights():
    helper_overlap = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    weights = overlap_weights(torch.tensor([[2.0, 0.0]]), helper_overlap, "focus")[0]
    tau = (1 + 1 / math.sqrt(2) - 1) / 2  # sparsemax threshold over the two largest similarities
    assert torch.allclose(weights, torch.tensor([1 - tau, 0.0, 1 / math.sqrt(2) - tau]))
    assert weights.sum() == pytest.approx(1.0) and (weights == 0).sum() == 1


def test_clp_and_focus_need_a_helper_that_covers_new_tokens():
    source = torch.randn(5, 3)
    nan = torch.full((2, 4), float("nan"))
    for method in ("clp", "focus"):
        with pytest.raises(AfptError, match="covers none of the new tokens"):
            init_new_rows(
                method,
                source,
                2,
                torch.Generator(),
                helper_new=nan,
                helper_overlap=torch.randn(3, 4),
                overlap_source_ids=torch.tensor([0, 1, 2]),
            )
    with pytest.raises(AfptError, match="adapt.init='fasttext' is unknown"):
        init_new_rows("fasttext", source, 2, torch.Generator())


def _changed(before: dict, model) -> set[str]:
    return {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("policy", ["new_rows_and_head", "embeddings", "full"])
def test_freeze_policies_change_exactly_the_promised_tensors(policy, tied):
    model = tiny_llama(tied=tied, vocab=96)
    n_old = 80  # ids 80..95 are the "new" tokens; the random batches use all 96
    expand_vocabulary(model, n_old, 96, "mean", torch.Generator().manual_seed(0), pad_multiple=1)
    apply_policy(model, policy, n_old)
    snapshot = frozen_snapshot(model, policy, n_old)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    fit(CausalLMModule(model, lr=1e-2, warmup_fraction=0.0), [], max_steps=3)
    changed = _changed(before, model)
    assert changed_frozen(model, snapshot, n_old) == []
    body = {n for n in before if n not in ("model.embed_tokens.weight", "lm_head.weight")}
    emb = model.get_input_embeddings().weight
    if policy == "full":
        assert body <= changed
    else:
        assert not body & changed
    assert "model.embed_tokens.weight" in changed
    if policy == "new_rows_and_head":
        assert torch.equal(emb[:n_old].detach(), before["model.embed_tokens.weight"][:n_old])
        assert not torch.equal(emb[n_old:].detach(), before["model.embed_tokens.weight"][n_old:])
    if not tied:
        assert ("lm_head.weight" in changed) == (policy in ("new_rows_and_head", "full"))


def test_pretrain_then_adapt_to_a_held_out_language(tmp_path):
    base_dir = tmp_path / "pretrain"
    pretrain.run(compose_config(base_dir, ["forgetting=none", "trainer.max_steps=30"]))
    out = tmp_path / "adapt"
    cfg = compose_config(
        out,
        [
            "stage=adapt",
            f"init_from={base_dir / 'model'}",
            "adapt.languages=[xd]",
            "adapt.new_tokens=256",
            "adapt.token_budget=5000",
            "adapt.eval_docs=8",
            "adapt.val_every_n_steps=10",
        ],
    )
    metrics = adapt.run(cfg)
    assert metrics["new_tokens"] > 100 and metrics["frozen_unchanged"]
    assert metrics["trainable_parameters"]["body"] == 0
    assert metrics["after"]["xd"]["ppl_char"] < metrics["before"]["xd"]["ppl_char"] / 100
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["vocab_size_after"] == len(AutoTokenizer.from_pretrained(out / "model"))
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert model.get_input_embeddings().weight.shape[0] >= saved["vocab_size_after"]
    assert (out / "adaptation.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize("init", ["clp", "focus"])
def test_clp_and_focus_train_their_own_helper(tmp_path, init):
    base_dir = tmp_path / "pretrain"
    pretrain.run(compose_config(base_dir, ["forgetting=none", "trainer.max_steps=4"]))
    cfg = compose_config(
        tmp_path / "adapt",
        [
            "stage=adapt",
            f"init_from={base_dir / 'model'}",
            "adapt.languages=[xe]",
            f"adapt.init={init}",
            "adapt.new_tokens=128",
            "adapt.token_budget=500",
            "adapt.eval_docs=4",
            "adapt.helper.steps=5",
            "adapt.helper.batch_size=4",
        ],
    )
    metrics = adapt.run(cfg)
    assert metrics["init"] == init and metrics["fallback_rows"] == 0 and metrics["new_tokens"] > 50


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["adapt.policy=everything"], "adapt.policy='everything' is unknown"),
        (["adapt.init=fasttext"], "adapt.init='fasttext' is unknown"),
        (["adapt.vocab_size=10"], "adapt.vocab_size=10 is smaller"),
    ],
)
def test_adapt_bad_input(tmp_path, overrides, message):
    base_dir = tmp_path / "pretrain"
    pretrain.run(compose_config(base_dir, ["forgetting=none", "trainer.max_steps=2"]))
    out = tmp_path / "adapt"
    with pytest.raises(AfptError, match=message.replace("(", r"\(")):
        adapt.run(compose_config(out, ["stage=adapt", f"init_from={base_dir / 'model'}", *overrides]))
    assert not (out / "model").exists() and not (out / "metrics.json").exists()


def test_adapt_refuses_a_model_without_tokenizer_and_an_empty_corpus(tmp_path):
    model = tiny_llama(tied=True)
    model.save_pretrained(tmp_path / "bare")
    with pytest.raises(AfptError, match="holds no tokenizer"):
        adapt.run(compose_config(tmp_path / "a", ["stage=adapt", f"init_from={tmp_path / 'bare'}"]))
    base_dir = tmp_path / "pretrain"
    pretrain.run(compose_config(base_dir, ["forgetting=none", "trainer.max_steps=2"]))
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(AfptError, match="is empty"):
        adapt.run(
            compose_config(
                tmp_path / "b",
                [
                    "stage=adapt",
                    f"init_from={base_dir / 'model'}",
                    "data=files",
                    f"data.files={{xd: {empty}}}",
                    "adapt.languages=[xd]",
                ],
            )
        )
    assert not (tmp_path / "b" / "model").exists()
    sharded = ["trainer=fsdp2", "trainer.accelerator=cpu", "trainer.precision=32-true"]
    with pytest.raises(AfptError, match="stage=adapt runs on one device or under DDP"):
        adapt.run(compose_config(tmp_path / "c", ["stage=adapt", f"init_from={base_dir / 'model'}", *sharded]))
    assert not (tmp_path / "c" / "model").exists()


def test_adapt_resume_matches_an_uninterrupted_run(tmp_path):
    import shutil

    from safetensors.torch import load_file

    base_dir = tmp_path / "pretrain"
    pretrain.run(compose_config(base_dir, ["forgetting=none", "trainer.max_steps=4"]))
    common = [
        "stage=adapt",
        f"init_from={base_dir / 'model'}",
        "adapt.languages=[xd]",
        "adapt.new_tokens=128",
        "adapt.token_budget=1024",
        "adapt.eval_docs=4",
        "callbacks.model_checkpoint.every_n_train_steps=4",
        "callbacks.model_checkpoint.save_top_k=-1",
    ]
    full = tmp_path / "full"
    adapt.run(compose_config(full, common))
    resumed = tmp_path / "resumed"
    shutil.copytree(full / "tokenizer", resumed / "tokenizer")
    adapt.run(compose_config(resumed, [*common, f"ckpt_path={full / 'checkpoints' / 'step4.ckpt'}"]))
    a, b = load_file(full / "model" / "model.safetensors"), load_file(resumed / "model" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
