"""Tokenize JSONL or plain-text corpora into a Megatron token shard.

Writes PREFIX.bin/.idx (readable by kis-megatron and by Megatron-LM), PREFIX.meta.json
(tokenizer, vocab size, EOD id, counts) and, with --doc-key, PREFIX.doclabels.npy.

    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/general \\
        --tokenizer-model tok/tok.model --workers 4
    python tools/preprocess_data.py --input books.txt --format text --text-doc-sep blank \\
        --output-prefix data/books --tokenizer-model tok/tok.model
    python tools/preprocess_data.py --input facts.jsonl --doc-key fact_id \\
        --output-prefix data/domain --tokenizer-model tok/tok.model

Text format: one document per non-blank line (--text-doc-sep line, the default), or one
per paragraph of lines separated by blank lines (--text-doc-sep blank).
"""

import argparse
import sys

from kis_megatron.errors import KisError, exit_with
from kis_megatron.data.preprocess import FORMATS, TEXT_DOC_SEPS, preprocess


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
    )
    p.add_argument("--input", nargs="+", required=True, metavar="FILE",
                   help="input files, tokenized in this order into one dataset")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.bin, PREFIX.idx, ...")
    p.add_argument("--tokenizer-model", required=True, help="SentencePiece .model file")
    p.add_argument("--format", choices=FORMATS, default="jsonl", help="input format (default jsonl)")
    p.add_argument("--json-key", default="text", help="JSONL field holding the text (default text)")
    p.add_argument("--text-doc-sep", choices=TEXT_DOC_SEPS, default="line",
                   help="text format: a document per line, or per blank-line separated paragraph")
    p.add_argument("--doc-key", default=None,
                   help="JSONL field with an integer label per document (e.g. fact_id), "
                        "stored in PREFIX.doclabels.npy; -1 where absent")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes (default 1)")
    p.add_argument("--chunk-size", type=int, default=256, help="documents per work item")
    p.add_argument("--no-progress", action="store_true", help="never show a progress bar")
    p.add_argument("--force", action="store_true", help="replace existing outputs at the prefix")
    return p


def main(argv=None) -> int:
    """Run the tool; returns 0, or 2 after printing `error: ...` for a user error."""
    args = build_parser().parse_args(argv)
    try:
        meta = preprocess(
            args.input,
            args.output_prefix,
            args.tokenizer_model,
            fmt=args.format,
            json_key=args.json_key,
            text_doc_sep=args.text_doc_sep,
            doc_key=args.doc_key,
            workers=args.workers,
            chunk_size=args.chunk_size,
            progress=False if args.no_progress else None,
            force=args.force,
        )
    except (KisError, OSError) as e:
        return exit_with(e)
    print(f"wrote {args.output_prefix}.bin/.idx: {meta['num_documents']} documents, "
          f"{meta['num_tokens']} tokens ({meta['dtype']}), max token id {meta['max_token_id']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
