"""Retention probes: building, files, answer spans, batched scoring against float64 brute
force, the oracle / random / constant must-shows, greedy exact match, flat metrics."""

import json
import math
import random

import pytest
import torch

from kis_megatron.knowledge.triplets import KnowledgeError, RelationTemplates, Triplet, \
    make_knowledge_set
from kis_megatron.knowledge.worlds import default_configs, generate_worlds
from kis_megatron.eval.retention import (ProbeItem, answer_span, build_probes,
                                         evaluate_retention, greedy_exact_match, load_probes,
                                         save_probes, score_probes, select_probes,
                                         span_logprobs)

BOS, PAD = 1, 0


class WordTokenizer:
    """Whitespace word-level tokenizer with a BOS token: no training needed."""

    def __init__(self, texts):
        words = sorted({w for t in texts for w in t.split()})
        self.ids = {w: i + 2 for i, w in enumerate(words)}
        self.words = {i: w for w, i in self.ids.items()}
        self.vocab = len(words) + 2

    def encode(self, text):
        return [BOS] + [self.ids[w] for w in text.split()]

    def decode(self, ids):
        return " ".join(self.words.get(i, "<?>") for i in ids)


@pytest.fixture(scope="module")
def worlds():
    return generate_worlds(default_configs(120, 60), seed=3)


@pytest.fixture(scope="module")
def probes(worlds):
    return {name: build_probes(ks, k=4, seed=0) for name, ks in worlds.items()}


@pytest.fixture(scope="module")
def tok(probes):
    texts = [t for ps in probes.values() for p in ps for t in (p.prompt, *p.candidates)]
    return WordTokenizer(texts)


def oracle(tok, probes, known=None):
    """A logprob_fn that puts high logits on the true answer's tokens after each known prompt
    (known: the probes it knows; others get random logits)."""
    table = {}
    for p in (known if known is not None else probes):
        ids = tok.encode(p.prompt)
        table[tuple(ids)] = tok.encode(p.prompt + " " + p.answer)[len(ids):]
    lengths = sorted({len(k) for k in table}, reverse=True)
    gen = torch.Generator().manual_seed(0)

    def fn(input_ids):
        B, T = input_ids.shape
        out = torch.randn(B, T, tok.vocab, generator=gen)
        for b in range(B):
            row = input_ids[b].tolist()
            for L in lengths:
                answer = table.get(tuple(row[:L])) if L <= T else None
                if answer is not None:
                    for j, a in enumerate(answer):
                        if L - 1 + j < T:
                            out[b, L - 1 + j, a] = 50.0
                    break
        return out
    return fn


# ----------------------------------------------------------------------------- building


def test_build_probes_properties(worlds, probes):
    for name, ks in worlds.items():
        ps = probes[name]
        pools = ks.objects_by_relation()
        assert len(ps) == 2 * len(ks.triplets)  # one recall + one held-out probe per fact
        for p in ps:
            t = ks.triplets[p.fact_id]
            assert (p.knowledge_set, p.relation, p.subject, p.answer) == (
                name, t.relation, t.subject, t.object)
            assert len(p.distractors) == 4 and len(set(p.candidates)) == 5
            assert set(p.distractors) <= set(pools[t.relation])
            templates = getattr(ks.templates[t.relation],
                                "questions" if p.style == "recall" else "heldout_questions")
            assert p.prompt == templates[p.template].format(subject=t.subject)
    # every distractor value appears: sampling covers the pool, not a fixed few
    d = probes["domain"]
    for rel, pool in worlds["domain"].objects_by_relation().items():
        seen = {x for p in d if p.relation == rel for x in p.distractors}
        assert seen == set(pool)
    assert build_probes(worlds["domain"], k=4, seed=0) == d
    assert build_probes(worlds["domain"], k=4, seed=1) != d


def test_build_probes_sampling_and_errors(worlds):
    ks = worlds["general"]
    sub = build_probes(ks, k=2, seed=5, max_facts=37, styles=("heldout",))
    assert len(sub) == 37 and {p.style for p in sub} == {"heldout"}
    assert len({p.fact_id for p in sub}) == 37
    small = make_knowledge_set("s", [Triplet(f"e{i}", "r", f"o{i % 3}") for i in range(6)],
                               {"r": RelationTemplates(["{subject} r {object}"])})
    with pytest.raises(KnowledgeError, match="'r' has only 3 distinct objects"):
        build_probes(small, k=3)
    assert len(build_probes(small, k=2)) == 6  # no heldout templates: recall only
    for bad in (0, 1.5, True):
        with pytest.raises(KnowledgeError, match="k "):
            build_probes(small, k=bad)


