import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from kis_megatron.config import ModelConfig, config_from_dict
from kis_megatron.model.llama import Transformer, llama_ffn_dim
from kis_megatron.parallel.parallelize import build_model


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=97, dim=48, n_layers=2, n_heads=6, n_kv_heads=2, max_seq_len=32)
    base.update(kw)
    return ModelConfig(**base)


def reference_forward(model: Transformer, tokens: torch.Tensor, sd: dict | None = None) -> torch.Tensor:
    """An independent float64 re-implementation of the forward pass from the raw weights
    (``sd``, default: the model's, in float64): explicit RMSNorm, complex-number RoPE,
    repeated KV heads and a masked softmax."""
    if sd is None:
        sd = {k: v.double() for k, v in model.state_dict().items()}
    d, eps = model.dims, model.cfg.norm_eps
    B, T = tokens.shape

    def norm(x, w):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w

    half = d.head_dim // 2
    inv = 1.0 / (model.cfg.rope_theta ** (torch.arange(0, d.head_dim, 2, dtype=torch.float64) / d.head_dim))
    rot = torch.polar(torch.ones(T, half, dtype=torch.float64), torch.outer(torch.arange(T, dtype=torch.float64), inv))

    def rope(x):  # (B, T, H, hd), "rotate half": pair element i with i + hd/2
        z = torch.complex(x[..., :half], x[..., half:]) * rot[None, :, None, :]
        return torch.cat([z.real, z.imag], -1)

    h = sd["tok_embeddings.weight"][tokens]
    mask = torch.full((T, T), float("-inf"), dtype=torch.float64).triu(1)
    for i in range(d.n_layers):
        p = f"layers.{i}."
        x = norm(h, sd[p + "attn_norm.weight"])
        q = rope((x @ sd[p + "attn.wq.weight"].T).view(B, T, d.n_heads, d.head_dim))
        k = rope((x @ sd[p + "attn.wk.weight"].T).view(B, T, d.n_kv_heads, d.head_dim))
        v = (x @ sd[p + "attn.wv.weight"].T).view(B, T, d.n_kv_heads, d.head_dim)
        rep = d.n_heads // d.n_kv_heads
        k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
        att = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d.head_dim) + mask
        y = torch.einsum("bhqk,bkhd->bqhd", att.softmax(-1), v).reshape(B, T, -1)
        h = h + y @ sd[p + "attn.wo.weight"].T
        x = norm(h, sd[p + "ffn_norm.weight"])
        g, u = x @ sd[p + "ffn.w_gate.weight"].T, x @ sd[p + "ffn.w_up.weight"].T
        h = h + (F.silu(g) * u) @ sd[p + "ffn.w_down.weight"].T
    h = norm(h, sd["norm.weight"])
    w_out = sd["tok_embeddings.weight"] if model.cfg.tie_embeddings else sd["output.weight"]
    return h @ w_out.T


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("kv", [6, 2, 1])
def test_forward_matches_float64_reference(tie, kv):
    model = build_model(tiny(n_kv_heads=kv, tie_embeddings=tie), seed=3)
    tokens = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(0))
    ref = reference_forward(model, tokens)
    logits = model(tokens)
    torch.testing.assert_close(logits.double(), ref, rtol=1e-4, atol=1e-5)
    targets = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(1))
    loss = model(tokens, targets)
    ref_loss = F.cross_entropy(ref.reshape(-1, 97), targets.reshape(-1))
    assert abs(loss.item() - ref_loss.item()) < 1e-5


def test_causal_future_tokens_do_not_change_the_past():
    model = build_model(tiny(), seed=0)
    a = torch.randint(0, 97, (1, 16))
    b = a.clone()
    b[0, 10:] = (b[0, 10:] + 5) % 97
    torch.testing.assert_close(model(a)[:, :10], model(b)[:, :10])
    assert not torch.allclose(model(a)[:, 10:], model(b)[:, 10:])


def test_same_seed_same_weights_and_tied_head():
    a, b = build_model(tiny(), seed=7), build_model(tiny(), seed=7)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n
    c = build_model(tiny(), seed=8)
    assert not torch.equal(a.layers["0"].attn.wq.weight, c.layers["0"].attn.wq.weight)
    t = build_model(tiny(tie_embeddings=True), seed=0)
    assert t.output.weight is t.tok_embeddings.weight


def test_param_count_matches_closed_form():
    cfg = tiny(n_kv_heads=2)
    m = Transformer(cfg)
    d, hd, f = 48, 8, llama_ffn_dim(48)
    per_layer = d * 6 * hd + 2 * d * 2 * hd + 6 * hd * d + 3 * d * f + 2 * d
    expected = 97 * d * 2 + 2 * per_layer + d
    assert m.num_params() == expected
    assert m.num_params(non_embedding=True) == expected - 2 * 97 * d
    # 6 FLOPs per matmul weight per token (embedding lookup excluded) + attention
    matmul = expected - 97 * d - (2 * 2 * d + d)
    assert m.flops_per_token(32) == 6 * matmul + 12 * 2 * d * 32


@pytest.mark.parametrize("name, low, high", [
    ("tiny", 0.05e6, 0.2e6), ("125m", 110e6, 150e6), ("350m", 320e6, 400e6),
    ("760m", 700e6, 850e6), ("1.3b", 1.2e9, 1.45e9), ("3b", 3.0e9, 3.6e9), ("7b", 6.5e9, 7.0e9),
])
def test_presets_have_their_nominal_size(name, low, high):
    cfg = config_from_dict({"model": {"preset": name}}).model
    with torch.device("meta"):
        n = Transformer(cfg).num_params()
    assert low <= n <= high, n


