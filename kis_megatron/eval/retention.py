"""Retention probes: fixed multiple-choice questions about a knowledge set, and their scoring.

A probe asks one fact: a prompt built from a question template and the subject, the correct
object and K distractors (other objects of the same relation, sampled with a fixed seed).
Two styles: ``recall`` prompts come from the statement form the model was trained on
(``"Tavo Renley works for"``); ``heldout`` prompts use wording never rendered into training
text (``"Q: Who is Tavo Renley employed by? A:"``). Probe sets are saved as JSONL files so every run
of a sweep is scored on exactly the same questions.

Scoring needs no model class: ``logprob_fn(input_ids[B, T]) -> [B, T, V]`` (logits or
log-probabilities: ``log_softmax`` is applied here, a no-op on log-probabilities) and
``encode(text) -> list[int]``. Each candidate's score is the summed log-likelihood of its
answer tokens after the prompt; the prediction is the argmax, and a tie with the correct
answer counts as wrong, so a model that cannot tell the candidates apart never gets credit.
Put the model in eval mode first (dropout); gradients are off here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

from kis_megatron.knowledge.triplets import KnowledgeError, KnowledgeSet, fill, jsonl_text
from kis_megatron.utils import atomic_write_text, read_jsonl

if TYPE_CHECKING:
    import torch
# torch is imported inside the scoring functions: tools that only build or read probe files
# (tools/make_knowledge.py) then start in a fraction of a second instead of seconds.

STYLES = ("recall", "heldout")
_TEMPLATE_LIST = {"recall": "questions", "heldout": "heldout_questions"}


@dataclass(frozen=True)
class ProbeItem:
    """One multiple-choice question about fact ``fact_id`` of ``knowledge_set``."""

    knowledge_set: str
    fact_id: int
    relation: str
    subject: str
    prompt: str
    answer: str
    distractors: tuple[str, ...]
    style: str
    template: int

    @property
    def candidates(self) -> tuple[str, ...]:
        """The correct answer first, then the distractors."""
        return (self.answer, *self.distractors)

    def to_json(self) -> dict:
        return {"knowledge_set": self.knowledge_set, "fact_id": self.fact_id,
                "relation": self.relation, "subject": self.subject, "style": self.style,
                "template": self.template, "prompt": self.prompt, "answer": self.answer,
                "distractors": list(self.distractors)}


def build_probes(ks: KnowledgeSet, k: int = 4, seed: int = 0, max_facts: int | None = None,
                 styles: Sequence[str] = STYLES) -> list[ProbeItem]:
    """The probe set of a knowledge set: for each fact (or a seeded sample of ``max_facts``)
    and each style whose relation has templates of that style, one probe with a seeded choice
    of template and ``k`` distinct distractors from the relation's other objects.

    Raises KnowledgeError when a relation has fewer than ``k + 1`` distinct objects.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise KnowledgeError(f"k (distractors per probe) must be a positive integer, got {k!r}")
    for s in styles:
        if s not in STYLES:
            raise KnowledgeError(f"unknown probe style {s!r}; expected one of {STYLES}")
    if max_facts is not None and (isinstance(max_facts, bool) or not isinstance(max_facts, int)
                                  or max_facts < 1):
        raise KnowledgeError(f"max_facts must be a positive integer, got {max_facts!r}")
    rng = random.Random(seed)
    pools = ks.objects_by_relation()
    n = len(ks.triplets)
    fact_ids = range(n) if max_facts is None or max_facts >= n else \
        sorted(rng.sample(range(n), max_facts))
    probes = []
    for fid in fact_ids:
        t = ks.triplets[fid]
        rt = ks.templates[t.relation]
        for style in styles:
            templates = getattr(rt, _TEMPLATE_LIST[style])
            if not templates:
                continue
            others = [o for o in pools[t.relation] if o != t.object]
            if len(others) < k:
                raise KnowledgeError(
                    f"knowledge set {ks.name!r}: relation {t.relation!r} has only "
                    f"{len(others) + 1} distinct objects, so a probe cannot have {k} "
                    "distractors; lower k or add facts with other objects")
            j = rng.randrange(len(templates))
            probes.append(ProbeItem(ks.name, fid, t.relation, t.subject,
                                    fill(templates[j], t.subject), t.object,
                                    tuple(rng.sample(others, k)), style, j))
    return probes


