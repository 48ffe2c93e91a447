"""The planner (``kis-train ... --plan``) against exact counts of built models and against the
memory a real CPU step uses. Tolerances (also in kis_megatron/plan.py's doc): parameters,
weights, gradients and optimizer state exact; activations kept for the backward within 2 %;
activations + gradients within 10 % of the peak of a micro-batch accumulated onto another's
gradients, on the reference (CPU) path."""

import json
import os
import subprocess
import sys

import pytest
import torch

from _corpus import ROOT, torchrun
from kis_megatron import plan as P
from kis_megatron.config import ConfigError, load_config
from kis_megatron.model.llama import Transformer
from kis_megatron.parallel.parallelize import build_model
from kis_megatron.parallel.recompute import apply_recompute
from kis_megatron.training.memory import accumulated_microbatch_bytes
from kis_megatron.training.optim import build_optimizer

TINY = str(ROOT / "examples" / "tiny_cpu" / "train.yaml")


def meta_params(cfg) -> int:
    with torch.device("meta"):
        return Transformer(cfg.model).num_params()


@pytest.mark.parametrize("overrides", [
    ["parallel.tp=8"],
    ["parallel.tp=4", "parallel.pp=2"],
    ["parallel.tp=4", "parallel.pp=2", "model.tie_embeddings=true"],
    ["parallel.tp=2", "parallel.pp=4", "parallel.vpp=2", "train.global_batch=8"],
])
def test_7b_parameters_per_rank_sum_to_the_model(overrides):
    cfg = load_config(None, ["model.preset=7b", "data.seq_len=4096", "train.micro_batch=1",
                             "train.global_batch=16", *overrides])
    par = cfg.parallel
    p = P.plan(cfg, par.tp * par.pp)
    ranks = p["ranks"]
    assert len(ranks) == par.pp
    owned = sum(r["params_owned_tp0"] + (par.tp - 1) * r["params_owned_other_tp"] for r in ranks)
    assert owned == meta_params(cfg) == p["model_params"]
    norms = cfg.model.dim * (2 * cfg.model.n_layers + 1)  # replicated on every tp rank
    tied_copy = cfg.model.vocab_size // par.tp * cfg.model.dim if cfg.model.tie_embeddings and par.pp > 1 else 0
    held = sum(r["params_held"] * par.tp for r in ranks)
    assert held == meta_params(cfg) + (par.tp - 1) * norms + par.tp * tied_copy
    assert p["params_per_rank"] == max(r["params_held"] for r in ranks)


