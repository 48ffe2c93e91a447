"""The infusion blender: global batches with an exact share of domain tokens.

Each optimizer step draws ``global_batch`` windows of ``seq_len + 1`` tokens, each from
the general source or one of the domain sources. The plan (kis_megatron.infusion.schedule)
keeps every domain's cumulative token count within ``seq_len`` tokens (one sample) of
its scheduled target after every step, spreads domain samples through the batch so each
data-parallel slice gets its share, and is pure index arithmetic: every rank computes
the plan and the statistics of the whole global batch, and reads only its own windows.

Sources are consumed in order (one window cursor per source); an exhausted source starts
a new epoch with a fresh shuffle, which the batch reports so the trainer can log
"domain source X repeats (epoch 2)". With ``repeat=False`` a plan that needs more domain
windows in ``total_steps`` than a domain source has is refused at construction.

Typical use::

    general = TokenWindowSource(IndexedDataset(p), seq_len, seed, "general")
    domain = TokenWindowSource(IndexedDataset(q), seq_len, seed, "facts", load_doc_labels(q))
    blender = InfusionBlender(general, [domain], 0.1, seq_len, global_batch, seed, steps)
    batch = blender.next_batch(dp_rank, dp_size)   # batch.tokens: (B / dp, seq_len + 1)
    log(batch.metrics())                            # identical on every rank
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from kis_megatron.data.errors import InfusionError, check_int
from kis_megatron.infusion.source import TokenWindowSource, WindowExposures, stable_name_hash
from kis_megatron.infusion.schedule import RatioTargets, Schedule

__all__ = [
    "Batch",
    "ExposureStats",
    "InfusionBlender",
    "InfusionError",
    "Schedule",
    "TokenWindowSource",
    "WindowExposures",
    "stable_name_hash",
]

_STATE_VERSION = 1


@dataclass
class ExposureStats:
    """Cumulative exposures of one labelled source's facts (over the global batch)."""

    facts: int  # distinct facts of the source, never-exposed ones included
    mean: float  # full renderings per fact
    min: int
    max: int
    full: int  # labelled documents rendered in full so far
    cut: int  # labelled documents cut at a window border so far

    @property
    def cut_fraction(self) -> float:
        """Fraction of labelled document occurrences that were cut (not counted)."""
        seen = self.full + self.cut
        return self.cut / seen if seen else 0.0


@dataclass
class Batch:
    """This rank's slice of one global batch, with statistics of the whole global batch.

    Token counts are cumulative over all steps so far, this step included, and count
    training tokens (targets): ``seq_len`` per sample.
    """

    step: int
    tokens: np.ndarray  # int64 (global_batch / dp_size, seq_len + 1)
    source: np.ndarray  # int64 (global_batch / dp_size,): index into source_names
    source_names: tuple[str, ...]  # general first, then the domains
    tokens_total: int
    tokens_domain: int  # all domains together
    target_domain_tokens: float  # the schedule's integral, in tokens
    tokens_domain_by_source: dict[str, int] = field(default_factory=dict)
    target_domain_tokens_by_source: dict[str, float] = field(default_factory=dict)
    exposures: dict[str, ExposureStats] = field(default_factory=dict)
    new_epochs: list[tuple[str, int]] = field(default_factory=list)  # (source, epoch >= 2)

    def metrics(self) -> dict:
        """Flat, JSON-able statistics for metrics.jsonl (the same on every rank)."""
        out = {
            "tokens_total": self.tokens_total,
            "tokens_domain": self.tokens_domain,
            "target_domain_tokens": self.target_domain_tokens,
        }
        if len(self.tokens_domain_by_source) > 1:
            for name, v in self.tokens_domain_by_source.items():
                out[f"tokens_domain/{name}"] = v
                out[f"target_domain_tokens/{name}"] = self.target_domain_tokens_by_source[name]
        for name, e in self.exposures.items():
            out[f"exposures/{name}/mean"] = e.mean
            out[f"exposures/{name}/min"] = e.min
            out[f"exposures/{name}/max"] = e.max
            out[f"exposures/{name}/cut_fraction"] = e.cut_fraction
        return out


