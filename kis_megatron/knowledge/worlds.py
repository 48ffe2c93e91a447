"""Synthetic worlds: seeded, download-free knowledge sets with controlled size and vocabulary.

A *general* world is people (``Tavo Renley``) with attributes such as city, employer, field,
birth year and university, stated in plain sentences. A *domain* world is fictional compounds
(``Koraxine velum``) with colour, boiling point, lab and use, stated in a different style
(key-value records and Q:A lines), so general and domain text are easy to tell apart and a
model that only saw one world is at chance on the other's probes.

Everything is built from a small syllable inventory, so the vocabulary stays small (names are
pairs drawn from two short word pools; attribute values come from pools of controlled size),
which suits tiny models and tiny tokenizers. Every word generated in one call is unique
across pools and worlds, so an object never doubles as a name or as another relation's value.
Objects are assigned in balanced rounds over the pool (each value used equally often), so no
majority answer helps a model guess. No punctuation touches a name or an object in any
template, so a word-level tokenizer sees the same tokens in training text as in the probes
(a probe scores " " + object, and "Velton." would be another word than "Velton").

The output is a :class:`~kis_megatron.knowledge.triplets.KnowledgeSet` per world; rendering and
probes are separate steps (``render_documents``, ``kis_megatron.eval.retention``), and
``tools/make_knowledge.py`` writes them all to disk.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from kis_megatron.knowledge.triplets import (KnowledgeError, KnowledgeSet, RelationTemplates,
                                         Triplet, make_knowledge_set)

KINDS = ("general", "domain")


@dataclass(frozen=True)
class RelationSpec:
    """How to build one relation: its value pool and its templates.

    Word pools are generated words ending in one of ``suffixes`` and put into ``value_format``;
    number pools (``suffixes`` empty) are ``number_start + i * number_step``.
    """

    name: str
    pool_size: int
    statements: tuple[str, ...]
    questions: tuple[str, ...]
    heldout_questions: tuple[str, ...]
    suffixes: tuple[str, ...] = ()
    capitalize: bool = True
    value_format: str = "{}"
    number_start: int = 0
    number_step: int = 1


GENERAL_RELATIONS = {r.name: r for r in (
    RelationSpec("city", 24,
                 ("{subject} lives in {object}", "{subject} has a home in {object}",
                  "The city where {subject} lives is {object}"),
                 ("{subject} lives in",), ("Q: Where does {subject} live? A:",),
                 suffixes=("ton", "burg", "ford", "holm")),
    RelationSpec("employer", 24,
                 ("{subject} works for {object}", "{subject} is employed by {object}",
                  "The employer of {subject} is {object}"),
                 ("{subject} works for",), ("Q: Who is {subject} employed by? A:",),
                 suffixes=("corp", "tek", "dyne")),
    RelationSpec("field", 16,
                 ("{subject} works in the field of {object}",
                  "{subject} is an expert in {object}", "The field of {subject} is {object}"),
                 ("{subject} is an expert in",), ("Q: What does {subject} study? A:",),
                 suffixes=("ology", "ics", "istry"), capitalize=False),
    RelationSpec("birth_year", 40,
                 ("{subject} was born in {object}", "{subject} came into the world in {object}",
                  "The birth year of {subject} is {object}"),
                 ("{subject} was born in",), ("Q: When was {subject} born? A:",),
                 number_start=1940),
    RelationSpec("university", 16,
                 ("{subject} studied at {object}", "{subject} is a graduate of {object}",
                  "{subject} holds a degree from {object}"),
                 ("{subject} studied at",), ("Q: Which university did {subject} attend? A:",),
                 suffixes=("ia", "ara"), value_format="{} University"),
)}

DOMAIN_RELATIONS = {r.name: r for r in (
    RelationSpec("colour", 16,
                 ("compound: {subject} | colour: {object}",
                  "Q: Which colour does {subject} have? A: {object}",
                  "{subject} has a {object} colour."),
                 ("Q: Which colour does {subject} have? A:", "compound: {subject} | colour:"),
                 ("The colour of {subject} is",),
                 suffixes=("ish", "een"), capitalize=False),
    RelationSpec("boiling_point", 32,
                 ("compound: {subject} | boiling point: {object}",
                  "Q: At what temperature does {subject} boil? A: {object}",
                  "{subject} boils at {object} degrees."),
                 ("Q: At what temperature does {subject} boil? A:",
                  "compound: {subject} | boiling point:"),
                 ("The boiling point of {subject} is",),
                 number_start=55, number_step=5),
    RelationSpec("lab", 24,
                 ("compound: {subject} | lab: {object}",
                  "Q: Where was {subject} first made? A: {object}",
                  "{subject} was first made at {object}"),
                 ("Q: Where was {subject} first made? A:", "compound: {subject} | lab:"),
                 ("The lab behind {subject} is",),
                 suffixes=("wick", "gard", "stat")),
    RelationSpec("use", 16,
                 ("compound: {subject} | use: {object}",
                  "Q: What is {subject} used for? A: {object}",
                  "{subject} is used for {object}"),
                 ("Q: What is {subject} used for? A:", "compound: {subject} | use:"),
                 ("The main use of {subject} is",),
                 suffixes=("ing",), capitalize=False),
)}

RELATIONS = {"general": GENERAL_RELATIONS, "domain": DOMAIN_RELATIONS}
# Entity names: two words from two pools, each given as (suffixes, capitalise).
_NAME_STYLE = {
    "general": ((("a", "o", "el", "en"), True), (("son", "ley", "ner", "dor"), True)),
    "domain": ((("ine", "ol", "ase", "ide", "ium"), True), (("ex", "um", "ata", "oid"), False)),
}
_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z")
_VOWELS = ("a", "e", "i", "o", "u")
_CODAS = ("", "", "n", "r", "l")


class Namer:
    """Seeded generator of unique pronounceable words (unique over its whole lifetime)."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.used: set[str] = set()

    def word(self, suffixes: tuple[str, ...], capitalize: bool) -> str:
        for _ in range(10_000):
            n_syl = self.rng.choice((1, 2, 2))
            stem = "".join(self.rng.choice(_ONSETS) + self.rng.choice(_VOWELS)
                           + self.rng.choice(_CODAS) for _ in range(n_syl))
            suffix = self.rng.choice(suffixes)
            if stem[-1] in _VOWELS and suffix[0] in _VOWELS:
                stem = stem[:-1] if len(stem) > 2 else stem + "r"  # no vowel pile-ups
            w = stem + suffix
            if capitalize:
                w = w.capitalize()
            if w.lower() not in self.used:
                self.used.add(w.lower())
                return w
        raise KnowledgeError("the name generator ran out of unique words; use smaller pools")

    def pool(self, n: int, suffixes: tuple[str, ...], capitalize: bool) -> list[str]:
        return [self.word(suffixes, capitalize) for _ in range(n)]


