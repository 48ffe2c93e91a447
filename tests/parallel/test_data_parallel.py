"""Data parallelism on CPU (gloo, torchrun, 2 processes) reproduces the single-process run."""

import os
import subprocess
import sys
import time

import pytest
import torch

from _corpus import ROOT, tiny_overrides, torchrun, train_rows as losses
from kis_megatron.config import load_config
from kis_megatron.parallel.parallelize import build_model
from kis_megatron.training.trainer import Trainer
from kis_megatron.training.checkpoint import CheckpointManager

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]  # every test starts several processes

def final_weights(run_dir, cfg):
    model = build_model(cfg.model, seed=0)
    CheckpointManager(run_dir / "checkpoints").load(CheckpointManager(run_dir / "checkpoints").latest(),
                                                    model, None)
    return dict(model.named_parameters())


def test_dp2_matches_single_process(world_corpus, tmp_path):
    common = {"train.steps": 4, "train.global_batch": 8, "train.micro_batch": 2,
              "infusion.domain": world_corpus["shards"]["domain"], "infusion.ratio": 0.25}
    single = tmp_path / "single"
    cfg = load_config(None, tiny_overrides(world_corpus, single, **common))
    Trainer(cfg).fit()
    dp = tmp_path / "dp2"
    proc = torchrun(2, "-m", "kis_megatron.train", *tiny_overrides(world_corpus, dp, **common))
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = losses(single), losses(dp)
    assert sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert abs(a[step]["loss"] - b[step]["loss"]) <= 1e-5 * abs(a[step]["loss"]), step
        assert abs(a[step]["grad_norm"] - b[step]["grad_norm"]) <= 1e-5 * a[step]["grad_norm"], step
        assert a[step]["tokens_domain"] == b[step]["tokens_domain"], step  # the global batch's
    wa, wb = final_weights(single, cfg), final_weights(dp, cfg)
    for name, p in wa.items():
        torch.testing.assert_close(wb[name], p, rtol=1e-5, atol=1e-7, msg=name)


FAILING_RANK = """
import sys
from kis_megatron import train
real_step = train.Trainer.train_step
def train_step(self):
    if self.dims.rank == 1 and self.step == 2:
        raise RuntimeError("rank 1 fails on purpose")
    return real_step(self)
train.Trainer.train_step = train_step
sys.exit(train.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("layout", [{}, {"parallel.pp": 2, "model.tie_embeddings": False}], ids=["dp2", "pp2"])
def test_a_failing_rank_stops_every_rank(world_corpus, tmp_path, layout):
    """Also when the other rank is blocked in a pipeline receive from the failed one."""
    script = tmp_path / "fail.py"
    script.write_text(FAILING_RANK)
    t0 = time.time()
    proc = torchrun(2, str(script), *tiny_overrides(world_corpus, tmp_path / "run", **{
        "train.steps": 50, "parallel.timeout_s": 60, **layout}))
    assert proc.returncode != 0
    assert "rank 1 fails on purpose" in proc.stderr
    assert time.time() - t0 < 120


def test_two_node_launch_on_one_machine(world_corpus, tmp_path):
    """Two torchrun invocations (--nnodes=2, node ranks 0 and 1, c10d rendezvous on
    127.0.0.1) train together: the same losses as one process."""
    common = {"train.steps": 3, "train.global_batch": 8, "train.micro_batch": 4}
    single = tmp_path / "single"
    Trainer(load_config(None, tiny_overrides(world_corpus, single, **common))).fit()
    run = tmp_path / "two_nodes"
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2",
                               f"--node-rank={r}", "--nproc-per-node=1", "--rdzv-backend=c10d",
                               f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=kis-test",
                               "-m", "kis_megatron.train", *tiny_overrides(world_corpus, run, **common)],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in (0, 1)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    a, b = losses(single), losses(run)
    assert sorted(b) == [1, 2, 3]
    for step in a:
        assert abs(a[step]["loss"] - b[step]["loss"]) <= 1e-5 * abs(a[step]["loss"]), step


def test_slurm_multinode_script_on_one_machine(world_corpus, tmp_path):
    """examples/launch/train_multinode.sbatch, run by bash with stand-ins for SLURM (srun starts
    its command once per "node", here two local processes; scontrol names 127.0.0.1 as the
    first node): the two torchruns meet by c10d rendezvous and train like one process."""
    import socket

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fakes = {
        "scontrol": "#!/bin/bash\necho 127.0.0.1\n",
        "srun": "#!/bin/bash\nfor i in $(seq $SLURM_NNODES); do \"$@\" & done\n"
                "status=0; for job in $(jobs -p); do wait $job || status=1; done; exit $status\n",
        "torchrun": f"#!/bin/bash\nexec {sys.executable} -m torch.distributed.run \"$@\"\n",
    }
    for name, text in fakes.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    common = {"train.steps": 3, "train.global_batch": 8, "train.micro_batch": 4}
    single = tmp_path / "single"
    Trainer(load_config(None, tiny_overrides(world_corpus, single, **common))).fit()
    run = tmp_path / "slurm"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1",
           "SLURM_JOB_NODELIST": "node[0-1]", "SLURM_NNODES": "2", "SLURM_JOB_ID": "42",
           "GPUS_PER_NODE": "1", "MASTER_PORT": str(port)}
    proc = subprocess.run(["bash", str(ROOT / "examples/launch/train_multinode.sbatch"),
                           *tiny_overrides(world_corpus, run, **common)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = losses(single), losses(run)
    assert sorted(b) == [1, 2, 3]
    for step in a:
        assert abs(a[step]["loss"] - b[step]["loss"]) <= 1e-5 * abs(a[step]["loss"]), step
