import json
import subprocess
import sys

import pytest
import yaml

from _corpus import ROOT, write_base_config
from kis_megatron.config import ConfigError
from kis_megatron.sweep import load_sweep, print_launch, run_local, run_status


def write_sweep(tmp_path, corpus, axes=None, **extra):
    write_base_config(corpus, tmp_path / "base.yaml", **{"train.steps": 3})
    doc = {"base": "base.yaml", "out": str(tmp_path / "runs"),
           "axes": axes or {"model": [{"name": "d16", "overrides": {"model.dim": 16}},
                                      {"name": "d32", "overrides": {"model.dim": 32}}],
                            "infusion": [{"name": "r0", "overrides": {"infusion.ratio": 0.0}}]},
           **extra}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@pytest.mark.slow
def test_grid_runs_skip_finished_and_print_launch(world_corpus, tmp_path):
    sweep = load_sweep(write_sweep(tmp_path, world_corpus))
    assert [r.run_id for r in sweep.runs] == ["d16-r0", "d32-r0"]
    assert sweep.runs[1].params > sweep.runs[0].params
    outcome = run_local(sweep, jobs=2, progress=False, log=lambda s: None)
    assert all(v.startswith("finished") for v in outcome.values()), outcome
    for r in sweep.runs:
        assert run_status(r) == "finished"
        assert json.loads((r.run_dir / "run.json").read_text())["model_params"] == r.params
    again = run_local(sweep, jobs=1, progress=False, log=lambda s: None)
    assert all(v.startswith("skipped") for v in again.values())
    text = print_launch(load_sweep(write_sweep(tmp_path, world_corpus, axes={
        "model": [{"name": "d24", "overrides": {"model.dim": 24}}]})), "slurm")
    assert "sbatch --array=0-0" in text and "model.dim=24" in text and "checkpoint.resume=auto" in text


def _metrics_without_timing(run) -> list[dict]:
    rows = [json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "tflops_per_device")} for r in rows]


@pytest.mark.slow
def test_forked_runs_equal_runs_in_their_own_process(world_corpus, tmp_path, monkeypatch):
    # The sweep trains each run in a child of a fork server that imported the trainer once;
    # the same run started as its own process (KIS_SWEEP_FORK=0) logs the same numbers.
    axes = {"model": [{"name": "d16", "overrides": {"model.dim": 16, "log.progress": "lines"}}]}
    (tmp_path / "a").mkdir()
    forked = load_sweep(write_sweep(tmp_path / "a", world_corpus, axes=axes))
    assert run_local(forked, progress=False, log=lambda s: None)["d16"].startswith("finished")
    monkeypatch.setenv("KIS_SWEEP_FORK", "0")
    (tmp_path / "b").mkdir()
    own = load_sweep(write_sweep(tmp_path / "b", world_corpus, axes=axes))
    assert run_local(own, progress=False, log=lambda s: None)["d16"].startswith("finished")
    assert _metrics_without_timing(forked.runs[0]) == _metrics_without_timing(own.runs[0])
    assert "step 3/3" in (forked.runs[0].run_dir / "train.log").read_text()  # its output, in its log


@pytest.mark.slow
def test_interrupted_run_resumes(world_corpus, tmp_path):
    path = write_sweep(tmp_path, world_corpus, axes={"model": [{"name": "a", "overrides": {
        "checkpoint.interval": 1, "train.steps": 4}}]})
    sweep = load_sweep(path)
    run = sweep.runs[0]
    args = [sys.executable, "-m", "kis_megatron.train", "--config", str(sweep.base), *run.override_args(),
            "train.stop_after=2"]
    assert subprocess.run(args, cwd=ROOT, capture_output=True).returncode == 0
    assert run_status(run) == "partial"
    run_local(sweep, progress=False, log=lambda s: None)
    assert run_status(run) == "finished"
    assert "resumed from" in (run.run_dir / "train.log").read_text()


@pytest.mark.parametrize("axes, needle", [
    ({"model": [{"name": "x", "overrides": {"model.dimm": 3}}]}, "run x: unknown config key 'model.dimm'"),
    ({"model": []}, "non-empty list"),
    ({"model": [{"nam": "x"}]}, "each point is"),
    ({"model": [{"name": "x"}], "m2": [{"name": "x"}], "m3": [{"name": "y"}, {"name": "y"}]}, "share the run id"),
])
def test_bad_sweeps_are_clear_errors(world_corpus, tmp_path, axes, needle):
    with pytest.raises(ConfigError, match=needle):
        load_sweep(write_sweep(tmp_path, world_corpus, axes=axes))
