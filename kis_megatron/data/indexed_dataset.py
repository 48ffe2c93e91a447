"""Token shards in Megatron's indexed dataset format (.bin + .idx), plus our sidecars.

The files are byte-compatible in both directions with
``megatron.core.datasets.indexed_dataset`` (IndexedDatasetBuilder / IndexedDataset), so
shards made here train under Megatron-LM and Megatron's shards train here.

``prefix.idx`` (all little endian)::

    9 bytes   magic b"MMIDIDX\\x00\\x00"
    uint64    version, always 1
    uint8     dtype code of the tokens (see _DTYPE_CODES)
    uint64    n, the number of sequences
    uint64    d, the number of document indices (number of documents + 1)
    int32[n]  sequence lengths, in tokens
    int64[n]  sequence pointers, byte offsets into prefix.bin
    int64[d]  document indices: document k is sequences [doc[k], doc[k+1]); doc[0] == 0
    (int8[n]  sequence modes: only in Megatron's multimodal datasets; ignored here)

``prefix.bin`` holds the tokens of every sequence back to back. Our writer stores one
sequence per document, as Megatron's ``tools/preprocess_data.py`` does.

Sidecars (ours, optional): ``prefix.meta.json`` (tokenizer path and sha256, vocab size, EOD
id, max token id, counts), written by kis_megatron.data.preprocess, and
``prefix.doclabels.npy`` (one int64 label per document, e.g. a fact id, for exposure
accounting).
"""

from __future__ import annotations

import json
import operator
import os
import shutil
import struct
from array import array

import numpy as np

from kis_megatron.data.errors import DataError
from kis_megatron.utils import atomic_write, temp_path

__all__ = [
    "DataError",
    "IndexedDataset",
    "IndexedDatasetWriter",
    "best_dtype",
    "check_vocab",
    "load_doc_labels",
    "read_meta",
    "write_doc_labels",
    "write_meta",
]

_MAGIC = b"MMIDIDX\x00\x00"
_VERSION = 1
# magic, version, dtype code, sequence count, document-index count: 34 bytes, no padding.
_HEADER = struct.Struct("<9sQBQQ")

# Megatron's DType enum: the code stored in the index for each numpy type.
_DTYPE_CODES = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
_CODE_OF = {np.dtype(t): code for code, t in _DTYPE_CODES.items()}


def bin_path(prefix) -> str:
    """Path of the token file for a dataset prefix."""
    return os.fspath(prefix) + ".bin"


def idx_path(prefix) -> str:
    """Path of the index file for a dataset prefix."""
    return os.fspath(prefix) + ".idx"


def meta_path(prefix) -> str:
    """Path of our metadata sidecar for a dataset prefix."""
    return os.fspath(prefix) + ".meta.json"


def doc_labels_path(prefix) -> str:
    """Path of our per-document label sidecar for a dataset prefix."""
    return os.fspath(prefix) + ".doclabels.npy"


def best_dtype(vocab_size: int) -> type:
    """Smallest token dtype for a vocabulary: np.uint16 below 65500 ids, else np.int32.

    Same rule as Megatron's DType.optimal_dtype, so both tools pick the same files.
    """
    if vocab_size is None or vocab_size < 65500:
        return np.uint16
    return np.int32


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _token_dtype(dtype) -> np.dtype:
    dt = np.dtype(dtype)
    if dt not in _CODE_OF or dt.kind not in "iu":
        names = sorted(np.dtype(t).name for t in _DTYPE_CODES.values() if np.dtype(t).kind in "iu")
        raise DataError(f"token dtype {dt.name} is not supported; use one of {names}")
    return dt


def _read_header(path: str) -> tuple[type, int, int]:
    """Validate an index file's header; return (dtype, sequence count, document-index count)."""
    if not os.path.isfile(path):
        raise DataError(f"missing index file: {path} (a dataset needs both .bin and .idx)")
    size = os.path.getsize(path)
    if size < _HEADER.size:
        raise DataError(f"{path}: {size} bytes is too short for an index; it is truncated")
    with open(path, "rb") as f:
        magic, version, code, n, d = _HEADER.unpack(f.read(_HEADER.size))
    if magic != _MAGIC:
        raise DataError(
            f"{path}: bad magic {magic!r}, expected {_MAGIC!r}; not a Megatron .idx file"
        )
    if version != _VERSION:
        raise DataError(f"{path}: index version {version} is not supported (only 1)")
    if code not in _DTYPE_CODES:
        raise DataError(
            f"{path}: unknown dtype code {code} (known codes: {sorted(_DTYPE_CODES)}); "
            "the index is corrupt or from an incompatible writer"
        )
    expected = _HEADER.size + 12 * n + 8 * d
    # expected + n: Megatron's multimodal indices append one int8 mode per sequence.
    if size not in (expected, expected + n):
        raise DataError(
            f"{path}: {size} bytes does not match its header ({n} sequences, {d} document "
            f"indices need {expected} bytes); the index is truncated or corrupt"
        )
    if d < 1:
        raise DataError(f"{path}: no document indices (needs at least the leading 0)")
    return _DTYPE_CODES[code], n, d


