"""Export a run's checkpoint as a Hugging Face Llama folder (config, safetensors, tokenizer).

    python tools/export_hf.py out/tiny_ladder/runs/d64-f0256 --out hf/d64-f0256
    python tools/export_hf.py RUN_DIR --checkpoint RUN_DIR/checkpoints/step_00000100 --out DIR \
        --max-shard-size 2GB

The folder loads offline with ``AutoModelForCausalLM.from_pretrained(DIR)`` and
``AutoTokenizer.from_pretrained(DIR)`` (same ids as our tokenizer, no BOS added), so tools such
as lm-evaluation-harness can score it. Checkpoints of any parallel layout export (they name
full tensors). Works from any directory: relative paths in the run's config (data.tokenizer)
are taken from where the run was launched (``launch_dir`` in its run.json).
"""

import argparse
import sys

from kis_megatron.errors import KisError, exit_with
from kis_megatron.interop.hf import export_hf


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", help="a run directory (or a checkpoint directory inside one)")
    ap.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    ap.add_argument("--force", action="store_true", help="replace an existing --out")
    ap.add_argument("--checkpoint", help="checkpoint directory (default: the run's latest)")
    ap.add_argument("--max-shard-size", default="5GB", help="split weights above this (default 5GB)")
    ap.add_argument("--tokenizer", help="sentencepiece .model (default: the run's data.tokenizer)")
    args = ap.parse_args(argv)
    try:
        out = export_hf(args.run_dir, args.out, checkpoint=args.checkpoint,
                        max_shard_size=args.max_shard_size, tokenizer=args.tokenizer, force=args.force)
    except (KisError, OSError) as e:  # OSError: the file system refused (path, cause)
        return exit_with(e)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
