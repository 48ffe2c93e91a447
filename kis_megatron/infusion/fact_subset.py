"""The first F facts of a labelled shard, as a shard of their own (``infusion.facts``).

One domain world and one token shard serve every level of a "number of facts" study: the
documents whose fact label (``prefix.doclabels.npy``, written by
``tools/preprocess_data.py --doc-key fact_id``) is in ``0 .. F-1`` are seen through a
:class:`DocumentSubset`, a view with the shard interface ``TokenWindowSource`` reads
(``len``, ``sizes``, ``get(i, offset, length)``) that copies no tokens. The facts of level
F are the first F of every larger level; generated worlds number facts entity by entity
(``kis_megatron.knowledge.worlds``), so a prefix of facts is a prefix of whole entities.
"""

from __future__ import annotations

import operator

import numpy as np

from kis_megatron.data.errors import DataError

__all__ = ["DocumentSubset", "first_facts"]


class DocumentSubset:
    """Documents ``indices`` of ``dataset``, in that order, renumbered 0 .. len - 1."""

    def __init__(self, dataset, indices):
        self.dataset = dataset
        self.indices = np.asarray(indices, dtype=np.int64)
        self.sizes = np.asarray(dataset.sizes)[self.indices]
        self.num_tokens = int(self.sizes.sum(dtype=np.int64))

    def __len__(self) -> int:
        return len(self.indices)

    def __repr__(self) -> str:
        return f"DocumentSubset({self.dataset!r}, documents={len(self)}, tokens={self.num_tokens})"

    def get(self, i, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens [offset, offset + length) of document i of the subset."""
        i = operator.index(i)
        if not 0 <= i < len(self.indices):
            raise IndexError(f"document {i} out of range for a subset of {len(self.indices)}")
        return self.dataset.get(int(self.indices[i]), offset, length)


def first_facts(dataset, labels, facts: int, key: str = "infusion.facts",
                where: str = "the shard") -> tuple[DocumentSubset, np.ndarray]:
    """(view, its labels): the documents of facts 0 .. facts-1, in shard order.

    Documents without a fact (label -1) are left out. Raises DataError naming ``key`` when
    the shard has no labels, fewer distinct facts than asked, or not every fact id below
    ``facts`` (then the subset would hold fewer facts than its name says).
    """
    if labels is None:
        raise DataError(f"{key}={facts} needs fact labels, but {where} has no .doclabels.npy; "
                        "make it with tools/preprocess_data.py --doc-key fact_id")
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) != len(dataset):
        raise DataError(f"{key}: {where} has {len(dataset)} documents but {len(labels)} labels; "
                        "re-run preprocessing")
    have = np.unique(labels[labels >= 0])
    if facts > len(have):
        raise DataError(f"{key}={facts} exceeds the {len(have)} distinct facts in {where}; "
                        f"use at most {len(have)}")
    present = np.searchsorted(have, facts)  # ids below `facts`; all present iff == facts
    if present != facts:
        missing = np.setdiff1d(np.arange(facts), have[:present])[0]
        raise DataError(f"{key}={facts}: {where} has no document of fact {int(missing)}, so its "
                        f"first {facts} fact ids hold only {int(present)} facts; fact ids must "
                        "run 0, 1, 2, ... as tools/make_knowledge.py writes them")
    keep = np.flatnonzero((labels >= 0) & (labels < facts))
    return DocumentSubset(dataset, keep), labels[keep]
