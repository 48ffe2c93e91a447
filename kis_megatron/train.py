"""Train a model: ``kis-train --config FILE.yaml [section.key=value ...]``.

Single process on CPU::

    kis-train --config examples/tiny_cpu/train.yaml train.steps=200

Data parallel on a GPU node (one process per GPU), or across nodes, under torchrun
(``parallel.tp=N`` adds tensor parallelism: groups of N ranks share each layer;
``parallel.pp=M`` pipeline parallelism: M stages of layers; dp is the rest)::

    torchrun --nproc-per-node 8 -m kis_megatron.train --config examples/gpu_ladder/base.yaml ...
    torchrun --nnodes 4 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        -m kis_megatron.train --config ...

The loop itself is ``kis_megatron.training.trainer.Trainer``; this module is the entry point.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from kis_kernels.dispatch import KernelBackendError
from kis_megatron import plan
from kis_megatron.config import Config, config_yaml, load_config
from kis_megatron.errors import KisError, exit_with
from kis_megatron.parallel.dims import destroy_distributed
from kis_megatron.training.trainer import Trainer, TrainingDiverged

__all__ = ["Trainer", "TrainingDiverged", "main", "train"]  # Trainer kept here for importers of 0.x


def train(cfg: Config) -> dict:
    """Run training as configured; returns the final evaluation record."""
    try:
        return Trainer(cfg).fit()
    finally:
        destroy_distributed()


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="kis-train", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=100")
    parser.add_argument("--help-config", action="store_true",
                        help="list every config key with its type, default, values and comment; exit")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (defaults, preset, file, overrides) as YAML; exit")
    plan.add_arguments(parser)
    args = parser.parse_args(argv)
    if args.json and not args.plan:
        parser.error("--json goes with --plan")
    if args.help_config:
        from kis_megatron.config_help import help_config

        print(help_config())
        return 0
    try:
        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            print(config_yaml(cfg), end="")
            return 0
        if args.plan:
            return plan.run(cfg, args)
        train(cfg)
    except (KisError, KernelBackendError, OSError) as e:  # OSError: the file system refused; any other traceback past here is a bug
        return exit_with(e)
    except KeyboardInterrupt:
        print("interrupted; resume with checkpoint.resume=auto", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
