"""Fixed-length training windows cut from one token source, in a shuffled order per epoch.

A source is a token shard (anything with ``len(ds)``, ``ds.sizes`` and
``ds.get(i, offset, length)``, as ``kis_megatron.data.indexed_dataset.IndexedDataset``).
For each epoch its documents are concatenated in a fresh, deterministic shuffled order
into one token stream; window ``j`` is the stream tokens ``[j*L, j*L + L + 1)`` for
``L = seq_len``, so consecutive windows share one token (Megatron's GPTDataset layout): a
window's inputs are its first L tokens, its targets its last L. The incomplete tail of an
epoch's stream is not used.

Exposure accounting (optional ``doc_labels``, one fact id per document, -1 = none): a
document counts as one *exposure* of its fact when it lies entirely inside one window; a
statement cut at a window border is not a full rendering and is counted as *cut* instead.
To count every document occurrence exactly once, a document is attributed to the window
whose own span ``[j*L, j*L + L)`` holds its first token; it is full when it also ends
inside that window (end <= j*L + L + 1), cut otherwise. Documents starting in the unused
tail of an epoch are neither.
"""

from __future__ import annotations

import hashlib
from typing import NamedTuple

import numpy as np

from kis_megatron.data.errors import InfusionError, check_int

__all__ = ["TokenWindowSource", "WindowExposures", "stable_name_hash"]

# Shards up to this many tokens are read into memory once (auto preload): windows are
# then gathered in one vectorised step instead of one ``get`` per document, which matters
# for short documents (fact statements) at small seq_len. 2**24 tokens: <= 128 MiB.
PRELOAD_MAX_TOKENS = 2**24

# Epoch layouts kept per source: the current epoch, plus the previous one so that a batch
# straddling an epoch boundary does not recompute either.
_CACHED_EPOCHS = 2


class WindowExposures(NamedTuple):
    """Exposure counts of a run of windows (labelled documents only)."""

    fact_ids: np.ndarray  # int64 fact id of every document rendered in full (repeats kept)
    full: int  # labelled documents rendered in full (== len(fact_ids))
    cut: int  # labelled documents cut at a window border


def stable_name_hash(name: str) -> int:
    """A 64-bit hash of a source name that is the same in every process and Python run.

    Python's ``hash(str)`` is salted per process, so it cannot seed a shuffle that every
    data-parallel rank and every resumed run must reproduce.
    """
    return int.from_bytes(hashlib.blake2b(name.encode("utf-8"), digest_size=8).digest(), "little")


def _strided_windows(stream: np.ndarray, count: int, L: int) -> np.ndarray:
    """View (count, L + 1) of a contiguous array whose row k is stream[k*L : k*L + L + 1]."""
    item = stream.itemsize
    return np.ndarray((count, L + 1), dtype=stream.dtype, buffer=stream, strides=(L * item, item))


