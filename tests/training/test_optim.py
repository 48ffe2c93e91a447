import math

import pytest
import torch

from kis_megatron.config import TrainConfig
from kis_megatron.training.optim import build_optimizer, build_scheduler, lr_factor


def lrs(cfg):
    p = torch.nn.Parameter(torch.zeros(2, 2))
    opt = torch.optim.SGD([p], lr=cfg.lr)
    sched = build_scheduler(opt, cfg)
    out = []
    for _ in range(cfg.steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_cosine_warmup_then_decay_to_min_lr():
    cfg = TrainConfig(steps=110, lr=1.0, min_lr=0.1, warmup_steps=10, schedule="cosine")
    lr = lrs(cfg)
    assert lr[:10] == pytest.approx([(i + 1) / 10 for i in range(10)])
    assert lr[10] == pytest.approx(1.0) and lr[-1] == pytest.approx(0.1)
    mid = 10 + 99 // 2
    assert lr[mid] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (mid - 10) / 99)))
    assert all(a >= b for a, b in zip(lr[10:], lr[11:]))


def test_wsd_is_flat_then_linear_decay():
    cfg = TrainConfig(steps=100, lr=2.0, min_lr=0.2, warmup_steps=0, schedule="wsd", decay_frac=0.2)
    lr = lrs(cfg)
    assert lr[:80] == pytest.approx([2.0] * 80)
    assert lr[-1] == pytest.approx(0.2)
    diffs = [a - b for a, b in zip(lr[80:], lr[81:])]
    assert diffs == pytest.approx([diffs[0]] * len(diffs))


def test_no_weight_decay_on_norms():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.LayerNorm(3))
    opt = build_optimizer(model, TrainConfig(weight_decay=0.1), torch.device("cpu"))
    decay = {id(p) for p in opt.param_groups[0]["params"]}
    assert id(model[0].weight) in decay and id(model[1].weight) not in decay
    assert opt.param_groups[1]["weight_decay"] == 0.0


def test_constant_schedule_holds_the_lr_after_warmup():
    cfg = TrainConfig(steps=30, lr=0.5, min_lr=0.05, warmup_steps=5, schedule="constant")
    assert lrs(cfg) == pytest.approx([0.5 * (i + 1) / 5 for i in range(5)] + [0.5] * 25)
    assert lr_factor(0, TrainConfig(warmup_steps=0, schedule="constant")) == 1.0


def _fake_apex(monkeypatch, extension_loads: bool):
    """A fake ``apex`` package: ``apex.optimizers.FusedAdam`` always imports; its CUDA
    extension ``amp_C`` imports only when ``extension_loads`` (a pure-Python apex install
    has none, and FusedAdam then raises when constructed)."""
    import sys
    import types

    from kis_megatron.training import optim

    class FusedAdam:
        def __init__(self, *args, **kwargs):
            if not extension_loads:
                raise RuntimeError("apex.optimizers.FusedAdam requires cuda extensions")

    apex = types.ModuleType("apex")
    apex.optimizers = types.ModuleType("apex.optimizers")
    apex.optimizers.FusedAdam = FusedAdam
    apex.multi_tensor_apply = types.ModuleType("apex.multi_tensor_apply")
    apex.multi_tensor_apply.multi_tensor_applier = types.SimpleNamespace(available=extension_loads)
    monkeypatch.setitem(sys.modules, "apex", apex)
    monkeypatch.setitem(sys.modules, "apex.optimizers", apex.optimizers)
    monkeypatch.setitem(sys.modules, "apex.multi_tensor_apply", apex.multi_tensor_apply)
    # None in sys.modules makes `import amp_C` raise ImportError, as a missing extension does.
    monkeypatch.setitem(sys.modules, "amp_C", types.ModuleType("amp_C") if extension_loads else None)
    optim.apex_fused_adam.cache_clear()
    optim._log_choice.cache_clear()
    return FusedAdam


@pytest.mark.parametrize("extension_loads", [False, True])
def test_apex_fused_adam_only_when_its_cuda_extension_loads(monkeypatch, caplog, extension_loads):
    from kis_megatron.training import optim

    fused_adam = _fake_apex(monkeypatch, extension_loads)
    cuda = torch.device("cuda")  # _adamw only chooses; nothing is allocated on the device
    with caplog.at_level("INFO", logger="kis_megatron.training.optim"):
        for _ in range(3):  # one message however many optimizers are built
            cls, kw = optim._adamw(TrainConfig(), cuda)
    optim.apex_fused_adam.cache_clear()
    optim._log_choice.cache_clear()
    messages = [r for r in caplog.records if r.name == "kis_megatron.training.optim"]
    assert len(messages) == 1, [r.getMessage() for r in messages]
    if extension_loads:
        assert cls is fused_adam and kw["adam_w_mode"] is True
        assert messages[0].levelname == "INFO"
    else:
        assert cls is torch.optim.AdamW and kw["fused"] is True
        assert messages[0].levelname == "WARNING"
        assert "CUDA extension did not load" in messages[0].getMessage()
    assert optim._adamw(TrainConfig(), torch.device("cpu"))[0] is torch.optim.AdamW
