"""Tokenizer training and the encode/decode wrapper, on a tiny generated corpus."""

import hashlib
import os
import pickle

import pytest
import sentencepiece as spm

from kis_megatron.data.errors import DataError
from kis_megatron.data.tokenizer import Tokenizer, train_tokenizer

ODD_TEXTS = [
    "Alice lives in Paris.",
    "  two leading spaces, and trailing  ",
    "line one\nline two\n\nafter a blank line",
    "Zürich, Kraków, 東京 and 🎉 are not in the training data",
    "tabs\tand  double  spaces 0123456789",
    "",
]


def test_roundtrip_is_lossless(tiny_tokenizer, tok_sentences):
    tok = Tokenizer(tiny_tokenizer)
    for text in tok_sentences[:50] + ODD_TEXTS:
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.unk_id not in ids  # byte fallback: nothing is unknown
        assert tok.decode(ids) == text


def test_special_ids_and_vocab(tiny_tokenizer):
    tok = Tokenizer(tiny_tokenizer)
    assert tok.vocab_size == 400
    vocab_file = tiny_tokenizer[: -len(".model")] + ".vocab"
    with open(vocab_file, encoding="utf-8") as f:
        pieces = [line.split("\t")[0] for line in f]
    assert len(pieces) == tok.vocab_size
    assert (tok.unk_id, tok.bos_id, tok.eod_id, tok.pad_id) == (0, 1, 2, 3)
    assert [pieces[i] for i in (0, 1, 2, 3)] == ["<unk>", "<s>", "</s>", "<pad>"]
    assert tok.id_to_piece(tok.eod_id) == "</s>"
    # Plain text never produces the EOD id: only preprocessing appends it.
    assert tok.eod_id not in tok.encode("Alice lives in Paris. </s>")


def test_digits_are_split(tiny_tokenizer):
    tok = Tokenizer(tiny_tokenizer)
    ids = tok.encode("born in 1987 with 2024 friends")
    digit_pieces = [tok.id_to_piece(i) for i in ids if any(c.isdigit() for c in tok.id_to_piece(i))]
    assert "".join(digit_pieces).replace("\u2581", "") == "19872024"
    assert all(sum(c.isdigit() for c in p) == 1 for p in digit_pieces)


def test_batch_sha_and_pickle(tiny_tokenizer, tok_sentences):
    tok = Tokenizer(tiny_tokenizer)
    texts = tok_sentences[:20] + ODD_TEXTS
    expected = [tok.encode(t) for t in texts]
    assert tok.encode_batch(texts) == expected
    assert tok.encode_batch(texts, num_threads=2) == expected
    assert tok.encode_batch([]) == []
    with open(tiny_tokenizer, "rb") as f:
        assert tok.sha256 == hashlib.sha256(f.read()).hexdigest()
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.sha256 == tok.sha256 and clone.encode_batch(texts) == expected
    with pytest.raises(DataError, match="token id 400 is outside"):
        tok.decode([5, 400])


def test_training_is_deterministic_and_atomic(tmp_path, tok_sentences):
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(tok_sentences) + "\n", encoding="utf-8")
    first = train_tokenizer(corpus, tmp_path / "first", vocab_size=400, num_threads=1)
    second = train_tokenizer(corpus, tmp_path / "sub" / "second", vocab_size=400, num_threads=1)
    # The output path is not recorded in the model, so the same input gives the same file.
    assert Tokenizer(first).sha256 == Tokenizer(second).sha256
    assert sorted(os.listdir(tmp_path)) == ["c.txt", "first.model", "first.vocab", "sub"]
    assert sorted(os.listdir(tmp_path / "sub")) == ["second.model", "second.vocab"]


def test_unigram_without_pad(tmp_path, tok_sentences):
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(tok_sentences) + "\n", encoding="utf-8")
    path = train_tokenizer([corpus], tmp_path / "uni", vocab_size=315, model_type="unigram",
                           pad=False, num_threads=1)
    tok = Tokenizer(path)
    assert tok.pad_id == -1 and tok.eod_id == 2 and tok.vocab_size == 315
    for text in tok_sentences[:20] + ODD_TEXTS:
        assert tok.decode(tok.encode(text)) == text


def test_training_errors(tmp_path, tok_sentences):
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(tok_sentences[:100]) + "\n", encoding="utf-8")
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n\t\n", encoding="utf-8")
    out = tmp_path / "out" / "m"
    with pytest.raises(DataError, match="input not found: .*missing.txt"):
        train_tokenizer([corpus, tmp_path / "missing.txt"], out, vocab_size=400)
    with pytest.raises(DataError, match="empty corpus"):
        train_tokenizer([blank], out, vocab_size=400)
    with pytest.raises(DataError, match="vocab_size must be an integer >= 261 .*byte"):
        train_tokenizer([corpus], out, vocab_size=200)
    with pytest.raises(DataError, match="model_type"):
        train_tokenizer([corpus], out, vocab_size=400, model_type="wordpiece")
    with pytest.raises(DataError, match="Vocabulary size too high"):
        train_tokenizer([corpus], out, vocab_size=5000, num_threads=1)
    # Nothing half-written: no model, no temp files.
    assert os.listdir(tmp_path / "out") == []


def test_model_errors(tmp_path, tok_sentences):
    with pytest.raises(DataError, match="tokenizer model not found: .*nope.model"):
        Tokenizer(tmp_path / "nope.model")
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"this is not a protobuf")
    with pytest.raises(DataError, match="not a sentencepiece model"):
        Tokenizer(junk)
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(tok_sentences[:100]) + "\n", encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "noeos"),
                                   vocab_size=60, eos_id=-1, minloglevel=2)
    with pytest.raises(DataError, match="no </s> \\(eos\\) piece"):
        Tokenizer(tmp_path / "noeos.model")
