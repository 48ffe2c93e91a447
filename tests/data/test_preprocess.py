"""Preprocessing corpora into shards, and the two CLIs, end to end on a tiny tokenizer."""

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest

from kis_megatron.data.errors import DataError
from kis_megatron.data.indexed_dataset import (
    IndexedDataset,
    check_vocab,
    load_doc_labels,
    read_meta,
)
from kis_megatron.data.preprocess import preprocess
from kis_megatron.data.tokenizer import Tokenizer
from kis_megatron.utils import OutputExists

_TOOLS = Path(__file__).resolve().parents[2] / "tools"


def _tool(name):
    spec = importlib.util.spec_from_file_location(f"_kis_tool_{name}", _TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write_jsonl(path, records, blank_every=0):
    with open(path, "w", encoding="utf-8") as f:
        for i, r in enumerate(records):
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
            if blank_every and i % blank_every == 0:
                f.write("\n")
    return path


def _records(tok_sentences):
    recs = [{"text": s, "fact_id": i} for i, s in enumerate(tok_sentences[:40])]
    recs[3] = {"text": "two lines\nin one document, Zürich 🎉", "fact_id": 3}
    recs[5] = {"text": "   ", "fact_id": 5}  # whitespace only: skipped with its label
    recs[7] = {"text": "no label here"}
    recs[8] = {"text": "null label", "fact_id": None}
    return recs


def _expected_docs(tok, texts):
    return [tok.encode(t) + [tok.eod_id] for t in texts if t.strip()]


def _assert_docs(prefix, expected):
    ds = IndexedDataset(prefix)
    assert len(ds) == ds.num_documents == len(expected)
    for i, ref in enumerate(expected):
        np.testing.assert_array_equal(ds[i], ref)
    return ds


def test_jsonl_end_to_end(tmp_path, tiny_tokenizer, tok_sentences):
    recs = _records(tok_sentences)
    src = _write_jsonl(tmp_path / "in.jsonl", recs, blank_every=9)
    prefix = str(tmp_path / "out" / "shard")
    meta = preprocess([src], prefix, tiny_tokenizer, chunk_size=7, progress=False)
    tok = Tokenizer(tiny_tokenizer)
    expected = _expected_docs(tok, [r["text"] for r in recs])
    ds = _assert_docs(prefix, expected)
    assert ds.dtype == np.uint16
    kept = [r["text"] for r in recs if r["text"].strip()]
    for i, text in enumerate(kept):  # the tokens decode back to the exact document
        assert ds[i][-1] == tok.eod_id and tok.decode(ds[i][:-1]) == text
    assert read_meta(prefix) == meta
    assert meta["num_documents"] == len(expected) == len(recs) - 1
    assert meta["num_tokens"] == sum(len(d) for d in expected)
    assert meta["max_token_id"] == max(max(d) for d in expected)
    assert meta["tokenizer_sha256"] == tok.sha256 and meta["eod_id"] == tok.eod_id == 2
    assert meta["vocab_size"] == 400 and meta["skipped_empty_documents"] == 1
    assert load_doc_labels(prefix) is None  # no --doc-key, no labels
    assert check_vocab(prefix, tok.vocab_size) == meta["max_token_id"]
    with pytest.raises(DataError, match="does not fit the model's vocab_size"):
        check_vocab(prefix, meta["max_token_id"])
    assert sorted(os.listdir(tmp_path / "out")) == ["shard.bin", "shard.idx", "shard.meta.json"]


def _read(path):
    with open(path, "rb") as f:
        return f.read()


def test_worker_count_gives_identical_bytes(tmp_path, tiny_tokenizer, tok_sentences):
    recs = _records(tok_sentences) + [{"text": s} for s in tok_sentences[40:]]
    a = _write_jsonl(tmp_path / "a.jsonl", recs[:150])
    b = _write_jsonl(tmp_path / "b.jsonl", recs[150:])
    one = str(tmp_path / "one")
    preprocess([a, b], one, tiny_tokenizer, doc_key="fact_id", workers=1, chunk_size=64,
               progress=False)
    rc = _tool("preprocess_data").main([
        "--input", str(a), str(b), "--output-prefix", str(tmp_path / "two"),
        "--tokenizer-model", tiny_tokenizer, "--doc-key", "fact_id", "--workers", "2",
        "--chunk-size", "5", "--no-progress"])
    assert rc == 0
    for ext in (".bin", ".idx", ".meta.json", ".doclabels.npy"):
        assert _read(one + ext) == _read(str(tmp_path / "two") + ext), ext
    tok = Tokenizer(tiny_tokenizer)
    _assert_docs(one, _expected_docs(tok, [r["text"] for r in recs]))


def test_doc_labels_follow_kept_documents(tmp_path, tiny_tokenizer, tok_sentences):
    recs = _records(tok_sentences)
    src = _write_jsonl(tmp_path / "in.jsonl", recs)
    prefix = str(tmp_path / "lab")
    preprocess(src, prefix, tiny_tokenizer, doc_key="fact_id", progress=False)
    labels = load_doc_labels(prefix)
    expected = [r.get("fact_id") for r in recs if r["text"].strip()]
    expected = [-1 if v is None else v for v in expected]
    assert labels.dtype == np.int64 and labels.tolist() == expected
    assert 5 not in labels and labels[6] == -1 and labels[7] == -1


def test_text_formats(tmp_path, tiny_tokenizer):
    src = tmp_path / "in.txt"
    src.write_text("first para line one\nline two\n\n\n  \nsecond para\r\nends here\n\nlast",
                   encoding="utf-8")
    tok = Tokenizer(tiny_tokenizer)
    preprocess(src, tmp_path / "lines", tiny_tokenizer, fmt="text", progress=False)
    _assert_docs(str(tmp_path / "lines"), _expected_docs(tok, [
        "first para line one", "line two", "second para", "ends here", "last"]))
    preprocess(src, tmp_path / "paras", tiny_tokenizer, fmt="text", text_doc_sep="blank",
               progress=False)
    _assert_docs(str(tmp_path / "paras"), _expected_docs(tok, [
        "first para line one\nline two", "second para\nends here", "last"]))


def test_errors_name_the_problem(tmp_path, tiny_tokenizer):
    good = _write_jsonl(tmp_path / "good.jsonl", [{"text": "Alice lives in Paris."}])
    prefix = str(tmp_path / "keep")
    preprocess(good, prefix, tiny_tokenizer, progress=False)
    before = {ext: _read(prefix + ext) for ext in (".bin", ".idx", ".meta.json")}

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n\n{"text": "broken"\n', encoding="utf-8")
    with pytest.raises(DataError, match="bad.jsonl:3: invalid JSON"):
        preprocess(bad, prefix, tiny_tokenizer, progress=False, force=True)
    nokey = _write_jsonl(tmp_path / "nokey.jsonl", [{"text": "a"}, {"body": "b"}])
    with pytest.raises(DataError, match="nokey.jsonl:2: no key 'text' \\(keys: body\\)"):
        preprocess(nokey, prefix, tiny_tokenizer, workers=2, chunk_size=1, progress=False, force=True)
    badlab = _write_jsonl(tmp_path / "badlab.jsonl", [{"text": "a", "fact_id": "x"}])
    with pytest.raises(DataError, match="badlab.jsonl:1: document label 'fact_id' must be an integer"):
        preprocess(badlab, prefix, tiny_tokenizer, doc_key="fact_id", progress=False, force=True)
    empty = _write_jsonl(tmp_path / "empty.jsonl", [{"text": ""}, {"text": " \n "}])
    with pytest.raises(DataError, match="empty corpus"):
        preprocess(empty, prefix, tiny_tokenizer, progress=False, force=True)
    with pytest.raises(DataError, match="--doc-key.*--format jsonl"):
        preprocess(good, prefix, tiny_tokenizer, fmt="text", doc_key="fact_id", force=True)
    with pytest.raises(DataError, match="tokenizer model not found"):
        preprocess(good, prefix, tmp_path / "none.model", force=True)
    with pytest.raises(OutputExists, match="keep.bin.*already exist.*--force"):
        preprocess(good, prefix, tiny_tokenizer, progress=False)  # not asked to replace
    # Every failure (with force too: a failed run replaces nothing) left the earlier dataset
    # exactly as it was, and no temp files.
    assert {ext: _read(prefix + ext) for ext in before} == before
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


def test_cli_errors_exit_2(tmp_path, tiny_tokenizer, capsys):
    tool = _tool("preprocess_data")
    rc = tool.main(["--input", str(tmp_path / "missing.jsonl"), "--output-prefix",
                    str(tmp_path / "x"), "--tokenizer-model", tiny_tokenizer])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: input file not found:") and "missing.jsonl" in err
    assert "Traceback" not in err
    assert not os.path.exists(tmp_path / "x.bin")


def test_train_tokenizer_cli(tmp_path, tok_sentences, capsys):
    src = _write_jsonl(tmp_path / "c.jsonl", [{"body": s} for s in tok_sentences])
    tool = _tool("train_tokenizer")
    rc = tool.main(["--input", str(src), "--format", "jsonl", "--json-key", "body",
                    "--model-prefix", str(tmp_path / "tok" / "t"), "--vocab-size", "380",
                    "--threads", "1"])
    assert rc == 0
    tok = Tokenizer(tmp_path / "tok" / "t.model")
    assert tok.vocab_size == 380 and tok.decode(tok.encode(tok_sentences[0])) == tok_sentences[0]
    assert sorted(os.listdir(tmp_path / "tok")) == ["t.model", "t.vocab"]
    capsys.readouterr()
    rc = tool.main(["--input", str(src), "--format", "jsonl", "--model-prefix",
                    str(tmp_path / "tok2" / "t"), "--vocab-size", "380"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and "no key 'text'" in err
