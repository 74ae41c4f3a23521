"""The embedded synthetic world: deterministic, parallel, distinct scripts and word orders."""

from __future__ import annotations

import pytest

from afpt.data.world import World, WorldConfig


def test_world_is_deterministic_and_seeded():
    assert World(WorldConfig(seed=1)).documents("xa", count=5) == World(WorldConfig(seed=1)).documents("xa", count=5)
    assert World(WorldConfig(seed=1)).documents("xa", count=5) != World(WorldConfig(seed=2)).documents("xa", count=5)


def test_corpora_are_parallel_across_languages():
    world = World()
    fact = world.facts[0]
    en = world.sentence(fact, "en")
    assert fact.subject in en and fact.obj in en
    docs = {lang: world.documents(lang, count=3) for lang in world.languages}
    for lang, lang_docs in docs.items():
        assert [d.count(".") for d in lang_docs] == [d.count(".") for d in docs["en"]], lang


def test_synthetic_languages_share_no_letters_with_english_or_each_other():
    world = World()
    letters = {
        lang: {c for d in world.documents(lang, count=50) for c in d.lower() if c.isalpha()} for lang in world.languages
    }
    codes = list(letters)
    for i, a in enumerate(codes):
        for b in codes[i + 1 :]:
            assert not letters[a] & letters[b], (a, b)


def test_word_order_and_case_suffix():
    world = World()
    fact = next(f for f in world.facts if f.relation == "keeps")
    for lang in ("xa", "xb", "xc", "xd"):
        spec = world.languages[lang]
        words = world.sentence(fact, lang).rstrip(".").split(" ")
        positions = {slot: i for i, slot in enumerate(spec.order)}
        assert words[positions["V"]] == world.lexicons[lang]["keeps"]
        obj = words[positions["O"]]
        if spec.case_suffix:
            assert obj == world.name(fact.obj, lang) + world.lexicons[lang]["<case>"]
        else:
            assert obj == world.name(fact.obj, lang)


def test_sizes_are_configurable_and_splits_differ():
    world = World(
        WorldConfig(num_people=5, num_cities=2, num_countries=1, train_docs_per_language=7, val_docs_per_language=3)
    )
    assert len(world.entities["person"]) == 5 and len(world.facts) == 5 * 5 + 2
    assert len(world.documents("en")) == 7 and len(world.documents("en", "validation")) == 3
    assert world.documents("en", count=3) != world.documents("en", "validation")


def test_later_stages_get_questions_choices_and_pairs():
    world = World()
    question, answer, fact = world.qa_pairs("en")[0]
    assert question.endswith("?") and fact.obj in answer
    item = world.multiple_choice("xd")[0]
    assert len(item["choices"]) == 4 and len(set(item["choices"])) == 4
    assert item["choices"][item["label"]] == world.name(world.facts[0].obj, "xd")
    src, tgt = world.translation_pairs("xe")[0]
    assert src == world.sentence(world.facts[0], "en") and tgt == world.sentence(world.facts[0], "xe")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_people": 0}, "world.num_people must be a positive integer"),
        ({"pretrain_languages": ("en", "qq")}, "unknown languages"),
    ],
)
def test_bad_world_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        WorldConfig(**kwargs)