def _as_schedules(ratios, num_domains: int) -> list[Schedule]:
    """Ratios as given (a number, a Schedule, a {step: ratio} mapping, or a list of
    those, one per domain) -> one Schedule per domain."""
    if ratios is None:
        items = []
    elif isinstance(ratios, (numbers.Real, Schedule, Mapping)) and not isinstance(ratios, bool):
        items = [ratios]
    elif isinstance(ratios, Sequence) and not isinstance(ratios, str):
        items = list(ratios)
    else:
        raise InfusionError(f"ratios must be a number, a Schedule or a list of them, got {ratios!r}")
    if len(items) != num_domains:
        raise InfusionError(
            f"got {len(items)} ratio(s)/schedule(s) for {num_domains} domain source(s); give one each"
        )
    out = []
    for item in items:
        if isinstance(item, Schedule):
            out.append(item)
        elif isinstance(item, Mapping):
            out.append(Schedule.piecewise(item))
        else:
            out.append(Schedule.constant(item))
    return out


class _FactCounter:
    """Full renderings per fact, with min and max kept up to date in time proportional to
    the step's exposures rather than the number of facts (a full pass over the counts
    happens only when the minimum rises, i.e. a few hundred times per run at most)."""

    def __init__(self, counts: np.ndarray, cut: int = 0):
        self.counts = counts
        self.full = int(counts.sum())
        self.cut = cut
        self.max = int(counts.max()) if len(counts) else 0
        self._rescan()

    def _rescan(self) -> None:
        self.min = int(self.counts.min()) if len(self.counts) else 0
        self._at_min = int(np.count_nonzero(self.counts == self.min))

    def add(self, idx: np.ndarray, cut: int) -> None:
        """Count one full rendering per entry of idx (dense fact indices, repeats allowed)."""
        self.cut += cut
        if not len(idx):
            return
        before = self.counts[idx]
        np.add.at(self.counts, idx, 1)
        after = self.counts[idx]
        self.full += len(idx)
        self.max = max(self.max, int(after.max()))
        # A fact hit m times appears m times in idx, each with after - before == m:
        # summing 1/m over the entries that were at the minimum counts facts, not hits.
        left = before == self.min
        if left.any():
            self._at_min -= round(float(np.sum(1.0 / (after[left] - before[left]))))
            if self._at_min == 0:
                self._rescan()

    def stats(self) -> ExposureStats:
        n = len(self.counts)
        return ExposureStats(facts=n, mean=self.full / n, min=self.min, max=self.max,
                             full=self.full, cut=self.cut)


def _epoch_runs(first: int, count: int, per_epoch: int):
    """Split ordinals first .. first+count-1 into (epoch, window, n, offset) runs."""
    done = 0
    while done < count:
        o = first + done
        epoch, j = divmod(o, per_epoch)
        n = min(count - done, per_epoch - j)
        yield epoch, j, n, done
        done += n