class IndexedDatasetWriter:
    """Write a Megatron indexed dataset, one sequence per document.

    Use as a context manager: the files are committed on a clean exit, and discarded if
    the block raises. Tokens go to a temp file beside the prefix; ``finalize`` writes the
    index to another temp file and renames both only at the end, after removing any old
    index, so a crash never leaves a .bin/.idx pair that looks valid.
    """

    def __init__(self, prefix, dtype=np.int32):
        self.prefix = os.fspath(prefix)
        self.dtype = _token_dtype(dtype).type
        self._le = np.dtype(self.dtype).newbyteorder("<")
        self._itemsize = np.dtype(self.dtype).itemsize
        self._info = np.iinfo(self.dtype)
        directory = os.path.dirname(os.path.abspath(self.prefix))
        if not os.path.isdir(directory):
            raise DataError(f"output directory does not exist: {directory}")
        self._tmp_bin = str(temp_path(bin_path(self.prefix)))
        self._bin = open(self._tmp_bin, "xb")
        self._sizes = array("i")  # int32 per sequence (array keeps big corpora compact)
        self._doc_idx = array("q", [0])  # int64, Megatron's leading 0 included
        self._max_token = -1
        self._done = False

    def __enter__(self) -> "IndexedDatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._done:
            self.finalize()

    @property
    def num_documents(self) -> int:
        """Documents written so far."""
        return len(self._doc_idx) - 1

    @property
    def num_tokens(self) -> int:
        """Tokens written so far."""
        return int(np.frombuffer(self._sizes, dtype=np.int32).sum(dtype=np.int64))

    @property
    def max_token_id(self) -> int:
        """Largest token id written so far, -1 when none."""
        return self._max_token

    def _check_open(self) -> None:
        if self._done:
            raise DataError(f"writer for {self.prefix} is already finalized or aborted")

    def _check_tokens(self, arr: np.ndarray) -> None:
        if arr.size and arr.dtype.kind not in "iu":
            raise DataError(f"token ids must be integers, got dtype {arr.dtype}")
        if arr.size:
            lo, hi = int(arr.min()), int(arr.max())
            if lo < self._info.min or hi > self._info.max:
                bad = lo if lo < self._info.min else hi
                raise DataError(
                    f"token id {bad} does not fit dtype {np.dtype(self.dtype).name} "
                    f"[{self._info.min}, {self._info.max}]; pick the dtype with best_dtype(vocab_size)"
                )
            self._max_token = max(self._max_token, hi)

    def add_document(self, tokens) -> None:
        """Append one document (a 1-D sequence of integer token ids) as one sequence."""
        self._check_open()
        arr = np.asarray(tokens)
        if arr.ndim != 1:
            raise DataError(f"a document must be a 1-D sequence of token ids, got shape {arr.shape}")
        if arr.size >= 2**31:
            raise DataError(f"a document of {arr.size} tokens exceeds the int32 length field")
        self._check_tokens(arr)
        self._bin.write(arr.astype(self._le, copy=False).tobytes())
        self._sizes.append(arr.size)
        self._doc_idx.append(len(self._sizes))

    def add_documents(self, tokens, lengths) -> None:
        """Append many documents at once: ``tokens`` is their concatenation, ``lengths``
        their sizes. Same files as add_document per document, with one check and one
        write per call (the preprocessing hot path)."""
        self._check_open()
        arr, lengths = np.asarray(tokens), np.asarray(lengths)
        if arr.ndim != 1 or lengths.ndim != 1:
            raise DataError("add_documents expects 1-D tokens and 1-D lengths")
        if lengths.size and (lengths.dtype.kind not in "iu" or int(lengths.min()) < 0
                             or int(lengths.max()) >= 2**31):
            raise DataError("document lengths must be integers in [0, 2**31)")
        if int(lengths.sum(dtype=np.int64)) != arr.size:
            raise DataError(
                f"document lengths sum to {int(lengths.sum(dtype=np.int64))} but {arr.size} tokens were given"
            )
        self._check_tokens(arr)
        self._bin.write(arr.astype(self._le, copy=False).tobytes())
        first = len(self._sizes)
        self._sizes.frombytes(lengths.astype(np.int32).tobytes())
        self._doc_idx.frombytes(np.arange(first + 1, first + 1 + lengths.size, dtype=np.int64).tobytes())

    def merge(self, other_prefix) -> None:
        """Append every document of a finished dataset (same dtype), in order.

        Document boundaries of the other dataset are kept as they are, so merging a
        Megatron dataset with several sequences per document is exact too.
        """
        self._check_open()
        other = IndexedDataset(other_prefix)
        if np.dtype(other.dtype) != np.dtype(self.dtype):
            raise DataError(
                f"cannot merge {other.prefix}: its dtype {np.dtype(other.dtype).name} differs "
                f"from this writer's {np.dtype(self.dtype).name}"
            )
        offset = len(self._sizes)
        self._sizes.frombytes(other.sizes.astype(np.int32).tobytes())
        self._doc_idx.frombytes((other.document_indices[1:] + offset).astype(np.int64).tobytes())
        if other.num_tokens:
            self._max_token = max(self._max_token, int(other._tokens.max()))
        with open(bin_path(other.prefix), "rb") as f:
            shutil.copyfileobj(f, self._bin)

    def _index_bytes(self) -> bytes:
        sizes = np.frombuffer(self._sizes, dtype=np.int32)
        pointers = np.zeros(len(sizes), dtype=np.int64)
        np.cumsum(sizes[:-1], dtype=np.int64, out=pointers[1:])
        pointers *= self._itemsize
        doc_idx = np.frombuffer(self._doc_idx, dtype=np.int64)
        header = _HEADER.pack(_MAGIC, _VERSION, _CODE_OF[np.dtype(self.dtype)], len(sizes), len(doc_idx))
        return b"".join(
            [header, sizes.astype("<i4").tobytes(), pointers.astype("<i8").tobytes(),
             doc_idx.astype("<i8").tobytes()]
        )

    def finalize(self) -> None:
        """Commit prefix.bin and prefix.idx (replacing an older dataset at the prefix).

        Sidecars of an older dataset at this prefix are removed: they describe other tokens.
        """
        self._check_open()
        try:
            self._bin.flush()
            os.fsync(self._bin.fileno())
            self._bin.close()
            index = self._index_bytes()
            tmp_idx = str(temp_path(idx_path(self.prefix)))
            try:
                with open(tmp_idx, "xb") as f:
                    f.write(index)
                    f.flush()
                    os.fsync(f.fileno())
                # Old index first: a crash between the renames leaves a .bin without .idx
                # (reported as missing) rather than new tokens under an old index.
                for stale in (idx_path(self.prefix), meta_path(self.prefix),
                              doc_labels_path(self.prefix)):
                    _remove(stale)
                os.replace(self._tmp_bin, bin_path(self.prefix))
                os.replace(tmp_idx, idx_path(self.prefix))
            finally:
                _remove(tmp_idx)
        except BaseException:
            self.abort()
            raise
        self._done = True

    def abort(self) -> None:
        """Discard everything written; no dataset files are created or changed."""
        self._done = True
        if not self._bin.closed:
            self._bin.close()
        _remove(self._tmp_bin)


