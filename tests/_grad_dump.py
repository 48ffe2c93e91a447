"""Train as ``kis-train`` would (``python tests/_grad_dump.py OUT_FILE overrides...``, alone or under
torchrun) and save the first step's gradients, before clipping, as full tensors by parameter
name: tensor-parallel shards all-gathered, each pipeline stage adding the parameters it owns
(``OUT_FILE`` gets a ``.stage<k>`` suffix per pipeline rank that has something to add)."""

import sys
from pathlib import Path

if __name__ == "__main__":  # run as a script: the repository, not tests/, first on sys.path
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch  # noqa: E402

from kis_megatron.config import load_config  # noqa: E402
from kis_megatron.parallel.tensor_parallel import full_of  # noqa: E402
from kis_megatron.train import Trainer, destroy_distributed  # noqa: E402


def main(out: str, overrides: list[str]) -> None:
    trainer = Trainer(load_config(None, overrides))
    real = trainer.forward_backward

    def forward_backward():
        result = real()
        if trainer.step == 0:
            save_grads(trainer, out)
        return result

    trainer.forward_backward = forward_backward
    try:
        trainer.fit()
    finally:
        destroy_distributed()


def save_grads(trainer: Trainer, out: str) -> None:
    dims = trainer.dims
    grads = {}
    for name, p in trainer.model.named_parameters():
        if getattr(p, "_tied_copy", False):  # the last stage's copy of a tied embedding
            continue
        g = p.grad.detach()
        dim = getattr(p, "_tp_shard_dim", None)
        grads[name] = full_of(g, dim, dims.tp_group) if dim is not None else g.clone()
    if dims.dp_rank == 0 and dims.tp_rank == 0:
        torch.save(grads, f"{out}.stage{dims.pp_rank}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