_RANK_KEY = b"kis-megatron/probe-rank/1"


def fact_rank(fact_id: int) -> int:
    """A fixed pseudo-random rank of a fact id: blake2b with a fixed key, so it is the same
    in every process and run (Python's ``hash`` is salted per process)."""
    digest = hashlib.blake2b(str(fact_id).encode(), digest_size=8, key=_RANK_KEY).digest()
    return int.from_bytes(digest, "big")


def select_probes(probes: Sequence[ProbeItem], max_facts: int = 0,
                  facts_below: int | None = None) -> list[ProbeItem]:
    """The probes of the facts to score, in their original order: the facts with
    ``fact_id < facts_below`` (every fact when None), then, when ``max_facts`` > 0, only the
    first ``max_facts`` of those in the fixed ranking by :func:`fact_rank`. Every probe of a
    chosen fact is kept (all styles). The choice is nested: a larger ``max_facts`` adds
    facts, and the facts chosen below a larger ``facts_below`` that lie below a smaller one
    are all chosen there too.

    With ``facts_below``, distractors are drawn from the objects of the kept facts only
    (:func:`restrict_distractors`): a distractor the model never saw in training would be
    an easy wrong answer, and retention would sit above chance without any recall."""
    below = [p for p in probes if facts_below is None or p.fact_id < facts_below]
    eligible = {p.fact_id for p in below}
    if max_facts and len(eligible) > max_facts:
        eligible = set(sorted(eligible, key=lambda f: (fact_rank(f), f))[:max_facts])
    if facts_below is not None:
        below = restrict_distractors(below)
    return [p for p in below if p.fact_id in eligible]


def restrict_distractors(probes: Sequence[ProbeItem]) -> list[ProbeItem]:
    """Probes whose distractors all lie among the answers of ``probes`` of the same
    knowledge set and relation (the objects trained on when these are a world's first
    facts). A probe that already satisfies this is kept as it is; otherwise its
    distractors are redrawn from that pool, as many as it had, with a seed fixed by the
    fact, style and template (the same in every process)."""
    pools: dict[tuple[str, str], list[str]] = defaultdict(list)
    for p in probes:
        pool = pools[(p.knowledge_set, p.relation)]
        if p.answer not in pool:
            pool.append(p.answer)
    out = []
    for p in probes:
        pool = pools[(p.knowledge_set, p.relation)]
        if all(d in pool for d in p.distractors):
            out.append(p)
            continue
        others = [o for o in pool if o != p.answer]
        k = min(len(p.distractors), len(others))
        if k == 0:
            raise KnowledgeError(
                f"the first facts of '{p.knowledge_set}' hold one object of relation "
                f"'{p.relation}', so its probes have no distractor; infuse more facts "
                "(raise infusion.facts)")
        seed = fact_rank(p.fact_id) ^ (STYLES.index(p.style) << 8 | p.template)
        picked = tuple(random.Random(seed).sample(others, k))
        out.append(dataclasses.replace(p, distractors=picked))
    return out


def save_probes(path: str | Path, probes: Sequence[ProbeItem]) -> None:
    """Write probes as JSONL, atomically."""
    atomic_write_text(path, jsonl_text(p.to_json() for p in probes))


_PROBE_TYPES = {"knowledge_set": str, "fact_id": int, "relation": str, "subject": str,
                "style": str, "template": int, "prompt": str, "answer": str, "distractors": list}


def _probe_from_row(row, where: str) -> ProbeItem:
    if not isinstance(row, dict):
        raise KnowledgeError(f"{where}: a probe line must be a JSON object")
    for key, typ in _PROBE_TYPES.items():
        if key not in row:
            raise KnowledgeError(f"{where}: probe is missing field {key!r}")
        if not isinstance(row[key], typ) or isinstance(row[key], bool):
            raise KnowledgeError(f"{where}: probe field {key!r} must be a {typ.__name__}")
    if not all(isinstance(d, str) for d in row["distractors"]):
        raise KnowledgeError(f"{where}: probe distractors must be strings")
    return ProbeItem(row["knowledge_set"], row["fact_id"], row["relation"], row["subject"],
                     row["prompt"], row["answer"], tuple(row["distractors"]), row["style"],
                     row["template"])