class IndexedDataset:
    """Read a Megatron indexed dataset through numpy memory maps.

    ``ds[i]`` is the i-th sequence as a read-only numpy view (no copy). Opening checks the
    header, the index size and that the .bin holds exactly the tokens the index describes,
    and raises DataError naming the file otherwise.
    """

    def __init__(self, prefix):
        self.prefix = os.fspath(prefix)
        self._open()

    def _open(self) -> None:
        bpath, ipath = bin_path(self.prefix), idx_path(self.prefix)
        if not os.path.isfile(bpath):
            raise DataError(f"missing token file: {bpath} (a dataset needs both .bin and .idx)")
        dtype, n, d = _read_header(ipath)
        self.dtype = dtype
        self._itemsize = np.dtype(dtype).itemsize
        raw = np.memmap(ipath, dtype=np.uint8, mode="r")
        off = _HEADER.size
        self.sizes = np.frombuffer(raw, dtype="<i4", count=n, offset=off).view(np.int32)
        self.pointers = np.frombuffer(raw, dtype="<i8", count=n, offset=off + 4 * n).view(np.int64)
        self.document_indices = np.frombuffer(
            raw, dtype="<i8", count=d, offset=off + 12 * n
        ).view(np.int64)
        if self.document_indices[0] != 0 or self.document_indices[-1] != n:
            raise DataError(
                f"{ipath}: document indices must run from 0 to the sequence count {n}, got "
                f"{self.document_indices[0]} .. {self.document_indices[-1]}; the index is corrupt"
            )
        if n and int(self.sizes.min()) < 0:
            raise DataError(f"{ipath}: negative sequence length; the index is corrupt")
        self.num_tokens = int(self.sizes.sum(dtype=np.int64))
        bin_size = os.path.getsize(bpath)
        if self.num_tokens * self._itemsize != bin_size:
            raise DataError(
                f"{bpath}: {bin_size} bytes, but {ipath} describes {self.num_tokens} tokens of "
                f"{np.dtype(dtype).name} ({self.num_tokens * self._itemsize} bytes); the pair "
                "does not belong together or one file is truncated: re-run preprocessing"
            )
        _check_pointers(ipath, self.sizes, self.pointers, self.document_indices, self._itemsize)
        le = np.dtype(dtype).newbyteorder("<")
        if bin_size == 0:  # mmap cannot map an empty file
            self._tokens = np.empty(0, dtype=dtype)
        else:
            self._tokens = np.memmap(bpath, dtype=le, mode="r").view(np.ndarray)

    def __getstate__(self) -> dict:
        # Reopen the memory maps in the receiving process (e.g. DataLoader workers).
        return {"prefix": self.prefix}

    def __setstate__(self, state: dict) -> None:
        self.prefix = state["prefix"]
        self._open()

    def __repr__(self) -> str:
        return (f"IndexedDataset({self.prefix!r}, sequences={len(self)}, "
                f"documents={self.num_documents}, tokens={self.num_tokens}, "
                f"dtype={np.dtype(self.dtype).name})")

    def __len__(self) -> int:
        return len(self.sizes)

    @property
    def num_documents(self) -> int:
        """Number of documents (len(document_indices) - 1)."""
        return len(self.document_indices) - 1

    def _index(self, i) -> int:
        i = operator.index(i)
        n = len(self.sizes)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"sequence index {i} out of range for {n} sequences")
        return i

    def __getitem__(self, i) -> np.ndarray:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self.get(i)

    def get(self, i, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens [offset, offset + length) of sequence i (to its end when length is None)."""
        i = self._index(i)
        size = int(self.sizes[i])
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(
                f"tokens [{offset}, {offset + length}) out of range for sequence {i} of {size} tokens"
            )
        start = int(self.pointers[i]) // self._itemsize + offset
        return self._tokens[start:start + length]

    def token_range(self) -> tuple[int, int]:
        """(min, max) token id over the whole dataset, by a pass over the memory map."""
        if self.num_tokens == 0:
            return 0, -1
        return int(self._tokens.min()), int(self._tokens.max())


# Index entries checked per numpy pass when a shard is opened (bounds the temporaries).
_CHECK_CHUNK = 1 << 22


def _check_pointers(ipath: str, sizes, pointers, doc_idx, itemsize: int) -> None:
    """Every sequence must start where the previous one ends (Megatron's writer and ours
    lay them back to back, and the .bin size was checked against the sum of the sizes), and
    document indices must not go backwards: a vectorised pass, in chunks."""
    end = 0  # byte offset where the next sequence must start
    for lo in range(0, len(sizes), _CHECK_CHUNK):
        s = sizes[lo:lo + _CHECK_CHUNK].astype(np.int64) * itemsize
        expected = end + np.concatenate(([0], np.cumsum(s[:-1])))
        wrong = np.flatnonzero(pointers[lo:lo + _CHECK_CHUNK] != expected)
        if len(wrong):
            i = lo + int(wrong[0])
            raise DataError(
                f"{ipath}: sequence {i} starts at byte {int(pointers[i])}, but the sizes before "
                f"it end at byte {int(expected[wrong[0]])}; the sizes and pointers disagree, the "
                "index is corrupt: re-run preprocessing")
        end += int(s.sum())
    for lo in range(0, max(len(doc_idx) - 1, 0), _CHECK_CHUNK):
        step = np.diff(doc_idx[lo:lo + _CHECK_CHUNK + 1])
        if len(step) and int(step.min()) < 0:
            k = lo + int(np.argmax(step < 0))
            raise DataError(f"{ipath}: document index {k + 1} goes back from {int(doc_idx[k])} to "
                            f"{int(doc_idx[k + 1])}; the index is corrupt: re-run preprocessing")


def write_meta(prefix, meta: dict) -> None:
    """Atomically write the metadata sidecar prefix.meta.json."""
    data = (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode()
    atomic_write(meta_path(prefix), lambda f: f.write(data))


def read_meta(prefix) -> dict | None:
    """The metadata sidecar of a dataset, or None when there is none."""
    path = meta_path(prefix)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e}); delete it or re-run preprocessing") from None
    if not isinstance(meta, dict):
        raise DataError(f"{path}: expected a JSON object; delete it or re-run preprocessing")
    return meta


def check_vocab(dataset_or_prefix, vocab_size: int) -> int:
    """Refuse a dataset whose token ids do not fit a model's vocabulary; return the max id.

    Uses the sidecar's ``max_token_id`` when present (after checking that the sidecar's
    counts match the dataset), else a pass over the tokens. This is how the trainer turns
    a tokenizer/model mismatch into a clear error instead of an index error on the GPU.
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)) or vocab_size < 1:
        raise ValueError(f"vocab_size must be a positive integer, got {vocab_size!r}")
    ds = dataset_or_prefix
    if not isinstance(ds, IndexedDataset):
        ds = IndexedDataset(dataset_or_prefix)
    meta = read_meta(ds.prefix)
    if meta is not None:
        path = meta_path(ds.prefix)
        for key, actual in (("num_documents", ds.num_documents), ("num_tokens", ds.num_tokens)):
            if key not in meta or meta[key] != actual:
                raise DataError(
                    f"{path}: {key}={meta.get(key)!r} but the dataset has {actual}; the sidecar "
                    "is stale: re-run preprocessing or delete it"
                )
        if not isinstance(meta.get("max_token_id"), int):
            raise DataError(f"{path}: missing integer 'max_token_id'; re-run preprocessing")
        max_id = meta["max_token_id"]
        origin = f"tokenizer {meta.get('tokenizer_model', '?')}"
    else:
        min_id, max_id = ds.token_range()
        if min_id < 0:
            raise DataError(f"{ds.prefix}: negative token id {min_id}; the data is corrupt")
        origin = "no .meta.json sidecar"
    if max_id >= vocab_size:
        raise DataError(
            f"{ds.prefix}: token id {max_id} does not fit the model's vocab_size {vocab_size} "
            f"({origin}); tokenize with the model's tokenizer or set the model's vocab_size "
            f">= {max_id + 1}"
        )
    return max_id


