"""Comparisons of a parallel run with its single-process reference: logged losses and grad
norms, checkpointed weights, gradients."""

import torch

from _corpus import train_rows
from kis_megatron.parallel.parallelize import build_model
from kis_megatron.training.checkpoint import CheckpointManager


def weights_at(run_dir, step, cfg):
    """The parameters of a checkpoint, loaded into a plain single-process model."""
    model = build_model(cfg.model, seed=0)
    CheckpointManager(run_dir / "checkpoints").load(run_dir / "checkpoints" / f"step_{step:08d}", model, None)
    return dict(model.named_parameters())


def assert_same_run(reference, other, steps, keys=("loss", "grad_norm")):
    a, b = train_rows(reference), train_rows(other)
    assert sorted(b) == list(steps)
    for step in steps:
        for key in keys:
            assert abs(a[step][key] - b[step][key]) <= 1e-5 * abs(a[step][key]), (step, key, a[step], b[step])


def assert_same_tensors(wa: dict, wb: dict, rel: float = 1e-5):
    """Each tensor within ``rel`` of the reference, relative in L2 norm. Not elementwise: Adam's
    first steps move a weight by about lr * sign(grad), so an element whose gradient is
    near zero amplifies the last-bit differences of a split matmul far beyond the rest."""
    assert wa.keys() == wb.keys(), sorted(set(wa) ^ set(wb))
    for name, p in wa.items():
        err = ((wb[name].detach() - p.detach()).norm() / p.detach().norm()).item()
        assert err <= rel, (name, err)


assert_same_weights = assert_same_tensors
