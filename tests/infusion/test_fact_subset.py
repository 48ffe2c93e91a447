"""infusion.facts: the domain stream of the first F facts of one labelled shard.

Every document's tokens name its fact (general tokens lie in another range), so a batch's
content says which facts it carries without any tokenizer.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from kis_megatron.config import ConfigError, load_config
from kis_megatron.data.errors import DataError
from kis_megatron.infusion.fact_subset import DocumentSubset
from kis_megatron.data.indexed_dataset import IndexedDataset, IndexedDatasetWriter, write_doc_labels
from kis_megatron.infusion.stream import build_train_stream

FACTS, RENDERS, SEQ = 30, 3, 16
BASE = 1000  # fact f: tokens BASE + f; no fact: BASE + 500; general: < BASE


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("facts")
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(FACTS), RENDERS)
    labels = np.concatenate([labels, [-1, -1]])  # two documents without a fact
    rng.shuffle(labels)  # documents in shuffled order, as make_knowledge writes them
    with IndexedDatasetWriter(d / "domain", np.uint16) as w:
        for f in labels:
            w.add_document(np.full(rng.integers(5, 12), BASE + f if f >= 0 else BASE + 500))
    write_doc_labels(d / "domain", labels)
    with IndexedDatasetWriter(d / "general", np.uint16) as w:
        for _ in range(200):
            w.add_document(rng.integers(1, 900, rng.integers(5, 40)))
    with IndexedDatasetWriter(d / "nolabels", np.uint16) as w:
        for f in range(FACTS):
            w.add_document(np.full(9, BASE + f))
    return {"dir": d, "labels": labels, "domain": str(d / "domain"),
            "general": str(d / "general"), "nolabels": str(d / "nolabels")}


def stream(shards, facts, steps=20, **extra):
    over = {"data.train": shards["general"], "infusion.domain": shards["domain"],
            "infusion.ratio": 0.25, "data.seq_len": SEQ, "model.max_seq_len": SEQ,
            "train.steps": steps, "train.global_batch": 8, "train.micro_batch": 4,
            "train.seed": 3, "model.vocab_size": 2048, **extra}
    if facts is not None:
        over["infusion.facts"] = facts
    cfg = load_config(None, [f"{k}={v}" for k, v in over.items()])
    return build_train_stream(cfg.data, cfg.infusion, vocab_size=cfg.model.vocab_size,
                              seed=cfg.train.seed, global_batch=cfg.train.global_batch,
                              steps=cfg.train.steps)


def test_subset_view_reads_the_shards_documents(shards):
    ds = IndexedDataset(shards["domain"])
    view = DocumentSubset(ds, [4, 0, 7])
    assert len(view) == 3 and view.sizes.tolist() == ds.sizes[[4, 0, 7]].tolist()
    assert np.array_equal(view.get(1, 2, 3), ds.get(0, 2, 3))
    assert view.num_tokens == int(ds.sizes[[4, 0, 7]].sum())
    with pytest.raises(IndexError):
        view.get(3)


@pytest.mark.parametrize("facts", [1, 7, FACTS])
def test_stream_carries_only_the_first_facts_at_the_exact_ratio(shards, facts):
    s = stream(shards, facts)
    src = s.blender.sources[1]
    assert src.fact_ids.tolist() == list(range(facts))
    docs = int(np.count_nonzero((shards["labels"] >= 0) & (shards["labels"] < facts)))
    assert s.describe()["domain_facts"] == facts and s.describe()["domain_documents"] == docs
    seen = set()
    for step in range(1, 21):
        b = s.next_batch()
        st = b.stats
        assert st["tokens_total"] == step * 8 * SEQ
        assert abs(st["tokens_domain"] - 0.25 * st["tokens_total"]) <= SEQ, st
        domain_rows = b.tokens[b.tokens.max(axis=1) >= BASE]
        seen |= set(domain_rows[domain_rows >= BASE].ravel().tolist())
    assert seen and max(seen) < BASE + facts  # no token of a later fact, nor unlabelled ones
    counts = s.blender.exposure_counts("domain")
    assert len(counts) == facts and counts.sum() > 0
    assert st["exposures/mean"] == counts.sum() / facts


def test_two_builds_give_the_same_tokens_and_a_resumed_stream_continues_identically(shards):
    a, b = stream(shards, 7), stream(shards, 7)
    full = [a.next_batch() for _ in range(12)]
    for want in full:
        assert np.array_equal(b.next_batch().tokens, want.tokens)
    first = stream(shards, 7)
    for _ in range(5):
        first.next_batch()
    state = json.loads(json.dumps(first.state_dict()))
    resumed = stream(shards, 7)
    resumed.load_state_dict(state)
    for want in full[5:]:
        got = resumed.next_batch()
        assert np.array_equal(got.tokens, want.tokens) and got.stats == want.stats
    with pytest.raises(DataError, match="resume with the configuration"):  # another level
        stream(shards, 8).load_state_dict(state)


def test_facts_errors_name_the_key(shards):
    with pytest.raises(DataError, match=rf"infusion.facts=31 exceeds the {FACTS} distinct facts"):
        stream(shards, FACTS + 1)
    with pytest.raises(DataError, match="infusion.facts=3 needs fact labels"):
        stream(shards, 3, **{"infusion.domain": shards["nolabels"]})
    with pytest.raises(DataError, match="infusion.facts=1: .* fewer than one window"):
        stream(shards, 1, **{"data.seq_len": 64, "model.max_seq_len": 64})
    with pytest.raises(ConfigError, match="infusion.facts: .*infusion.domains"):
        stream(shards, 3, **{"infusion.domain": "null", "infusion.ratio": 0,
                             "infusion.domains": f"[{{name: d, path: {shards['domain']}, ratio: 0.1}}]"})


def test_fact_ids_with_a_gap_are_refused(tmp_path):
    prefix = tmp_path / "gap"
    with IndexedDatasetWriter(prefix, np.uint16) as w:
        for f in (0, 1, 3, 4):
            w.add_document(np.full(20, BASE + f))
    write_doc_labels(prefix, [0, 1, 3, 4])
    from kis_megatron.infusion.fact_subset import first_facts

    ds = IndexedDataset(prefix)
    assert len(first_facts(ds, [0, 1, 3, 4], 2)[0]) == 2
    with pytest.raises(DataError, match="infusion.facts=3: .* no document of fact 2"):
        first_facts(ds, [0, 1, 3, 4], 3)