_PROBES_HINT = "; a probe file holds one JSON object per line, in UTF-8"


def load_probes(path: str | Path) -> list[ProbeItem]:
    """Read a probe JSONL file written by :func:`save_probes`; errors name file and line."""
    out = []
    for lineno, row in read_jsonl(path, KnowledgeError, _PROBES_HINT, what="probe file"):
        where = f"{path}:{lineno}"
        item = _probe_from_row(row, where)
        if item.style not in STYLES:
            raise KnowledgeError(f"{where}: unknown style {item.style!r}; expected {STYLES}")
        if not item.distractors or len(set(item.candidates)) != len(item.candidates):
            raise KnowledgeError(f"{where}: distractors must be non-empty, distinct and differ "
                                 "from the answer")
        out.append(item)
    if not out:
        raise KnowledgeError(f"{path}: the probe file is empty")
    return out


# ----------------------------------------------------------------------------- scoring


def answer_span(encode: Callable[[str], list[int]], prompt: str,
                answer: str) -> tuple[list[int], int]:
    """Token ids of ``prompt + " " + answer`` and the index where the scored span starts.

    Prompt and answer are tokenised *jointly*, so the answer gets the tokens it has in running
    text (a sentencepiece model writes the space as part of the answer's first piece,
    ``"▁Paris"``, which tokenising ``answer`` alone would not give). The span starts after the
    longest common prefix of ``encode(prompt)`` and the joint ids: normally all prompt tokens;
    if the tokenizer merged across the boundary, the merged token is scored too, for every
    candidate alike, so the comparison stays fair. ``encode`` should add no EOS token.
    """
    full, head = list(encode(prompt + " " + answer)), list(encode(prompt))
    start = 0
    while start < min(len(full), len(head)) and full[start] == head[start]:
        start += 1
    if start == 0:
        raise KnowledgeError(f"prompt {prompt!r} shares no leading token with prompt + answer; "
                             "the first answer token needs context (let encode add a BOS token)")
    if start == len(full):
        raise KnowledgeError(f"answer {answer!r} adds no tokens after prompt {prompt!r}")
    return full, start


def _right_pad(rows: list[list[int]], pad_id: int, device) -> torch.Tensor:
    import torch

    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out.to(device) if device is not None else out


def _log_probs(logprob_fn, ids: torch.Tensor) -> torch.Tensor:
    import torch

    with torch.no_grad():
        out = logprob_fn(ids)
    if out.dim() != 3 or out.shape[:2] != ids.shape:
        raise ValueError(f"logprob_fn must return [B, T, V] for input [B, T] = "
                         f"{list(ids.shape)}, got {list(out.shape)}")
    if out.dtype in (torch.float16, torch.bfloat16):
        out = out.float()
    return torch.log_softmax(out, dim=-1)


def span_logprobs(logprob_fn, seqs: Sequence[tuple[list[int], int]], batch_size: int = 64,
                  pad_id: int = 0, device=None) -> list[tuple[float, int]]:
    """(summed log-probability of ``ids[start:]`` given ``ids[:start]``, token count) for each
    ``(ids, start)``, in input order. Sequences are batched by length with right padding:
    a causal model's outputs at real positions never see the padding after them."""
    import torch

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0]))
    out: list[tuple[float, int]] = [(0.0, 0)] * len(seqs)
    for b0 in range(0, len(order), batch_size):
        idx = order[b0:b0 + batch_size]
        ids = _right_pad([seqs[i][0] for i in idx], pad_id, device)
        lp = _log_probs(logprob_fn, ids)[:, :-1]                     # (B, T-1, V) predicts t+1
        tok = lp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)    # (B, T-1)
        pos = torch.arange(tok.shape[1], device=tok.device)
        starts = torch.tensor([seqs[i][1] - 1 for i in idx], device=tok.device)
        ends = torch.tensor([len(seqs[i][0]) - 1 for i in idx], device=tok.device)
        mask = (pos[None] >= starts[:, None]) & (pos[None] < ends[:, None])
        sums = (tok.double() * mask).sum(1).cpu().tolist()
        for i, s in zip(idx, sums):
            out[i] = (s, len(seqs[i][0]) - seqs[i][1])
    return out


