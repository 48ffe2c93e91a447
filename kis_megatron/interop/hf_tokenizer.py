"""Our SentencePiece tokenizer as Hugging Face tokenizer files that load offline.

``write_hf_tokenizer(model_path, out_dir)`` writes, next to a copy of ``tokenizer.model``:

- ``tokenizer.json``: the same segmentation rebuilt with the ``tokenizers`` library. The
  SentencePiece normalizer (identity rule, dummy "▁" prefix, spaces as "▁") becomes a
  normalizer ``Prepend("▁") + Replace(" ", "▁")``; a BPE model becomes an HF BPE whose merges
  are ordered by the merged piece's id (SentencePiece merges by piece score, which falls with
  the id); a unigram model becomes an HF Unigram with the same scores; byte fallback stays on.
  Deliberately no BOS/EOS post-processor: our training never prepends BOS and the data path
  appends EOD itself, so ``tokenizer(text).input_ids == Tokenizer.encode(text)``.
- ``tokenizer_config.json`` and ``special_tokens_map.json``: the generic fast-tokenizer class
  (``PreTrainedTokenizerFast``, which loads ``tokenizer.json`` as is in transformers 4 and 5),
  ``add_bos_token``/``add_eos_token`` false, and the unk/bos/eos/pad pieces of the model.

One known difference, unigram models only: HF's Unigram lattice can match the literal text of a
control piece (say ``</s>`` typed inside a document) where SentencePiece would spell it out
in byte pieces; BPE models (the project's default) match SentencePiece on any text.

A normalization the rebuilt pipeline cannot reproduce exactly (any rule other than identity,
or ``remove_extra_whitespaces``) is refused, never approximated.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from kis_megatron.config import ConfigError

# SentencePiece piece types (sentencepiece_model.proto).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
_BPE, _UNIGRAM = 2, 1
_SPACE = "\u2581"  # "▁", SentencePiece's visible space


class TokenizerExportError(ConfigError):
    """A tokenizer that cannot be written as Hugging Face files without changing its ids."""


def _load_proto(model_path: Path):
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    try:
        proto.ParseFromString(model_path.read_bytes())
    except Exception:  # protobuf raises its own DecodeError type
        raise TokenizerExportError(f"{model_path}: not a sentencepiece model file") from None
    return proto


def _bpe_merges(pieces: list[str], types: list[int]) -> list[tuple[str, str]]:
    """Every split of every normal piece into two normal pieces, ranked by the merged piece's id
    (its SentencePiece score rank), then by the left part's id for a stable order."""
    normal = {p: i for i, (p, t) in enumerate(zip(pieces, types)) if t in (_NORMAL, _USER_DEFINED)}
    ranked = []
    for i, (piece, t) in enumerate(zip(pieces, types)):
        if t != _NORMAL:
            continue
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in normal and right in normal:
                ranked.append((i, normal[left], left, right))
    ranked.sort()
    return [(left, right) for _, _, left, right in ranked]


def build_tokenizer_json(model_path: str | Path):
    """A ``tokenizers.Tokenizer`` that segments text exactly as the SentencePiece model does."""
    try:
        from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers
        from tokenizers.models import BPE, Unigram
    except ImportError:
        raise TokenizerExportError("exporting a tokenizer needs the `tokenizers` package "
                                   "(pip install tokenizers)") from None
    model_path = Path(model_path)
    proto = _load_proto(model_path)
    norm, trainer = proto.normalizer_spec, proto.trainer_spec
    if norm.name not in ("identity", "") or norm.precompiled_charsmap:
        raise TokenizerExportError(
            f"{model_path}: normalization rule {norm.name!r} cannot be reproduced exactly in "
            "tokenizer.json; retrain the tokenizer with tools/train_tokenizer.py (identity rule)")
    if norm.remove_extra_whitespaces:
        raise TokenizerExportError(
            f"{model_path}: remove_extra_whitespaces=true cannot be reproduced exactly in "
            "tokenizer.json; retrain the tokenizer with tools/train_tokenizer.py")
    if trainer.treat_whitespace_as_suffix:
        raise TokenizerExportError(f"{model_path}: treat_whitespace_as_suffix is not supported")
    pieces = [p.piece for p in proto.pieces]
    types = [p.type for p in proto.pieces]
    unk = pieces[trainer.unk_id] if 0 <= trainer.unk_id < len(pieces) else None
    if trainer.model_type == _BPE:
        vocab = {p: i for i, p in enumerate(pieces)}
        model = BPE(vocab=vocab, merges=_bpe_merges(pieces, types), unk_token=unk,
                    fuse_unk=True, byte_fallback=trainer.byte_fallback)
    elif trainer.model_type == _UNIGRAM:
        model = Unigram([(p.piece, p.score) for p in proto.pieces], unk_id=trainer.unk_id,
                        byte_fallback=trainer.byte_fallback)
    else:
        raise TokenizerExportError(f"{model_path}: only BPE and unigram sentencepiece models "
                                   "can be exported")
    tok = Tokenizer(model)
    steps = [normalizers.Replace(" ", _SPACE)]
    if norm.add_dummy_prefix:
        steps.insert(0, normalizers.Prepend(_SPACE))
    tok.normalizer = normalizers.Sequence(steps)
    if trainer.split_digits:
        tok.pre_tokenizer = pre_tokenizers.Digits(individual_digits=True)
    dec = [decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if norm.add_dummy_prefix:
        dec.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(dec)
    # SentencePiece never matches control pieces (<s>, </s>) inside text: registered as special
    # tokens here, and tokenizer_config sets split_special_tokens so they are not matched either.
    tok.add_special_tokens([AddedToken(p, special=True, normalized=False)
                            for p, t in zip(pieces, types) if t in (_CONTROL, _UNKNOWN)])
    tok.encode_special_tokens = True
    user = [AddedToken(p, special=False, normalized=True) for p, t in zip(pieces, types)
            if t == _USER_DEFINED]
    if user:
        tok.add_tokens(user)
    return tok


def write_hf_tokenizer(model_path: str | Path, out_dir: str | Path) -> dict:
    """Write tokenizer.model, tokenizer.json, tokenizer_config.json and special_tokens_map.json
    into ``out_dir``; returns the special ids (bos/eos/unk/pad, -1 when absent)."""
    import sentencepiece as spm

    model_path, out_dir = Path(model_path), Path(out_dir)
    if not model_path.is_file():
        raise TokenizerExportError(f"tokenizer model not found: {model_path}")
    tok = build_tokenizer_json(model_path)
    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    ids = {"bos": sp.bos_id(), "eos": sp.eos_id(), "unk": sp.unk_id(), "pad": sp.pad_id()}
    special = {f"{k}_token": sp.id_to_piece(v) for k, v in ids.items() if v >= 0}
    shutil.copyfile(model_path, out_dir / "tokenizer.model")
    tok.save(str(out_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,  # the normalizer already adds SentencePiece's dummy prefix
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": True,
        "model_max_length": 1 << 30,
        **special,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    return ids
