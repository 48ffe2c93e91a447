"""Knowledge sets: template/triplet validation (file:line errors), round trips, rendering."""

import json
import os
import re
from collections import Counter

import pytest

from kis_megatron.knowledge.triplets import (KnowledgeError, RelationTemplates, Triplet,
                                         derive_questions, fill,
                                         load_knowledge_set, load_templates, load_triplets,
                                         make_knowledge_set, parse_templates, render_documents,
                                         save_knowledge_set, templates_to_yaml)

TEMPLATES = """\
name: people
relations:
  employer:
    statements:
      - "{subject} works for {object}."
      - "The employer of {subject} is {object}."
      - "{object} employs {subject}."
    questions:
      - "{subject} works for"
    heldout_questions:
      - "Q: Who employs {subject}? A:"
  city:
    statements:
      - "{subject} lives in {object}."
      - "{{home}} of {subject}: {object}"
"""

TRIPLETS = [
    {"subject": "Ana Bel", "relation": "employer", "object": "Kortek", "id": "Q1"},
    {"subject": "Ana Bel", "relation": "city", "object": "Velton"},
    {"subject": "Rik Dor", "relation": "employer", "object": "Mircorp"},
    {"subject": "Rik Dor", "relation": "city", "object": "Zalburg", "id": 7},
    {"subject": "Oli Tan", "relation": "employer", "object": "Kortek"},
]


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def write_set(tmp_path, triplets=TRIPLETS, templates=TEMPLATES):
    tp = write(tmp_path / "triplets.jsonl", "".join(json.dumps(t) + "\n" for t in triplets))
    yp = write(tmp_path / "templates.yaml", templates)
    return tp, yp


def test_load_round_trip_and_derived_questions(tmp_path):
    ks = load_knowledge_set(*write_set(tmp_path))
    assert ks.name == "people"
    assert ks.triplets[0] == Triplet("Ana Bel", "employer", "Kortek", "Q1")
    assert ks.triplets[3].id == 7 and ks.triplets[1].id is None
    emp, city = ks.templates["employer"], ks.templates["city"]
    assert emp.questions == ["{subject} works for"]
    assert emp.heldout_questions == ["Q: Who employs {subject}? A:"]
    # city has no 'questions' key: derived from statements where {subject} precedes {object}
    assert city.questions == ["{subject} lives in", "{{home}} of {subject}:"]
    assert city.heldout_questions == []
    assert ks.objects_by_relation() == {"employer": ["Kortek", "Mircorp"],
                                        "city": ["Velton", "Zalburg"]}
    # save and reload: identical content
    out = tmp_path / "copy"
    save_knowledge_set(ks, out)
    again = load_knowledge_set(out / "triplets.jsonl", out / "templates.yaml")
    assert again == ks


def test_derive_questions_rules():
    assert derive_questions(["{object} employs {subject}.", "{subject} is in {object} now",
                             "{subject} is in {object}."]) == ["{subject} is in"]
    # an explicit empty list means: no recall probes for that relation
    t = parse_templates("relations:\n  r:\n    statements: ['{subject} x {object}']\n"
                        "    questions: []\n")
    assert t["r"].questions == []


def test_literal_braces_render():
    t = parse_templates(TEMPLATES)
    assert fill(t["city"].statements[1], "Ana", "Velton") == "{home} of Ana: Velton"
    text = templates_to_yaml(t)
    assert parse_templates(text) == t


def _rel(body):
    return "relations:\n  employer:\n" + body


@pytest.mark.parametrize("text, line, expect", [
    (_rel("    statements:\n      - '{subject} works for'\n"), 4, "missing the {object}"),
    (_rel("    statements:\n      - '{subject} works for {obj}'\n"), 4, "unknown slot {obj}"),
    (_rel("    statements:\n      - '{subject} works for {}'\n"), 4, "unknown slot {}"),
    (_rel("    statements:\n      - 'someone works for {object}'\n"),
     4, "missing the {subject}"),
    (_rel("    statements:\n      - '{subject} works for {object'\n"), 4, "unbalanced"),
    (_rel("    statements:\n      - '{subject} works for {object!r}'\n"), 4, "format spec"),
    (_rel("    statements: ['{subject} a {object}']\n    questions:\n"
          "      - '{subject} works for {object}'\n"), 5, "contains {object}"),
    (_rel("    statements: ['{subject} a {object}']\n    questions:\n"
          "      - '{subject} works for '\n"), 5, "ends with whitespace"),
    (_rel("    statements: []\n"), 2, "no statement templates"),
    (_rel("    questions: ['{subject} works for']\n"), 2, "no statement templates"),
    (_rel("    statements: ['{subject} a {object}']\n    answers: ['x']\n"),
     4, "unknown key 'answers'"),
    (_rel("    statements: '{subject} a {object}'\n"), 3, "must be a list"),
    (_rel("    statements: ['Q: Who employs {subject}? A: {object}']\n"
          "    heldout_questions: ['Q: Who employs {subject}? A:']\n"),
     2, "held-out question .* occurs in statement"),
    ("relations:\n  a:\n    statements: ['{subject} a {object}']\n  a:\n"
     "    statements: ['{subject} b {object}']\n", 4, "defined twice"),
    ("relations: {}\n", None, "non-empty mapping"),
    ("", None, "empty templates file"),
    ("relations:\n  a: [\n", None, "malformed YAML"),
    ("relation:\n  a: {}\n", 1, "unknown top-level key 'relation'"),
])
def test_template_errors_name_file_and_line(tmp_path, text, line, expect):
    path = write(tmp_path / "t.yaml", text)
    with pytest.raises(KnowledgeError) as info:
        load_templates(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}:{line}: " if line else f"{path}"), msg
    assert re.search(expect, msg), msg