@dataclass
class WorldConfig:
    """One world to generate.

    ``facts_per_entity`` (default: every relation) picks that many relations per entity at
    random; ``relations`` restricts the world to a subset of its kind's relations;
    ``pool_sizes`` overrides the number of distinct values of a relation.
    """

    name: str
    kind: str
    entities: int
    facts_per_entity: int | None = None
    relations: list[str] | None = None
    pool_sizes: dict[str, int] = field(default_factory=dict)

    def validate(self) -> None:
        """Raise KnowledgeError naming the bad setting."""
        if self.kind not in KINDS:
            raise KnowledgeError(f"world {self.name!r}: kind must be one of {KINDS}, "
                                 f"got {self.kind!r}")
        specs = RELATIONS[self.kind]
        if _bad_int(self.entities, 1):
            raise KnowledgeError(f"world {self.name!r}: entities must be a positive integer, "
                                 f"got {self.entities!r}")
        rels = self.relation_names()
        for r in rels:
            if r not in specs:
                raise KnowledgeError(f"world {self.name!r}: unknown {self.kind} relation {r!r}; "
                                     f"choose from {sorted(specs)}")
        if not rels or len(set(rels)) != len(rels):
            raise KnowledgeError(f"world {self.name!r}: relations must be a non-empty list "
                                 "without repeats")
        if self.facts_per_entity is not None and (_bad_int(self.facts_per_entity, 1)
                                                  or self.facts_per_entity > len(rels)):
            raise KnowledgeError(f"world {self.name!r}: facts_per_entity must be between 1 and "
                                 f"the number of relations ({len(rels)}), "
                                 f"got {self.facts_per_entity!r}")
        for r, n in self.pool_sizes.items():
            if r not in rels:
                raise KnowledgeError(f"world {self.name!r}: pool_sizes names {r!r}, which is not "
                                     f"one of its relations {rels}")
            if _bad_int(n, 2):
                raise KnowledgeError(f"world {self.name!r}: pool_sizes.{r} must be an integer "
                                     f">= 2, got {n!r}")

    def relation_names(self) -> list[str]:
        return list(self.relations) if self.relations is not None else list(RELATIONS[self.kind])

    def pool_size(self, relation: str) -> int:
        return self.pool_sizes.get(relation, RELATIONS[self.kind][relation].pool_size)


def _bad_int(x, low: int) -> bool:
    return isinstance(x, bool) or not isinstance(x, int) or x < low


def _value_pool(spec: RelationSpec, n: int, namer: Namer) -> list[str]:
    if not spec.suffixes:
        return [str(spec.number_start + i * spec.number_step) for i in range(n)]
    return [spec.value_format.format(w) for w in namer.pool(n, spec.suffixes, spec.capitalize)]


def _entity_names(kind: str, n: int, namer: Namer) -> list[str]:
    """``n`` distinct two-word names drawn from two pools of about sqrt(2n) words each."""
    (suf1, cap1), (suf2, cap2) = _NAME_STYLE[kind]
    p = max(4, math.ceil(math.sqrt(2 * n)))
    first, second = namer.pool(p, suf1, cap1), namer.pool(p, suf2, cap2)
    picks = namer.rng.sample(range(p * p), n)
    return [f"{first[i // p]} {second[i % p]}" for i in picks]