class InfusionBlender:
    """Deterministic, resumable mixer of a general source and domain sources.

    ``general`` and each of ``domains`` is a TokenWindowSource (its seq_len must match),
    or a bare shard, wrapped as a source named "general" / "domain<i>" shuffled with
    ``seed``. ``ratios`` is one ratio or Schedule per domain (see ``_as_schedules``).
    """

    def __init__(self, general, domains, ratios, seq_len: int, global_batch: int, seed: int,
                 total_steps: int, repeat: bool = True):
        self.seq_len = check_int(seq_len, "seq_len", 1)
        self.global_batch = check_int(global_batch, "global_batch", 1)
        self.seed = check_int(seed, "seed", 0)
        self.total_steps = check_int(total_steps, "total_steps", 1)
        if not isinstance(repeat, bool):
            raise InfusionError(f"repeat must be True or False, got {repeat!r}")
        self.repeat = repeat
        if isinstance(domains, (str, bytes)) or not isinstance(domains, Sequence):
            raise InfusionError(f"domains must be a list of sources, got {type(domains).__name__}")
        self.sources = [self._wrap(general, "general")]
        self.sources += [self._wrap(ds, f"domain{i}") for i, ds in enumerate(domains)]
        self.source_names = tuple(s.name for s in self.sources)
        if len(set(self.source_names)) != len(self.source_names):
            raise InfusionError(f"source names must be unique, got {list(self.source_names)}")
        self.schedules = _as_schedules(ratios, len(domains))
        self.targets = RatioTargets(self.schedules, self.total_steps, self.global_batch)
        if not repeat:
            self._check_enough_domain_data()
        self.step = 0
        self._samples = [0] * len(self.sources)  # windows consumed per source (the cursors)
        self._expo = {s.name: _FactCounter(np.zeros(s.num_facts, dtype=np.int64))
                      for s in self.sources if s.num_facts}

    def _wrap(self, src, name: str) -> TokenWindowSource:
        if isinstance(src, TokenWindowSource):
            if src.seq_len != self.seq_len:
                raise InfusionError(
                    f"source '{src.name}' cuts windows for seq_len {src.seq_len}, the blender "
                    f"uses {self.seq_len}; build the source with the same seq_len"
                )
            return src
        return TokenWindowSource(src, self.seq_len, self.seed, name)

    def _check_enough_domain_data(self) -> None:
        n = self.total_steps * self.global_batch
        exact = self.targets.num_domains == 1
        for d, src in enumerate(self.sources[1:]):
            need = self.targets.max_count(d, n)
            if need > src.num_windows_per_epoch:
                raise InfusionError(
                    f"domain source '{src.name}' has {src.num_windows_per_epoch} windows of "
                    f"{self.seq_len + 1} tokens per epoch ({src.num_tokens} tokens), but "
                    f"{self.total_steps} steps at its schedule need {'' if exact else 'up to '}"
                    f"{need} ({need * self.seq_len} domain tokens) with repeat=False; allow "
                    "repeats, add domain data, or lower the ratio or the number of steps"
                )

    @property
    def num_domains(self) -> int:
        """Number of domain sources."""
        return len(self.sources) - 1

    @property
    def epochs_started(self) -> dict[str, int]:
        """Epochs begun so far per source (0 before its first window; 2 means it repeats)."""
        return {s.name: -(-c // s.num_windows_per_epoch)
                for s, c in zip(self.sources, self._samples)}

    def exposure_counts(self, name: str) -> np.ndarray:
        """Full renderings so far of each fact of a labelled source (aligned with its
        ``fact_ids``); a copy."""
        if name not in self._expo:
            raise KeyError(f"source {name!r} has no doc labels (labelled: {list(self._expo)})")
        return self._expo[name].counts.copy()

    def _plan(self) -> np.ndarray:
        n0 = self.step * self.global_batch
        return self.targets.plan(n0, self.global_batch, self._samples[1:])

    def next_batch(self, dp_rank: int = 0, dp_size: int = 1) -> Batch:
        """The next step's batch: this rank's contiguous slice of the global batch.

        Every rank must call this once per step with its own rank; all of them plan the
        same global batch and report the same statistics, and each reads only its slice.
        """
        dp_size = check_int(dp_size, "dp_size", 1)
        dp_rank = check_int(dp_rank, "dp_rank", 0)
        B, L = self.global_batch, self.seq_len
        if dp_rank >= dp_size:
            raise InfusionError(f"dp_rank {dp_rank} is out of range for dp_size {dp_size}")
        if B % dp_size:
            raise InfusionError(
                f"global_batch {B} is not divisible by the data-parallel size {dp_size}; "
                "pick a global batch that is a multiple of it"
            )
        plan = self._plan()
        taken = np.bincount(plan, minlength=len(self.sources))
        samples = [c + int(m) for c, m in zip(self._samples, taken)]
        for src, c in zip(self.sources[1:], samples[1:]):
            if not self.repeat and c > src.num_windows_per_epoch:
                raise InfusionError(
                    f"domain source '{src.name}' is exhausted at step {self.step} (past "
                    f"total_steps={self.total_steps}?) and repeat=False; allow repeats or add data"
                )
        rows = B // dp_size
        lo, hi = dp_rank * rows, (dp_rank + 1) * rows
        mine = plan[lo:hi]
        tokens = np.empty((rows, L + 1), dtype=np.int64)
        for k, src in enumerate(self.sources):
            where = np.flatnonzero(mine == k)
            if not len(where):
                continue
            # Ordinal of this rank's first sample of source k: the source's cursor plus
            # its samples in the earlier slices of the global batch.
            first = self._samples[k] + int(np.count_nonzero(plan[:lo] == k))
            block = np.empty((len(where), L + 1), dtype=np.int64)
            for epoch, j, n, off in _epoch_runs(first, len(where), src.num_windows_per_epoch):
                src.windows(epoch, j, n, out=block[off:off + n])
            tokens[where] = block
        expo = self._count_exposures(taken)
        new_epochs = self._new_epochs(samples)
        # Commit only now: an error above leaves the blender where it was.
        for name, (idx, cut) in expo.items():
            self._expo[name].add(idx, cut)
        self._samples = samples
        step = self.step
        self.step += 1
        return self._batch(step, tokens, mine, new_epochs)

    def _count_exposures(self, taken) -> dict[str, tuple[np.ndarray, int]]:
        out = {}
        for k, src in enumerate(self.sources):
            if src.name not in self._expo:
                continue
            parts, cut = [], 0
            for epoch, j, n, _ in _epoch_runs(self._samples[k], int(taken[k]),
                                              src.num_windows_per_epoch):
                idx, c = src.exposure_indices(epoch, j, n)
                parts.append(idx)
                cut += c
            out[src.name] = (np.concatenate(parts) if parts else np.empty(0, np.int64), cut)
        return out

    def _new_epochs(self, samples) -> list[tuple[str, int]]:
        out = []
        for src, old, new in zip(self.sources, self._samples, samples):
            w = src.num_windows_per_epoch
            for e in range(-(-old // w) + 1, -(-new // w) + 1):
                if e >= 2:
                    out.append((src.name, e))
        return out

    def _batch(self, step: int, tokens, mine, new_epochs) -> Batch:
        L = self.seq_len
        n = self.step * self.global_batch
        dom = {s.name: c * L for s, c in zip(self.sources[1:], self._samples[1:])}
        tgt = {s.name: self.targets.target(d, n) * L for d, s in enumerate(self.sources[1:])}
        expo = {name: c.stats() for name, c in self._expo.items()}
        return Batch(
            step=step, tokens=tokens, source=mine.copy(), source_names=self.source_names,
            tokens_total=n * L, tokens_domain=sum(dom.values()),
            target_domain_tokens=float(sum(tgt.values())), tokens_domain_by_source=dom,
            target_domain_tokens_by_source=tgt, exposures=expo, new_epochs=new_epochs,
        )

    # ---- checkpointing -------------------------------------------------------------

    def _fingerprint(self) -> dict:
        """What must match for a saved state to continue the same stream."""
        return {
            "seq_len": self.seq_len,
            "global_batch": self.global_batch,
            "sources": [[s.name, s.seed, s.num_documents, s.num_tokens, s.num_facts]
                        for s in self.sources],
            "pieces": [[list(p) for p in sch.pieces(self.total_steps)] for sch in self.schedules],
        }

    def state_dict(self) -> dict:
        """Small, JSON- and torch.save-able state (plain ints, floats, strings, lists)."""
        return {
            "version": _STATE_VERSION,
            "step": self.step,
            "samples": list(self._samples),
            "exposures": {name: {"counts": c.counts.tolist(), "full": c.full, "cut": c.cut}
                          for name, c in self._expo.items()},
            "fingerprint": self._fingerprint(),
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Continue exactly where the saved blender stopped (same batches from here on).

        Refuses a state saved with another seq_len, batch size, sources or schedule,
        naming the difference.
        """
        if not isinstance(state, Mapping) or state.get("version") != _STATE_VERSION:
            raise InfusionError(f"not an infusion blender state of version {_STATE_VERSION}")
        mine, theirs = self._fingerprint(), state.get("fingerprint")
        if not isinstance(theirs, Mapping):
            raise InfusionError("blender state has no fingerprint; it is not from this blender")
        for key, value in mine.items():
            if _listify(theirs.get(key)) != value:
                raise InfusionError(f"the checkpoint's data stream differs from this run's: "
                                    f"{_difference(key, theirs.get(key), value)}; resume with the "
                                    "configuration and data of the saved run")
        try:
            step, samples, expo = self._parse_state(state)
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, InfusionError):
                raise
            raise InfusionError(f"blender state is malformed ({e!r}); it is not from this blender") from None
        self.step, self._samples, self._expo = step, samples, expo

    def _parse_state(self, state: Mapping):
        step = check_int(state["step"], "saved step", 0)
        samples = [check_int(c, "saved sample count", 0) for c in state["samples"]]
        if len(samples) != len(self.sources) or sum(samples) != step * self.global_batch:
            raise InfusionError(f"blender state is inconsistent: step {step}, samples {samples}")
        n = step * self.global_batch
        for d in range(self.num_domains):
            dev = samples[d + 1] - self.targets.target(d, n)
            exact = self.num_domains > 1 or samples[1] == self.targets.max_count(0, n)
            if not (-1.0 <= dev <= 1.0 and exact):
                raise InfusionError(f"blender state is inconsistent: domain {d} is {dev:g} "
                                    "samples off its target")
        saved = state["exposures"]
        if not isinstance(saved, Mapping) or set(saved) != set(self._expo):
            raise InfusionError("blender state's exposure counters do not match the labelled sources")
        expo = {}
        for name, mine in self._expo.items():
            arr = np.asarray(saved[name]["counts"], dtype=np.int64)
            full = check_int(saved[name]["full"], "saved full count", 0)
            if arr.shape != mine.counts.shape or (arr.size and int(arr.min()) < 0) \
                    or int(arr.sum()) != full:
                raise InfusionError(f"blender state's exposure counts of '{name}' are not "
                                    f"{mine.counts.shape[0]} non-negative counts summing to {full}")
            expo[name] = _FactCounter(arr, check_int(saved[name]["cut"], "saved cut count", 0))
        return step, samples, expo


_SOURCE_FIELDS = (("seed", "train.seed"), ("documents", "its shard"), ("tokens", "its shard"),
                  ("facts", "infusion.facts"))


def _difference(key: str, saved, mine) -> str:
    """A fingerprint difference in the words of the config keys that cause it."""
    if key == "seq_len":
        return f"data.seq_len was {saved}, now {mine}"
    if key == "global_batch":
        return f"train.global_batch was {saved}, now {mine}"
    if key == "pieces":
        return "the infusion ratio or schedule (infusion.ratio, schedule, steps) changed"
    saved = _listify(saved) if isinstance(saved, (list, tuple)) else []
    if len(saved) != len(mine):
        return f"the run had {len(saved)} sources ({', '.join(str(s[0]) for s in saved)}), now {len(mine)}"
    for old, new in zip(saved, mine):
        for i, (what, knob) in enumerate(_SOURCE_FIELDS, start=1):
            if old[0] != new[0] or old[i] != new[i]:
                if old[0] != new[0]:
                    return f"source {old[0]!r} is now {new[0]!r}"
                return f"source {new[0]!r}: {what} was {old[i]}, now {new[i]} ({knob})"
    return f"{key} changed"


def _listify(value):
    """Tuples -> lists, recursively, so a state that went through JSON compares equal."""
    if isinstance(value, (list, tuple)):
        return [_listify(v) for v in value]
    return value