def _loss_and_grads(model: Transformer, x: torch.Tensor, y: torch.Tensor) -> tuple[float, dict]:
    loss = model(x, y)
    loss.backward()
    return loss.item(), {n: p.grad for n, p in model.named_parameters()}


def _float64_loss_and_grads(model: Transformer, x: torch.Tensor, y: torch.Tensor) -> tuple[float, dict]:
    """The loss and parameter gradients of ``reference_forward`` in float64 (autograd through
    the independent re-implementation, not through the model's ops)."""
    leaves = {n: p.detach().double().requires_grad_(True) for n, p in model.named_parameters()}
    logits = reference_forward(model, x, sd=leaves)
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
    loss.backward()
    return loss.item(), {n: t.grad for n, t in leaves.items()}


def _assert_matches_float64(got: tuple[float, dict], ref: tuple[float, dict]) -> None:
    (loss, grads), (loss64, grads64) = got, ref
    assert abs(loss - loss64) < 1e-5 * loss64, (loss, loss64)
    for name, g64 in grads64.items():
        err = (grads[name].double() - g64).abs().max().item() / g64.abs().max().item()
        assert err < 1e-4, (name, err)


@pytest.mark.parametrize("kernels", [True, False], ids=["fused", "plain"])
def test_loss_and_gradients_match_float64(kernels):
    """Both paths (the fused ops of ``model.kernels`` and plain PyTorch) against autograd
    through the float64 re-implementation: loss and every parameter's gradient."""
    model = build_model(tiny(kernels=kernels), seed=1)
    gen = torch.Generator().manual_seed(4)
    x, y = torch.randint(0, 97, (2, 9), generator=gen), torch.randint(0, 97, (2, 9), generator=gen)
    _assert_matches_float64(_loss_and_grads(model, x, y), _float64_loss_and_grads(model, x, y))


_TRITON_CHILD = """
import sys, torch
from kis_kernels._triton import interpreter_active
from kis_megatron.config import ModelConfig
from kis_megatron.parallel.parallelize import build_model
assert interpreter_active(), "triton is not interpreted"
cfg = ModelConfig(**eval(sys.argv[1]))
model = build_model(cfg, seed=1)
x, y = torch.load(sys.argv[2])
loss = model(x, y)
loss.backward()
torch.save((loss.item(), {n: p.grad for n, p in model.named_parameters()}), sys.argv[3])
"""


@pytest.mark.slow
def test_the_triton_kernels_in_the_model_match_float64(tmp_path):
    """The model's fused path with the Triton kernels (through Triton's interpreter, in a fresh
    process: TRITON_INTERPRET must be set before triton is imported) against float64."""
    pytest.importorskip("triton")
    cfg = tiny()
    gen = torch.Generator().manual_seed(4)
    x, y = torch.randint(0, 97, (2, 9), generator=gen), torch.randint(0, 97, (2, 9), generator=gen)
    torch.save((x, y), tmp_path / "batch.pt")
    env = {**os.environ, "TRITON_INTERPRET": "1", "KIS_KERNELS": "triton"}
    proc = subprocess.run([sys.executable, "-c", _TRITON_CHILD, repr(cfg.__dict__), str(tmp_path / "batch.pt"),
                           str(tmp_path / "out.pt")], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(tmp_path / "out.pt")
    _assert_matches_float64(got, _float64_loss_and_grads(build_model(cfg, seed=1), x, y))


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("tie", [True, False])
def test_bf16_autocast_trains(fused, tie):
    """Under autocast (what CUDA training uses by default) the loss stays close to fp32 and
    every parameter gets a finite fp32 gradient: the LM head's fused loss must not mix dtypes."""
    cfg = tiny(tie_embeddings=tie, kernels=fused)
    model = build_model(cfg, seed=2)
    x = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(0))
    ref = model(x[:, :-1], x[:, 1:]).item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x[:, :-1], x[:, 1:])
    loss.backward()
    assert loss.dtype == torch.float32 and abs(loss.item() - ref) < 2e-2 * ref
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("tied", [False, True])
def test_a_pipeline_stage_allocates_only_its_part_with_the_full_models_values(tied):
    from kis_megatron.config import ParallelConfig
    from kis_megatron.parallel.pipeline import PipelineLayout

    cfg = ModelConfig(vocab_size=96, dim=32, n_layers=5, n_heads=4, n_kv_heads=2, max_seq_len=16,
                      tie_embeddings=tied)
    full = dict(build_model(cfg, seed=7).named_parameters(remove_duplicate=False))
    seen = set()
    for rank in range(2):
        layout = PipelineLayout(cfg.n_layers, ParallelConfig(pp=2, vpp=2), rank)
        stage = build_model(cfg, seed=7, parallelize=layout.prune)
        owned = {f"layers.{i}." for i in layout.owned_layers()}
        for name, p in stage.named_parameters():
            assert p.device.type == "cpu" and name in full
            assert name.startswith(tuple(owned) + ("tok_embeddings", "norm", "output")), name
            assert torch.equal(p, full[name]), name
            seen.add(name)
        assert torch.equal(stage.rope_cos, build_model(cfg, seed=7).rope_cos)
    assert seen == set(full)  # every parameter lives on some stage
