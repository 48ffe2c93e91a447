"""End-to-end trainer behaviour on CPU: learning, exact resume, kill-safety, clear errors."""

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from _corpus import ROOT, tiny_overrides
from kis_megatron.config import load_config
from kis_megatron.training.trainer import Trainer
from kis_megatron.training.checkpoint import CheckpointManager


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(run_dir) if "loss" in r}


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kis_megatron.train", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)


@pytest.mark.slow
def test_validation_loss_falls_well_below_its_start(world_corpus, tmp_path):
    cfg = load_config(None, tiny_overrides(world_corpus, tmp_path / "run", **{
        "train.steps": 40, "train.lr": 0.01, "checkpoint.save_final": False}))
    trainer = Trainer(cfg)
    start = trainer.validation_loss()
    final = trainer.fit()
    assert final["val_loss"] < 0.75 * start, (start, final["val_loss"])
    rows = metrics(tmp_path / "run")
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 41))
    for key in ("loss", "lr", "grad_norm", "tokens_total", "tokens_domain", "tokens_per_s"):
        assert key in rows[0], key
    assert rows[-2]["tokens_total"] == 40 * 8 * 32 and rows[-2]["tokens_domain"] == 0
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["status"] == "finished" and info["model_params"] == trainer.model.num_params()
    r = rows[0]  # achieved model FLOP/s = FLOPs per token x tokens per second (no MFU on CPU)
    assert abs(r["tflops_per_device"] - info["flops_per_token"] * r["tokens_per_s"] / 1e12) < 1e-9
    assert "mfu" not in r
    resolved = load_config(tmp_path / "run" / "config.yaml")
    assert resolved == cfg


@pytest.mark.slow
def test_resume_is_bit_identical(world_corpus, tmp_path):
    common = {"train.steps": 8, "checkpoint.interval": 4, "infusion.domain":
              world_corpus["shards"]["domain"], "infusion.ratio": 0.25}
    straight = tmp_path / "straight"
    Trainer(load_config(None, tiny_overrides(world_corpus, straight, **common))).fit()
    split = tmp_path / "split"
    first = Trainer(load_config(None, tiny_overrides(world_corpus, split, **common, **{"train.stop_after": 4})))
    first.fit()
    assert json.loads((split / "run.json").read_text())["status"] == "stopped"
    second = Trainer(load_config(None, tiny_overrides(world_corpus, split, **common,
                                                      **{"checkpoint.resume": "auto"})))
    assert second.step == 4
    second.fit()
    a, b = train_losses(straight), train_losses(split)
    assert sorted(b) == list(range(1, 9))  # the resumed run's log has each step once
    assert [a[s] for s in range(5, 9)] == [b[s] for s in range(5, 9)]
    assert [r["tokens_domain"] for r in metrics(straight) if "loss" in r] == \
        [r["tokens_domain"] for r in metrics(split) if "loss" in r]
    ma, mb = (CheckpointManager(d / "checkpoints") for d in (straight, split))
    wa = torch.load(ma.latest() / "extra_rank0.pt", weights_only=False)
    wb = torch.load(mb.latest() / "extra_rank0.pt", weights_only=False)
    assert wa["data"] == wb["data"] and wa["scheduler"] == wb["scheduler"]


