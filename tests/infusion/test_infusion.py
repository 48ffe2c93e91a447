"""Tests of the infusion blender against brute-force references.

References are independent of the code under test: token streams are rebuilt by
concatenating whole documents, targets are summed in exact Fractions from the schedule's
definition, domain tokens are recounted from the materialised samples (every source's
token ids live in their own range, so a row's content says where it came from), and
exposures are recounted document by document.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kis_megatron.data.errors import InfusionError
from kis_megatron.infusion.blender import InfusionBlender, Schedule, TokenWindowSource
from kis_megatron.infusion.schedule import RatioTargets

# The plan tracks targets summed in float64; vs. exact sums that adds rounding only.
EPS = 1e-9
SPAN = 10_000  # source k's token ids lie in [k * SPAN, (k + 1) * SPAN)


class FakeShard:
    """In-memory stand-in with the IndexedDataset interface the blender codes against."""

    def __init__(self, docs):
        self.docs = [np.asarray(d, dtype=np.int32) for d in docs]
        self.sizes = np.array([len(d) for d in self.docs], dtype=np.int32)

    def __len__(self):
        return len(self.docs)

    def get(self, i, offset=0, length=None):
        d = self.docs[i]
        end = len(d) if length is None else offset + length
        assert 0 <= offset <= end <= len(d)
        return d[offset:end]


def make_shard(lengths, source_id, seed=0):
    rng = np.random.default_rng([seed, source_id])
    return FakeShard([rng.integers(0, SPAN, n) + source_id * SPAN for n in lengths])


def stream_of(src, epoch):
    """The epoch's stream, by concatenating whole documents in the source's order."""
    order = src.doc_order(epoch)
    assert sorted(order.tolist()) == list(range(src.num_documents))
    return np.concatenate([src.dataset.docs[i] for i in order]).astype(np.int64)


def brute_exposures(src, labels, epoch):
    """Per window: (fact ids rendered in full, cut count), by the documented rule, one
    document at a time: attributed to the window whose own span holds its first token."""
    L, W = src.seq_len, src.num_windows_per_epoch
    full = [[] for _ in range(W)]
    cut = [0] * W
    pos = 0
    for doc in src.doc_order(epoch):
        size = len(src.dataset.docs[doc])
        s, e = pos, pos + size
        pos = e
        if size == 0 or labels[doc] < 0 or s >= W * L:
            continue
        w = s // L
        if w * L <= s and e <= w * L + L + 1:
            full[w].append(int(labels[doc]))
        else:
            cut[w] += 1
    return full, cut


def ratio_at(changes, step):
    """Ratio of a {step: ratio} schedule at a step (largest key <= step)."""
    return changes[max(k for k in changes if k <= step)]


# ---------------------------------------------------------------- TokenWindowSource


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 40), min_size=1, max_size=30),
    seq_len=st.integers(1, 24),
    seed=st.integers(0, 2**32),
    epoch=st.integers(0, 3),
    preload=st.booleans(),
)
def test_windows_match_brute_force_stream(lengths, seq_len, seed, epoch, preload):
    if sum(lengths) < seq_len + 1:
        lengths = lengths + [seq_len + 1]
    src = TokenWindowSource(make_shard(lengths, 0, seed), seq_len, seed, "s", preload=preload)
    stream = stream_of(src, epoch)
    W = src.num_windows_per_epoch
    assert W == (len(stream) - 1) // seq_len
    every = src.windows(epoch, 0, W)
    for j in range(W):
        expect = stream[j * seq_len:j * seq_len + seq_len + 1]
        tokens, _ = src.window(epoch, j)
        assert tokens.dtype == np.int64 and np.array_equal(tokens, expect)
        assert np.array_equal(every[j], expect)
    j0 = W // 3
    assert np.array_equal(src.windows(epoch, j0, W - j0), every[j0:])


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 30), min_size=1, max_size=40),
    seq_len=st.integers(1, 20),
    seed=st.integers(0, 1000),
    data=st.data(),
)
def test_exposures_match_document_by_document_count(lengths, seq_len, seed, data):
    if sum(lengths) < seq_len + 1:
        lengths = lengths + [seq_len + 1]
    labels = np.array(data.draw(st.lists(st.integers(-1, 5), min_size=len(lengths),
                                         max_size=len(lengths))), dtype=np.int64)
    src = TokenWindowSource(make_shard(lengths, 0, seed), seq_len, seed, "facts", labels)
    full, cut = brute_exposures(src, labels, epoch=1)
    W = src.num_windows_per_epoch
    for j in range(W):
        got = src.exposures(1, j)
        assert sorted(got.fact_ids.tolist()) == sorted(full[j]) and got.cut == cut[j]
        assert np.array_equal(np.sort(src.window(1, j)[1]), np.sort(full[j]))
    run = src.exposures(1, 0, W)
    assert sorted(run.fact_ids.tolist()) == sorted(sum(full, []))
    assert run.cut == sum(cut) and run.full == len(run.fact_ids)
    # A full document's tokens really lie inside its window.
    stream = stream_of(src, 1)
    order, pos = src.doc_order(1), 0
    for doc in order:
        size = len(src.dataset.docs[doc])
        if size and labels[doc] >= 0 and pos < W * seq_len:
            w = pos // seq_len
            inside = pos + size <= w * seq_len + seq_len + 1
            assert (labels[doc] in full[w]) or not inside
            if inside:
                window = stream[w * seq_len:w * seq_len + seq_len + 1]
                off = pos - w * seq_len
                assert np.array_equal(window[off:off + size], src.dataset.docs[doc])
        pos += size


class ShortShard(FakeShard):
    """A shard whose index promises more tokens than document 2 holds."""

    def get(self, i, offset=0, length=None):
        d = self.docs[i]
        piece = d[offset:len(d) if length is None else offset + length]
        return piece[:-1] if i == 2 else piece


@pytest.mark.parametrize("preload", [True, False])
def test_shard_disagreeing_with_its_sizes_is_an_error(preload):
    shard = ShortShard([np.arange(10)] * 5)
    with pytest.raises(InfusionError, match="document 2 did not return"):
        TokenWindowSource(shard, 4, 0, "s", preload=preload).windows(0, 0, 12)


def test_doc_order_is_deterministic_and_varies_by_epoch_and_name():
    shard = make_shard([5] * 50, 0)
    a = TokenWindowSource(shard, 8, 3, "general")
    b = TokenWindowSource(shard, 8, 3, "general")
    c = TokenWindowSource(shard, 8, 3, "other")
    d = TokenWindowSource(shard, 8, 4, "general")
    assert np.array_equal(a.doc_order(0), b.doc_order(0))
    assert not np.array_equal(a.doc_order(0), a.doc_order(1))
    assert not np.array_equal(a.doc_order(0), c.doc_order(0))
    assert not np.array_equal(a.doc_order(0), d.doc_order(0))
    # Evicting cached epochs and coming back gives the same order.
    first = a.doc_order(0).copy()
    for e in range(1, 5):
        a.doc_order(e)
    assert np.array_equal(a.doc_order(0), first)


def test_doc_order_is_the_same_in_another_process():
    code = "\n".join([
        "import numpy as np",
        "from kis_megatron.infusion.blender import TokenWindowSource",
        "class S:",
        "    sizes = np.full(40, 3, np.int32)",
        "    def __len__(self): return 40",
        "    def get(self, i, offset=0, length=None): return np.zeros(3)",
        "src = TokenWindowSource(S(), 4, 7, 'domain-x', preload=False)",
        "print(src.doc_order(2).tolist())",
    ])
    outs = []
    for hashseed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=hashseed)
        res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, check=True)
        outs.append(json.loads(res.stdout))
    assert outs[0] == outs[1]
    assert len(set(outs[0])) == 40


@pytest.mark.parametrize("lengths, seq_len, labels, match", [
    ([], 4, None, "no documents"),
    ([2, 2], 4, None, "fewer than one window"),
    ([3, 3], 4, [0], "doc_labels"),
    ([3, 3], 4, [0, -2], "fact ids are >= 0"),
    ([3, 3], 0, None, "seq_len"),
])
def test_source_errors(lengths, seq_len, labels, match):
    with pytest.raises(InfusionError, match=match):
        TokenWindowSource(make_shard(lengths, 0), seq_len, 0, "s", labels)


# ------------------------------------------------------------------- the blender


def build(lengths_by_source, ratios, seq_len, batch, steps, seed=0, labels=None, repeat=True):
    """A blender over fake shards; source k's tokens lie in [k * SPAN, (k+1) * SPAN)."""
    labels = labels or {}
    srcs = [TokenWindowSource(make_shard(ls, k, seed), seq_len, seed,
                              "general" if k == 0 else f"dom{k}", labels.get(k))
            for k, ls in enumerate(lengths_by_source)]
    return InfusionBlender(srcs[0], srcs[1:], ratios, seq_len, batch, seed, steps, repeat)


