"""Indexed dataset: byte compatibility with megatron-core in both directions, and errors."""

import os
import pickle
import struct

import numpy as np
import pytest

from kis_megatron.data.indexed_dataset import (
    DataError,
    IndexedDataset,
    IndexedDatasetWriter,
    best_dtype,
    check_vocab,
    load_doc_labels,
    write_doc_labels,
    write_meta,
)

mcore = pytest.importorskip("megatron.core.datasets.indexed_dataset")


def _docs(seed, n=37, vocab=60000):
    rng = np.random.default_rng(seed)
    docs = [rng.integers(0, vocab, size=int(rng.integers(1, 50))) for _ in range(n)]
    docs[min(5, n - 1)] = np.zeros(0, dtype=np.int64)  # an empty document is legal in the format
    return docs


def _build_mcore(prefix, docs, dtype):
    builder = mcore.IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for d in docs:
        builder.add_document(d, [len(d)])
    builder.finalize(prefix + ".idx")


def _build_ours(prefix, docs, dtype):
    with IndexedDatasetWriter(prefix, dtype) as w:
        for d in docs:
            w.add_document(d)
    return w


def _read(path):
    with open(path, "rb") as f:
        return f.read()


@pytest.mark.parametrize("dtype", [np.int32, np.uint16])
def test_megatron_written_read_by_ours(tmp_path, dtype):
    docs = _docs(1)
    prefix = str(tmp_path / "m")
    _build_mcore(prefix, docs, dtype)
    ds = IndexedDataset(prefix)
    assert ds.dtype == dtype
    assert len(ds) == len(docs) and ds.num_documents == len(docs)
    np.testing.assert_array_equal(ds.sizes, [len(d) for d in docs])
    np.testing.assert_array_equal(ds.document_indices, np.arange(len(docs) + 1))
    assert ds.num_tokens == sum(len(d) for d in docs)
    for i, d in enumerate(docs):
        np.testing.assert_array_equal(ds[i], d)


@pytest.mark.parametrize("dtype", [np.int32, np.uint16])
def test_ours_written_read_by_megatron_and_bytes_equal(tmp_path, dtype):
    docs = _docs(2)
    ours, theirs = str(tmp_path / "ours"), str(tmp_path / "theirs")
    _build_ours(ours, docs, dtype)
    _build_mcore(theirs, docs, dtype)
    ref = mcore.IndexedDataset(ours)
    assert len(ref) == len(docs)
    np.testing.assert_array_equal(ref.sequence_lengths, [len(d) for d in docs])
    np.testing.assert_array_equal(ref.document_indices, np.arange(len(docs) + 1))
    for i, d in enumerate(docs):
        np.testing.assert_array_equal(ref[i], d)
        assert ref[i].dtype == dtype
    assert _read(ours + ".bin") == _read(theirs + ".bin")
    assert _read(ours + ".idx") == _read(theirs + ".idx")


def test_add_documents_batch_equals_one_by_one(tmp_path):
    docs = _docs(8, n=23)
    one, batch = str(tmp_path / "one"), str(tmp_path / "batch")
    _build_ours(one, docs, np.uint16)
    with IndexedDatasetWriter(batch, np.uint16) as w:
        w.add_documents(np.concatenate(docs[:10]), [len(d) for d in docs[:10]])
        w.add_documents(np.concatenate(docs[10:]), np.array([len(d) for d in docs[10:]]))
        with pytest.raises(DataError, match="lengths sum to 5 but 4 tokens"):
            w.add_documents([1, 2, 3, 4], [2, 3])
    assert w.num_documents == len(docs)
    for ext in (".bin", ".idx"):
        assert _read(one + ext) == _read(batch + ext)