@dataclass
class ProbeScores:
    """Scores of a probe list. Keys are (knowledge set, style) and, for ``per_relation``,
    (knowledge set, style, relation). ``chance`` is the mean of 1 / number of candidates."""

    scores: list[list[float]]
    correct: list[bool]
    accuracy: dict[tuple[str, str], float]
    counts: dict[tuple[str, str], int]
    per_relation: dict[tuple[str, str, str], float]
    chance: dict[tuple[str, str], float]


def _group(probes: Sequence[ProbeItem], correct: Sequence[bool]):
    hits: dict[tuple, list[bool]] = defaultdict(list)
    rel_hits: dict[tuple, list[bool]] = defaultdict(list)
    chance: dict[tuple, list[float]] = defaultdict(list)
    for p, c in zip(probes, correct):
        hits[(p.knowledge_set, p.style)].append(c)
        rel_hits[(p.knowledge_set, p.style, p.relation)].append(c)
        chance[(p.knowledge_set, p.style)].append(1.0 / len(p.candidates))
    mean = lambda d: {k: sum(v) / len(v) for k, v in d.items()}  # noqa: E731
    return mean(hits), {k: len(v) for k, v in hits.items()}, mean(rel_hits), mean(chance)


def score_probes(probes: Sequence[ProbeItem], logprob_fn, encode, batch_size: int = 64,
                 normalize: str = "sum", pad_id: int = 0, device=None) -> ProbeScores:
    """Multiple-choice accuracy: every candidate of every probe is scored in shared batches.

    ``normalize="sum"`` (default) scores the summed answer log-likelihood; ``"mean"`` divides
    by the answer's token count (use it when candidates differ much in length). A probe is
    correct only when its answer scores strictly above every distractor: ties count wrong.
    """
    if normalize not in ("sum", "mean"):
        raise ValueError(f"normalize must be 'sum' or 'mean', got {normalize!r}")
    if not probes:
        raise ValueError("no probes to score")
    seqs, owner = [], []
    for i, p in enumerate(probes):
        for c in p.candidates:
            seqs.append(answer_span(encode, p.prompt, c))
            owner.append(i)
    raw = span_logprobs(logprob_fn, seqs, batch_size, pad_id, device)
    scores: list[list[float]] = [[] for _ in probes]
    for i, (s, n) in zip(owner, raw):
        scores[i].append(s / n if normalize == "mean" else s)
    correct = [sc[0] > max(sc[1:]) for sc in scores]
    acc, counts, per_rel, chance = _group(probes, correct)
    return ProbeScores(scores, correct, acc, counts, per_rel, chance)


@dataclass
class ExactMatch:
    """Greedy-generation results: per probe output text and hit, grouped like ProbeScores."""

    outputs: list[str]
    correct: list[bool]
    accuracy: dict[tuple[str, str], float]
    counts: dict[tuple[str, str], int]


def _starts_with_answer(text: str, answer: str) -> bool:
    """True when ``text`` begins with ``answer`` as a whole word (``"Paris."`` yes,
    ``"Parisian"`` no)."""
    text = text.lstrip()
    return text.startswith(answer) and (len(text) == len(answer)
                                        or not text[len(answer)].isalnum())


def _greedy(logprob_fn, prompts: list[list[int]], max_new_tokens: int, batch_size: int,
            pad_id: int, device) -> list[list[int]]:
    """Greedy continuation of each prompt, re-running the full forward each step (no cache:
    probes are short)."""
    import torch

    out: list[list[int]] = []
    for b0 in range(0, len(prompts), batch_size):
        rows = [list(p) for p in prompts[b0:b0 + batch_size]]
        n0 = [len(r) for r in rows]
        for _ in range(max_new_tokens):
            ids = _right_pad(rows, pad_id, device)
            with torch.no_grad():
                logits = logprob_fn(ids)
            last = torch.tensor([len(r) - 1 for r in rows], device=logits.device)
            nxt = logits[torch.arange(len(rows), device=logits.device), last].argmax(-1)
            for r, t in zip(rows, nxt.tolist()):
                r.append(t)
        out.extend(r[n:] for r, n in zip(rows, n0))
    return out


