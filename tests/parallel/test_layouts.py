"""Every parallel layout reproduces the single-process run on CPU (gloo, torchrun): the first
step's gradient of every parameter (gathered to full tensors), the losses and grad norms of
4 steps, validation loss and retention probes, and the final weights, all within 1e-5
relative, with untied and tied embeddings, and with activation recomputation. Checkpoints reshard between tp=2 x pp=2 and one
process in both directions, and a ZeRO-1 checkpoint resumes without ZeRO."""

import re

import pytest
import torch

from _compare import assert_same_run, assert_same_tensors, weights_at
from _corpus import ROOT, tiny_overrides, torchrun
from kis_megatron.config import ConfigError, load_config
from kis_megatron.training.trainer import Trainer

STEPS = 4
GRAD_DUMP = ROOT / "tests" / "_grad_dump.py"

# name: (processes, overrides). 4 layers; 4 micro-batches of 2 per step at dp=1, 2 at dp=2.
LAYOUTS = {
    "tp2": (2, {"parallel.tp": 2}),
    "dp2": (2, {}),
    "pp2": (2, {"parallel.pp": 2}),
    "pp2_vpp2": (2, {"parallel.pp": 2, "parallel.vpp": 2}),
    "tp2_sp": (2, {"parallel.tp": 2, "parallel.sp": True}),
    "dp2_zero1": (2, {"parallel.zero1": True}),
    "tp2_pp2": (4, {"parallel.tp": 2, "parallel.pp": 2}),
    "tp2_sp_pp2_vpp2_tied": (4, {"parallel.tp": 2, "parallel.sp": True, "parallel.pp": 2, "parallel.vpp": 2,
                                 "model.tie_embeddings": True}),
    "dp2_pp2_zero1_tied": (4, {"parallel.pp": 2, "parallel.zero1": True, "model.tie_embeddings": True}),
    # Recomputation changes no number: the same references, with train.recompute on.
    "tp2_sp_recompute_full": (2, {"parallel.tp": 2, "parallel.sp": True, "train.recompute": "full"}),
    "pp2_vpp2_recompute_selective": (2, {"parallel.pp": 2, "parallel.vpp": 2, "train.recompute": "selective"}),
    "dp2_recompute_full": (2, {"train.recompute": "full"}),
}
TIED = {"model.tie_embeddings": True}


def reference_of(layout: str) -> str:
    return "single_tied" if LAYOUTS[layout][1].get("model.tie_embeddings") else "single"


def common(world_corpus) -> dict:
    return {"model.n_layers": 4, "model.tie_embeddings": False, "train.steps": STEPS,
            "train.global_batch": 8, "train.micro_batch": 2, "checkpoint.interval": 2,
            "checkpoint.keep": 3, "eval.interval": 2,
            "eval.probes.general": world_corpus["probes"]["general"]}


def load_grads(prefix) -> dict:
    grads = {}
    for part in sorted(prefix.parent.glob(prefix.name + ".stage*")):
        stage = torch.load(part)
        assert not grads.keys() & stage.keys(), "a parameter on two pipeline stages"
        grads.update(stage)
    return grads


