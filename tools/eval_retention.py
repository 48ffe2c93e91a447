"""Score retention probes on a saved checkpoint.

    python tools/eval_retention.py out/tiny_ladder/runs/d64-f0256
    python tools/eval_retention.py RUN_DIR --checkpoint RUN_DIR/checkpoints/step_00000100 \
        --probes general=world/general/probes.jsonl domain=world/domain/probes.jsonl --exact-match

Uses the run's resolved config.yaml (model shape, tokenizer) and, unless --probes is given,
its eval.probes. Prints the metrics as JSON (retention/<name>, retention_heldout/<name>,
probes/<name>, exact_match/<name>, ...) and writes them to --out when given.
"""

import argparse
import json
import sys

from kis_megatron.config import ConfigError
from kis_megatron.errors import KisError, exit_with
from kis_megatron.eval.probing import evaluate_checkpoint
from kis_megatron.utils import atomic_write_json


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", help="a run directory (holds config.yaml and checkpoints/)")
    ap.add_argument("--checkpoint", help="checkpoint directory (default: the latest)")
    ap.add_argument("--probes", nargs="+", metavar="NAME=FILE", help="probe files to score")
    ap.add_argument("--exact-match", action="store_true", help="also greedy-generation exact match")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--out", help="write the metrics JSON here too")
    args = ap.parse_args(argv)
    try:
        probes = None
        if args.probes:
            probes = {}
            for item in args.probes:
                name, sep, path = item.partition("=")
                if not sep or not name or not path:
                    raise ConfigError(f"--probes takes NAME=FILE, got {item!r}")
                probes[name] = path
        metrics = evaluate_checkpoint(args.run_dir, args.checkpoint, probes, args.exact_match, args.device)
    except KisError as e:
        return exit_with(e)
    text = json.dumps(metrics, indent=2)
    print(text)
    if args.out:
        atomic_write_json(args.out, metrics)
    return 0


if __name__ == "__main__":
    sys.exit(main())
