"""Synthetic worlds: determinism, sizes, uniqueness, balance, templates; the CLI end to end."""

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from kis_megatron.knowledge.triplets import (KnowledgeError, load_knowledge_set, parse_templates,
                                         render_documents, templates_to_yaml)
from kis_megatron.knowledge.worlds import (DOMAIN_RELATIONS, GENERAL_RELATIONS, WorldConfig,
                                      configs_from_dict, default_configs, generate_worlds)

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "make_knowledge.py"


@pytest.fixture(scope="module")
def worlds():
    return generate_worlds(default_configs(300, 128, domains=2), seed=11)


def test_deterministic_and_seed_dependent(worlds):
    again = generate_worlds(default_configs(300, 128, domains=2), seed=11)
    assert again == worlds
    other = generate_worlds(default_configs(300, 128, domains=2), seed=12)
    assert other["general"].triplets != worlds["general"].triplets


def test_fact_ids_run_entity_by_entity(worlds):
    """infusion.facts takes a prefix of fact ids: it must be a prefix of whole entities."""
    for ks in worlds.values():
        subjects = [t.subject for t in ks.triplets]
        runs = [s for i, s in enumerate(subjects) if i == 0 or s != subjects[i - 1]]
        assert len(runs) == len(set(subjects))  # each entity's facts are one block


def test_sizes_pools_and_balance(worlds):
    assert list(worlds) == ["general", "domain1", "domain2"]
    g = worlds["general"]
    assert len(g.triplets) == 300 * len(GENERAL_RELATIONS)
    for name in ("domain1", "domain2"):
        assert len(worlds[name].triplets) == 128 * len(DOMAIN_RELATIONS)
    for ks in worlds.values():
        specs = GENERAL_RELATIONS if ks.name == "general" else DOMAIN_RELATIONS
        subjects = Counter(t.subject for t in ks.triplets)
        assert set(subjects.values()) == {len(specs)}  # every entity has every relation
        for rel, spec in specs.items():
            uses = Counter(t.object for t in ks.triplets if t.relation == rel)
            assert len(uses) == spec.pool_size  # the whole pool is used ...
            assert max(uses.values()) - min(uses.values()) <= 1  # ... equally often
    years = {int(t.object) for t in g.triplets if t.relation == "birth_year"}
    assert years == set(range(1940, 1980))


def test_names_unique_within_and_across_worlds(worlds):
    words_by_world = {}
    for name, ks in worlds.items():
        subjects = {t.subject for t in ks.triplets}
        objects = {t.object for t in ks.triplets if not t.object.isdigit()}
        assert len(subjects) == len({t.subject for t in ks.triplets})
        assert not subjects & objects
        for s in subjects:
            assert len(s.split()) == 2 and s.replace(" ", "").isalpha()
        # a generated word belongs to one pool only: no object of one relation is
        # an object of another
        by_rel = {}
        for t in ks.triplets:
            by_rel.setdefault(t.relation, set()).add(t.object)
        rels = list(by_rel)
        for i, a in enumerate(rels):
            for b in rels[i + 1:]:
                assert not by_rel[a] & by_rel[b] or {a, b} == {"birth_year", "boiling_point"}
        words_by_world[name] = {w for t in ks.triplets for w in (t.subject + " " + t.object)
                                .split() if not w.isdigit() and w != "University"}
    names = list(words_by_world)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not words_by_world[a] & words_by_world[b], (a, b)


def test_small_vocabulary(worlds):
    # the pilot's whole word-level vocabulary was 463 tokens for 300 people + a domain world
    for name, ks in worlds.items():
        words = {w for d in render_documents(ks) for w in d["text"].split()}
        assert len(words) < 300, (name, len(words))
    subj_words = {w for t in worlds["general"].triplets for w in t.subject.split()}
    assert len(subj_words) <= 2 * 25  # two pools of ceil(sqrt(2 * 300)) words