def run_ranks(make, steps, dp):
    """Per step: the global batch assembled from dp blenders, one per rank."""
    blenders = [make() for _ in range(dp)]
    out = []
    for _ in range(steps):
        parts = [b.next_batch(r, dp) for r, b in enumerate(blenders)]
        out.append(parts)
    return out


@settings(max_examples=30, deadline=None)
@given(
    num_domains=st.integers(1, 3),
    seq_len=st.integers(1, 16),
    dp=st.sampled_from([1, 2, 3, 4]),
    per_rank=st.integers(1, 6),
    steps=st.integers(1, 12),
    data=st.data(),
)
def test_domain_tokens_track_schedule_at_every_step(num_domains, seq_len, dp, per_rank, steps, data):
    batch = dp * per_rank
    weights = data.draw(st.lists(st.floats(0.0, 1.0), min_size=num_domains + 1,
                                 max_size=num_domains + 1))
    total = sum(weights) + 1e-3
    # Piecewise schedules: ratios (summing below 1) change at up to two random steps.
    change_steps = sorted(set([0] + data.draw(st.lists(st.integers(1, steps), max_size=2))))
    scheds = [{} for _ in range(num_domains)]
    for s in change_steps:
        w = data.draw(st.lists(st.floats(0.0, 1.0), min_size=num_domains + 1,
                               max_size=num_domains + 1)) if s else weights
        tot = sum(w) + 1e-3 if s else total
        for d in range(num_domains):
            scheds[d][s] = w[d + 1] / tot * 0.999
    lengths = [data.draw(st.lists(st.integers(1, 3 * seq_len), min_size=1, max_size=12))
               for _ in range(num_domains + 1)]
    lengths = [ls + [seq_len + 1] for ls in lengths]

    def make():
        return build(lengths, scheds, seq_len, batch, steps)

    ref = make()
    ranks = run_ranks(make, steps, dp)
    counts = [0] * (num_domains + 1)
    target = [Fraction(0)] * num_domains
    consumed = [[] for _ in range(num_domains + 1)]
    for s, parts in enumerate(ranks):
        whole = ref.next_batch()
        tokens = np.concatenate([p.tokens for p in parts])
        assert tokens.shape == (batch, seq_len + 1) and tokens.dtype == np.int64
        assert np.array_equal(tokens, whole.tokens)  # union of the disjoint slices
        assert np.array_equal(np.concatenate([p.source for p in parts]), whole.source)
        origin = tokens // SPAN
        assert (origin == origin[:, :1]).all()  # each sample from one source
        assert np.array_equal(origin[:, 0], whole.source)
        for k in range(num_domains + 1):
            consumed[k].extend(tokens[origin[:, 0] == k])
            counts[k] += int(np.count_nonzero(origin[:, 0] == k))
        for d in range(num_domains):
            target[d] += Fraction(scheds[d][max(k for k in scheds[d] if k <= s)]) * batch
            dom_tokens = counts[d + 1] * seq_len
            assert abs(dom_tokens - target[d] * seq_len) <= seq_len * (1 + EPS)
            name = f"dom{d + 1}"
            for p in parts:  # the same global statistics on every rank
                assert p.tokens_domain_by_source[name] == dom_tokens
                assert p.target_domain_tokens_by_source[name] == pytest.approx(
                    float(target[d] * seq_len), rel=1e-12, abs=1e-9)
        for p in parts:
            assert p.tokens_total == (s + 1) * batch * seq_len
            assert p.tokens_domain == sum(counts[1:]) * seq_len
            assert p.metrics() == parts[0].metrics()
    # Sources are consumed sequentially, epoch after epoch.
    for k, src in enumerate(ref.sources):
        W = src.num_windows_per_epoch
        for o, row in enumerate(consumed[k]):
            assert np.array_equal(row, src.window(o // W, o % W)[0])
        assert ref.epochs_started[src.name] == -(-len(consumed[k]) // W)


@settings(max_examples=30, deadline=None)
@given(ratio=st.floats(0.0, 0.99), dp=st.sampled_from([1, 2, 4, 8]),
       per_rank=st.integers(1, 16), two=st.booleans())
def test_each_dp_slice_gets_its_share(ratio, dp, per_rank, two):
    batch = dp * per_rank
    ratios = [ratio / 2, ratio / 2] if two else [ratio]
    lengths = [[7] * 40] * (len(ratios) + 1)
    blenders = [build(lengths, ratios, 4, batch, 6) for _ in range(dp)]
    for _ in range(6):
        for r, b in enumerate(blenders):
            src = b.next_batch(r, dp).source
            for d, rd in enumerate(ratios):
                # The counts within one sample of their target at both slice ends.
                assert abs(np.count_nonzero(src == d + 1) - rd * per_rank) <= (1 if not two else 2)


def test_plan_bound_holds_per_sample_for_hard_mixtures():
    # Ratios summing to nearly 1, batches of 1: the earliest-deadline-first case.
    for ratios in ([0.4995, 0.4995], [0.33, 0.33, 0.33], [0.7, 0.2, 0.05, 0.0499]):
        tg = RatioTargets([Schedule.constant(r) for r in ratios], 10, 1)
        counts, exact = [0] * len(ratios), [Fraction(0)] * len(ratios)
        for n, k in enumerate(tg.plan(0, 3000, counts)):
            if k:
                counts[k - 1] += 1
            for d, r in enumerate(ratios):
                exact[d] += Fraction(r)
                assert -1 - EPS <= counts[d] - exact[d] <= 1 - tg.alpha + EPS
        assert tg.plan(0, 1, [0] * len(ratios)).shape == (1,)


def test_window_schedule_infuses_only_inside_the_window():
    sch = Schedule.window(0.25, 0.8, 1.0)
    assert sch.pieces(1000) == ((0, 0.0), (800, 0.25), (1000, 0.0))
    assert Schedule.window(0.1, 0.0, 0.5).pieces(10) == ((0, 0.1), (5, 0.0))
    b = build([[9] * 200, [5] * 200], sch, 4, 8, 20)
    per_step = [int(np.count_nonzero(b.next_batch().source == 1)) for _ in range(22)]
    assert per_step[:16] == [0] * 16 and per_step[20:] == [0, 0]
    assert sum(per_step[16:20]) == 8  # 0.25 * 8 samples * 4 steps
    assert b.state_dict()["samples"][1] == 8


def test_piecewise_schedule_changes_at_given_steps():
    b = build([[9] * 300, [5] * 300], {0: 0.1, 5: 0.5, 8: 0.0}, 4, 10, 12)
    per_step = [int(np.count_nonzero(b.next_batch().source == 1)) for _ in range(10)]
    assert per_step == [1] * 5 + [5] * 3 + [0] * 2


def test_resume_continues_bit_identically(tmp_path):
    lengths = [[3, 17, 9, 30, 2] * 6, [4, 6, 5] * 5, [11, 2] * 8]
    labels = {1: np.arange(15) % 7, 2: np.arange(16) % 5 - 1}

    def make():
        return build(lengths, [{0: 0.2, 6: 0.35}, 0.3], 8, 12, 20, seed=5, labels=labels)

    for dp_rank, dp_size in ((0, 1), (1, 3)):
        straight = make()
        full = [straight.next_batch(dp_rank, dp_size) for _ in range(14)]
        first = make()
        for _ in range(7):
            first.next_batch(dp_rank, dp_size)
        state = json.loads(json.dumps(first.state_dict()))  # JSON-able
        torch.save(first.state_dict(), tmp_path / "s.pt")
        state_pt = torch.load(tmp_path / "s.pt", weights_only=True)
        for saved in (state, state_pt):
            resumed = make()
            resumed.load_state_dict(saved)
            for want in full[7:]:
                got = resumed.next_batch(dp_rank, dp_size)
                assert np.array_equal(got.tokens, want.tokens)
                assert got.metrics() == want.metrics() and got.step == want.step
            assert resumed.state_dict() == straight.state_dict()
    assert any(batch.new_epochs for batch in full)  # the run crossed epochs


def test_same_seed_same_batches_other_seed_other_batches():
    lengths = [[5, 9, 13, 2] * 10, [4, 7] * 10]
    a, b, c = (build(lengths, 0.3, 6, 8, 5, seed=s) for s in (1, 1, 2))
    for _ in range(5):
        ta, tb = a.next_batch().tokens, b.next_batch().tokens
        assert np.array_equal(ta, tb)
    assert not np.array_equal(build(lengths, 0.3, 6, 8, 5, seed=1).next_batch().tokens,
                              c.next_batch().tokens)


def test_exposure_stats_match_a_recount_of_consumed_windows():
    lengths = [[13] * 30, [3, 4, 5, 6, 7, 9] * 5]
    labels = np.array([i % 12 for i in range(30)], dtype=np.int64)
    labels[::7] = -1
    b = build(lengths, 0.4, 8, 10, 8, labels={1: labels})
    src = b.sources[1]
    W = src.num_windows_per_epoch
    for _ in range(8):
        batch = b.next_batch(1, 2)
    n_windows = b.state_dict()["samples"][1]
    assert n_windows > W  # crossed into a second epoch
    counts = np.zeros(12, dtype=np.int64)
    cut = 0
    for o in range(n_windows):
        full, cuts = brute_exposures(src, labels, o // W)
        for f in full[o % W]:
            counts[f] += 1
        cut += cuts[o % W]
    stats = batch.exposures["dom1"]
    assert np.array_equal(b.exposure_counts("dom1"), counts)
    assert stats.facts == 12 and stats.min == counts.min() and stats.max == counts.max()
    assert stats.mean == pytest.approx(counts.sum() / 12) and stats.cut == cut
    assert batch.metrics()["exposures/dom1/cut_fraction"] == pytest.approx(
        cut / (cut + counts.sum()))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 6), steps=st.lists(st.lists(st.integers(0, 5), max_size=12), max_size=30))
def test_fact_counter_min_max_match_a_full_recount(n, steps):
    from kis_megatron.infusion.blender import _FactCounter

    counter, ref = _FactCounter(np.zeros(n, dtype=np.int64)), np.zeros(n, dtype=np.int64)
    for t, step in enumerate(steps):
        idx = np.array([i % n for i in step], dtype=np.int64)
        counter.add(idx, cut=1)
        for i in idx:
            ref[i] += 1
        st_ = counter.stats()
        assert (st_.min, st_.max, st_.full, st_.cut) == (ref.min(), ref.max(), ref.sum(), t + 1)
    # Rebuilt from saved counts (a resume), it continues to agree.
    again = _FactCounter(ref.copy(), cut=3)
    again.add(np.array([0, 0], dtype=np.int64), 0)
    ref[0] += 2
    assert (again.min, again.max, again.full, again.cut) == (ref.min(), ref.max(), ref.sum(), 3)


def test_several_domains_report_per_domain_keys():
    labels = {1: np.arange(20) % 4, 2: np.arange(20) % 3}
    b = build([[9] * 40, [5] * 20, [6] * 20], [0.2, 0.1], 4, 10, 4, labels=labels)
    m = b.next_batch().metrics()
    for key in ("tokens_domain/dom1", "tokens_domain/dom2", "target_domain_tokens/dom1",
                "exposures/dom1/mean", "exposures/dom2/min", "exposures/dom2/cut_fraction"):
        assert key in m
    assert m["tokens_domain"] == m["tokens_domain/dom1"] + m["tokens_domain/dom2"]
    assert m["target_domain_tokens/dom1"] == pytest.approx(0.2 * 10 * 4)
    assert m["target_domain_tokens"] == pytest.approx(0.3 * 10 * 4)
    json.dumps(m)


def test_never_exposed_facts_count_in_min_and_mean():
    labels = np.array([0, 1, 2, 99], dtype=np.int64)  # fact 99's doc is never used
    b = build([[10] * 10, [6, 6, 6, 200]], 0.2, 4, 5, 1, labels={1: labels})
    stats = b.next_batch().exposures["dom1"]
    assert stats.facts == 4 and stats.min == 0


def test_repeat_false_refuses_a_plan_that_outgrows_the_domain():
    lengths = [[10] * 100, [9] * 10]  # domain: 90 tokens -> 11 windows of 8 + 1
    with pytest.raises(InfusionError, match="dom1.*11 windows.*repeat=False"):
        build(lengths, 0.5, 8, 4, 10, repeat=False)
    ok = build(lengths, 0.5, 8, 4, 5, repeat=False)  # 10 windows needed
    for _ in range(5):
        ok.next_batch()
    assert ok.epochs_started["dom1"] == 1
    with pytest.raises(InfusionError, match="exhausted"):
        for _ in range(2):
            ok.next_batch()
    rep = build(lengths, 0.5, 8, 4, 10)
    events = [e for _ in range(10) for e in rep.next_batch().new_epochs]
    assert ("dom1", 2) in events and rep.epochs_started["dom1"] == 2


@pytest.mark.parametrize("kwargs, match", [
    (dict(ratios=1.0), r"outside \[0, 1\)"),
    (dict(ratios=-0.1), r"outside \[0, 1\)"),
    (dict(ratios=float("nan")), "ratio must be a number"),
    (dict(ratios=[0.6, 0.5], n_domains=2), "sum to 1.1"),
    (dict(ratios=[0.3]), r"1 ratio\(s\).*2 domain"),
    (dict(ratios={0: 0.1, 20: 0.3, 10: 0.2}), "strictly increasing"),
    (dict(ratios={0: 0.1, -5: 0.3}), "negative"),
    (dict(ratios={3: 0.1}), "first step must be 0"),
    (dict(ratios=[{0: 0.5, 4: 0.2}, {0: 0.2, 4: 0.8}], n_domains=2), "at step 4"),
    (dict(seq_len=5), "seq_len 4"),
    (dict(global_batch=0), "global_batch"),
])
def test_blender_validation(kwargs, match):
    n_domains = kwargs.pop("n_domains", 1)
    if "ratios" in kwargs and isinstance(kwargs["ratios"], list) and n_domains == 1:
        n_domains = 2
    srcs = [TokenWindowSource(make_shard([9] * 20, k), 4, 0, f"s{k}") for k in range(n_domains + 1)]
    args = dict(ratios=0.1, seq_len=4, global_batch=4, seed=0, total_steps=10)
    args.update(kwargs)
    with pytest.raises(InfusionError, match=match):
        InfusionBlender(srcs[0], srcs[1:], **args)


@pytest.mark.parametrize("fracs, match", [
    ((0.5, 0.5), "start_frac < end_frac"),
    ((-0.1, 0.5), "start_frac < end_frac"),
    ((0.2, 1.5), "end_frac <= 1"),
])
def test_window_validation(fracs, match):
    with pytest.raises(InfusionError, match=match):
        Schedule.window(0.1, *fracs)
    with pytest.raises(InfusionError, match="holds no step"):
        Schedule.window(0.1, 0.31, 0.39).pieces(2)


def test_dp_and_state_errors():
    b = build([[9] * 20, [9] * 20], 0.2, 4, 6, 5)
    with pytest.raises(InfusionError, match="not divisible"):
        b.next_batch(0, 4)
    with pytest.raises(InfusionError, match="out of range"):
        b.next_batch(2, 2)
    with pytest.raises(InfusionError, match="seq_len"):
        build([[9] * 20, [9] * 20], 0.2, 8, 6, 5).load_state_dict(b.state_dict())
    other = build([[9] * 20, [9] * 20], 0.3, 4, 6, 5)
    with pytest.raises(InfusionError, match="the infusion ratio or schedule"):
        other.load_state_dict(b.state_dict())
    state = b.state_dict()
    state["samples"] = [3, 3]
    with pytest.raises(InfusionError, match="inconsistent"):
        b.load_state_dict(state)
    with pytest.raises(InfusionError, match="not an infusion blender state"):
        b.load_state_dict({"step": 3})


def test_general_only_blender_and_bare_shards():
    b = InfusionBlender(make_shard([9] * 20, 0), [], None, 4, 4, 0, 3)
    batch = b.next_batch()
    assert batch.tokens_domain == 0 and (batch.source == 0).all()
    b2 = InfusionBlender(make_shard([9] * 20, 0), [make_shard([5] * 20, 1)], 0.5, 4, 4, 0, 3)
    assert b2.source_names == ("general", "domain0")
    assert np.count_nonzero(b2.next_batch().source == 1) == 2


def test_real_shard_round_trip(tmp_path):
    idx = pytest.importorskip("kis_megatron.data.indexed_dataset")
    rng = np.random.default_rng(0)
    prefixes, docs_by = [], []
    for k, (n, hi) in enumerate(((40, 30), (25, 12))):
        docs = [rng.integers(0, SPAN, rng.integers(1, hi)) + k * SPAN for _ in range(n)]
        prefix = str(tmp_path / f"shard{k}")
        with idx.IndexedDatasetWriter(prefix, np.uint16) as w:
            for d in docs:
                w.add_document(d)
        prefixes.append(prefix)
        docs_by.append(docs)
    real = [TokenWindowSource(idx.IndexedDataset(p), 8, 1, n)
            for p, n in zip(prefixes, ("general", "dom"))]
    fake = [TokenWindowSource(FakeShard(d), 8, 1, n) for d, n in zip(docs_by, ("general", "dom"))]
    a = InfusionBlender(real[0], real[1:], 0.3, 8, 6, 1, 10)
    b = InfusionBlender(fake[0], fake[1:], 0.3, 8, 6, 1, 10)
    for _ in range(10):
        ba, bb = a.next_batch(), b.next_batch()
        assert np.array_equal(ba.tokens, bb.tokens) and ba.metrics() == bb.metrics()