def test_select_probes_keeps_facts_below_a_limit_and_a_fixed_nested_sample(probes):
    d = probes["domain"]  # 240 facts, a recall and a held-out probe each
    facts = lambda ps: {p.fact_id for p in ps}  # noqa: E731
    assert select_probes(d) == d
    below = select_probes(d, facts_below=50)
    assert facts(below) == set(range(50))
    assert [(p.fact_id, p.style, p.answer) for p in below] == \
        [(p.fact_id, p.style, p.answer) for p in d if p.fact_id < 50]
    five = select_probes(d, max_facts=5, facts_below=50)
    # a fixed ranking (keyed blake2b of the fact id): the same in every process and release
    assert sorted(facts(five)) == [10, 37, 42, 45, 48]
    assert len(five) == 10 and {p.style for p in five} == {"recall", "heldout"}
    assert five == [p for p in below if p.fact_id in facts(five)]  # file order kept
    assert facts(five) < facts(select_probes(d, max_facts=8, facts_below=50))  # nested in the cap
    wide = facts(select_probes(d, max_facts=5, facts_below=200))
    assert {f for f in wide if f < 50} <= facts(five)  # nested in the fact limit
    assert select_probes(d, max_facts=500, facts_below=50) == below


def test_a_fact_limit_draws_distractors_from_the_objects_trained_on(probes):
    d = probes["domain"]
    full_pool = {}
    for p in d:
        full_pool.setdefault(p.relation, set()).add(p.answer)
    for limit in (24, 50):
        kept = select_probes(d, facts_below=limit)
        pool = {}
        for p in (q for q in d if q.fact_id < limit):
            pool.setdefault(p.relation, set()).add(p.answer)
        assert any(pool[r] < full_pool[r] for r in pool)  # the limit does shrink some pool
        for p in kept:
            assert set(p.distractors) <= pool[p.relation] - {p.answer}
            assert len(set(p.distractors)) == min(4, len(pool[p.relation]) - 1)
        assert kept == select_probes(d, facts_below=limit)  # deterministic
    pool50 = {(q.relation, q.answer) for q in d if q.fact_id < 50}
    fine = [p for p in d if p.fact_id < 50 and all((p.relation, x) in pool50 for x in p.distractors)]
    kept = {(p.fact_id, p.style, p.template): p for p in select_probes(d, facts_below=50)}
    assert fine and all(kept[(p.fact_id, p.style, p.template)] == p for p in fine)  # left as they were
    few = select_probes(d, facts_below=12)  # three compounds: two distractors at most
    assert few and all(len(p.distractors) <= 2 for p in few)
    with pytest.raises(KnowledgeError, match="raise infusion.facts"):
        select_probes(d, facts_below=4)  # one compound: no other objects to draw from


def test_probe_files_round_trip_and_errors(tmp_path, probes):
    path = tmp_path / "p.jsonl"
    save_probes(path, probes["domain"])
    assert load_probes(path) == probes["domain"]
    good = json.loads(path.read_text().splitlines()[0])
    cases = [("{not json", ":1: invalid JSON"),
             (json.dumps({k: v for k, v in good.items() if k != "answer"}),
              ":1: probe is missing field 'answer'"),
             (json.dumps({**good, "fact_id": "3"}), ":1: probe field 'fact_id' must be a int"),
             (json.dumps({**good, "style": "quiz"}), ":1: unknown style 'quiz'"),
             (json.dumps({**good, "distractors": [good["answer"]]}), ":1: distractors must"),
             ("", ": the probe file is empty")]
    for line, msg in cases:
        path.write_text(line + "\n")
        with pytest.raises(KnowledgeError) as info:
            load_probes(path)
        assert str(info.value).startswith(str(path) + msg), str(info.value)


# ----------------------------------------------------------------------------- spans


def test_answer_span_word_and_char_level():
    tok = WordTokenizer(["Q: Who employs Ana? A: Kortek Works"])
    ids, start = answer_span(tok.encode, "Q: Who employs Ana? A:", "Kortek Works")
    assert ids[start:] == [tok.ids["Kortek"], tok.ids["Works"]]
    assert ids[:start] == tok.encode("Q: Who employs Ana? A:")
    ids, start = answer_span(lambda s: [ord(c) for c in s], "ab:", "cd")
    assert ids[start:] == [ord(" "), ord("c"), ord("d")] and start == 3


class PieceTokenizer:
    """Greedy longest-match over sentencepiece-style pieces ("▁" marks a preceding space)."""

    def __init__(self, pieces):
        self.pieces = sorted(pieces, key=len, reverse=True)
        self.ids = {p: i for i, p in enumerate(pieces)}

    def encode(self, text):
        s, out = "▁" + text.replace(" ", "▁"), []
        while s:
            piece = next(p for p in self.pieces if s.startswith(p))
            out.append(self.ids[piece])
            s = s[len(piece):]
        return out