KILLER = textwrap.dedent("""
    import os, signal, sys
    import kis_megatron.training.checkpoint as ck
    real_save = ck.dcp.save
    calls = []
    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)  # the shard files are on disk, COMPLETE is not
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
    ck.dcp.save = save_then_die
    from kis_megatron.train import main
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.slow
def test_sigkill_while_checkpointing_leaves_previous_loadable(world_corpus, tmp_path):
    run = tmp_path / "run"
    common = {"train.steps": 6, "checkpoint.interval": 2}
    proc = subprocess.run([sys.executable, "-c", KILLER, *tiny_overrides(world_corpus, run, **common)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    ckpts = CheckpointManager(run / "checkpoints")
    assert ckpts.latest().name == "step_00000002"  # step 4's save was cut short
    assert any(p.name.startswith(".tmp-step_00000004") for p in (run / "checkpoints").iterdir())
    resumed = Trainer(load_config(None, tiny_overrides(world_corpus, run, **common,
                                                       **{"checkpoint.resume": "auto"})))
    assert resumed.step == 2
    resumed.fit()
    straight = tmp_path / "straight"
    Trainer(load_config(None, tiny_overrides(world_corpus, straight, **common))).fit()
    assert train_losses(run) == train_losses(straight)
    assert not any(p.name.startswith(".tmp-") for p in (run / "checkpoints").iterdir())
    assert len(ckpts.complete_checkpoints()) == 2  # keep=2


@pytest.mark.parametrize("extra, needle", [
    ({"train.stepz": 3}, "train.stepz"),
    ({"train.steps": "many"}, "train.steps"),
    ({"data.train": "/nonexistent/shard"}, "/nonexistent/shard"),
    ({"model.vocab_size": 300}, "vocab"),
])
def test_bad_input_is_one_clear_error(world_corpus, tmp_path, extra, needle):
    proc = run_cli(*tiny_overrides(world_corpus, tmp_path / "run", **extra))
    assert proc.returncode == 2
    assert proc.stderr.startswith("error:") and needle in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_empty_corpus_is_refused_by_preprocessing(world_corpus, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": ""}\n')
    proc = subprocess.run([sys.executable, str(ROOT / "tools/preprocess_data.py"), "--input", str(empty),
                           "--output-prefix", str(tmp_path / "out"), "--tokenizer-model",
                           world_corpus["tokenizer"]], capture_output=True, text=True)
    assert proc.returncode == 2 and "empty corpus" in proc.stderr and "Traceback" not in proc.stderr
    assert not list(tmp_path.glob("out*"))


@pytest.mark.slow
def test_existing_run_dir_is_not_overwritten(world_corpus, tmp_path):
    run = tmp_path / "run"
    assert run_cli(*tiny_overrides(world_corpus, run, **{"train.steps": 2})).returncode == 0
    before = (run / "metrics.jsonl").read_text()
    proc = run_cli(*tiny_overrides(world_corpus, run, **{"train.steps": 2}))
    assert proc.returncode == 2 and "checkpoint.resume=auto" in proc.stderr
    assert (run / "metrics.jsonl").read_text() == before


@pytest.mark.slow
def test_a_checkpoint_of_another_model_is_one_clear_error(world_corpus, tmp_path):
    first = tmp_path / "two_layers"
    Trainer(load_config(None, tiny_overrides(world_corpus, first, **{"train.steps": 1}))).fit()
    proc = run_cli(*tiny_overrides(world_corpus, tmp_path / "three_layers", **{
        "model.n_layers": 3, "checkpoint.resume": str(first / "checkpoints" / "step_00000001")}))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    # The settings the checkpoint holds name the key; the tensors themselves are checked too
    # (tests/test_fault_catalogue.py: a checkpoint of another model names the first tensor).
    assert "model.n_layers=3 differs from model.n_layers=2" in proc.stderr


def test_shards_made_with_another_tokenizer_are_refused(world_corpus, tmp_path):
    text = tmp_path / "other.txt"
    text.write_text("".join(f"line {i} of another corpus with other words\n" for i in range(300)))
    other = subprocess.run([sys.executable, str(ROOT / "tools/train_tokenizer.py"), "--input", str(text),
                            "--model-prefix", str(tmp_path / "other"), "--vocab-size", "300"],
                           capture_output=True, text=True)
    assert other.returncode == 0, other.stderr
    proc = run_cli(*tiny_overrides(world_corpus, tmp_path / "run",
                                   **{"data.tokenizer": str(tmp_path / "other.model")}))
    assert proc.returncode == 2 and "tokenized with" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_bf16_autocast_run(world_corpus, tmp_path):
    """train.dtype=bf16 (autocast, the CUDA default) trains end to end; its losses track fp32."""
    runs = {}
    for dtype in ("fp32", "bf16"):
        run = tmp_path / dtype
        Trainer(load_config(None, tiny_overrides(world_corpus, run, **{
            "train.steps": 3, "train.dtype": dtype, "checkpoint.save_final": False}))).fit()
        runs[dtype] = train_losses(run)
    for step, loss in runs["fp32"].items():
        assert abs(runs["bf16"][step] - loss) < 0.05 * loss, (step, runs)
