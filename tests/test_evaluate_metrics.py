"""Perplexity against a hand computation, and isotropy."""

from __future__ import annotations

import math

import pytest
import torch

from afpt.data import load_tokenizer
from afpt.evaluate.metrics import random_pair_baseline, sample_occurrences, self_similarity, text_nll
from afpt.models import load_model


def test_perplexity_matches_a_hand_computation(base_model):
    model, tokenizer = load_model(base_model), load_tokenizer(base_model)
    texts = ["Lano is a city in Widamu.", "Kefo lives in Lano and likes tea.", "x"]
    out = text_nll(model, tokenizer, texts, max_length=64, batch_size=2)
    nll, count, chars = 0.0, 0, 0
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            logp = torch.log_softmax(model(torch.tensor([[tokenizer.eos_token_id, *ids]])).logits[0, :-1].float(), -1)
            nll -= float(logp[torch.arange(len(ids)), torch.tensor(ids)].sum())
            count += len(ids)
            chars += len(text)
    assert out["tokens"] == count and out["chars"] == chars
    assert out["ppl_token"] == pytest.approx(math.exp(nll / count), rel=1e-4)
    assert out["ppl_char"] == pytest.approx(math.exp(nll / chars), rel=1e-4)
    assert out["ppl_byte"] == pytest.approx(out["ppl_char"], rel=1e-6)  # ASCII text: one byte per character


def test_self_similarity_of_identical_vectors_is_one_and_of_random_ones_about_zero():
    same = {"a": torch.ones(5, 16), "b": torch.arange(16.0).repeat(4, 1)}
    assert self_similarity(same) == pytest.approx(1.0)
    generator = torch.Generator().manual_seed(0)
    noise = {w: torch.randn(10, 4096, generator=generator) for w in "abcdef"}
    assert abs(self_similarity(noise)) < 0.01
    assert abs(random_pair_baseline(noise, 500, seed=0)) < 0.01


def test_baseline_subtraction_on_a_hand_made_example():
    vectors = {"a": torch.tensor([[1.0, 0.0], [0.6, 0.8]]), "b": torch.tensor([[0.0, 1.0], [0.0, 2.0]])}
    # a: cos 0.6; b: cos 1.0 -> self-similarity 0.8. Cross pairs: cos 0 or 0.8, each half the time -> 0.4.
    assert self_similarity(vectors) == pytest.approx(0.8)
    baseline = random_pair_baseline(vectors, 20000, seed=1)
    assert baseline == pytest.approx(0.4, abs=0.01)
    assert self_similarity(vectors) - baseline == pytest.approx(0.4, abs=0.01)


def test_sampled_occurrences_cover_the_word_in_distinct_documents(base_model):
    tokenizer = load_tokenizer(base_model)
    texts = ["the cat sat", "a cat ran far", "my cat", "no dog here", "the dog ran"]
    occ = sample_occurrences(tokenizer, texts, words=10, contexts=2, max_length=32, seed=0)
    assert set(occ) == {"cat", "the", "dog", "ran"}
    for word, places in occ.items():
        assert len({d for d, _ in places}) == 2
        for doc, positions in places:
            ids = tokenizer(texts[doc], add_special_tokens=False)["input_ids"]
            assert tokenizer.decode([ids[p] for p in positions]).strip() == word