def test_megatron_multi_sequence_documents_and_pointers(tmp_path):
    # Megatron may split a document into several sequences (e.g. sentences); we read that.
    prefix = str(tmp_path / "multi")
    rng = np.random.default_rng(3)
    builder = mcore.IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    seqs, doc_idx = [], [0]
    for _ in range(6):
        lengths = [int(x) for x in rng.integers(1, 9, size=int(rng.integers(1, 4)))]
        toks = rng.integers(0, 1000, size=sum(lengths))
        builder.add_document(toks, lengths)
        start = 0
        for ln in lengths:
            seqs.append(toks[start:start + ln])
            start += ln
        doc_idx.append(len(seqs))
    builder.finalize(prefix + ".idx")
    ds = IndexedDataset(prefix)
    assert len(ds) == len(seqs) and ds.num_documents == 6
    np.testing.assert_array_equal(ds.document_indices, doc_idx)
    expected_ptr = np.concatenate([[0], np.cumsum([len(s) for s in seqs])[:-1]]) * 4
    np.testing.assert_array_equal(ds.pointers, expected_ptr)
    for i, s in enumerate(seqs):
        np.testing.assert_array_equal(ds[i], s)


def test_merge_matches_megatron_add_index(tmp_path):
    a, b = _docs(4, n=11), _docs(5, n=9)
    pa, pb = str(tmp_path / "a"), str(tmp_path / "b")
    _build_ours(pa, a, np.uint16)
    _build_ours(pb, b, np.uint16)
    with IndexedDatasetWriter(str(tmp_path / "ab"), np.uint16) as w:
        for d in a[:3]:
            w.add_document(d)
        w.merge(pb)
        w.merge(pa)
    assert w.num_documents == 3 + 9 + 11
    builder = mcore.IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=np.uint16)
    for d in a[:3]:
        builder.add_document(d, [len(d)])
    builder.add_index(pb)
    builder.add_index(pa)
    builder.finalize(str(tmp_path / "ref.idx"))
    for ext in (".bin", ".idx"):
        assert _read(str(tmp_path / "ab") + ext) == _read(str(tmp_path / "ref") + ext)
    expected_max = max(int(d.max()) for d in a + b if len(d))
    assert w.max_token_id == expected_max


def test_merge_refuses_other_dtype(tmp_path):
    _build_ours(str(tmp_path / "a"), _docs(6, n=3), np.int32)
    with IndexedDatasetWriter(str(tmp_path / "b"), np.uint16) as w:
        with pytest.raises(DataError, match="dtype int32 differs"):
            w.merge(str(tmp_path / "a"))
        w.abort()
    assert sorted(os.listdir(tmp_path)) == ["a.bin", "a.idx"]


def test_get_offset_length_and_indexing(tmp_path):
    docs = _docs(7, n=8)
    prefix = str(tmp_path / "g")
    _build_ours(prefix, docs, np.int32)
    ds = IndexedDataset(prefix)
    d = docs[3]
    np.testing.assert_array_equal(ds.get(3, offset=2), d[2:])
    np.testing.assert_array_equal(ds.get(3, offset=1, length=4), d[1:5])
    np.testing.assert_array_equal(ds[-1], docs[-1])
    np.testing.assert_array_equal(ds[np.int64(2)], docs[2])
    assert [len(x) for x in ds[1:4]] == [len(x) for x in docs[1:4]]
    with pytest.raises(IndexError):
        ds[len(docs)]
    with pytest.raises(IndexError):
        ds.get(3, offset=1, length=len(d))
    assert not ds[0].flags.writeable  # a view of the read-only map, not a copy
    clone = pickle.loads(pickle.dumps(ds))
    np.testing.assert_array_equal(clone[4], docs[4])


def test_best_dtype_matches_megatron():
    for v in (1, 256, 32000, 65499, 65500, 65536, 128256):
        assert best_dtype(v) == mcore.DType.optimal_dtype(v)
    assert best_dtype(65499) == np.uint16 and best_dtype(65500) == np.int32


def test_writer_is_atomic(tmp_path):
    prefix = str(tmp_path / "x")
    w = IndexedDatasetWriter(prefix, np.uint16)
    w.add_document([1, 2, 3])
    assert not os.path.exists(prefix + ".bin") and not os.path.exists(prefix + ".idx")
    w.finalize()
    assert sorted(os.listdir(tmp_path)) == ["x.bin", "x.idx"]
    with pytest.raises(RuntimeError):
        with IndexedDatasetWriter(prefix, np.uint16) as w2:
            w2.add_document([9, 9])
            raise RuntimeError("crash")
    # The failed rewrite left the old dataset untouched and no temp files behind.
    assert sorted(os.listdir(tmp_path)) == ["x.bin", "x.idx"]
    np.testing.assert_array_equal(IndexedDataset(prefix)[0], [1, 2, 3])


