"""Tokenize corpora into Megatron token shards: prefix.bin/.idx + prefix.meta.json.

Input formats (chosen with ``fmt``; the CLI is tools/preprocess_data.py):

- ``jsonl``: one JSON object per line, the document text under ``json_key`` (default
  ``text``). Blank lines are skipped. With ``doc_key`` (e.g. ``fact_id``) an int64 label per
  document is also stored in prefix.doclabels.npy (-1 where the key is absent or null), so
  the trainer can count how often each fact was seen.
- ``text``: UTF-8 plain text. ``text_doc_sep="line"`` (default): every non-blank line is a
  document. ``text_doc_sep="blank"``: documents are paragraphs, runs of non-blank lines
  separated by blank lines, their lines joined with "\\n".

Documents whose text is empty or whitespace only are skipped (and counted in the
metadata). Each kept document becomes one sequence followed by the tokenizer's EOD id, as
in Megatron's GPT data. Several inputs go, in the order given, into one dataset; make one
call per shard for several shards.

Tokenization runs in ``workers`` processes over chunks of documents with an ordered
``Pool.imap``, so the output files are byte-identical for any worker count and chunk size.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import tempfile
from array import array
from typing import Iterator, Sequence

import numpy as np
from tqdm import tqdm

from kis_megatron.data.errors import DataError
from kis_megatron.data.indexed_dataset import (
    IndexedDatasetWriter,
    best_dtype,
    write_doc_labels,
    write_meta,
)
from kis_megatron.data.tokenizer import Tokenizer, train_tokenizer
from kis_megatron.utils import read_jsonl, read_lines, refuse_to_replace

__all__ = ["iter_documents", "preprocess", "train_tokenizer_from_corpus"]

FORMATS = ("jsonl", "text")
TEXT_DOC_SEPS = ("line", "blank")
_INT64 = np.iinfo(np.int64)


def _check_options(fmt: str, text_doc_sep: str, doc_key: str | None) -> None:
    if fmt not in FORMATS:
        raise DataError(f"input format must be one of {list(FORMATS)}, got {fmt!r}")
    if text_doc_sep not in TEXT_DOC_SEPS:
        raise DataError(f"text document separator must be one of {list(TEXT_DOC_SEPS)}, got {text_doc_sep!r}")
    if doc_key is not None and fmt != "jsonl":
        raise DataError("document labels (--doc-key) need JSONL input (--format jsonl)")


def _check_inputs(inputs) -> list[str]:
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    paths = [os.fspath(p) for p in inputs]
    if not paths:
        raise DataError("no input files given")
    for p in paths:
        if not os.path.isfile(p):
            raise DataError(f"input file not found: {p}")
    return paths


_TEXT_HINT = "; the corpus must be UTF-8 text"
_JSONL_HINT = "; a JSONL corpus holds one JSON object per line, in UTF-8"


def _label(path: str, lineno: int, obj: dict, doc_key: str) -> int:
    value = obj.get(doc_key)
    if value is None:
        return -1
    if isinstance(value, bool) or not isinstance(value, int):
        raise DataError(
            f"{path}:{lineno}: document label {doc_key!r} must be an integer, got {value!r}"
        )
    if not 0 <= value <= _INT64.max:  # -1 is how the shard marks "no label"
        raise DataError(f"{path}:{lineno}: document label {doc_key!r} must be an integer >= 0 "
                        f"(a fact id), got {value}")
    return value


def iter_documents(
    path: str | os.PathLike,
    fmt: str = "jsonl",
    json_key: str = "text",
    text_doc_sep: str = "line",
    doc_key: str | None = None,
) -> Iterator[tuple[str, int]]:
    """Yield (text, label) for each document record of one file, in file order.

    label is the int under ``doc_key`` (JSONL only), or -1. Records with empty text are
    yielded too; ``preprocess`` skips and counts them. Malformed input raises DataError
    naming the file and line.
    """
    path = os.fspath(path)
    _check_options(fmt, text_doc_sep, doc_key)
    if fmt == "jsonl":
        for lineno, obj in read_jsonl(path, DataError, _JSONL_HINT, what="the corpus"):
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            if json_key not in obj:
                keys = ", ".join(sorted(obj)[:10]) or "none"
                raise DataError(
                    f"{path}:{lineno}: no key {json_key!r} (keys: {keys}); choose the text "
                    "field with --json-key"
                )
            text = obj[json_key]
            if not isinstance(text, str):
                raise DataError(
                    f"{path}:{lineno}: {json_key!r} must be a string, got {type(text).__name__}"
                )
            yield text, (_label(path, lineno, obj, doc_key) if doc_key is not None else -1)
    elif text_doc_sep == "line":
        for _, line, _ in read_lines(path, DataError, _TEXT_HINT, what="the corpus"):
            if line.strip():
                yield line, -1
    else:
        para: list[str] = []
        for _, line, _ in read_lines(path, DataError, _TEXT_HINT, what="the corpus"):
            if line.strip():
                para.append(line)
            elif para:
                yield "\n".join(para), -1
                para = []
        if para:
            yield "\n".join(para), -1


# Set once per worker process by _init_worker, so the model is not re-sent per chunk.
_WORKER_TOKENIZER: Tokenizer | None = None


def _init_worker(tokenizer: Tokenizer) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = tokenizer


def _encode_with(tokenizer: Tokenizer, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Tokens of a chunk, EOD after each document: (flat int64 tokens, per-document lengths)."""
    ids = tokenizer.encode_batch(texts, num_threads=1)
    lengths = np.fromiter((len(x) + 1 for x in ids), dtype=np.int64, count=len(ids))
    flat = np.empty(int(lengths.sum()), dtype=np.int64)
    pos, eod = 0, tokenizer.eod_id
    for x in ids:
        flat[pos:pos + len(x)] = x
        pos += len(x)
        flat[pos] = eod
        pos += 1
    return flat, lengths