def test_templates_valid_styles_differ_and_heldout_unseen(worlds):
    g, d = worlds["general"], worlds["domain1"]
    for ks in (g, d):
        assert parse_templates(templates_to_yaml(ks.templates)) == ks.templates
        for rt in ks.templates.values():
            assert len(rt.statements) >= 3 and rt.questions and rt.heldout_questions
    gs = {s for rt in g.templates.values() for s in rt.statements}
    ds = {s for rt in d.templates.values() for s in rt.statements}
    assert not gs & ds
    assert any(s.startswith("compound: ") for s in ds) and any(s.startswith("Q: ") for s in ds)
    for ks in (g, d):
        text = "\n".join(doc["text"] for doc in render_documents(ks))
        for t in ks.triplets[:200]:
            rt = ks.templates[t.relation]
            for q in rt.questions:  # recall prompts are followed by the object in training
                assert q.format(subject=t.subject) + " " + t.object in text
            for h in rt.heldout_questions:  # held-out prompts never occur in training
                assert h.format(subject=t.subject) not in text


def test_names_and_objects_are_whole_words_everywhere(worlds):
    # no punctuation touches a name or an object, so a word-level tokenizer sees the probe's
    # answer tokens in the training text
    for ks in worlds.values():
        docs = render_documents(ks)
        for d in docs[:2000]:
            t = ks.triplets[d["fact_id"]]
            words = d["text"].split()
            for part in (t.subject, t.object):
                n = len(part.split())
                assert any(words[i:i + n] == part.split() for i in range(len(words))), d
        for t in ks.triplets[:300]:
            rt = ks.templates[t.relation]
            for q in rt.questions + rt.heldout_questions:
                assert t.subject.split()[-1] in q.format(subject=t.subject).split()


def test_facts_per_entity_relations_and_pools():
    cfg = WorldConfig("w", "domain", 50, facts_per_entity=2, relations=["colour", "lab", "use"],
                      pool_sizes={"lab": 5})
    ks = generate_worlds([cfg], seed=0)["w"]
    per = Counter(t.subject for t in ks.triplets)
    assert len(per) == 50 and set(per.values()) == {2}
    assert {t.relation for t in ks.triplets} <= {"colour", "lab", "use"}
    assert len({t.object for t in ks.triplets if t.relation == "lab"}) == 5
    assert set(ks.templates) == {"colour", "lab", "use"}


@pytest.mark.parametrize("cfg, msg", [
    (WorldConfig("w", "space", 5), "kind must be one of"),
    (WorldConfig("w", "general", 0), "entities must be a positive integer"),
    (WorldConfig("w", "general", 5, relations=["colour"]), "unknown general relation 'colour'"),
    (WorldConfig("w", "general", 5, facts_per_entity=6), "facts_per_entity must be between"),
    (WorldConfig("w", "general", 5, pool_sizes={"city": 1}), "pool_sizes.city must be"),
    (WorldConfig("w", "general", 5, relations=["city"], pool_sizes={"field": 3}),
     "not one of its relations"),
])
def test_bad_world_configs(cfg, msg):
    with pytest.raises(KnowledgeError, match=msg):
        generate_worlds([cfg], seed=0)


def test_configs_from_dict():
    cfgs = configs_from_dict({"general": {"entities": 10, "pool_sizes": {"city": 4}},
                              "domain": {"count": 2, "entities": 7}})
    assert [(c.name, c.kind, c.entities) for c in cfgs] == [
        ("general", "general", 10), ("domain1", "domain", 7), ("domain2", "domain", 7)]
    with pytest.raises(KnowledgeError, match="unknown key 'general.entitys'"):
        configs_from_dict({"general": {"entitys": 10}}, "w.yaml")
    with pytest.raises(KnowledgeError, match="'domain.entities' is required"):
        configs_from_dict({"domain": {"count": 1}})
    with pytest.raises(KnowledgeError, match="nothing to generate"):
        generate_worlds(default_configs(0, 0), seed=0)


# ----------------------------------------------------------------------------- CLI


def run_tool(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=120)