@pytest.mark.slow
def test_7b_tp8_json_keys_and_a_layout_that_does_not_fit_is_warned(tmp_path):
    def cli(*extra):
        return subprocess.run([sys.executable, "-m", "kis_megatron.train", "model.preset=7b",
                               "data.seq_len=4096", "train.micro_batch=1", "train.global_batch=8",
                               *extra, "--plan", "--json"], capture_output=True, text=True, cwd=ROOT,
                              timeout=120)
    proc = cli("parallel.tp=8")
    assert proc.returncode == 0, proc.stderr
    p = json.loads(proc.stdout)
    mem = p["memory_bytes_per_rank"]
    assert set(mem) == {"weights", "grads", "optimizer", "activations", "total"}
    assert mem["total"] == sum(v for k, v in mem.items() if k != "total")
    assert p["params_per_rank"] > 0 and p["flops_per_step"] > 0 and p["comm_bytes_per_step"]["tp"] > 0
    assert p["gpu"]["fits"] and not p["warnings"] and "warning" not in proc.stderr
    one_gpu = cli("parallel.tp=1")  # 7B with AdamW on one 80 GB card: no
    assert one_gpu.returncode == 0, one_gpu.stderr
    assert not json.loads(one_gpu.stdout)["gpu"]["fits"]
    assert "warning: will not fit" in one_gpu.stderr and "parallel.tp" in one_gpu.stderr
    text = subprocess.run([sys.executable, "-m", "kis_megatron.train", "--config", TINY, "--plan",
                           "--plan-gpu", "cpu"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert text.returncode == 0 and "parameters" in text.stdout and "activations" in text.stdout


def test_bad_plan_arguments_are_config_errors():
    cfg = load_config(None, ["model.preset=125m", "parallel.tp=2"])
    with pytest.raises(ConfigError, match="--plan-world 3 is not a multiple of parallel.tp"):
        P.plan(cfg, 3)
    with pytest.raises(ConfigError, match="--plan-gpu 'v100'"):
        P.plan(cfg, 2, "v100")


def _measure(cfg):
    """Of the real model on CPU, the second of two accumulated micro-batches (the first one's
    gradients alive, as in a step with accumulation): bytes its forward keeps for the
    backward, and the peak bytes alive during its forward and backward; and the model."""
    model = build_model(cfg.model, seed=0)
    apply_recompute(model, cfg.train.recompute)
    tokens = torch.randint(0, cfg.model.vocab_size, (cfg.train.micro_batch, cfg.data.seq_len + 1),
                           generator=torch.Generator().manual_seed(0))
    kept, peak = accumulated_microbatch_bytes(model, tokens)
    return kept, peak, model


@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
@pytest.mark.parametrize("extra", [[], ["model.n_kv_heads=2", "model.tie_embeddings=false", "model.n_layers=3"]],
                         ids=["tiny_example", "gqa_untied"])
def test_tiny_example_memory_matches_a_measured_cpu_step(recompute, extra):
    cfg = load_config(TINY, [f"train.recompute={recompute}", "train.micro_batch=8", *extra])
    p = P.plan(cfg, 1, gpu=None)
    mem = p["memory_bytes_per_rank"]
    layout = P.resolve_layout(cfg, 1)
    act = P.activation_bytes(cfg, layout, P.stage_parameters(cfg, layout)[0], cuda=False, bf16=False)
    kept, peak, model = _measure(cfg)
    assert abs(act["per_microbatch"] - kept) <= 0.02 * kept, (act, kept)
    grads = sum(q.grad.nbytes for q in model.parameters())
    assert abs(mem["activations"] + mem["grads"] - peak) <= 0.10 * peak, (mem, peak)
    # Weights, gradients and AdamW state: exact against the built model and optimizer.
    assert mem["weights"] == sum(q.nbytes for q in model.parameters()) and mem["grads"] == grads
    opt = build_optimizer(model, cfg.train, torch.device("cpu"))
    opt.step()
    moments = sum(v.nbytes for s in opt.state.values() for k, v in s.items() if k != "step")
    assert mem["optimizer"] == moments


@pytest.mark.slow
def test_triton_path_activations_match_the_kernels_through_the_interpreter():
    """On CUDA the Triton kernels save less than the CPU references; the planner's CUDA path
    is checked here by running those kernels through Triton's interpreter (fp32)."""
    code = """
import gc, json, torch
from kis_megatron import plan as P
from kis_megatron.config import load_config
from kis_megatron.parallel.parallelize import build_model
from kis_megatron.parallel.recompute import apply_recompute
from kis_megatron.training.memory import LiveTensorBytes
out = []
for rc in ("none", "full"):
    cfg = load_config(%r, ["train.micro_batch=2", "train.recompute=" + rc])
    lay = P.resolve_layout(cfg, 1)
    est = P.activation_bytes(cfg, lay, P.stage_parameters(cfg, lay)[0], cuda=True, bf16=False)
    model = build_model(cfg.model, seed=0)
    apply_recompute(model, rc)
    t = torch.randint(0, cfg.model.vocab_size, (2, cfg.data.seq_len + 1))
    with LiveTensorBytes() as mem:
        loss = model(t[:, :-1], t[:, 1:])
        gc.collect()
        out.append((est["per_microbatch"], mem.live))
print(json.dumps(out))
""" % TINY
    env = {**os.environ, "KIS_KERNELS": "triton", "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=300)
    if proc.returncode and "triton" in proc.stderr and "No module named" in proc.stderr:
        pytest.skip("triton is not installed")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for est, kept in json.loads(proc.stdout.splitlines()[-1]):
        assert abs(est - kept) <= 0.02 * kept, (est, kept)


PER_RANK = """
import gc, json, sys, torch, torch.distributed as dist
from kis_megatron.config import load_config
from kis_megatron.parallel.parallelize import build_model
from kis_megatron.parallel.tensor_parallel import apply_tp
from kis_megatron.training.memory import LiveTensorBytes
from kis_megatron.training.optim import build_optimizer

dist.init_process_group("gloo")
group = dist.new_group([0, 1])
out = {}
for tie in ("false", "true"):
    cfg = load_config(sys.argv[1], ["model.tie_embeddings=" + tie, "model.n_kv_heads=2"])
    model = build_model(cfg.model, seed=0, parallelize=lambda m: apply_tp(m, group))
    out["tp2_tie_" + tie] = sum(p.numel() for p in model.parameters())
for sp in (False, True):  # activations kept by one micro-batch at tp=2, with and without sp
    cfg = load_config(sys.argv[1], ["model.n_kv_heads=2", "train.micro_batch=8"])
    model = build_model(cfg.model, seed=0, parallelize=lambda m: apply_tp(m, group, sequence_parallel=sp))
    tokens = torch.randint(0, cfg.model.vocab_size, (8, cfg.data.seq_len + 1), generator=torch.Generator().manual_seed(0))
    with LiveTensorBytes() as mem:
        loss = model(tokens[:, :-1], tokens[:, 1:])
        gc.collect()
        out["kept_sp_" + str(sp)] = mem.live
model = build_model(cfg.model, seed=0)  # ZeRO-1 over dp = 2: the largest rank's state
opt = build_optimizer(model, cfg.train, torch.device("cpu"), zero_group=group)
for p in model.parameters():
    p.grad = torch.zeros_like(p)
opt.step()
out["zero1_elems"] = sum(v.numel() for s in opt.optim.state.values() for k, v in s.items() if k != "step") // 2
with open(sys.argv[2] + str(dist.get_rank()), "w") as f:  # not stdout: ranks' lines interleave
    json.dump(out, f)
dist.barrier()  # ZeRO's last broadcasts finish on every rank before the group goes
dist.destroy_process_group()
"""


@pytest.mark.slow
@pytest.mark.multiprocess
def test_parameters_per_rank_match_a_real_tp2_model_and_zero1_partition(tmp_path):
    script = tmp_path / "per_rank.py"
    script.write_text(PER_RANK)
    proc = torchrun(2, str(script), TINY, str(tmp_path / "rank"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads((tmp_path / f"rank{r}").read_text()) for r in range(2)]
    for tie in ("false", "true"):
        cfg = load_config(TINY, [f"model.tie_embeddings={tie}", "model.n_kv_heads=2", "parallel.tp=2"])
        p = P.plan(cfg, 2, gpu=None)
        assert all(r[f"tp2_tie_{tie}"] == p["params_per_rank"] for r in results)
    for sp in (False, True):  # activations under tensor (and sequence) parallelism, measured
        cfg = load_config(TINY, ["model.n_kv_heads=2", "train.micro_batch=8", "parallel.tp=2", f"parallel.sp={sp}"])
        layout = P.resolve_layout(cfg, 2)
        est = P.activation_bytes(cfg, layout, P.stage_parameters(cfg, layout)[0], cuda=False, bf16=False)
        for r in results:
            kept = r[f"kept_sp_{sp}"]
            assert abs(est["per_microbatch"] - kept) <= 0.02 * kept, (sp, est, kept)
    cfg = load_config(TINY, ["model.n_kv_heads=2", "model.tie_embeddings=true", "parallel.zero1=true",
                             "train.micro_batch=16"])
    p = P.plan(cfg, 2, gpu=None)
    assert max(r["zero1_elems"] for r in results) * 8 == p["memory_bytes_per_rank"]["optimizer"]


def test_a_cuda_run_is_warned_before_it_builds_the_model(monkeypatch):
    """The trainer calls warn_if_unfit with its device and world size before building."""
    import types

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: types.SimpleNamespace(total_memory=80 * 2**30))
    common = ["model.preset=7b", "data.seq_len=4096", "train.micro_batch=1", "train.global_batch=8"]
    cuda = torch.device("cuda", 0)  # only its type and properties are read
    msg = P.warn_if_unfit(load_config(None, common), 1, cuda)
    assert msg.startswith("warning: the plan of this layout needs") and "--plan" in msg
    assert P.warn_if_unfit(load_config(None, common + ["parallel.tp=8"]), 8, cuda) is None
    assert P.warn_if_unfit(load_config(None, common), 1, torch.device("cpu")) is None
