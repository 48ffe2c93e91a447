"""Tensor parallelism on CPU (gloo, torchrun) reproduces the single-process run: losses,
grad norms and final weights, at tp=2 and tp=2 x dp=2; checkpoints reshard between tp=2
and tp=1 in both directions; a model that does not split is refused with a clear error."""

import json

import pytest

from _compare import assert_same_run, assert_same_weights, weights_at
from _corpus import tiny_overrides, torchrun
from kis_megatron.config import ConfigError, load_config
from kis_megatron.model.llama import ModelDims
from kis_megatron.parallel.tensor_parallel import check_tp
from kis_megatron.training.trainer import Trainer

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]  # every test starts gloo ranks

STEPS = 4
COMMON = {"train.steps": STEPS, "train.global_batch": 8, "train.micro_batch": 2,
          "checkpoint.interval": 2, "checkpoint.keep": 3}


@pytest.fixture(scope="module")
def single(world_corpus, tmp_path_factory):
    """The single-process reference run (4 steps, checkpoints at steps 2 and 4)."""
    run = tmp_path_factory.mktemp("tp") / "single"
    cfg = load_config(None, tiny_overrides(world_corpus, run, **COMMON))
    Trainer(cfg).fit()
    return run, cfg


@pytest.mark.parametrize("nproc", [2, 4], ids=["tp2", "tp2xdp2"])
def test_tp_matches_single_process(world_corpus, single, tmp_path, nproc):
    ref, cfg = single
    run = tmp_path / f"tp2_{nproc}procs"
    proc = torchrun(nproc, "-m", "kis_megatron.train",
                    *tiny_overrides(world_corpus, run, **COMMON, **{"parallel.tp": 2}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_run(ref, run, range(1, STEPS + 1))
    # Checkpoints hold full tensors: a plain model loads them and matches the reference.
    assert_same_weights(weights_at(ref, STEPS, cfg), weights_at(run, STEPS, cfg))
    info = json.loads((run / "run.json").read_text())
    assert info["model_params"] == json.loads((ref / "run.json").read_text())["model_params"]
    assert_saved_as_shards(run / "checkpoints" / "step_00000004")
    if nproc == 2:  # save at tp=2, resume at tp=1: the same steps 3 and 4 as never resharding
        resumed = tmp_path / "tp2_to_tp1"
        Trainer(load_config(None, tiny_overrides(world_corpus, resumed, **COMMON, **{
            "checkpoint.resume": str(run / "checkpoints" / "step_00000002")}))).fit()
        assert_same_run(ref, resumed, [3, 4])
        assert_same_weights(weights_at(ref, STEPS, cfg), weights_at(resumed, STEPS, cfg))


def assert_saved_as_shards(path):
    """DCP's metadata: a split weight (and its Adam moments) is one chunk per tensor-parallel
    shard, at its offset in the full tensor (each rank wrote its own, none gathered them); a
    replicated norm one chunk. Data-parallel replicas of a shard are written once."""
    from torch.distributed.checkpoint import FileSystemReader

    meta = FileSystemReader(str(path)).read_metadata().state_dict_metadata

    def chunks(key):
        return sorted((tuple(c.offsets), tuple(c.sizes)) for c in meta[key].chunks)

    assert tuple(meta["model.layers.0.attn.wq.weight"].size) == (32, 32)  # the full shape
    assert chunks("model.layers.0.attn.wq.weight") == [((0, 0), (16, 32)), ((16, 0), (16, 32))]
    assert chunks("model.layers.0.attn.wo.weight") == [((0, 0), (32, 16)), ((0, 16), (32, 16))]
    assert chunks("model.tok_embeddings.weight") == [((0, 0), (200, 32)), ((200, 0), (200, 32))]
    assert chunks("optim.state.layers.0.ffn.w_down.weight.exp_avg_sq") == [((0, 0), (32, 64)), ((0, 64), (32, 64))]
    assert chunks("model.layers.0.attn_norm.weight") == [((0,), (32,))]


def test_tp1_checkpoint_resumes_at_tp2(world_corpus, single, tmp_path):
    ref, cfg = single
    run = tmp_path / "tp1_to_tp2"
    proc = torchrun(2, "-m", "kis_megatron.train", *tiny_overrides(world_corpus, run, **COMMON, **{
        "parallel.tp": 2, "checkpoint.resume": str(ref / "checkpoints" / "step_00000002")}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_run(ref, run, [3, 4])
    assert_same_weights(weights_at(ref, STEPS, cfg), weights_at(run, STEPS, cfg))


LAYERS_SCRIPT = """
import torch
import torch.distributed as dist
from kis_megatron.config import ModelConfig
from kis_megatron.parallel.parallelize import build_model
from kis_megatron.parallel.tensor_parallel import apply_tp, clip_grad_norm_, full_of

dist.init_process_group("gloo")
group = dist.new_group([0, 1])
gen = torch.Generator().manual_seed(1)
tokens = torch.randint(0, 64, (2, 12), generator=gen)
targets = torch.randint(0, 64, (2, 12), generator=gen)
targets[0, :3] = -100
for fused, sp in ((True, False), (False, False), (True, True)):
    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48,
                      max_seq_len=16, tie_embeddings=True, kernels=fused)
    full = build_model(cfg, seed=3).double()
    tp = apply_tp(build_model(cfg, seed=3).double(), group, sequence_parallel=sp)
    assert tp.output.weight is tp.tok_embeddings.weight  # still tied, to the same shard
    assert tp.tok_embeddings.weight.shape == (32, 32) and tp.layers["0"].attn.wk.weight.shape == (8, 32)
    torch.testing.assert_close(tp(tokens), full(tokens), rtol=0, atol=1e-12)
    # An odd length: sequence parallelism pads it to a multiple of tp, invisibly.
    torch.testing.assert_close(tp(tokens[:, :11]), full(tokens[:, :11]), rtol=0, atol=1e-12)
    loss_tp, loss_full = tp(tokens, targets), full(tokens, targets)
    # The plain path's unsharded loss rounds logits to float32 (ops.linear_cross_entropy).
    tol = 1e-12 if fused else 1e-6
    torch.testing.assert_close(loss_tp, loss_full, rtol=tol, atol=tol, check_dtype=False)
    loss_tp.backward()
    loss_full.backward()
    full_params = dict(full.named_parameters())
    for name, p in tp.named_parameters():
        dim = getattr(p, "_tp_shard_dim", None)
        grad = p.grad if dim is None else full_of(p.grad, dim, group)
        torch.testing.assert_close(grad, full_params[name].grad, rtol=tol, atol=tol, msg=name)
    norm_tp = clip_grad_norm_(tp.parameters(), 0.01, group)
    norm_full = torch.nn.utils.clip_grad_norm_(full.parameters(), 0.01)
    torch.testing.assert_close(norm_tp, norm_full, rtol=tol, atol=0)
    assert norm_full > 0.01  # so the clipping below really scaled
    for name, p in tp.named_parameters():
        dim = getattr(p, "_tp_shard_dim", None)
        grad = p.grad if dim is None else full_of(p.grad, dim, group)
        torch.testing.assert_close(grad, full_params[name].grad, rtol=tol, atol=tol, msg=name)
dist.destroy_process_group()
print("layers ok")
"""


def test_layers_and_clipping_match_float64(tmp_path):
    """Tied embeddings, GQA head split, gathered logits, loss, every gradient (fused and
    plain loss paths, and sequence-parallel) and the clipped global norm equal the unsharded
    model's in float64."""
    script = tmp_path / "layers.py"
    script.write_text(LAYERS_SCRIPT)
    proc = torchrun(2, str(script))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("layers ok") == 2


def test_kv_heads_not_divisible_by_tp_is_refused(world_corpus, tmp_path):
    proc = torchrun(2, "-m", "kis_megatron.train", *tiny_overrides(world_corpus, tmp_path / "run", **{
        "parallel.tp": 2, "model.n_kv_heads": 1}))
    assert proc.returncode != 0
    assert "error: model.n_kv_heads=1 is not divisible by parallel.tp=2" in proc.stderr
    cfg = load_config(None, tiny_overrides(world_corpus, tmp_path / "x"))
    with pytest.raises(ConfigError, match="model.n_heads=4 is not divisible by parallel.tp=3"):
        check_tp(ModelDims.from_config(cfg.model), 3)
