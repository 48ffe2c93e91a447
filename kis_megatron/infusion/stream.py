"""From the config's ``data`` and ``infusion`` sections to the trainer's batches.

Opens the general and domain shards, checks them against the model's vocabulary and the
tokenizer (and against each other: every shard's sidecar must name the same tokenizer), builds
the infusion blender (ratio 0 and no domain = plain pretraining) and wraps it for one
data-parallel rank. With ``infusion.facts`` = F the domain stream holds only the documents
of facts 0 .. F-1 (a view, ``kis_megatron.infusion.fact_subset``). Every batch's token ids are
checked against the vocabulary as it is read (one max per row), so a corrupt id is an error
naming its shard, not an index error in the model. Validation windows come from ``data.valid``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch

from kis_megatron.config import ConfigError, DataConfig, InfusionConfig, infusion_value
from kis_megatron.data.errors import DataError
from kis_megatron.infusion.fact_subset import first_facts
from kis_megatron.data.indexed_dataset import IndexedDataset, check_vocab, load_doc_labels, read_meta
from kis_megatron.infusion.blender import Batch, InfusionBlender
from kis_megatron.infusion.source import TokenWindowSource
from kis_megatron.infusion.schedule import Schedule
from kis_megatron.data.tokenizer import Tokenizer


def open_shard(prefix: str, key: str, vocab_size: int, tokenizer: Optional[str]) -> IndexedDataset:
    """The shard at ``prefix``, refused with a clear error when its token ids do not fit
    the model or it was made with another tokenizer than ``data.tokenizer``."""
    if not prefix:
        raise ConfigError(f"{key}: a shard prefix is required")
    ds = IndexedDataset(prefix)
    if len(ds) == 0:
        raise DataError(f"{key}: shard {prefix} holds no documents")
    check_vocab(ds, vocab_size)
    meta = read_meta(prefix)
    if tokenizer:
        tok = Tokenizer(tokenizer)
        if tok.vocab_size > vocab_size:
            raise DataError(f"data.tokenizer {tokenizer} has {tok.vocab_size} tokens but "
                            f"model.vocab_size is {vocab_size}; raise model.vocab_size")
    if tokenizer and meta and meta.get("tokenizer_sha256"):
        if tok.sha256 != meta["tokenizer_sha256"]:
            raise DataError(f"{key}: shard {prefix} was tokenized with {meta.get('tokenizer_model')} "
                            f"(sha256 {meta['tokenizer_sha256'][:12]}...), not with data.tokenizer="
                            f"{tokenizer}; re-run tools/preprocess_data.py with that tokenizer")
    return ds


def check_one_tokenizer(shards: list[tuple[str, str]]) -> None:
    """Refuse shards (``(config key, prefix)`` pairs) whose sidecars record different
    tokenizers: their token ids would mean different words. Needs no ``data.tokenizer``;
    shards without a sidecar (e.g. made by Megatron) cannot be compared and are let through."""
    first = None
    for key, prefix in shards:
        meta = read_meta(prefix) if prefix else None
        sha = meta.get("tokenizer_sha256") if meta else None
        if not sha:
            continue
        if first is None:
            first = (key, prefix, sha, meta.get("tokenizer_model"))
        elif sha != first[2]:
            raise DataError(
                f"{key}: shard {prefix} was tokenized with {meta.get('tokenizer_model')} (sha256 "
                f"{sha[:12]}...), but {first[0]}: shard {first[1]} with {first[3]} (sha256 "
                f"{first[2][:12]}...); all shards of a run need one tokenizer: re-run "
                "tools/preprocess_data.py with the same --tokenizer-model")


def check_ids(tokens: np.ndarray, vocab_size: int, where) -> None:
    """Refuse token ids outside [0, vocab_size) in ``tokens`` (rows of windows);
    ``where(row)`` names the shard a row came from."""
    if not tokens.size:
        return
    hi, lo = tokens.max(axis=1), tokens.min(axis=1)
    bad = np.flatnonzero((hi >= vocab_size) | (lo < 0))
    if len(bad):
        row = int(bad[0])
        value = int(hi[row]) if hi[row] >= vocab_size else int(lo[row])
        raise DataError(f"{where(row)} holds token id {value}, outside the model's vocabulary "
                        f"[0, {vocab_size}); the shard is corrupt or was made with another "
                        "tokenizer: re-run tools/preprocess_data.py")


def _schedule(inf: InfusionConfig, ratio: float):
    if inf.schedule == "constant":
        return ratio
    if inf.schedule == "window":
        return Schedule.window(ratio, inf.window_start, inf.window_end)
    return Schedule.piecewise(inf.ratio_steps)


class TrainStream:
    """The blender seen from one data-parallel rank, with log-friendly statistics."""

    def __init__(self, blender: InfusionBlender, dp_rank: int, dp_size: int, describe: dict,
                 vocab_size: Optional[int] = None, shards: Optional[list[str]] = None):
        self.blender, self.dp_rank, self.dp_size = blender, dp_rank, dp_size
        self._describe = describe
        self._notes: list[str] = []
        # For the id check of every batch: the vocabulary, and "key: shard prefix" per source.
        self.vocab_size, self.shards = vocab_size, shards

    def next_batch(self) -> "StreamBatch":
        b: Batch = self.blender.next_batch(self.dp_rank, self.dp_size)
        if self.vocab_size is not None:
            check_ids(b.tokens, self.vocab_size, lambda row: f"{self.shards[b.source[row]]} "
                      f"(the batch of step {b.step + 1})")
        for name, epoch in b.new_epochs:
            if epoch == 2 or epoch % 10 == 0:  # the first repeat, then a reminder now and then
                self._notes.append(f"data: source '{name}' is exhausted and repeats (epoch {epoch})")
        stats = b.metrics()
        domains = self.blender.source_names[1:]
        if len(domains) == 1 and b.exposures:  # one domain: the plain keys DESIGN.md names
            e = b.exposures[domains[0]]
            stats.update({"exposures/mean": e.mean, "exposures/min": e.min, "exposures/max": e.max})
        return StreamBatch(b.tokens, stats)

    def notes(self) -> list[str]:
        """Messages for the log since the last call (e.g. a domain source that repeats)."""
        out, self._notes = self._notes, []
        return out

    def describe(self) -> dict:
        return dict(self._describe)

    def state_dict(self) -> dict:
        return self.blender.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.blender.load_state_dict(state)


class StreamBatch:
    def __init__(self, tokens: np.ndarray, stats: dict):
        self.tokens, self.stats = tokens, stats


def build_train_stream(d: DataConfig, inf: InfusionConfig, *, vocab_size: int, seed: int,
                       global_batch: int, steps: int, dp_rank: int = 0, dp_size: int = 1) -> TrainStream:
    """The stream of the ``data`` and ``infusion`` sections for one data-parallel rank: the
    shards checked against the model's ``vocab_size`` (``model.vocab_size``), shuffled with
    ``seed`` (``train.seed``), blended into ``global_batch`` windows a step for ``steps``
    steps (``train.global_batch``, ``train.steps``: the ratio targets span the whole run)."""
    check_one_tokenizer([("data.train", d.train), ("data.valid", d.valid),
                         ("infusion.domain", inf.domain)]
                        + [(f"infusion.domains.{s.name}", s.path) for s in inf.domains])
    general = TokenWindowSource(open_shard(d.train, "data.train", vocab_size, d.tokenizer),
                                d.seq_len, seed, "general")
    specs = [(s.name, s.path, s.ratio) for s in inf.domains]
    if inf.domain:
        specs.insert(0, ("domain", inf.domain, inf.ratio))
    elif inf.ratio > 0 and not specs:
        raise ConfigError("infusion.ratio > 0 needs a domain shard: set infusion.domain")
    if inf.domains and inf.schedule != "constant":
        raise ConfigError("infusion.schedule window/steps applies to infusion.domain; "
                          "infusion.domains takes constant ratios")
    domains, ratios, describe = [], [], {"domains": []}
    shards = [f"data.train: shard {d.train}"]
    for name, path, ratio in specs:
        key = "infusion.domain" if name == "domain" and path == inf.domain else f"infusion.domains.{name}"
        ds = open_shard(path, key, vocab_size, d.tokenizer)
        labels = load_doc_labels(path)
        if inf.facts is not None and path == inf.domain:
            ds, labels = _first_facts(ds, labels, inf.facts, path, d.seq_len)
        src = TokenWindowSource(ds, d.seq_len, seed, name, doc_labels=labels)
        domains.append(src)
        shards.append(f"{key}: shard {path}")
        ratios.append(_schedule(inf, ratio) if path == inf.domain else ratio)
        describe["domains"].append({"name": name, "path": str(path), "ratio": ratio,
                                    "documents": len(ds), "tokens": int(ds.num_tokens),
                                    "facts": int(src.num_facts)})
    if len(domains) == 1:
        describe["domain_facts"] = describe["domains"][0]["facts"]
        describe["domain_documents"] = describe["domains"][0]["documents"]
    blender = InfusionBlender(general, domains, ratios, d.seq_len, global_batch, seed, steps,
                              repeat=inf.repeat)
    return TrainStream(blender, dp_rank, dp_size, describe, vocab_size, shards)


def realised_infusion_value(inf: InfusionConfig, described: dict) -> float:
    """The infusion value run.json records for the law tools: what the blender realises
    (``described``: ``TrainStream.describe()``), never a number that only the config claims."""
    claimed = infusion_value(inf)
    if inf.kind != "domain_facts":
        return float(claimed)
    facts = described.get("domain_facts", 0)
    if not facts:
        raise DataError(f"infusion.kind=domain_facts counts the facts of infusion.domain {inf.domain} by "
                        "their document labels, and it has none; preprocess it with --doc-key fact_id")
    if claimed is not None and claimed != facts:
        raise ConfigError(f"infusion.value={claimed:g}, but infusion.domain {inf.domain} infuses {facts} "
                          "facts; leave infusion.value unset (kind=domain_facts records the facts infused)")
    return float(facts)


def _first_facts(ds, labels, facts: int, path: str, seq_len: int):
    """The documents of facts 0 .. facts-1 of the domain shard (``infusion.facts``)."""
    view, labels = first_facts(ds, labels, facts, where=f"infusion.domain shard {path}")
    if view.num_tokens < seq_len + 1:
        raise DataError(f"infusion.facts={facts}: the documents of the first {facts} facts hold "
                        f"{view.num_tokens} tokens, fewer than one window of data.seq_len + 1 = "
                        f"{seq_len + 1}; raise infusion.facts or lower data.seq_len")
    return view, labels


def build_validation_windows(d: DataConfig, vocab_size: int, count: int) -> Optional[torch.Tensor]:
    """The first ``count`` windows (``eval.val_batches * train.micro_batch``) of
    ``data.valid`` in a fixed shuffle (seed 0), so every run and every evaluation scores the
    same tokens; None without ``data.valid``."""
    if not d.valid:
        return None
    ds = open_shard(d.valid, "data.valid", vocab_size, d.tokenizer)
    src = TokenWindowSource(ds, d.seq_len, 0, "valid")
    windows = src.windows(0, 0, min(count, src.num_windows_per_epoch)).astype(np.int64)
    check_ids(windows, vocab_size, lambda row: f"data.valid: shard {d.valid}")
    return torch.from_numpy(windows)


def shard_exists(prefix: str) -> bool:
    return Path(prefix + ".bin").is_file() and Path(prefix + ".idx").is_file()