def test_cli_generate_and_reproduce(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    cfg = tmp_path / "w.yaml"
    cfg.write_text("seed: 5\nrenders_per_fact: 4\nprobe_k: 3\nmax_probe_facts: 20\n"
                   "general: {entities: 40}\ndomain: {count: 2, entities: 30, "
                   "relations: [colour, lab]}\n")
    r = run_tool("--out", a, "--config", cfg)
    assert r.returncode == 0, r.stderr
    # the same settings as flags with the seed given twice give byte-identical output
    r = run_tool("--out", b, "--config", cfg, "--seed", 5)
    assert r.returncode == 0, r.stderr
    summary = json.loads((a / "world.json").read_text())
    assert list(summary["worlds"]) == ["general", "domain1", "domain2"]
    assert summary["seed"] == 5 and summary["probe_k"] == 3
    for name, w in summary["worlds"].items():
        for f in ("triplets.jsonl", "templates.yaml", "train.jsonl", "probes.jsonl"):
            assert (a / name / f).read_bytes() == (b / name / f).read_bytes()
        ks = load_knowledge_set(a / name / "triplets.jsonl", a / name / "templates.yaml")
        assert ks.name == name and len(ks.triplets) == w["facts"]
        docs = [json.loads(x) for x in (a / name / "train.jsonl").read_text().splitlines()]
        assert len(docs) == w["documents"] == 4 * w["facts"]
        for d in docs:
            t = ks.triplets[d["fact_id"]]
            assert d["text"] == ks.templates[t.relation].statements[d["template"]].format(
                subject=t.subject, object=t.object)
        probes = [json.loads(x) for x in (a / name / "probes.jsonl").read_text().splitlines()]
        assert w["probes"] == {"recall": 20, "heldout": 20} and len(probes) == 40
        assert all(len(p["distractors"]) == 3 for p in probes)
    assert summary["worlds"]["domain1"]["relations"].keys() == {"colour", "lab"}
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temp dirs left


def test_cli_user_triplets_and_errors(tmp_path):
    src = generate_worlds(default_configs(0, 12), seed=1)["domain"]
    trip, tmpl = tmp_path / "t.jsonl", tmp_path / "t.yaml"
    trip.write_text("".join(json.dumps(t.to_json()) + "\n" for t in src.triplets))
    tmpl.write_text(templates_to_yaml(src.templates))
    out = tmp_path / "o"
    r = run_tool("--out", out, "--triplets", trip, "--templates", tmpl, "--name", "chem",
                 "--probe-k", 2)
    assert r.returncode == 0, r.stderr
    summary = json.loads((out / "world.json").read_text())
    assert summary["source"] == "user" and summary["worlds"]["chem"]["facts"] == 48
    assert load_knowledge_set(out / "chem" / "triplets.jsonl",
                              out / "chem" / "templates.yaml").triplets == src.triplets

    # errors: one line, "error: ...", exit 2, and nothing written
    with open(trip, "a") as f:
        f.write('{"subject": "x", "relation": "colour"}\n')
    cases = [
        (["--out", out], "already exists"),
        (["--out", tmp_path / "n1", "--triplets", trip, "--templates", tmpl],
         f"{trip}:49: missing field 'object'"),
        (["--out", tmp_path / "n2", "--general-entities", 3, "--domain-entities", 0],
         "only 3 distinct objects"),
        (["--out", tmp_path / "n3", "--config", tmp_path / "nope.yaml"], "cannot read --config"),
        (["--out", tmp_path / "n4", "--triplets", trip], "give both"),
    ]
    for args, msg in cases:
        r = run_tool(*args)
        assert r.returncode == 2, (args, r.stderr)
        assert r.stderr.startswith("error: ") and msg in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
    assert sorted(os.listdir(tmp_path)) == ["o", "t.jsonl", "t.yaml"]

    r = run_tool("--out", out, "--overwrite", "--general-entities", 10, "--domains", 0)
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(out)) == ["general", "world.json"]