def greedy_exact_match(probes: Sequence[ProbeItem], encode, decode, max_new_tokens: int = 8,
                       logprob_fn=None, generate_fn=None, batch_size: int = 64,
                       pad_id: int = 0, device=None) -> ExactMatch:
    """Greedy-decode after each prompt; a hit when the decoded text starts with the correct
    object as a whole word. Give ``generate_fn(prompt_ids, max_new_tokens) -> new ids`` to use
    your own decoder, or ``logprob_fn`` to decode greedily here (argmax of the last position).
    """
    if (logprob_fn is None) == (generate_fn is None):
        raise ValueError("give exactly one of logprob_fn and generate_fn")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
            or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    prompts = [list(encode(p.prompt)) for p in probes]
    if generate_fn is not None:
        new = [list(generate_fn(ids, max_new_tokens))[:max_new_tokens] for ids in prompts]
    else:
        new = _greedy(logprob_fn, prompts, max_new_tokens, batch_size, pad_id, device)
    outputs = [decode(ids) for ids in new]
    correct = [_starts_with_answer(o, p.answer) for o, p in zip(outputs, probes)]
    acc, counts, _, _ = _group(probes, correct)
    return ExactMatch(outputs, correct, acc, counts)


def evaluate_retention(model_logprob_fn, encode,
                       probe_files: Mapping[str, str | Path | Sequence[ProbeItem]],
                       decode=None, batch_size: int = 64, max_new_tokens: int | None = None,
                       normalize: str = "sum", per_relation: bool = False, pad_id: int = 0,
                       device=None) -> dict[str, float | int]:
    """Flat metrics for metrics.jsonl, for each ``name -> probe file`` (or probe list):

    ``retention/<name>`` (recall accuracy), ``retention_heldout/<name>``,
    ``retention_chance/<name>``, ``probes/<name>`` and ``probes_heldout/<name>`` (counts),
    ``exact_match/<name>`` (recall style; only when ``decode`` is given; ``max_new_tokens``
    defaults to the longest answer's token count + 1), and with ``per_relation``
    ``retention_relation/<name>/<relation>``.
    """
    metrics: dict[str, float | int] = {}
    for name, src in probe_files.items():
        probes = load_probes(src) if isinstance(src, (str, Path)) else list(src)
        res = score_probes(probes, model_logprob_fn, encode, batch_size, normalize, pad_id,
                           device)
        for style, prefix in (("recall", ""), ("heldout", "_heldout")):
            keys = [k for k in res.counts if k[1] == style]
            n = sum(res.counts[k] for k in keys)
            if not n:
                continue
            metrics[f"retention{prefix}/{name}"] = sum(
                res.accuracy[k] * res.counts[k] for k in keys) / n
            metrics[f"probes{prefix}/{name}"] = n
            if style == "recall":
                metrics[f"retention_chance/{name}"] = sum(
                    res.chance[k] * res.counts[k] for k in keys) / n
        if per_relation:
            rels = defaultdict(list)
            for p, c in zip(probes, res.correct):
                if p.style == "recall":
                    rels[p.relation].append(c)
            for rel, hits in rels.items():
                metrics[f"retention_relation/{name}/{rel}"] = sum(hits) / len(hits)
        recall = [p for p in probes if p.style == "recall"]
        if decode is not None and recall:
            steps = max_new_tokens or 1 + max(
                len(ids) - s for ids, s in (answer_span(encode, p.prompt, p.answer)
                                            for p in recall))
            em = greedy_exact_match(recall, encode, decode, steps, logprob_fn=model_logprob_fn,
                                    batch_size=batch_size, pad_id=pad_id, device=device)
            metrics[f"exact_match/{name}"] = sum(em.correct) / len(em.correct)
    return metrics