@pytest.fixture(scope="module")
def runs(world_corpus, tmp_path_factory):
    """Runs by layout name, each launched once and shared by the tests; "single" and
    "single_tied" are the one-process references, run in this process."""
    root = tmp_path_factory.mktemp("layouts")
    done = {}

    def get(name: str):
        if name not in done:
            run = root / name
            if name.startswith("single"):
                from _grad_dump import main

                extra = TIED if name == "single_tied" else {}
                main(str(root / f"{name}.grads"), tiny_overrides(world_corpus, run, **{**common(world_corpus), **extra}))
            else:
                nproc, extra = LAYOUTS[name]
                proc = torchrun(nproc, str(GRAD_DUMP), str(root / f"{name}.grads"),
                                *tiny_overrides(world_corpus, run, **{**common(world_corpus), **extra}))
                assert proc.returncode == 0, proc.stderr[-3000:]
            done[name] = (run, load_grads(root / f"{name}.grads"))
        return done[name]

    return get


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_single_process(runs, layout):
    ref, ref_grads = runs(reference_of(layout))
    run, grads = runs(layout)
    assert_same_tensors(ref_grads, grads)
    assert_same_run(ref, run, range(1, STEPS + 1))
    evals_ref = [r for r in _rows(ref) if "val_loss" in r]
    evals = [r for r in _rows(run) if "val_loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    for a, b in zip(evals_ref, evals):
        for key in ("val_loss", "retention/general"):
            assert abs(a[key] - b[key]) <= 1e-5 * abs(a[key]), (key, a, b)
    cfg = load_config(run / "config.yaml")
    assert_same_tensors(weights_at(ref, STEPS, cfg), weights_at(run, STEPS, cfg))


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("layout", ["tp2_pp2", "tp2_sp_pp2_vpp2_tied", "dp2_zero1"])
def test_checkpoint_resumes_in_one_process(runs, world_corpus, tmp_path, layout):
    """Saved at a layout (pipeline stages, or ZeRO-1 optimizer shards), resumed by one process:
    steps 3 and 4 as if never resharded."""
    ref, _ = runs(reference_of(layout))
    run, _ = runs(layout)
    resumed = tmp_path / "resumed"
    tied = TIED if reference_of(layout) == "single_tied" else {}
    cfg = load_config(None, tiny_overrides(world_corpus, resumed, **{
        **common(world_corpus), **tied, "checkpoint.resume": str(run / "checkpoints" / "step_00000002")}))
    Trainer(cfg).fit()
    assert_same_run(ref, resumed, [3, 4])
    assert_same_tensors(weights_at(ref, STEPS, cfg), weights_at(resumed, STEPS, cfg))


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("reference", ["single", "single_tied"])
def test_single_process_checkpoint_resumes_at_tp2_pp2(runs, world_corpus, tmp_path, reference):
    """The other way: a tied embedding's optimizer state reaches the last stage's copy too."""
    ref, _ = runs(reference)
    run = tmp_path / "to_tp2_pp2"
    tied = TIED if reference == "single_tied" else {}
    proc = torchrun(4, "-m", "kis_megatron.train", *tiny_overrides(world_corpus, run, **{
        **common(world_corpus), **tied, "parallel.tp": 2, "parallel.pp": 2,
        "checkpoint.resume": str(ref / "checkpoints" / "step_00000002")}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_run(ref, run, [3, 4])


@pytest.mark.parametrize("overrides, message", [
    ({"parallel.pp": 4, "parallel.vpp": 2}, "pp * vpp = 8 stages, but the model has only n_layers=4"),
    ({"parallel.pp": 2, "parallel.pp_layers": "[1, 2]"}, "must give every stage >= 1 layer and sum to"),
    ({"parallel.pp": 2, "parallel.pp_layers": "[1, 1, 2]"}, "it needs one per stage, pp * vpp = 2"),
    ({"parallel.vpp": 2}, "virtual stages need parallel.pp > 1"),
    ({"parallel.tp": 2, "parallel.sp": True, "data.seq_len": 31}, "must be divisible by parallel.tp=2"),
])
def test_bad_layouts_are_config_errors(world_corpus, tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, tiny_overrides(world_corpus, tmp_path / "run", **{**common(world_corpus), **overrides}))


@pytest.mark.slow
@pytest.mark.multiprocess
def test_too_few_micro_batches_is_refused(world_corpus, tmp_path):
    """Checked on every rank before the first step, so all exit with the same message."""
    from kis_megatron.config import ParallelConfig
    from kis_megatron.parallel.pipeline import check_microbatches

    with pytest.raises(ConfigError, match="must be a multiple of parallel.pp=2 with parallel.vpp > 1"):
        check_microbatches(5, ParallelConfig(pp=2, vpp=2))
    check_microbatches(5, ParallelConfig(pp=2))
    proc = torchrun(2, "-m", "kis_megatron.train", *tiny_overrides(world_corpus, tmp_path / "run", **{
        **common(world_corpus), "parallel.pp": 2, "train.global_batch": 2, "train.micro_batch": 2}), timeout=120)
    assert proc.returncode != 0, proc.stderr[-2000:]
    assert "micro-batches per step = train.global_batch / (train.micro_batch * dp) = 1 must be >= " \
           "parallel.pp=2 to fill the pipeline" in proc.stderr


def test_uneven_and_explicit_stage_splits():
    from kis_megatron.parallel.pipeline import stage_layer_ids

    assert stage_layer_ids(5, 2) == [[0, 1, 2], [3, 4]]
    assert stage_layer_ids(4, 4) == [[0], [1], [2], [3]]
    assert stage_layer_ids(5, 2, [1, 4]) == [[0], [1, 2, 3, 4]]
    with pytest.raises(ConfigError, match="pp_layers"):
        stage_layer_ids(5, 2, [2, 2])


def _rows(run_dir):
    import json

    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]

