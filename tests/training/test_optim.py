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
    assert lr_factor(0, TrainConfig(warmup_steps=0, schedule="constant")) == 1.0
