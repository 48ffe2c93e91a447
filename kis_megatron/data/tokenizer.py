"""SentencePiece tokenizer: training with lossless defaults, and a small encode/decode wrapper.

Training defaults follow the Llama recipe: identity normalization and whitespace kept as
it is, so ``decode(encode(text)) == text`` for any text; byte fallback, so unseen
characters become byte pieces instead of <unk>; digits split into single pieces, so the
numbers inside facts (years, counts) tokenize the same way wherever they appear.

Special ids of a trained model: unk=0, bos=1, eos=2, pad=3 (pad can be left out). The eos
piece ``</s>`` is the end-of-document (EOD) token that preprocessing appends to every
document, as in Megatron's GPT data.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from typing import Iterable, Sequence

import sentencepiece as spm

from kis_megatron.data.errors import DataError
from kis_megatron.utils import atomic_write_bytes, read_lines, refuse_to_replace

__all__ = ["Tokenizer", "train_tokenizer", "UNK_ID", "BOS_ID", "EOS_ID", "PAD_ID"]

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
_MODEL_TYPES = ("bpe", "unigram")
_NUM_BYTE_PIECES = 256


def _check_int(name: str, value, least: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise DataError(f"{name} must be an integer >= {least}, got {value!r}")


def _has_text(path: str) -> bool:
    """True when the file holds at least one non-whitespace character; every line is read,
    so that text preprocessing would refuse (invalid UTF-8) is refused here too, at its line."""
    found = False
    for _, line, _ in read_lines(path, DataError, "; the tokenizer's corpus must be UTF-8 text",
                                 what="the tokenizer's corpus"):
        found = found or bool(line.strip())
    return found


def _clean_sp_error(err: Exception) -> str:
    # SentencePiece messages start with "INTERNAL: src/x.cc(123) [condition] "; keep the rest.
    msg = str(err).strip()
    cleaned = re.sub(r"^[A-Z_]+: \S+\(\d+\) \[.*?\]\s*", "", msg)
    return cleaned or msg


def train_tokenizer(
    input_files: str | os.PathLike | Sequence[str | os.PathLike],
    model_prefix: str | os.PathLike,
    vocab_size: int,
    model_type: str = "bpe",
    *,
    byte_fallback: bool = True,
    split_digits: bool = True,
    pad: bool = True,
    character_coverage: float = 0.9995,
    user_defined_symbols: Iterable[str] = (),
    input_sentence_size: int = 2_000_000,
    max_sentence_length: int = 16384,
    seed: int = 0,
    num_threads: int | None = None,
    verbose: bool = False,
    force: bool = False,
) -> str:
    """Train a SentencePiece model on text files (one sentence/line each); return the .model path.

    Writes ``model_prefix.model`` and ``model_prefix.vocab``, each to a temp name renamed
    into place only after training succeeded, so a failed run never leaves a half-written
    model. Raises DataError with a
    plain message for a missing input, an empty corpus or a vocabulary that cannot fit.

    input_sentence_size: at most this many lines are sampled (with ``seed``) from large
    corpora; 0 uses every line.
    """
    if isinstance(input_files, (str, os.PathLike)):
        input_files = [input_files]
    files = [os.fspath(p) for p in input_files]
    if not files:
        raise DataError("no tokenizer training input given")
    if model_type not in _MODEL_TYPES:
        raise DataError(f"model_type must be one of {list(_MODEL_TYPES)}, got {model_type!r}")
    for path in files:
        if not os.path.isfile(path):
            raise DataError(f"tokenizer training input not found: {path}")
    if not [p for p in files if _has_text(p)]:  # each file read whole
        raise DataError(f"empty corpus: {', '.join(files)} contain no text to train a tokenizer on")
    specials = 4 if pad else 3
    minimum = specials + 1 + (_NUM_BYTE_PIECES if byte_fallback else 0)
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < minimum:
        raise DataError(
            f"vocab_size must be an integer >= {minimum}"
            + (" (byte fallback reserves 256 byte pieces)" if byte_fallback else "")
            + f", got {vocab_size!r}"
        )

    _check_int("input_sentence_size", input_sentence_size, 0)
    _check_int("max_sentence_length", max_sentence_length, 1)
    _check_int("seed", seed, 0)
    if num_threads is not None:
        _check_int("num_threads", num_threads, 1)
    if not 0.98 <= character_coverage <= 1.0:  # SentencePiece's own bounds
        raise DataError(f"character_coverage must lie in [0.98, 1], got {character_coverage!r}")
    model_prefix = os.fspath(model_prefix)
    refuse_to_replace([model_prefix + ".model", model_prefix + ".vocab"], force)
    os.makedirs(os.path.dirname(os.path.abspath(model_prefix)), exist_ok=True)
    if num_threads is None:
        num_threads = max(1, min(os.cpu_count() or 1, 8))
    # model_writer makes SentencePiece return the model instead of writing files, so we
    # write both atomically, and no temp path ends up recorded inside the model.
    proto = io.BytesIO()
    options = dict(
        input=files,
        model_writer=proto,
        vocab_size=vocab_size,
        model_type=model_type,
        byte_fallback=byte_fallback,
        split_digits=split_digits,
        character_coverage=character_coverage,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        pad_id=PAD_ID if pad else -1,
        input_sentence_size=input_sentence_size,
        shuffle_input_sentence=True,
        max_sentence_length=max_sentence_length,
        num_threads=num_threads,
        minloglevel=0 if verbose else 2,  # 2: errors only; they are raised below anyway
    )
    symbols = list(user_defined_symbols)
    if symbols:
        options["user_defined_symbols"] = symbols
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(**options)
    except RuntimeError as e:
        raise DataError(
            f"sentencepiece training on {', '.join(files)} failed: {_clean_sp_error(e)}"
        ) from None
    model = proto.getvalue()
    sp = spm.SentencePieceProcessor(model_proto=model)
    # Same layout as SentencePiece's own .vocab: "piece<TAB>score" per id, %g scores.
    vocab = "".join(
        f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n" for i in range(sp.get_piece_size())
    )
    atomic_write_bytes(model_prefix + ".vocab", vocab.encode("utf-8"))
    atomic_write_bytes(model_prefix + ".model", model)
    return model_prefix + ".model"


class Tokenizer:
    """A SentencePiece model with the ids the data path needs (EOD, BOS, pad, vocab size).

    ``sha256`` identifies the model file, so shards and runs can record exactly which
    tokenizer made their tokens. Picklable (carries the model bytes), for worker processes.
    """

    def __init__(self, model_path: str | os.PathLike):
        self.model_path = os.fspath(model_path)
        if not os.path.isfile(self.model_path):
            raise DataError(
                f"tokenizer model not found: {self.model_path} "
                "(train one with tools/train_tokenizer.py)"
            )
        with open(self.model_path, "rb") as f:
            self._load(f.read())

    def _load(self, proto: bytes) -> None:
        try:
            sp = spm.SentencePieceProcessor(model_proto=proto)
        except (RuntimeError, OSError):
            raise DataError(f"{self.model_path}: not a sentencepiece model file") from None
        if sp.eos_id() < 0:
            raise DataError(
                f"{self.model_path}: the model has no </s> (eos) piece, which is the "
                "end-of-document token; retrain it with tools/train_tokenizer.py"
            )
        self._sp = sp
        self._proto = proto
        self.sha256 = hashlib.sha256(proto).hexdigest()

    def __getstate__(self) -> dict:
        return {"model_path": self.model_path, "proto": self._proto}

    def __setstate__(self, state: dict) -> None:
        self.model_path = state["model_path"]
        self._load(state["proto"])

    def __repr__(self) -> str:
        return f"Tokenizer({self.model_path!r}, vocab_size={self.vocab_size})"

    @property
    def vocab_size(self) -> int:
        """Number of pieces; every id is in [0, vocab_size)."""
        return self._sp.get_piece_size()

    @property
    def eod_id(self) -> int:
        """End-of-document id (the eos piece), appended after every document."""
        return self._sp.eos_id()

    @property
    def bos_id(self) -> int:
        """Beginning-of-sequence id, or -1 when the model has none."""
        return self._sp.bos_id()

    @property
    def pad_id(self) -> int:
        """Padding id, or -1 when the model has none."""
        return self._sp.pad_id()

    @property
    def unk_id(self) -> int:
        """Unknown-piece id (unused for text when the model has byte fallback)."""
        return self._sp.unk_id()

    def encode(self, text: str) -> list[int]:
        """Token ids of one text (no BOS/EOD added)."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        return self._sp.encode(text, out_type=int)

    def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[list[int]]:
        """Token ids of several texts, in order; num_threads > 1 uses SentencePiece threads."""
        texts = list(texts)
        for t in texts:
            if not isinstance(t, str):
                raise TypeError(f"encode_batch expects str items, got {type(t).__name__}")
        if not texts:
            return []
        return self._sp.encode(texts, out_type=int, num_threads=num_threads)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of a sequence of ids (numpy arrays and tensors of ints are fine)."""
        ids = [int(i) for i in ids]
        n = self.vocab_size
        for i in ids:
            if not 0 <= i < n:
                raise DataError(f"token id {i} is outside this tokenizer's vocabulary [0, {n})")
        return self._sp.decode(ids)

    def id_to_piece(self, token_id: int) -> str:
        """The piece string of an id (for inspection and debugging)."""
        return self._sp.id_to_piece(int(token_id))
