"""The run directory's contract (kis_megatron/run_dir.py): paths, status and resume policy."""

import json

import pytest

from kis_megatron.config import ConfigError, load_config, save_config
from kis_megatron.run_dir import RunDir, find_run_dirs_below, is_run_dir


def test_a_runs_relative_paths_resolve_against_where_it_was_launched(tmp_path):
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    save_config(load_config(None, ["data.train=shards/general", "data.tokenizer=/abs/tok.model",
                                   "eval.probes.domain=world/probes.jsonl",
                                   "infusion.domains=[{name: a, path: shards/a, ratio: 0.1}]",
                                   "model.init_from=hf:hf/llama"]), run / "config.yaml")
    cfg = RunDir(run).load_config()  # no run.json: the paths stay as written (the current directory)
    assert cfg.data.train == "shards/general"
    (run / "run.json").write_text(json.dumps({"launch_dir": "/work/study"}))
    cfg = RunDir(run).load_config()
    assert cfg.data.train == "/work/study/shards/general" and cfg.data.tokenizer == "/abs/tok.model"
    assert cfg.eval.probes == {"domain": "/work/study/world/probes.jsonl"}
    assert cfg.infusion.domains[0].path == "/work/study/shards/a" and cfg.data.valid is None
    assert cfg.model.init_from == "hf:/work/study/hf/llama"
    with pytest.raises(ConfigError, match="not a run directory"):
        RunDir(tmp_path).load_config()


def test_progress_follows_the_files_a_run_leaves(tmp_path):
    rd = RunDir(tmp_path / "r")
    assert rd.progress() == "new" and rd.info() == {} and not is_run_dir(rd.path)
    rd.path.mkdir()
    rd.metrics_path.write_text("")
    assert rd.progress() == "interrupted"
    (rd.checkpoints_dir / "step_00000002").mkdir(parents=True)
    assert rd.progress() == "interrupted"  # no COMPLETE: not a checkpoint yet
    (rd.checkpoints_dir / "step_00000002" / "COMPLETE").write_text("2\n")
    (rd.checkpoints_dir / ".tmp-step_00000004").mkdir()
    assert rd.progress() == "partial" and [p.name for p in rd.complete_checkpoints()] == ["step_00000002"]
    rd.write_info({"status": "failed", "error": "boom"})
    assert rd.progress() == "failed" and is_run_dir(rd.path)
    rd.write_info({"status": "finished"})
    assert rd.progress() == "finished" and find_run_dirs_below(tmp_path) == [str(rd.path)]
    rd.info_path.write_text("{cut")
    assert rd.info() == {} and rd.progress() == "partial"
    with pytest.raises(ValueError, match="cannot read"):
        rd.read_info(ValueError)


def test_resume_policy(tmp_path):
    rd = RunDir(tmp_path / "r")
    cfg = load_config(None, [f"log.dir={rd.path}"])
    assert rd.resume_decision(cfg, None) == (None, False)  # a new run
    rd.write_config(cfg)
    rd.metrics_path.write_text("")
    with pytest.raises(ConfigError, match="already holds a run"):
        rd.resume_decision(cfg, None)
    auto = load_config(None, [f"log.dir={rd.path}", "checkpoint.resume=auto"])
    assert rd.resume_decision(auto, None) == (None, True)  # started, no checkpoint: afresh
    rd.write_info({"status": "finished"})
    with pytest.raises(ConfigError, match="finished run and no checkpoint"):
        rd.resume_decision(auto, None)
    ckpt = rd.checkpoints_dir / "step_00000002"
    assert rd.resume_decision(auto, ckpt) == (ckpt, False)
    longer = load_config(None, [f"log.dir={rd.path}", "checkpoint.resume=auto", "train.steps=999"])
    assert rd.resume_decision(longer, ckpt) == (ckpt, False)  # train.steps is resumable
    other = load_config(None, [f"log.dir={rd.path}", "checkpoint.resume=auto", "train.lr=0.5"])
    with pytest.raises(ConfigError, match=r"train\.lr=0\.5 differs"):
        rd.resume_decision(other, ckpt)


def test_resume_policy_refuses_what_no_run_of_this_config_wrote(tmp_path):
    rd = RunDir(tmp_path / "r")
    cfg = load_config(None, [f"log.dir={rd.path}", "checkpoint.resume=auto"])
    rd.path.mkdir()
    (rd.path / "config.yaml").write_text("train: {steps: 3}\n")  # a hand-written config
    with pytest.raises(ConfigError, match="holds config.yaml but no run that kis-train started"):
        rd.resume_decision(cfg, None)
    rd.write_config(load_config(None, [f"log.dir={rd.path}", "train.seed=5"]))
    rd.write_info({"status": "interrupted"})  # another run's attempt, without a checkpoint
    with pytest.raises(ConfigError, match="train.seed=1234 differs from train.seed=5"):
        rd.resume_decision(cfg, None)
    ckpt = rd.checkpoints_dir / "step_00000010"
    short = load_config(None, [f"log.dir={rd.path}", "checkpoint.resume=auto", "train.seed=5", "train.steps=9"])
    with pytest.raises(ConfigError, match="train.steps=9 is below step 10"):
        rd.resume_decision(short, ckpt)
    rd.config_path.unlink()
    with pytest.raises(ConfigError, match="config.yaml is missing and the checkpoint holds no copy"):
        rd.resume_decision(short, ckpt)


def test_one_writer_per_run_directory(tmp_path):
    import json
    import os

    rd = RunDir(tmp_path / "r")
    lock = rd.lock()
    assert rd.path.is_dir() and not (rd.path / ".lock").exists()  # named only once the run writes
    lock.announce()
    assert json.loads((rd.path / ".lock").read_text())["pid"] == os.getpid()
    with pytest.raises(ConfigError, match=f"in use by another kis-train \\(pid {os.getpid()} on host"):
        rd.lock()
    lock.release()
    assert not (rd.path / ".lock").exists()
    rd.lock().release()  # free again
    fresh = RunDir(tmp_path / "new" / "deeper")
    fresh.lock().release()
    assert not fresh.path.exists()  # created by the lock, nothing written: removed again
