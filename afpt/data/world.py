"""A deterministic synthetic multilingual world: the embedded default corpus of afpt.

A small knowledge base (people, cities, countries and their attributes) is realised as parallel
text in English and in invented languages. Each invented language has its own lexicon, its own
script (so it shares almost no subwords with English or with the others), its own word order and,
optionally, an object case suffix. The same generator yields training documents, validation
documents, English question/answer pairs, multiple-choice items and translation pairs, so every
stage of afpt can run offline.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice

# One 26-letter alphabet per script; a latin word is written in a script letter by letter.
_LATIN = "abcdefghijklmnopqrstuvwxyz"
SCRIPTS: dict[str, str] = {
    "latin": _LATIN,
    "greek": "".join(chr(c) for c in range(0x03B1, 0x03CA)) + "\u03dd",
    "cyrillic": "".join(chr(c) for c in range(0x0430, 0x044A)),
    "armenian": "".join(chr(c) for c in range(0x0561, 0x057B)),
    "georgian": "".join(chr(c) for c in range(0x10D0, 0x10EA)),
    "runic": "".join(chr(c) for c in range(0x16A0, 0x16BA)),
}
WORD_ORDERS = ("SVO", "SOV", "VSO")

CATEGORIES: dict[str, tuple[str, ...]] = {
    "profession": (
        "baker",
        "farmer",
        "teacher",
        "doctor",
        "sailor",
        "painter",
        "singer",
        "miner",
        "weaver",
        "hunter",
        "potter",
        "judge",
        "smith",
        "tailor",
        "poet",
        "guard",
    ),
    "food": (
        "bread",
        "rice",
        "apples",
        "fish",
        "cheese",
        "soup",
        "honey",
        "beans",
        "plums",
        "nuts",
        "eggs",
        "cake",
        "corn",
        "figs",
        "milk",
        "olives",
    ),
    "animal": (
        "cat",
        "dog",
        "horse",
        "goat",
        "owl",
        "fox",
        "crow",
        "pig",
        "cow",
        "duck",
        "frog",
        "bear",
        "wolf",
        "deer",
        "hawk",
        "mouse",
    ),
    "color": (
        "red",
        "blue",
        "green",
        "yellow",
        "black",
        "white",
        "brown",
        "grey",
        "pink",
        "purple",
        "orange",
        "gold",
    ),
}
# relation -> (subject kind, object kind)
RELATIONS: dict[str, tuple[str, str]] = {
    "lives_in": ("person", "city"),
    "works_as": ("person", "profession"),
    "eats": ("person", "food"),
    "keeps": ("person", "animal"),
    "likes_color": ("person", "color"),
    "lies_in": ("city", "country"),
}
_ENGLISH_SENTENCE = {
    "lives_in": "{s} lives in {o}.",
    "works_as": "{s} works as {a} {o}.",
    "eats": "{s} eats {o}.",
    "keeps": "{s} keeps {a} {o}.",
    "likes_color": "{s} likes the color {o}.",
    "lies_in": "{s} is a city in {o}.",
}
_ENGLISH_QUESTION = {
    "lives_in": "Where does {s} live?",
    "works_as": "What does {s} work as?",
    "eats": "What does {s} eat?",
    "keeps": "Which animal does {s} keep?",
    "likes_color": "Which color does {s} like?",
    "lies_in": "In which country is {s}?",
}


@dataclass(frozen=True)
class LanguageSpec:
    """One language of the world: its code, script, word order and morphology."""

    code: str
    script: str = "latin"
    order: str = "SVO"
    case_suffix: bool = False
    consonants: str = "bdfgklmnprstvz"
    vowels: str = "aeiou"
    max_syllables: int = 3

    def __post_init__(self) -> None:
        if self.script not in SCRIPTS:
            raise ValueError(
                f"language {self.code!r}: unknown script {self.script!r}; expected one of {sorted(SCRIPTS)}"
            )
        if self.order not in WORD_ORDERS:
            raise ValueError(
                f"language {self.code!r}: unknown word order {self.order!r}; expected one of {WORD_ORDERS}"
            )


DEFAULT_LANGUAGES: tuple[LanguageSpec, ...] = (
    LanguageSpec("en"),
    LanguageSpec("xa", script="greek", order="SOV", consonants="bdgklmnpst", vowels="aeio"),
    LanguageSpec("xb", script="cyrillic", order="VSO", consonants="fhkmnrsvz", vowels="aiu"),
    LanguageSpec("xc", script="armenian", order="SVO", case_suffix=True, consonants="cdgjlnqrtx", vowels="aeouy"),
    LanguageSpec("xd", script="georgian", order="SOV", case_suffix=True, consonants="bghklmpstw", vowels="aeiu"),
    LanguageSpec("xe", script="runic", order="VSO", consonants="dfjkmnrtvz", vowels="aoiy"),
)


@dataclass
class WorldConfig:
    """Sizes and seed of the world; every size can go from seed-sized to millions of tokens."""

    seed: int = 0
    num_people: int = 200
    num_cities: int = 24
    num_countries: int = 8
    train_docs_per_language: int = 2000
    val_docs_per_language: int = 100
    facts_per_doc: int = 6
    languages: tuple[LanguageSpec, ...] = DEFAULT_LANGUAGES
    pretrain_languages: tuple[str, ...] = ("en", "xa", "xb", "xc")
    heldout_languages: tuple[str, ...] = ("xd", "xe")

    def __post_init__(self) -> None:
        for key in ("num_people", "num_cities", "num_countries", "train_docs_per_language", "facts_per_doc"):
            value = getattr(self, key)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"world.{key} must be a positive integer, got {value!r}")
        if self.val_docs_per_language < 0:
            raise ValueError(f"world.val_docs_per_language must be >= 0, got {self.val_docs_per_language!r}")
        self.languages = tuple(
            spec if isinstance(spec, LanguageSpec) else LanguageSpec(**spec) for spec in self.languages
        )
        known = {spec.code for spec in self.languages}
        for key in ("pretrain_languages", "heldout_languages"):
            unknown = [code for code in getattr(self, key) if code not in known]
            if unknown:
                raise ValueError(f"world.{key} names unknown languages {unknown}; the world has {sorted(known)}")


@dataclass(frozen=True)
class Fact:
    """One triple of the knowledge base, e.g. (person 3, lives_in, city 7)."""

    subject: str
    relation: str
    obj: str


class World:
    """The knowledge base and its realisation in every language of a :class:`WorldConfig`."""

    def __init__(self, config: WorldConfig | None = None) -> None:
        self.config = config or WorldConfig()
        rng = random.Random(self.config.seed)
        self.languages = {spec.code: spec for spec in self.config.languages}
        names = _unique_words(
            rng,
            "bcdfghjklmnprstvwz",
            "aeiou",
            2,
            3,
            self.config.num_people + self.config.num_cities + self.config.num_countries,
        )
        people = [n.capitalize() for n in names[: self.config.num_people]]
        cities = [
            n.capitalize() for n in names[self.config.num_people : self.config.num_people + self.config.num_cities]
        ]
        countries = [n.capitalize() for n in names[self.config.num_people + self.config.num_cities :]]
        self.entities: dict[str, list[str]] = {"person": people, "city": cities, "country": countries, **CATEGORIES}
        self.facts: list[Fact] = []
        for city in cities:
            self.facts.append(Fact(city, "lies_in", rng.choice(countries)))
        for person in people:
            for relation, (_, kind) in RELATIONS.items():
                if kind != "country":
                    self.facts.append(Fact(person, relation, rng.choice(self.entities[kind])))
        self.facts_by_subject: dict[str, list[Fact]] = {}
        for fact in self.facts:
            self.facts_by_subject.setdefault(fact.subject, []).append(fact)
        self.lexicons = {code: self._make_lexicon(spec) for code, spec in self.languages.items()}

    def _make_lexicon(self, spec: LanguageSpec) -> dict[str, str]:
        """Invent a word for every relation, category item and function word of one language."""
        if spec.code == "en":
            return {}
        rng = random.Random(f"{self.config.seed}-lexicon-{spec.code}")
        keys = list(RELATIONS) + [w for words in CATEGORIES.values() for w in words] + ["<case>", "<question>"]
        words = _unique_words(rng, spec.consonants, spec.vowels, 1, spec.max_syllables, len(keys))
        lexicon = {key: self._write(spec, word) for key, word in zip(keys, words)}
        lexicon["<case>"] = self._write(spec, words[-2][:2])
        return lexicon

    @staticmethod
    def _write(spec: LanguageSpec, latin: str) -> str:
        alphabet = SCRIPTS[spec.script]
        out = []
        for ch in latin:
            low = ch.lower()
            mapped = alphabet[_LATIN.index(low)] if low in _LATIN else ch
            out.append(mapped.upper() if ch.isupper() else mapped)
        return "".join(out)

    def name(self, entity: str, lang: str) -> str:
        """An entity's name, or a category word, written in the given language."""
        spec = self.languages[lang]
        if lang == "en":
            return entity
        if entity in self.lexicons[lang]:
            return self.lexicons[lang][entity]
        return self._write(spec, entity)

    def sentence(self, fact: Fact, lang: str) -> str:
        """Realise one fact as a declarative sentence in one language."""
        if lang == "en":
            article = "an" if fact.obj[0] in "aeiou" else "a"
            return _ENGLISH_SENTENCE[fact.relation].format(s=fact.subject, o=fact.obj, a=article)
        spec = self.languages[lang]
        lex = self.lexicons[lang]
        obj = self.name(fact.obj, lang) + (lex["<case>"] if spec.case_suffix else "")
        parts = {"S": self.name(fact.subject, lang), "V": lex[fact.relation], "O": obj}
        return " ".join(parts[slot] for slot in spec.order) + "."

    def question(self, fact: Fact, lang: str) -> str:
        """Ask for the object of a fact, in one language."""
        if lang == "en":
            return _ENGLISH_QUESTION[fact.relation].format(s=fact.subject)
        spec = self.languages[lang]
        lex = self.lexicons[lang]
        parts = {"S": self.name(fact.subject, lang), "V": lex[fact.relation], "O": lex["<question>"]}
        return " ".join(parts[slot] for slot in spec.order) + "?"

    def documents(self, lang: str, split: str = "train", count: int | None = None) -> list[str]:
        """Documents of one language: each groups a few facts about one or more subjects.

        The train and validation splits state the same facts in different combinations and
        orders, so validation perplexity measures fluency in the language, not new knowledge.
        Documents of the same index are parallel across languages.
        """
        return list(self.iter_documents(lang, split, count))

    def iter_documents(self, lang: str, split: str = "train", count: int | None = None) -> Iterator[str]:
        """The documents of ``documents``, generated one at a time (memory does not grow with ``count``)."""
        if lang not in self.languages:
            raise ValueError(f"unknown world language {lang!r}; the world has {sorted(self.languages)}")
        if count is None:
            count = self.config.train_docs_per_language if split == "train" else self.config.val_docs_per_language
        for doc in islice(self._document_facts(split), count):
            yield " ".join(self.sentence(f, lang) for f in doc)

    def _document_facts(self, split: str) -> Iterator[list[Fact]]:
        rng = random.Random(f"{self.config.seed}-docs-{split}")
        subjects = list(self.facts_by_subject)
        while True:
            facts: list[Fact] = []
            while len(facts) < self.config.facts_per_doc:
                subject_facts = list(self.facts_by_subject[rng.choice(subjects)])
                rng.shuffle(subject_facts)
                facts.extend(subject_facts[: rng.randint(1, len(subject_facts))])
            yield facts[: self.config.facts_per_doc]

    def qa_pairs(self, lang: str = "en") -> list[tuple[str, str, Fact]]:
        """Every fact as (question, answer sentence, fact), for instruction data and tests."""
        return [(self.question(f, lang), self.sentence(f, lang), f) for f in self.facts]

    def multiple_choice(self, lang: str, num_choices: int = 4, seed: int = 0) -> list[dict]:
        """Multiple-choice items: a question, candidate objects, and the index of the gold one."""
        rng = random.Random(f"{self.config.seed}-mc-{lang}-{seed}")
        items = []
        for fact in self.facts:
            kind = RELATIONS[fact.relation][1]
            distractors = rng.sample([e for e in self.entities[kind] if e != fact.obj], num_choices - 1)
            choices = distractors + [fact.obj]
            rng.shuffle(choices)
            items.append(
                {
                    "question": self.question(fact, lang),
                    "choices": [self.name(c, lang) for c in choices],
                    "label": choices.index(fact.obj),
                }
            )
        return items

    def translation_pairs(self, target: str, source: str = "en") -> list[tuple[str, str]]:
        """Parallel sentence pairs (source, target) for every fact."""
        return [(self.sentence(f, source), self.sentence(f, target)) for f in self.facts]


def _unique_words(
    rng: random.Random, consonants: str, vowels: str, min_syl: int, max_syl: int, count: int
) -> list[str]:
    """Draw ``count`` distinct pronounceable words from a small CV(C) phonology."""
    capacity = sum((len(consonants) * len(vowels)) ** n for n in range(min_syl, max_syl + 1))
    if count > capacity // 2:
        raise ValueError(
            f"a phonology of {len(consonants)} consonants and {len(vowels)} vowels cannot make {count} distinct words"
        )
    seen: set[str] = set()
    words: list[str] = []
    while len(words) < count:
        n = rng.randint(min_syl, max_syl)
        word = "".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(n))
        if rng.random() < 0.3:
            word += rng.choice(consonants)
        if word not in seen:
            seen.add(word)
            words.append(word)
    return words
