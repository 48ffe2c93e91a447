"""linear_cross_entropy (Triton through the interpreter, and the chunked reference)
against the full-logits float64 reference, including the vocabulary-parallel path."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import kis_kernels
from kis_kernels._triton import import_triton
from kis_kernels.ops import linear_cross_entropy as LCE  # the module (kis_kernels.linear_cross_entropy: the function)

TOL = 1e-5


def _problem(gen, n, h, v, ignore_index=-100, ignore_every=5):
    hidden = torch.randn(n, h, generator=gen)
    weight = torch.randn(v, h, generator=gen) / h**0.5 * 2.0
    target = torch.randint(0, v, (n,), generator=gen)
    target[::ignore_every] = ignore_index
    return hidden, weight, target


def _check_against_float64(hidden, weight, target, rel_err, *, grad_scale=1.0, **kw):
    h32, w32 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    loss32 = kis_kernels.linear_cross_entropy(h32, w32, target, **kw)
    (loss32 * grad_scale).backward()
    ignore = kw.get("ignore_index", -100)
    h64, w64 = hidden.double().requires_grad_(True), weight.double().requires_grad_(True)
    loss64 = kis_kernels.linear_cross_entropy_naive(h64, w64, target, ignore_index=ignore)
    (loss64 * grad_scale).backward()
    assert loss32.dim() == 0 and loss32.dtype == torch.float32
    assert rel_err(loss32, loss64) < TOL
    assert rel_err(h32.grad, h64.grad) < TOL
    assert rel_err(w32.grad, w64.grad) < TOL


@pytest.mark.parametrize(
    "n, h, v, chunk, max_block_v",
    [
        (37, 33, 257, None, None),  # default chunking, one vocab block of 512
        (37, 33, 1000, 8, None),  # 5 chunks, the last one partial
        (20, 96, 1000, 7, 128),  # vocab loop of 8 blocks of 128, the last one partial
    ],
)
def test_linear_cross_entropy_matches_float64(backend, n, h, v, chunk, max_block_v, rel_err, gen, monkeypatch):
    if max_block_v:
        monkeypatch.setattr(LCE, "_MAX_BLOCK_V", max_block_v)
    hidden, weight, target = _problem(gen, n, h, v)
    _check_against_float64(hidden, weight, target, rel_err, grad_scale=2.5, chunk_size=chunk)


def test_linear_cross_entropy_ignore_index_inside_vocab(backend, rel_err, gen):
    """A non-negative ignore_index is a real vocabulary id: those tokens must drop out."""
    hidden, weight, target = _problem(gen, 19, 33, 257, ignore_index=3, ignore_every=3)
    _check_against_float64(hidden, weight, target, rel_err, ignore_index=3, chunk_size=6)


def test_linear_cross_entropy_all_ignored(backend, gen):
    hidden, weight, _ = _problem(gen, 9, 33, 257)
    target = torch.full((9,), -100)
    h, w = hidden.requires_grad_(True), weight.requires_grad_(True)
    loss = kis_kernels.linear_cross_entropy(h, w, target, chunk_size=4)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.isfinite(h.grad).all() and h.grad.abs().max().item() == 0.0
    assert torch.isfinite(w.grad).all() and w.grad.abs().max().item() == 0.0


def test_linear_cross_entropy_batched_and_no_grad(backend, rel_err, gen):
    """(batch, seq, H) hidden with (batch, seq) targets; under no_grad only the loss."""
    hidden, weight, target = _problem(gen, 24, 33, 257)
    want = kis_kernels.linear_cross_entropy_naive(hidden.double(), weight.double(), target)
    h3 = hidden.view(4, 6, 33).clone().requires_grad_(True)
    loss = kis_kernels.linear_cross_entropy(h3, weight, target.view(4, 6))
    loss.backward()
    assert h3.grad.shape == (4, 6, 33)
    assert rel_err(loss, want) < TOL
    with torch.no_grad():
        loss_ng = kis_kernels.linear_cross_entropy(hidden, weight, target)
    assert loss_ng.grad_fn is None and rel_err(loss_ng, want) < TOL


def test_linear_cross_entropy_rejects_bad_targets(backend, gen):
    hidden, weight, target = _problem(gen, 6, 8, 11)
    target[2] = 11
    with pytest.raises(ValueError, match="outside the vocabulary"):
        kis_kernels.linear_cross_entropy(hidden, weight, target)
    with pytest.raises(ValueError, match="target has shape"):
        kis_kernels.linear_cross_entropy(hidden, weight, target[:5])
    with pytest.raises(ValueError, match="weight has shape"):
        kis_kernels.linear_cross_entropy(hidden, weight[:, :7], target)


def test_grad_weight_accumulates_in_fp32_across_bf16_chunks(gen):
    """The launcher's grad_weight sum (the Triton path's; CPU runs it in bf16 too): over 32
    chunks of bf16 gradients its error stays within one bf16 rounding (2^-8), where a bf16
    running sum (Liger's scheme, this code before) drifts to about 1%."""
    v, h, rows = 64, 32, 16
    chunks = [(torch.randn(rows, v, generator=gen).bfloat16(), torch.randn(rows, h, generator=gen).bfloat16())
              for _ in range(32)]
    want = sum(g.double().t() @ x.double() for g, x in chunks)
    acc = torch.zeros(v, h, dtype=torch.float32)
    bf16_sum = torch.zeros(v, h, dtype=torch.bfloat16)
    for g, x in chunks:
        LCE.accumulate_grad_weight(acc, g, x)
        bf16_sum.addmm_(g.t(), x)
    err = ((acc.double() - want).abs().max() / want.abs().max()).item()
    old = ((bf16_sum.double() - want).abs().max() / want.abs().max()).item()
    assert acc.dtype == torch.float32
    assert err < 2**-8 < old, (err, old)


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=pytest.mark.slow)], indirect=True)
def test_triton_backward_scales_in_place_and_refuses_a_second_pass(backend, gen):
    hidden, weight, target = _problem(gen, 12, 8, 50)
    h, w = hidden.requires_grad_(True), weight.requires_grad_(True)
    loss = kis_kernels.linear_cross_entropy(h, w, target, chunk_size=4)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def test_linear_cross_entropy_gradcheck_chunked_reference(gen):
    """The reference's hand-written chunked backward, checked by finite differences."""
    hidden = torch.randn(5, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(7, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 7, (5,), generator=gen)
    target[1] = -100

    def f(h, w):
        return kis_kernels.linear_cross_entropy_reference(h, w, target, chunk_size=3)

    assert torch.autograd.gradcheck(f, (hidden, weight))


def _vocab_parallel_worker(rank, world, init_file, backends, hidden, weight, target, out):
    # A fresh process: TRITON_INTERPRET=1 is inherited from the parent's environment.
    torch.set_num_threads(1)  # two ranks on a small shared machine: no thread oversubscription
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        shard = weight.shape[0] // world
        for backend in backends:
            os.environ["KIS_KERNELS"] = backend
            h = hidden.clone().requires_grad_(True)
            w = weight[rank * shard : (rank + 1) * shard].clone().requires_grad_(True)
            loss = kis_kernels.linear_cross_entropy(h, w, target, group=dist.group.WORLD, chunk_size=5)
            (loss * 1.5).backward()
            grad_hidden = h.grad.clone()
            dist.all_reduce(grad_hidden)  # the caller's job, as documented
            torch.save(
                {"loss": loss.detach(), "grad_hidden": grad_hidden, "grad_weight": w.grad},
                os.path.join(out, f"{backend}_{rank}.pt"),
            )
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.multiprocess
def test_linear_cross_entropy_vocab_parallel_two_ranks(tmp_path, rel_err, gen):
    """2 gloo ranks, each holding half of a 514-row vocabulary (shards of 257 rows),
    reproduce the single-process float64 loss and gradients, on both backends."""
    backends = ["triton", "torch"] if import_triton() is not None else ["torch"]
    hidden, weight, target = _problem(gen, 13, 33, 514)
    target[4] = 300  # make sure both shards own some targets
    target[5] = 10
    world = 2
    mp.spawn(
        _vocab_parallel_worker,
        args=(world, str(tmp_path / "init"), backends, hidden, weight, target, str(tmp_path)),
        nprocs=world,
    )
    h64, w64 = hidden.double().requires_grad_(True), weight.double().requires_grad_(True)
    loss64 = kis_kernels.linear_cross_entropy_naive(h64, w64, target)
    (loss64 * 1.5).backward()
    shard = weight.shape[0] // world
    for backend in backends:
        for rank in range(world):
            got = torch.load(tmp_path / f"{backend}_{rank}.pt")
            where = f"{backend} rank {rank}"
            assert rel_err(got["loss"], loss64) < TOL, where
            assert rel_err(got["grad_hidden"], h64.grad) < TOL, where
            assert rel_err(got["grad_weight"], w64.grad[rank * shard : (rank + 1) * shard]) < TOL, where