def _encode_chunk(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    return _encode_with(_WORKER_TOKENIZER, texts)


def preprocess(
    inputs: str | os.PathLike | Sequence[str | os.PathLike],
    output_prefix: str | os.PathLike,
    tokenizer_model: str | os.PathLike,
    *,
    fmt: str = "jsonl",
    json_key: str = "text",
    text_doc_sep: str = "line",
    doc_key: str | None = None,
    workers: int = 1,
    chunk_size: int = 256,
    progress: bool | None = None,
    force: bool = False,
) -> dict:
    """Tokenize ``inputs`` into one dataset at ``output_prefix``; return its metadata.

    Writes prefix.bin/.idx (Megatron format, uint16 tokens for vocabularies under 65500),
    prefix.meta.json and, with ``doc_key``, prefix.doclabels.npy. Nothing is replaced
    until the whole corpus is tokenized. ``progress`` None shows a bar only on a terminal.
    """
    paths = _check_inputs(inputs)
    _check_options(fmt, text_doc_sep, doc_key)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise DataError(f"workers must be a positive integer, got {workers!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise DataError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    tokenizer = Tokenizer(tokenizer_model)
    output_prefix = os.fspath(output_prefix)
    refuse_to_replace([output_prefix + s for s in (".bin", ".idx", ".meta.json", ".doclabels.npy")], force)
    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    if progress is None:
        progress = sys.stderr.isatty()

    labels = array("q")  # filled by the reader as chunks are handed out, in order
    skipped = [0]

    def chunks() -> Iterator[list[str]]:
        texts: list[str] = []
        for path in paths:
            for text, label in iter_documents(path, fmt, json_key, text_doc_sep, doc_key):
                if not text.strip():
                    skipped[0] += 1
                    continue
                texts.append(text)
                labels.append(label)
                if len(texts) == chunk_size:
                    yield texts
                    texts = []
        if texts:
            yield texts

    dtype = best_dtype(tokenizer.vocab_size)
    bar = tqdm(desc=f"tokenizing -> {output_prefix}", unit="doc", disable=not progress)
    pool = None
    try:
        with IndexedDatasetWriter(output_prefix, dtype) as writer:
            if workers == 1:
                results = (_encode_with(tokenizer, t) for t in chunks())
            else:
                # spawn: no fork of a parent that may hold threads (torch, tqdm).
                ctx = multiprocessing.get_context("spawn")
                pool = ctx.Pool(workers, initializer=_init_worker, initargs=(tokenizer,))
                results = pool.imap(_encode_chunk, chunks())  # ordered: deterministic output
            for flat, lengths in results:
                writer.add_documents(flat, lengths)
                bar.update(len(lengths))
            if writer.num_documents == 0:
                what = f"JSON key {json_key!r}" if fmt == "jsonl" else f"{fmt} documents"
                raise DataError(
                    f"empty corpus: no non-empty document in {', '.join(paths)} ({what})"
                )
            meta = {
                "format": "megatron-indexed-dataset",
                "dtype": np.dtype(dtype).name,
                "tokenizer_model": os.path.abspath(os.fspath(tokenizer_model)),
                "tokenizer_sha256": tokenizer.sha256,
                "vocab_size": tokenizer.vocab_size,
                "eod_id": tokenizer.eod_id,
                "max_token_id": writer.max_token_id,
                "num_documents": writer.num_documents,
                "num_tokens": writer.num_tokens,
                "skipped_empty_documents": skipped[0],
                "inputs": [os.path.abspath(p) for p in paths],
                "input_format": fmt,
                "json_key": json_key if fmt == "jsonl" else None,
                "text_doc_sep": text_doc_sep if fmt == "text" else None,
                "doc_key": doc_key,
            }
            writer.finalize()
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
    # Sidecars after the pair (finalize removed any stale ones): a crash in between
    # leaves a dataset without sidecars, never sidecars describing other tokens.
    if doc_key is not None:
        write_doc_labels(output_prefix, np.frombuffer(labels, dtype=np.int64))
    write_meta(output_prefix, meta)
    return meta


def train_tokenizer_from_corpus(
    inputs: str | os.PathLike | Sequence[str | os.PathLike],
    model_prefix: str | os.PathLike,
    vocab_size: int,
    *,
    fmt: str = "text",
    json_key: str = "text",
    **train_kwargs,
) -> str:
    """Train a tokenizer on plain-text files or on the texts of JSONL files.

    Text files go to SentencePiece as they are (one sentence per line). For JSONL the
    ``json_key`` texts are first written, one document after another, to a temporary
    text file. Returns the .model path; ``train_kwargs`` go to ``train_tokenizer``.
    """
    paths = _check_inputs(inputs)
    _check_options(fmt, "line", None)
    if fmt == "text":
        return train_tokenizer(paths, model_prefix, vocab_size, **train_kwargs)
    with tempfile.TemporaryDirectory(prefix="kis-tok-") as tmp:
        corpus = os.path.join(tmp, "corpus.txt")
        count = 0
        with open(corpus, "w", encoding="utf-8") as f:
            for path in paths:
                for text, _ in iter_documents(path, "jsonl", json_key):
                    if text.strip():
                        f.write(text.rstrip("\n") + "\n")
                        count += 1
        if count == 0:
            raise DataError(
                f"empty corpus: no non-empty {json_key!r} text in {', '.join(paths)}"
            )
        try:
            return train_tokenizer([corpus], model_prefix, vocab_size, **train_kwargs)
        except DataError as e:  # name the user's files, not our temporary one
            raise DataError(str(e).replace(corpus, ", ".join(paths))) from None