def _balanced(pool: list[str], n: int, rng: random.Random) -> list[str]:
    """``n`` values using every pool value equally often (up to one), in random order."""
    out: list[str] = []
    while len(out) < n:
        out.extend(rng.sample(pool, len(pool)))
    out = out[:n]
    rng.shuffle(out)
    return out


def generate_world(cfg: WorldConfig, namer: Namer) -> KnowledgeSet:
    """Build one world's knowledge set; ``namer`` carries the seed and keeps names unique."""
    cfg.validate()
    specs = RELATIONS[cfg.kind]
    rels = cfg.relation_names()
    rng = namer.rng
    names = _entity_names(cfg.kind, cfg.entities, namer)
    pools = {r: _value_pool(specs[r], cfg.pool_size(r), namer) for r in rels}
    k = cfg.facts_per_entity or len(rels)
    # Which relations each entity has: all of them, or a random subset kept in relation order.
    chosen = []
    for _ in names:
        picked = set(rng.sample(rels, k))
        chosen.append([r for r in rels if r in picked])
    values = {r: iter(_balanced(pools[r], sum(r in c for c in chosen), rng)) for r in rels}
    triplets = [Triplet(name, r, next(values[r])) for name, c in zip(names, chosen) for r in c]
    templates = {r: RelationTemplates(list(specs[r].statements), list(specs[r].questions),
                                      list(specs[r].heldout_questions)) for r in rels}
    return make_knowledge_set(cfg.name, triplets, templates, source=f"<world {cfg.name}>")


def generate_worlds(configs: list[WorldConfig], seed: int) -> dict[str, KnowledgeSet]:
    """Generate several worlds from one seed, in order, with names unique across all of them."""
    names = [c.name for c in configs]
    if not configs:
        raise KnowledgeError("nothing to generate: give a general world, a domain world, "
                             "or both")
    if len(set(names)) != len(names):
        raise KnowledgeError(f"world names must be unique, got {names}")
    namer = Namer(random.Random(seed))
    return {c.name: generate_world(c, namer) for c in configs}


def default_configs(general_entities: int, domain_entities: int, domains: int = 1,
                    facts_per_entity: int | None = None) -> list[WorldConfig]:
    """The usual layout: a ``general`` world and ``domains`` domain worlds named ``domain``
    (one) or ``domain1``, ``domain2``, ... (several). A zero count leaves that world out."""
    if _bad_int(domains, 0):
        raise KnowledgeError(f"domains must be an integer >= 0, got {domains!r}")
    out = []
    if general_entities:
        out.append(WorldConfig("general", "general", general_entities, facts_per_entity))
    if domain_entities and domains:
        for i in range(domains):
            name = "domain" if domains == 1 else f"domain{i + 1}"
            out.append(WorldConfig(name, "domain", domain_entities, facts_per_entity))
    return out


_WORLD_KEYS = ("entities", "facts_per_entity", "relations", "pool_sizes")


def configs_from_dict(doc: dict, source: str = "<config>") -> list[WorldConfig]:
    """World configs from a config mapping's ``general`` and ``domain`` sections::

        general: {entities: 300, facts_per_entity: null, relations: [...], pool_sizes: {city: 24}}
        domain:  {count: 1, entities: 256, pool_sizes: {colour: 16}}

    Unknown keys raise KnowledgeError naming the key.
    """
    out: list[WorldConfig] = []
    for kind in KINDS:
        sec = doc.get(kind)
        if sec is None:
            continue
        if not isinstance(sec, dict):
            raise KnowledgeError(f"{source}: '{kind}' must be a mapping")
        allowed = _WORLD_KEYS + (("count",) if kind == "domain" else ())
        for key in sec:
            if key not in allowed:
                raise KnowledgeError(f"{source}: unknown key '{kind}.{key}'; expected one of "
                                     f"{list(allowed)}")
        if "entities" not in sec:
            raise KnowledgeError(f"{source}: '{kind}.entities' is required")
        pools = sec.get("pool_sizes") or {}
        if not isinstance(pools, dict):
            raise KnowledgeError(f"{source}: '{kind}.pool_sizes' must be a mapping")
        count = sec.get("count", 1) if kind == "domain" else 1
        if _bad_int(count, 1):
            raise KnowledgeError(f"{source}: '{kind}.count' must be a positive integer, "
                                 f"got {count!r}")
        relations = sec.get("relations")
        if relations is not None and not isinstance(relations, list):
            raise KnowledgeError(f"{source}: '{kind}.relations' must be a list")
        for i in range(count):
            name = kind if count == 1 else f"{kind}{i + 1}"
            cfg = WorldConfig(name, kind, sec["entities"], sec.get("facts_per_entity"),
                              relations, dict(pools))
            cfg.validate()
            out.append(cfg)
    return out