def test_answer_span_sentencepiece_style():
    letters = list("ABPaimrs:") + ["▁"]
    tok = PieceTokenizer(letters + ["▁A", "▁Paris", "Par", "is"])
    ids, start = answer_span(tok.encode, "A:", "Paris")
    # jointly tokenised, the answer is the in-context piece "▁Paris"; encoding the answer
    # after the prompt as its own string without the space would give "Par", "is"
    assert ids[start:] == [tok.ids["▁Paris"]]
    assert tok.encode("A:Paris")[2:] == [tok.ids["Par"], tok.ids["is"]]
    assert ids[:start] == [tok.ids["▁A"], tok.ids[":"]]
    # a piece that crosses the prompt/answer boundary is scored with the answer
    merging = PieceTokenizer(letters + ["▁A", ":▁P", "aris"])
    ids, start = answer_span(merging.encode, "A:", "Paris")
    assert start == 1 and ids[start:] == [merging.ids[":▁P"], merging.ids["aris"]]
    with pytest.raises(ValueError, match="adds no tokens"):
        answer_span(lambda s: [1, 2], "A:", "Paris")
    with pytest.raises(ValueError, match="shares no leading token"):
        answer_span(lambda s: [len(s)], "A:", "Paris")


def test_answer_span_real_sentencepiece(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    corpus = tmp_path / "c.txt"
    rng = random.Random(0)
    words = ["Velton", "Kortek", "Marsburg", "Paris", "lives", "in", "works", "for", "Ana",
             "Rik", "Q:", "Who", "employs", "A:"]
    corpus.write_text("\n".join(" ".join(rng.choices(words, k=8)) for _ in range(400)))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "m"),
                                   vocab_size=60, model_type="bpe", num_threads=1,
                                   minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "m.model"))
    for prompt, answer in [("Ana lives in", "Velton"), ("Q: Who employs Rik? A:", "Kortek"),
                           ("Rik works for", "Marsburg Paris")]:
        ids, start = answer_span(sp.encode, prompt, answer)
        assert ids[:start] == sp.encode(prompt)
        assert sp.decode(ids[start:]) == answer
        assert sp.id_to_piece(ids[start]).startswith("▁")


# ----------------------------------------------------------------------------- scoring


def _causal_toy(V, seed=0):
    """A deterministic causal 'model': logits at t depend on token t and the prefix sum."""
    g = torch.Generator().manual_seed(seed)
    W, U = torch.randn(V, V, generator=g, dtype=torch.float64), \
        torch.randn(V, V, generator=g, dtype=torch.float64)

    def fn(ids):
        return (W[ids] + U[torch.cumsum(ids, 1) % V]).float()

    def reference(ids, start):  # float64, one unpadded sequence at a time
        x = torch.tensor(ids)[None]
        lp = torch.log_softmax(W[x] + U[torch.cumsum(x, 1) % V], -1)[0]
        return sum(lp[j - 1, ids[j]].item() for j in range(start, len(ids)))
    return fn, reference


def test_span_logprobs_match_float64_bruteforce():
    V = 23
    fn, ref = _causal_toy(V)
    rng = random.Random(1)
    seqs = []
    for _ in range(41):
        n = rng.randint(2, 15)
        seqs.append(([rng.randrange(1, V) for _ in range(n)], rng.randint(1, n - 1)))
    expected = [ref(ids, s) for ids, s in seqs]
    for bs in (1, 4, 7, 100):
        got = span_logprobs(fn, seqs, batch_size=bs)
        assert [n for _, n in got] == [len(ids) - s for ids, s in seqs]
        for (g, _), e in zip(got, expected):
            assert g == pytest.approx(e, rel=1e-5, abs=1e-4)


def test_score_probes_matches_bruteforce_and_normalize():
    V = 40
    fn, ref = _causal_toy(V, seed=2)
    encode = lambda s: [BOS] + [int(w) for w in s.split()]  # noqa: E731
    probes = [ProbeItem("w", i, "r", "x", f"{i + 3} 5 7", f"{i + 2}", (f"{i + 4} 9", "11 12 13"),
                        "recall", 0) for i in range(9)]
    res = score_probes(probes, fn, encode, batch_size=5)
    resm = score_probes(probes, fn, encode, batch_size=2, normalize="mean")
    for p, sc, scm in zip(probes, res.scores, resm.scores):
        for c, s, sm in zip(p.candidates, sc, scm):
            ids, start = answer_span(encode, p.prompt, c)
            assert s == pytest.approx(ref(ids, start), rel=1e-5, abs=1e-4)
            assert sm == pytest.approx(ref(ids, start) / (len(ids) - start), rel=1e-5, abs=1e-4)
    assert res.correct == [sc[0] > max(sc[1:]) for sc in res.scores]


