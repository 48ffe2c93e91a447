"""Train a SentencePiece tokenizer (BPE or unigram) for kis-megatron.

Writes PREFIX.model and PREFIX.vocab. Defaults are lossless (identity normalization,
whitespace kept, byte fallback) and split digits; ids: unk 0, bos 1, eos/EOD 2, pad 3.

    python tools/train_tokenizer.py --input corpus.txt --model-prefix tok/tok --vocab-size 8000
    python tools/train_tokenizer.py --input facts.jsonl general.jsonl --format jsonl \\
        --model-prefix tok/tok --vocab-size 8000 --model-type unigram
"""

import argparse
import sys

from kis_megatron.errors import KisError, exit_with
from kis_megatron.data.preprocess import FORMATS, train_tokenizer_from_corpus


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
    )
    p.add_argument("--input", nargs="+", required=True, metavar="FILE", help="training corpus files")
    p.add_argument("--model-prefix", required=True, help="writes PREFIX.model and PREFIX.vocab")
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
    p.add_argument("--format", choices=FORMATS, default="text",
                   help="text: one sentence per line (default); jsonl: texts under --json-key")
    p.add_argument("--json-key", default="text")
    p.add_argument("--no-byte-fallback", action="store_true",
                   help="map unseen characters to <unk> instead of byte pieces")
    p.add_argument("--no-split-digits", action="store_true", help="allow multi-digit pieces")
    p.add_argument("--no-pad", action="store_true", help="no <pad> piece")
    p.add_argument("--character-coverage", type=float, default=0.9995)
    p.add_argument("--input-sentence-size", type=int, default=2_000_000,
                   help="sample at most this many lines (0: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the line sampling")
    p.add_argument("--threads", type=int, default=None, help="training threads (default: up to 8)")
    p.add_argument("--verbose", action="store_true", help="show SentencePiece's log")
    p.add_argument("--force", action="store_true", help="replace existing outputs at the prefix")
    return p


def main(argv=None) -> int:
    """Run the tool; returns 0, or 2 after printing `error: ...` for a user error."""
    args = build_parser().parse_args(argv)
    try:
        path = train_tokenizer_from_corpus(
            args.input,
            args.model_prefix,
            args.vocab_size,
            fmt=args.format,
            json_key=args.json_key,
            model_type=args.model_type,
            byte_fallback=not args.no_byte_fallback,
            split_digits=not args.no_split_digits,
            pad=not args.no_pad,
            character_coverage=args.character_coverage,
            input_sentence_size=args.input_sentence_size,
            seed=args.seed,
            num_threads=args.threads,
            verbose=args.verbose,
            force=args.force,
        )
    except (KisError, OSError) as e:
        return exit_with(e)
    print(f"wrote {path} ({args.vocab_size} pieces)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
