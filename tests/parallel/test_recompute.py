"""train.recompute: the gradients of every mode equal the plain run's (bit for bit in eager;
within float32 rounding under torch.compile), the recomputation really happens, memory falls
as designed, and evaluation (no autograd) recomputes nothing. The parallel layouts with
recomputation are in tests/parallel/test_layouts.py."""

import pytest
import torch
import torch.nn.functional as F

from kis_megatron.config import ModelConfig
from kis_megatron.parallel.parallelize import build_model, compile_blocks
from kis_megatron.parallel.recompute import apply_recompute
from kis_megatron.training.memory import LiveTensorBytes

CFG = ModelConfig(vocab_size=97, dim=48, n_layers=3, n_heads=6, n_kv_heads=2, max_seq_len=32)
GEN = torch.Generator().manual_seed(0)
TOKENS = torch.randint(0, 97, (2, 17), generator=GEN)
TARGETS = torch.randint(0, 97, (2, 17), generator=GEN)


def run(mode: str, compiled: bool = False, dtype=torch.float32):
    model = build_model(CFG, seed=3).to(dtype)
    apply_recompute(model, mode)
    if compiled:  # (no memory count: compiled code allocates below the dispatcher)
        compile_blocks(model)
        loss = model(TOKENS, TARGETS)
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters()}, None
    with LiveTensorBytes() as mem:
        loss = model(TOKENS, TARGETS)
        kept = mem.live
        loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}, kept


@pytest.fixture(scope="module")
def plain():
    return run("none")


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_gradients_equal_the_plain_run_bit_for_bit(plain, mode):
    loss, grads, kept = run(mode)
    ref_loss, ref_grads, ref_kept = plain
    assert torch.equal(loss, ref_loss)
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        assert torch.equal(g, ref_grads[name]), name
    assert kept < ref_kept  # something was freed: the log-sum-exp (selective), the blocks (full)
    if mode == "full":
        assert kept < 0.5 * ref_kept


def test_float64_gradients_equal_too():
    _, ref, _ = run("none", dtype=torch.float64)
    for mode in ("selective", "full"):
        _, grads, _ = run(mode, dtype=torch.float64)
        assert all(torch.equal(grads[n], ref[n]) for n in ref), mode


@pytest.mark.parametrize("mode", ["none", "selective", "full"])
def test_recomputation_happens_in_backward_only(monkeypatch, mode):
    calls = []
    real = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(torch.is_grad_enabled())
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    model = apply_recompute(build_model(CFG, seed=3), mode)
    loss = model(TOKENS, TARGETS)
    assert len(calls) == CFG.n_layers
    loss.backward()
    assert len(calls) == CFG.n_layers * (1 if mode == "none" else 2)
    calls.clear()
    with torch.no_grad():
        model(TOKENS)
    assert len(calls) == CFG.n_layers


def test_the_config_key_is_checked():
    from kis_megatron.config import ConfigError, load_config

    assert load_config(None, []).train.recompute == "none"
    with pytest.raises(ConfigError, match="train.recompute='most': must be one of none, selective, full"):
        load_config(None, ["train.recompute=most"])


def test_applying_twice_is_once_and_a_bad_mode_is_refused():
    model = build_model(CFG, seed=3)
    apply_recompute(model, "full")
    forward = model.layers["0"].forward
    apply_recompute(model, "full")
    assert model.layers["0"].forward is forward
    with pytest.raises(ValueError, match="train.recompute='most'"):
        apply_recompute(model, "most")
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in build_model(CFG, seed=3).named_parameters()]


@pytest.mark.slow
def test_with_torch_compile(plain):
    """Each block compiled with its checkpoint inside (train.compile): gradients match the
    eager plain run within float32 rounding (compilation reorders sums)."""
    from torch._dynamo.utils import counters

    _, ref, _ = plain
    for mode in ("selective", "full"):
        counters.clear()
        _, grads, _ = run(mode, compiled=True)
        assert counters["stats"]["unique_graphs"] >= 1  # the blocks really were compiled
        for name, g in grads.items():
            err = ((g - ref[name]).norm() / ref[name].norm()).item()
            assert err < 1e-5, (mode, name, err)
