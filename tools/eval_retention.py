"""Score retention probes on a saved checkpoint.

    python tools/eval_retention.py out/tiny_ladder/runs/d64-f0256
    python tools/eval_retention.py RUN_DIR --checkpoint RUN_DIR/checkpoints/step_00000100 \
        --probes general=world/general/probes.jsonl domain=world/domain/probes.jsonl --exact-match

Uses the run's resolved config.yaml (model shape, tokenizer; relative paths in it are taken
from where the run was launched) and, unless --probes is given, its eval.probes. Prints the
metrics as JSON (retention/<name>, retention_heldout/<name>, probes/<name>,
exact_match/<name>, ...) and writes them to --out when given.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from kis_megatron.config import ConfigError
from kis_megatron.run_dir import RunDir
from kis_megatron.errors import KisError, exit_with
from kis_megatron.eval.probing import ProbeRunner
from kis_megatron.parallel.parallelize import build_model
from kis_megatron.training.checkpoint import CheckpointError, CheckpointManager, verify
from kis_megatron.training.device import resolve_device
from kis_megatron.utils import atomic_write_json


def evaluate_checkpoint(run_dir: str | Path, checkpoint: str | Path | None = None,
                        probes: dict[str, str] | None = None, exact_match: bool = False,
                        device: str = "auto") -> dict:
    """Retention metrics of a saved checkpoint of a run, with the run's own config and
    tokenizer: the latest checkpoint unless one is named, the run's ``eval.probes`` unless
    other probe files are given (so any checkpoint can be scored on any fixed probe set)."""
    run_dir = Path(run_dir)
    cfg = RunDir(run_dir).load_config()
    if probes:
        cfg.eval.probes = dict(probes)
    if not cfg.eval.probes:
        raise ConfigError("no probe files: the run has no eval.probes; pass --probes name=path")
    cfg.eval.exact_match = exact_match
    path = Path(checkpoint) if checkpoint else CheckpointManager(run_dir / "checkpoints").latest()
    if path is None:
        raise CheckpointError(f"{run_dir / 'checkpoints'} holds no complete checkpoint")
    verify(path, cfg.model)
    dev = resolve_device(device)
    model = build_model(cfg.model, seed=cfg.train.seed, device=dev)
    extra = CheckpointManager(path.parent).load(path, model, optimizer=None)
    model.eval()
    runner = ProbeRunner(cfg.eval, cfg.data.tokenizer, dev, facts=cfg.infusion.facts)
    return {"step": extra["step"], "checkpoint": str(path), **runner.run(model)}


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
    except (KisError, OSError) as e:  # OSError: the file system refused (path, cause)
        return exit_with(e)
    text = json.dumps(metrics, indent=2)
    print(text)
    if args.out:
        atomic_write_json(args.out, metrics)
    return 0


if __name__ == "__main__":
    sys.exit(main())