def test_oracle_scores_one(probes, tok):
    allp = probes["general"] + probes["domain"]
    res = score_probes(allp, oracle(tok, allp), tok.encode, batch_size=256)
    assert set(res.accuracy) == {("general", "recall"), ("general", "heldout"),
                                 ("domain", "recall"), ("domain", "heldout")}
    assert all(a == 1.0 for a in res.accuracy.values())
    assert all(a == 1.0 for a in res.per_relation.values())
    assert res.counts[("general", "recall")] == 600 and res.counts[("domain", "heldout")] == 240
    assert res.chance[("domain", "recall")] == pytest.approx(0.2)


def test_random_scores_chance(probes, tok):
    allp = probes["general"] + probes["domain"]  # 1680 probes, 5 candidates each
    gen = torch.Generator().manual_seed(7)
    res = score_probes(allp, lambda ids: torch.randn(*ids.shape, tok.vocab, generator=gen),
                       tok.encode, batch_size=512)
    acc = sum(res.correct) / len(res.correct)
    sd = math.sqrt(0.2 * 0.8 / len(allp))
    assert abs(acc - 0.2) < 4.5 * sd, acc


def test_constant_scores_zero_ties_count_wrong(probes, tok):
    ps = probes["domain"]
    res = score_probes(ps, lambda ids: torch.zeros(*ids.shape, tok.vocab), tok.encode)
    assert all(len(set(sc)) == 1 for sc in res.scores)  # every candidate ties
    assert sum(res.correct) == 0 and all(a == 0.0 for a in res.accuracy.values())


def test_score_probes_rejects_bad_logprob_shape(probes, tok):
    with pytest.raises(ValueError, match=r"must return \[B, T, V\]"):
        score_probes(probes["domain"][:3], lambda ids: torch.zeros(ids.shape[0], tok.vocab),
                     tok.encode)


# ----------------------------------------------------------------------------- exact match


def test_greedy_exact_match(probes, tok):
    ps = probes["general"][:120] + probes["domain"][:80]
    em = greedy_exact_match(ps, tok.encode, tok.decode, max_new_tokens=3,
                            logprob_fn=oracle(tok, ps), batch_size=17)
    assert all(em.correct) and all(a == 1.0 for a in em.accuracy.values())
    # a decoder that answers the first distractor is never right
    wrong = {tuple(tok.encode(p.prompt)): tok.encode(p.prompt + " " + p.distractors[0])[
        len(tok.encode(p.prompt)):] for p in ps}
    em = greedy_exact_match(ps, tok.encode, tok.decode, max_new_tokens=3,
                            generate_fn=lambda ids, n: wrong[tuple(ids)])
    assert not any(em.correct)
    # whole-word match: "Parisian" is not "Paris", "Paris." is
    words = WordTokenizer(["Paris", "Parisian", "Paris.", "A:"])
    p = ProbeItem("w", 0, "r", "x", "A:", "Paris", ("Oslo",), "recall", 0)
    for out, hit in (("Parisian", False), ("Paris.", True), ("Paris", True)):
        em = greedy_exact_match([p], words.encode, words.decode, 2,
                                generate_fn=lambda ids, n, o=out: [words.ids[o]])
        assert em.correct == [hit], out


def test_evaluate_retention_flat_metrics(tmp_path, probes, tok):
    files = {}
    for name in ("general", "domain"):
        files[name] = tmp_path / f"{name}.jsonl"
        save_probes(files[name], probes[name])
    # a model that knows the general world only: general at 1.0, domain near chance
    fn = oracle(tok, None, known=probes["general"])
    m = evaluate_retention(fn, tok.encode, files, decode=tok.decode, batch_size=256,
                           per_relation=True)
    assert m["retention/general"] == 1.0 and m["retention_heldout/general"] == 1.0
    assert m["exact_match/general"] == 1.0
    assert m["probes/general"] == 600 and m["probes_heldout/domain"] == 240
    assert m["retention_chance/domain"] == pytest.approx(0.2)
    sd = math.sqrt(0.2 * 0.8 / 240)
    assert abs(m["retention/domain"] - 0.2) < 4.5 * sd
    assert m["exact_match/domain"] < 0.1
    assert m["retention_relation/general/city"] == 1.0
    assert all(isinstance(v, (int, float)) for v in m.values())
    json.dumps(m)  # ready for metrics.jsonl