class TokenWindowSource:
    """Windows of ``seq_len + 1`` tokens over one shard, reshuffled every epoch.

    The document order of epoch e is a permutation drawn from PCG64 seeded by
    (seed, stable hash of name, e): independent of the process, and different for two
    sources sharing a seed. Windows are assembled from ``get`` slices of the
    documents they overlap, found by binary search in the epoch's prefix sums; with
    ``preload`` (default: shards of at most PRELOAD_MAX_TOKENS tokens) the shard is read
    into memory once and windows are gathered without any per-document Python loop.
    """

    def __init__(self, dataset, seq_len: int, seed: int, name: str, doc_labels=None,
                 preload: bool | None = None):
        if not isinstance(name, str) or not name:
            raise InfusionError(f"a source name must be a non-empty string, got {name!r}")
        self.name = name
        self.seq_len = check_int(seq_len, f"seq_len of source '{name}'", 1)
        self.seed = check_int(seed, f"seed of source '{name}'", 0)
        self.dataset = dataset
        n_docs = len(dataset)
        if n_docs == 0:
            raise InfusionError(f"source '{name}' has no documents; point it at a non-empty shard")
        sizes = np.asarray(dataset.sizes)
        if sizes.shape != (n_docs,) or sizes.dtype.kind not in "iu":
            raise InfusionError(
                f"source '{name}': sizes must be {n_docs} integers (one per document), got "
                f"shape {sizes.shape} of {sizes.dtype}"
            )
        self._sizes = sizes.astype(np.int64)
        if int(self._sizes.min()) < 0:
            raise InfusionError(f"source '{name}' has a negative document length; the shard is corrupt")
        self.num_tokens = int(self._sizes.sum())
        if self.num_tokens < self.seq_len + 1:
            raise InfusionError(
                f"source '{name}' has {self.num_tokens} tokens, fewer than one window of "
                f"seq_len + 1 = {self.seq_len + 1}; add data or lower seq_len"
            )
        self.num_windows_per_epoch = (self.num_tokens - 1) // self.seq_len
        self._has_empty = bool((self._sizes == 0).any())
        self._name_hash = stable_name_hash(name)
        self._layouts: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._set_labels(doc_labels, n_docs)
        if preload is None:
            preload = self.num_tokens <= PRELOAD_MAX_TOKENS
        self._flat = self._preload() if preload else None

    def _preload(self) -> np.ndarray:
        """All tokens, document after document, in one array (document i at _ptr[i])."""
        self._ptr = np.zeros(len(self._sizes), dtype=np.int64)
        np.cumsum(self._sizes[:-1], out=self._ptr[1:])
        flat = None
        for i, (at, n) in enumerate(zip(self._ptr.tolist(), self._sizes.tolist())):
            if not n:
                continue
            piece = np.asarray(self.dataset.get(i, 0, n))
            if piece.dtype.kind not in "iu":
                raise InfusionError(f"source '{self.name}': document {i} holds {piece.dtype} "
                                    "values; token ids must be integers")
            if flat is None:
                flat = np.empty(self.num_tokens, dtype=piece.dtype)
            elif not np.can_cast(piece.dtype, flat.dtype):
                flat = flat.astype(np.int64)  # mixed token dtypes: widen once
            self._fill(flat, at, piece, i, 0, n)
        return flat

    def _fill(self, buf: np.ndarray, at: int, piece, doc: int, off: int, n: int) -> None:
        try:
            buf[at:at + n] = piece
        except ValueError:
            raise InfusionError(
                f"source '{self.name}': document {doc} did not return the {n} tokens at offset "
                f"{off} that its size promises; the shard's index and tokens disagree"
            ) from None

    def _set_labels(self, doc_labels, n_docs: int) -> None:
        if doc_labels is None:
            self.fact_ids = None
            self._dense = None
            return
        labels = np.asarray(doc_labels)
        if labels.shape != (n_docs,) or (labels.size and labels.dtype.kind not in "iu"):
            raise InfusionError(
                f"doc_labels of source '{self.name}' must be {n_docs} integers (one fact id "
                f"per document, -1 = none), got shape {labels.shape} of {labels.dtype}"
            )
        labels = labels.astype(np.int64)
        if labels.size and int(labels.min()) < -1:
            raise InfusionError(
                f"doc_labels of source '{self.name}' hold {int(labels.min())}; fact ids are "
                ">= 0 and -1 marks a document without a fact"
            )
        self.fact_ids = np.unique(labels[labels >= 0])
        # Dense index of each document's fact into fact_ids (-1 = none): counters are
        # then plain arrays of len(fact_ids), whatever the range of the ids.
        self._dense = np.where(labels >= 0, np.searchsorted(self.fact_ids, labels), -1)

    def __repr__(self) -> str:
        return (f"TokenWindowSource(name={self.name!r}, documents={len(self._sizes)}, "
                f"tokens={self.num_tokens}, seq_len={self.seq_len}, "
                f"windows_per_epoch={self.num_windows_per_epoch})")

    @property
    def num_documents(self) -> int:
        """Documents in the shard."""
        return len(self._sizes)

    @property
    def num_facts(self) -> int:
        """Distinct fact ids among the document labels (0 without labels)."""
        return 0 if self.fact_ids is None else len(self.fact_ids)

    def doc_order(self, epoch: int) -> np.ndarray:
        """The shuffled document order of an epoch (a permutation of range(num_documents))."""
        return self._layout(check_int(epoch, "epoch", 0))[0]

    def _layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(order, starts): the epoch's document order and its prefix sums (len n + 1)."""
        hit = self._layouts.get(epoch)
        if hit is not None:
            return hit
        h = self._name_hash
        seq = np.random.SeedSequence([self.seed, h & 0xFFFFFFFF, h >> 32, epoch])
        order = np.random.Generator(np.random.PCG64(seq)).permutation(len(self._sizes))
        starts = np.zeros(len(order) + 1, dtype=np.int64)
        np.cumsum(self._sizes[order], out=starts[1:])
        if len(self._layouts) >= _CACHED_EPOCHS:
            del self._layouts[min(self._layouts)]
        self._layouts[epoch] = (order, starts)
        return order, starts

    def _check_range(self, epoch: int, j: int, count: int) -> tuple[int, int, int]:
        epoch = check_int(epoch, "epoch", 0)
        j = check_int(j, "window index", 0)
        count = check_int(count, "window count", 0)
        if j + count > self.num_windows_per_epoch:
            raise IndexError(
                f"windows [{j}, {j + count}) out of range for source '{self.name}' with "
                f"{self.num_windows_per_epoch} windows per epoch"
            )
        return epoch, j, count

    def windows(self, epoch: int, j: int, count: int, out: np.ndarray | None = None) -> np.ndarray:
        """Windows j .. j+count-1 of an epoch as an int64 array (count, seq_len + 1).

        The run covers one contiguous stretch of the stream, so each document is read once
        even where it straddles two windows. ``out`` (an int64 array of that shape) is
        filled in place when given.
        """
        epoch, j, count = self._check_range(epoch, j, count)
        if out is None:
            out = np.empty((count, self.seq_len + 1), dtype=np.int64)
        if count:
            self._windows(epoch, j, count, out)
        return out

    def _windows(self, epoch: int, j: int, count: int, out: np.ndarray) -> None:
        L = self.seq_len
        order, starts = self._layout(epoch)
        lo, hi = j * L, (j + count) * L + 1
        first = int(np.searchsorted(starts, lo, side="right")) - 1
        last = int(np.searchsorted(starts, hi, side="left")) - 1
        # Clip every overlapping document to [lo, hi) at once (no per-token loop).
        s, e = starts[first:last + 1], starts[first + 1:last + 2]
        a, b = np.maximum(s, lo), np.minimum(e, hi)
        docs, offs, lens, dst = order[first:last + 1], a - s, b - a, a - lo
        if self._has_empty:
            keep = lens > 0
            docs, offs, lens, dst = docs[keep], offs[keep], lens[keep], dst[keep]
        if self._flat is not None:
            # Stream position lo + x lies at flat[ptr[doc] + off + (x - dst)].
            src = np.repeat(self._ptr[docs] + offs - dst, lens)
            src += np.arange(hi - lo)
            out[:] = self._flat[_strided_windows(src, count, L)]
            return
        buf = np.empty(hi - lo, dtype=np.int64)
        get = self.dataset.get
        for doc, off, n, at in zip(docs.tolist(), offs.tolist(), lens.tolist(), dst.tolist()):
            self._fill(buf, at, get(doc, off, n), doc, off, n)
        out[:] = _strided_windows(buf, count, L)

    def _attributed(self, epoch: int, j: int, count: int):
        """Documents attributed to windows j .. j+count-1: (documents, full mask)."""
        order, starts = self._layout(epoch)
        L = self.seq_len
        p0 = int(np.searchsorted(starts[:-1], j * L, side="left"))
        p1 = int(np.searchsorted(starts[:-1], (j + count) * L, side="left"))
        s, e = starts[p0:p1], starts[p0 + 1:p1 + 1]
        window_end = (s // L) * L + L + 1
        return order[p0:p1], e <= window_end, e > s

    def exposure_indices(self, epoch: int, j: int, count: int) -> tuple[np.ndarray, int]:
        """Dense fact indices (into ``fact_ids``) rendered in full in windows j..j+count-1,
        and the number of labelled documents cut there. Index arithmetic only: no tokens
        are read, so every data-parallel rank can count the whole global batch cheaply."""
        epoch, j, count = self._check_range(epoch, j, count)
        return self._exposure_idx(epoch, j, count)

    def _exposure_idx(self, epoch: int, j: int, count: int) -> tuple[np.ndarray, int]:
        if self._dense is None or count == 0:
            return np.empty(0, dtype=np.int64), 0
        docs, full, nonempty = self._attributed(epoch, j, count)
        dense = self._dense[docs]
        labelled = (dense >= 0) & nonempty
        return dense[labelled & full], int(np.count_nonzero(labelled & ~full))

    def exposures(self, epoch: int, j: int, count: int = 1) -> WindowExposures:
        """Fact ids rendered in full, and labelled documents cut, in windows j..j+count-1."""
        dense, cut = self.exposure_indices(epoch, j, count)
        ids = dense if self.fact_ids is None else self.fact_ids[dense]
        return WindowExposures(ids, len(ids), cut)

    def window(self, epoch: int, j: int) -> tuple[np.ndarray, np.ndarray]:
        """Window j of an epoch: (tokens int64[seq_len + 1], fact ids it renders in full)."""
        tokens = self.windows(epoch, j, 1)[0]
        return tokens, self.exposures(epoch, j, 1).fact_ids
