"""train.profile: a torch.profiler trace of the chosen steps lands in the run directory as a
complete Chrome trace, the run's losses are the same as without it, and a window past the
last step is refused with the key named."""

from __future__ import annotations

import json

import pytest

from _corpus import tiny_overrides
from kis_megatron.config import ConfigError, load_config
from kis_megatron.training.trainer import Trainer


def losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def test_trace_of_the_chosen_steps_and_unchanged_losses(world_corpus, tmp_path):
    plain, profiled = tmp_path / "plain", tmp_path / "profiled"
    Trainer(load_config(None, tiny_overrides(world_corpus, plain, **{"train.steps": 4}))).fit()
    Trainer(load_config(None, tiny_overrides(world_corpus, profiled, **{
        "train.steps": 4, "train.profile.start": 2, "train.profile.steps": 2}))).fit()
    files = sorted(p.name for p in (profiled / "profile").iterdir())
    assert files == ["trace_rank0_steps2-3.json"]  # no temporary left, no CUDA snapshot on CPU
    trace = json.loads((profiled / "profile" / files[0]).read_text())
    names = {e.get("name", "") for e in trace["traceEvents"]}
    assert any("aten::mm" in n or "aten::addmm" in n for n in names)
    assert losses(profiled) == losses(plain)
    assert not (plain / "profile").exists()


def test_window_past_the_last_step_is_refused(world_corpus, tmp_path):
    with pytest.raises(ConfigError, match="train.profile.start"):
        load_config(None, tiny_overrides(world_corpus, tmp_path / "r", **{"train.profile.start": 99}))
