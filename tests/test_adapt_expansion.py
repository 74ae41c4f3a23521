"""Vocabulary merging, new-row initialisers and freeze policies."""

from __future__ import annotations

import math
import random

import pytest
import torch
from helpers import fit, tiny_llama

from afpt import CausalLMModule
from afpt.adapt.expansion import NewRowsHead, apply_policy, changed_frozen, expand_vocabulary, frozen_snapshot
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


def test_focus_helper_uses_sparse_convex_sparsemax_weights():
    helper_overlap = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    weights = overlap_weights(torch.tensor([[2.0, 0.0]]), helper_overlap, "focus_helper")[0]
    tau = (1 + 1 / math.sqrt(2) - 1) / 2  # sparsemax threshold over the two largest similarities
    assert torch.allclose(weights, torch.tensor([1 - tau, 0.0, 1 / math.sqrt(2) - tau]))
    assert weights.sum() == pytest.approx(1.0) and (weights == 0).sum() == 1


def test_clp_and_focus_helper_need_a_helper_that_covers_new_tokens():
    source = torch.randn(5, 3)
    nan = torch.full((2, 4), float("nan"))
    for method in ("clp", "focus_helper"):
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
@pytest.mark.parametrize("policy", ["new_rows_and_head", "embeddings", "embeddings_and_head", "full"])
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
        assert ("lm_head.weight" in changed) == (policy in ("new_rows_and_head", "embeddings_and_head", "full"))


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_reinit_all_rows_redraws_every_row_at_the_new_size(tied):
    from afpt.adapt.expansion import reinit_all_rows

    model = tiny_llama(tied=tied, vocab=96)
    body = {n: p.detach().clone() for n, p in model.named_parameters() if "embed" not in n and "lm_head" not in n}
    old = model.get_input_embeddings().weight.detach().clone()
    reinit_all_rows(model, 70, torch.Generator().manual_seed(3), pad_multiple=8)
    emb = model.get_input_embeddings().weight.detach()
    assert emb.shape == (72, 32) and not emb[0].any()  # padded to 72 rows; the pad row (id 0) is zero
    assert (emb[1:] != old[1:72]).any(dim=1).all() and 0.015 < emb[1:].std() < 0.025
    head = model.get_output_embeddings().weight.detach()
    assert head.shape == (72, 32) and (tied == (head.data_ptr() == emb.data_ptr()))
    assert all(torch.equal(body[n], p) for n, p in model.named_parameters() if n in body)


def test_new_rows_policy_zeroes_exactly_the_old_rows_gradient():
    """The embedding's gradient keeps the new rows' values bit for bit and is 0 on every old row."""
    model = tiny_llama(tied=True, vocab=96)
    ids = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    full = model.get_input_embeddings().weight.grad.clone()
    model.zero_grad(set_to_none=True)
    apply_policy(model, "new_rows_and_head", 80)
    model(input_ids=ids, labels=ids).loss.backward()
    grad = model.get_input_embeddings().weight.grad
    assert torch.equal(grad[:80], torch.zeros_like(grad[:80])) and full[:80].abs().sum() > 0
    assert torch.equal(grad[80:], full[80:]) and full[80:].abs().sum() > 0


@pytest.mark.parametrize("how", ["eager", "bf16_autocast", "compiled"])
def test_new_rows_head_skips_the_old_rows_weight_gradient_and_keeps_the_rest(how):
    """The tied head of ``new_rows_and_head`` gives the plain head's logits and hidden-state gradient, the plain
    head's weight gradient on the new rows, and exact zeros on the old rows (which the plain head fills)."""
    weight = torch.nn.Parameter(torch.randn(96, 32, generator=torch.Generator().manual_seed(0)))
    hidden = torch.randn(4, 16, 32, generator=torch.Generator().manual_seed(1))
    head = NewRowsHead(weight, 80)
    run = torch.compile(head, backend="aot_eager", fullgraph=True) if how == "compiled" else head
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=how == "bf16_autocast")
    results = []
    for forward in (lambda h: torch.nn.functional.linear(h, weight), run):
        h = hidden.clone().requires_grad_(True)
        with autocast:
            logits = forward(h)
        (logits.float().square().sum() / 100).backward()
        results.append((logits.detach(), h.grad, weight.grad))
        weight.grad = None
    (plain_logits, plain_dh, plain_dw), (logits, dh, dw) = results
    assert logits.dtype == plain_logits.dtype == (torch.bfloat16 if how == "bf16_autocast" else torch.float32)
    assert torch.equal(logits, plain_logits)
    assert dw.dtype == torch.float32 and dh.dtype == torch.float32
    assert torch.equal(dw[:80], torch.zeros_like(dw[:80])) and plain_dw[:80].abs().sum() > 0
    torch.testing.assert_close(dw[80:], plain_dw[80:])
    torch.testing.assert_close(dh, plain_dh)