@pytest.mark.parametrize("lines, expect", [
    (['{"subject": "a", "relation": "r", "object": "b"}', '{"subject": "a", "relation": "r"'],
     r":2: invalid JSON"),
    (['{"subject": "a", "relation": "r"}'], r":1: missing field 'object'"),
    (['{"subject": "a", "relation": "r", "object": ""}'], r":1: field 'object' must be a non"),
    (['{"subject": " a", "relation": "r", "object": "b"}'], r":1: .*surrounding whitespace"),
    (['{"subject": "a", "relation": 3, "object": "b"}'], r":1: field 'relation' must be"),
    (['{"subject": "a", "relation": "r", "object": "b", "id": [1]}'], r":1: field 'id'"),
    (['["a", "r", "b"]'], r":1: expected a JSON object"),
    (['{"subject": "a", "relation": "r", "object": "b"}', '',
      '{"subject": "a", "relation": "r", "object": "c"}'],
     r":3: .*conflicts with object 'b' on line 1"),
    (['{"subject": "a", "relation": "r", "object": "b"}',
      '{"subject": "a", "relation": "r", "object": "b"}'], r":2: .*repeats the same fact"),
])
def test_triplet_errors_name_file_and_line(tmp_path, lines, expect):
    path = write(tmp_path / "f.jsonl", "\n".join(lines) + "\n")
    with pytest.raises(KnowledgeError, match="^" + str(path) + expect):
        load_triplets(path)


def test_integer_objects_become_strings(tmp_path):
    path = write(tmp_path / "f.jsonl", '{"subject": "a", "relation": "born", "object": 1950}\n')
    triplets, first = load_triplets(path)
    assert triplets == [Triplet("a", "born", "1950")] and first == {"born": 1}


def test_cross_file_errors(tmp_path):
    extra = TRIPLETS + [{"subject": "Oli Tan", "relation": "university", "object": "X"}]
    tp, yp = write_set(tmp_path, extra)
    with pytest.raises(KnowledgeError, match=rf"^{tp}:6: relation 'university' is used by the "
                       "triplets but has no templates"):
        load_knowledge_set(tp, yp)
    tp, yp = write_set(tmp_path, [])
    with pytest.raises(KnowledgeError, match="has no triplets"):
        load_knowledge_set(tp, yp)
    with pytest.raises(KnowledgeError, match="cannot read triplets file"):
        load_knowledge_set(tmp_path / "missing.jsonl", yp)


def _small_set():
    templates = {"r": RelationTemplates(["{subject} a {object}.", "{subject} b {object}.",
                                         "{subject} c {object}."]),
                 "q": RelationTemplates(["{subject} q {object}."])}
    triplets = [Triplet(f"s{i}", "r" if i % 3 else "q", f"o{i % 4}") for i in range(30)]
    return make_knowledge_set("w", triplets, templates)


def test_render_each_paraphrase_once():
    ks = _small_set()
    docs = render_documents(ks, seed=3)
    expected = {(i, j) for i, t in enumerate(ks.triplets)
                for j in range(len(ks.templates[t.relation].statements))}
    assert Counter((d["fact_id"], d["template"]) for d in docs) == Counter(expected)
    for d in docs:
        t = ks.triplets[d["fact_id"]]
        assert d["text"] == ks.templates[t.relation].statements[d["template"]].format(
            subject=t.subject, object=t.object)
    # deterministic, shuffled (not in fact order), and seed-dependent
    assert docs == render_documents(ks, seed=3)
    assert [d["fact_id"] for d in docs] != sorted(d["fact_id"] for d in docs)
    assert docs != render_documents(ks, seed=4)


@pytest.mark.parametrize("n", [1, 2, 5, 7])
def test_render_n_times_balances_templates(n):
    ks = _small_set()
    docs = render_documents(ks, renders_per_fact=n, seed=0)
    per_fact = Counter(d["fact_id"] for d in docs)
    assert set(per_fact.values()) == {n} and len(per_fact) == len(ks.triplets)
    for fid, t in enumerate(ks.triplets):
        m = len(ks.templates[t.relation].statements)
        uses = Counter(d["template"] for d in docs if d["fact_id"] == fid)
        counts = [uses.get(j, 0) for j in range(m)]
        assert max(counts) - min(counts) <= 1 and sum(counts) == n


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_render_rejects_bad_count(bad):
    with pytest.raises(KnowledgeError, match="renders_per_fact"):
        render_documents(_small_set(), renders_per_fact=bad)


def test_save_leaves_only_final_files(tmp_path):
    ks = _small_set()
    save_knowledge_set(ks, tmp_path / "w")
    save_knowledge_set(ks, tmp_path / "w")  # overwriting goes through temp names too
    assert sorted(os.listdir(tmp_path / "w")) == ["templates.yaml", "triplets.jsonl"]