def write_doc_labels(prefix, labels) -> None:
    """Atomically write one int64 label per document to prefix.doclabels.npy."""
    arr = np.asarray(labels, dtype=np.int64)
    if arr.ndim != 1:
        raise DataError(f"document labels must be 1-D, got shape {arr.shape}")
    atomic_write(doc_labels_path(prefix), lambda f: np.save(f, arr, allow_pickle=False))


def load_doc_labels(prefix) -> np.ndarray | None:
    """Per-document int64 labels of a dataset (e.g. fact ids, -1 = none), or None if absent.

    When the index exists, the label count must equal its document count.
    """
    path = doc_labels_path(prefix)
    if not os.path.isfile(path):
        return None
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise DataError(f"{path}: not a readable .npy file ({e}); re-run preprocessing") from None
    if arr.ndim != 1 or arr.dtype != np.int64:
        raise DataError(f"{path}: expected a 1-D int64 array, got {arr.dtype} of shape {arr.shape}")
    if os.path.isfile(idx_path(prefix)):
        _, _, d = _read_header(idx_path(prefix))
        if len(arr) != d - 1:
            raise DataError(
                f"{path}: {len(arr)} labels but {idx_path(prefix)} has {d - 1} documents; "
                "the sidecar is stale: re-run preprocessing"
            )
    return arr