def test_add_document_rejects_bad_tokens(tmp_path):
    with IndexedDatasetWriter(str(tmp_path / "t"), np.uint16) as w:
        with pytest.raises(DataError, match="token id 70000 does not fit dtype uint16"):
            w.add_document([1, 70000])
        with pytest.raises(DataError, match="token id -1"):
            w.add_document([-1, 3])
        with pytest.raises(DataError, match="1-D"):
            w.add_document([[1, 2]])
        with pytest.raises(DataError, match="integers"):
            w.add_document([1.5])
        w.add_document([4])
    np.testing.assert_array_equal(IndexedDataset(str(tmp_path / "t"))[0], [4])
    with pytest.raises(DataError, match="not supported"):
        IndexedDatasetWriter(str(tmp_path / "f"), np.float32)


@pytest.fixture
def small(tmp_path):
    prefix = str(tmp_path / "s")
    _build_ours(prefix, [[1, 2, 3], [4, 5]], np.int32)
    return prefix


def test_missing_files_are_named(small):
    os.remove(small + ".idx")
    with pytest.raises(DataError, match="missing index file: .*s\\.idx"):
        IndexedDataset(small)
    os.remove(small + ".bin")
    with pytest.raises(DataError, match="missing token file: .*s\\.bin"):
        IndexedDataset(small)


def _patch(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_bad_magic(small):
    _patch(small + ".idx", 0, b"NOTANIDX\x00")
    with pytest.raises(DataError, match="bad magic"):
        IndexedDataset(small)


def test_unknown_dtype_code(small):
    _patch(small + ".idx", 17, struct.pack("<B", 99))
    with pytest.raises(DataError, match="unknown dtype code 99"):
        IndexedDataset(small)


def test_bin_size_mismatch(small):
    with open(small + ".bin", "ab") as f:
        f.write(b"\x00\x00\x00\x00")
    with pytest.raises(DataError, match="24 bytes, but .* describes 5 tokens of int32"):
        IndexedDataset(small)


def test_truncated_index(small):
    with open(small + ".idx", "r+b") as f:
        f.truncate(os.path.getsize(small + ".idx") - 8)
    with pytest.raises(DataError, match="truncated or corrupt"):
        IndexedDataset(small)


def test_check_vocab_without_and_with_sidecar(small):
    assert check_vocab(small, 6) == 5  # ids 1..5: brute-force max is 5
    with pytest.raises(DataError, match="token id 5 does not fit the model's vocab_size 5"):
        check_vocab(small, 5)
    meta = {"max_token_id": 40, "num_documents": 2, "num_tokens": 5, "tokenizer_model": "t.model"}
    write_meta(small, meta)
    # With the sidecar, its max id is trusted (no pass over the tokens).
    with pytest.raises(DataError, match="token id 40 .*tokenizer t.model"):
        check_vocab(IndexedDataset(small), 40)
    assert check_vocab(small, 41) == 40
    write_meta(small, dict(meta, num_tokens=6))
    with pytest.raises(DataError, match="stale"):
        check_vocab(small, 100)


def test_doc_labels_roundtrip_and_stale(small, tmp_path):
    assert load_doc_labels(small) is None
    write_doc_labels(small, [7, -1])
    labels = load_doc_labels(small)
    assert labels.dtype == np.int64
    np.testing.assert_array_equal(labels, [7, -1])
    write_doc_labels(small, [7, -1, 3])
    with pytest.raises(DataError, match="3 labels but .* has 2 documents"):
        load_doc_labels(small)
    # Rewriting the dataset drops the sidecars that described the old tokens.
    write_meta(small, {"max_token_id": 5})
    _build_ours(small, [[1]], np.int32)
    assert sorted(os.listdir(tmp_path)) == ["s.bin", "s.idx"]