def test_new_rows_policy_installs_its_head_only_on_a_tied_model_and_saves_plain_weights(tmp_path):
    tied, untied = tiny_llama(tied=True), tiny_llama(tied=False)
    apply_policy(tied, "new_rows_and_head", 80)
    apply_policy(untied, "new_rows_and_head", 80)
    assert isinstance(tied.get_output_embeddings(), NewRowsHead)
    assert tied.get_output_embeddings().weight is tied.get_input_embeddings().weight
    assert type(untied.get_output_embeddings()) is torch.nn.Linear
    embeddings = tiny_llama(tied=True)
    apply_policy(embeddings, "embeddings", 80)
    assert type(embeddings.get_output_embeddings()) is torch.nn.Linear
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    tied.save_pretrained(tmp_path)
    reloaded = type(tied).from_pretrained(tmp_path)
    assert type(reloaded.get_output_embeddings()) is torch.nn.Linear
    assert reloaded.get_output_embeddings().weight is reloaded.get_input_embeddings().weight
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, tied(input_ids=ids).logits)


def test_official_focus_copies_shared_rows_and_makes_new_rows_convex_combinations(base_model, tmp_path):
    pytest.importorskip("deepfocus")
    from helpers import compose_config

    from afpt.adapt.focus import focus_rows
    from afpt.adapt.vocab import merge_tokenizers, train_language_tokenizer
    from afpt.data import load_corpus, load_tokenizer

    base = load_tokenizer(base_model)
    corpus = load_corpus(compose_config(tmp_path).data, ["xd"])
    texts = corpus.train["xd"]["text"]
    merged = merge_tokenizers(base, train_language_tokenizer(base, texts, len(base) + 64), len(base) + 64)
    n_old = len(base)
    # One-hot source rows: a row FOCUS builds as a combination of shared tokens' rows shows its weights.
    source = torch.eye(n_old)
    rows = focus_rows(source, base, merged, texts, tmp_path, seed=0, min_count=2)
    assert rows.shape == (len(merged), n_old)
    # Shared tokens are copied: each old token's row is a source row, its own unless its text is a control
    # character or part of a UTF-8 character (FOCUS gives such tokens one canonical form and copies the first).
    assert torch.equal(rows[:n_old].sum(dim=1), torch.ones(n_old)) and torch.equal(
        rows[:n_old].amax(dim=1), torch.ones(n_old)
    )
    texts_of = [base.convert_tokens_to_string([t]) for t in base.convert_ids_to_tokens(list(range(n_old)))]
    whole = [i for i, text in enumerate(texts_of) if text.isprintable() and "\ufffd" not in text]
    assert len(whole) > n_old / 2 and torch.equal(rows[whole], source[whole])
    new = rows[n_old:]
    convex = (new >= 0).all(dim=1) & ((new.sum(dim=1) - 1).abs() < 1e-5)
    # The others are FOCUS's N(mean, std) rows for tokens seen fewer than min_count times (no fastText vector).
    assert convex.float().mean() > 0.75, "most new rows are convex combinations of shared tokens' rows"
    assert ((new[convex] > 0).sum(dim=1) < n_old).all()  # sparsemax: sparse weights
    again = focus_rows(source, base, merged, texts, tmp_path, seed=0, min_count=2)
    torch.manual_seed(123)  # other code touching the global RNG changes nothing
    assert torch.equal(rows, again)
