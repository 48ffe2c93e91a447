"""The catalogue of bad inputs and faults (issue 12): each case gives the input, the clear
error or behaviour expected, and checks that no output or data was lost or left half-written.

Nothing wrong may reach the law: a diverged run stops and is left out, an interrupted run
continues, a resume never continues another model, a damaged checkpoint is passed over, bad
data is named at its shard, and every user error is one ``error: ...`` line with exit 2.
Everything runs on one tiny prepared corpus (``world_corpus``) and one 4-step reference run.
"""

import hashlib
import json
import os
import runpy
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from _corpus import ROOT, tiny_overrides, torchrun, write_base_config
from kis_megatron.config import ConfigError, load_config
from kis_megatron.data.errors import DataError
from kis_megatron.errors import KisError
from kis_megatron.law.runs import read_run
from kis_megatron.sweep import load_sweep, run_local, run_status
from kis_megatron.training.trainer import Trainer, TrainingDiverged
from kis_megatron.training import checkpoint as ck


# ----------------------------------------------------------------------------- helpers


def tool(name: str):
    """``main`` of tools/<name>.py, run in this process (quicker than a subprocess)."""
    return runpy.run_path(str(ROOT / "tools" / f"{name}.py"), run_name="tool")["main"]


def snapshot(d: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under d: 'no data lost' is an equal snapshot."""
    if not d.exists():
        return {}
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()}


def steps_logged(run: Path) -> list[int]:
    return [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if "loss" in r]


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if "loss" in r}


def run_json(run: Path) -> dict:
    return json.loads((run / "run.json").read_text())


def trainer(corpus, run: Path, **extra) -> Trainer:
    return Trainer(load_config(None, tiny_overrides(corpus, run, **{"train.steps": 4, **extra})))


def clear_error(capsys, rc: int, *needles: str) -> str:
    """The entry point's convention: exit 2, one ``error:`` line naming the needles."""
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "error: " in err and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


@pytest.fixture(scope="module")
def ref_run(world_corpus, tmp_path_factory) -> Path:
    """A finished 4-step run with whole checkpoints and evaluations at steps 2 and 4."""
    run = tmp_path_factory.mktemp("ref") / "run"
    trainer(world_corpus, run, **{"checkpoint.interval": 2, "checkpoint.keep": 3,
                                  "eval.interval": 2}).fit()
    return run


@pytest.fixture
def ref_copy(ref_run, tmp_path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(ref_run, dst)
    return dst


# ----------------------------------------------------------------------------- divergence


@pytest.mark.slow
def test_nan_run_stops_is_marked_failed_and_is_left_out(world_corpus, ref_run, tmp_path, capsys):
    """train.lr=1e6: the gradient norm turns NaN at step 2; the update is not applied, the run
    stops with one error naming the step, run.json says failed, no checkpoint (not even the
    final one) is written, and extract_metrics / fit_law list it and leave it out."""
    run = tmp_path / "nan"
    from kis_megatron.train import main

    rc = main(tiny_overrides(world_corpus, run, **{"train.lr": 1e6, "train.steps": 8,
                                                   "checkpoint.interval": 1}))
    err = clear_error(capsys, rc, "diverged at step 2", "train.skip_nonfinite_steps")
    info = run_json(run)
    assert info["status"] == "failed" and "diverged at step 2" in info["error"]
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["latest", "step_00000001"]
    assert err.count("error:") == 1
    rows, note = read_run(str(run), all_evals=True)
    assert rows == [] and "failed" in note and "diverged at step 2" in note
    table = tmp_path / "t.csv"
    assert tool("extract_metrics")([str(run), str(ref_run), "--out", str(table)]) == 0
    assert f"warning: {run}: left out, the run failed" in capsys.readouterr().err
    assert {r.split(",")[0] for r in table.read_text().splitlines()[1:]} == \
        {str(run_json(ref_run)["model_params"])}  # the reference run's rows only
    rc = tool("fit_law")(["--runs", str(run), "--out", str(tmp_path / "law")])
    clear_error(capsys, rc, "no measurements", "the run failed")
    assert not (tmp_path / "law").exists()


def _inject_inf(t: Trainer, at_steps: set[int]) -> dict:
    """Make the gradient of steps ``at_steps`` (1-based) infinite; record weights around them."""
    seen = {}
    real = t.forward_backward

    def forward_backward():
        out = real()
        if t.step + 1 in at_steps:
            next(t.model.parameters()).grad[0, 0] = float("inf")
            seen[t.step + 1] = {k: v.clone() for k, v in t.model.state_dict().items()}
        return out

    t.forward_backward = forward_backward
    return seen


@pytest.mark.slow
def test_nonfinite_steps_are_skipped_within_the_budget(world_corpus, tmp_path):
    """train.skip_nonfinite_steps=1 and an injected inf gradient at step 2: that update is
    not applied (weights unchanged, AdamW counts 3 steps of 4), the run finishes, the log
    marks the step skipped, and the law readers keep the run (it is a measurement)."""
    run = tmp_path / "skip"
    t = trainer(world_corpus, run, **{"train.skip_nonfinite_steps": 1})
    before = _inject_inf(t, {2})
    real_step = t.train_step
    after = {}

    def train_step():
        out = real_step()
        if t.step == 2:
            after.update({k: v.clone() for k, v in t.model.state_dict().items()})
        return out

    t.train_step = train_step
    t.fit()
    assert all(torch.equal(before[2][k], after[k]) for k in after)
    assert {int(s["step"]) for s in t.optimizer.state.values()} == {3}
    info = run_json(run)
    assert info["status"] == "finished" and info["nonfinite_steps"] == 1
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if r.get("skipped")] == [2]
    rows, note = read_run(str(run))
    assert rows and note is None


@pytest.mark.slow
def test_nonfinite_steps_beyond_the_budget_stop_the_run(world_corpus, tmp_path):
    run = tmp_path / "over"
    t = trainer(world_corpus, run, **{"train.skip_nonfinite_steps": 1, "checkpoint.interval": 1})
    _inject_inf(t, {2, 3})
    with pytest.raises(TrainingDiverged, match="diverged at step 3: the gradient norm is inf"):
        t.fit()
    assert run_json(run)["status"] == "failed"
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == \
        ["step_00000001", "step_00000002"]  # step 2 was skipped (weights finite), 3 never saved


INF_ON_RANK_1 = textwrap.dedent("""
    import sys
    from kis_megatron import train
    real = train.Trainer.forward_backward
    def forward_backward(self):
        out = real(self)
        if self.dims.rank == 1 and self.step == 1:  # step 2, after DDP's all-reduce: rank 1 only
            next(self.model.parameters()).grad.fill_(float("inf"))
        return out
    train.Trainer.forward_backward = forward_backward
    sys.exit(train.main(sys.argv[1:]))
""")


@pytest.mark.slow
@pytest.mark.multiprocess
def test_all_ranks_agree_on_a_nonfinite_step(world_corpus, tmp_path):
    """dp=2 (gloo) with an infinite gradient on rank 1 alone: rank 0 sees finite numbers, yet
    both ranks stop at step 2 (one all-reduce of the flag), and rank 0 marks the run failed."""
    script = tmp_path / "inf.py"
    script.write_text(INF_ON_RANK_1)
    run = tmp_path / "run"
    proc = torchrun(2, str(script), *tiny_overrides(world_corpus, run, **{
        "train.steps": 4, "checkpoint.interval": 1, "parallel.timeout_s": 60}), timeout=240)
    assert proc.returncode != 0
    assert "error: the run diverged at step 2: the gradient norm is inf" in proc.stderr
    assert "error: the run diverged at step 2: another rank's" in proc.stderr
    info = run_json(run)
    assert info["status"] == "failed" and "another rank's" in info["error"]
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_00000001"]


@pytest.mark.parametrize("override, key", [
    ("train.lr=.inf", "train.lr"), ("train.lr=nan", "train.lr"), ("train.min_lr=.nan", "train.min_lr"),
    ("infusion.ratio_steps={0: .inf}", "infusion.ratio_steps.0"),
])
def test_nonfinite_config_values_are_refused(override, key):
    with pytest.raises(ConfigError, match=f"{key}: must be a finite number"):
        load_config(None, [override])


def test_a_checkpoint_of_nonfinite_weights_is_never_written(ref_copy):
    cfg = load_config(ref_copy / "config.yaml")
    from kis_megatron.parallel.parallelize import build_model
    from kis_megatron.training.optim import build_optimizer

    model = build_model(cfg.model, seed=0)
    with torch.no_grad():
        model.norm.weight[0] = float("nan")
    manager = ck.CheckpointManager(ref_copy / "checkpoints")
    before = snapshot(ref_copy / "checkpoints")
    with pytest.raises(ck.CheckpointError, match="refusing to save step 9.*norm.weight is not finite"):
        manager.save(9, model, build_optimizer(model, cfg.train, torch.device("cpu")), {})
    assert snapshot(ref_copy / "checkpoints") == before


def test_export_refuses_nonfinite_weights(ref_copy, monkeypatch, capsys, tmp_path):
    """A checkpoint with NaN weights (written by hand: the trainer never writes one)."""
    cfg = load_config(ref_copy / "config.yaml")
    from kis_megatron.parallel.parallelize import build_model
    from kis_megatron.training.optim import build_optimizer

    model = build_model(cfg.model, seed=0)
    with torch.no_grad():
        model.layers["1"].ffn.w_up.weight[3, 1] = float("nan")
    monkeypatch.setattr(ck, "_first_nonfinite", lambda m: None)
    bad = ck.CheckpointManager(ref_copy / "checkpoints").save(
        7, model, build_optimizer(model, cfg.train, torch.device("cpu")), {})
    rc = tool("export_hf")([str(ref_copy), "--checkpoint", str(bad), "--out", str(tmp_path / "hf")])
    clear_error(capsys, rc, "layers.1.ffn.w_up.weight holds NaN")
    assert not (tmp_path / "hf").exists() and not list(tmp_path.glob(".hf*"))


# ----------------------------------------------------------------------------- interrupted runs


KILL_AT_STEP_3 = textwrap.dedent("""
    import os, signal, sys
    from kis_megatron import train as t
    real = t.Trainer.train_step
    def step_then_die(self):
        out = real(self)
        if self.step == 3:
            os.kill(os.getpid(), signal.SIGKILL)
        return out
    t.Trainer.train_step = step_then_die
    sys.exit(t.main(sys.argv[1:]))
""")


@pytest.mark.slow
def test_sigkill_before_the_first_checkpoint_then_the_sweep_continues(world_corpus, ref_run, tmp_path):
    """A sweep run SIGKILLed at step 3 of 4 (it checkpoints only at the end): the sweep reports
    it as interrupted, not failed, and resume=auto starts it afresh: every step logged once,
    the old TensorBoard events gone, and the same losses as a run never interrupted."""
    write_base_config(world_corpus, tmp_path / "base.yaml", **{"train.steps": 4})
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump({
        "base": "base.yaml", "out": str(tmp_path / "runs"), "overrides": {"log.tensorboard": True},
        "axes": {"model": [{"name": "a"}]}}))
    sweep = load_sweep(tmp_path / "sweep.yaml")
    run = sweep.runs[0]
    from kis_megatron.sweep import train_command

    args = train_command(sweep, run)[3:]  # after python -m kis_megatron.train
    killed = subprocess.run([sys.executable, "-c", KILL_AT_STEP_3, *args], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert steps_logged(run.run_dir) == [1, 2] and not (run.run_dir / "checkpoints").exists()
    old_events = set((run.run_dir / "tb").iterdir())
    assert run_status(run) == "interrupted"
    said = []
    outcome = run_local(sweep, progress=False, log=said.append)
    assert outcome[run.run_id].startswith("finished"), (outcome, (run.run_dir / "train.log").read_text())
    assert any("starts afresh" in s for s in said)
    assert steps_logged(run.run_dir) == [1, 2, 3, 4]
    assert losses(run.run_dir) == losses(ref_run)
    assert not old_events & set((run.run_dir / "tb").iterdir())
    assert run_status(run) == "finished"


@pytest.mark.slow
def test_a_finished_run_without_checkpoint_is_not_started_over(world_corpus, tmp_path):
    run = tmp_path / "done"
    trainer(world_corpus, run, **{"train.steps": 2, "checkpoint.save_final": False}).fit()
    before = snapshot(run)
    with pytest.raises(ConfigError, match="holds a finished run and no checkpoint"):
        trainer(world_corpus, run, **{"train.steps": 2, "checkpoint.resume": "auto"})
    assert snapshot(run) == before


# ----------------------------------------------------------------------------- resume fit


@pytest.mark.parametrize("extra, needles", [
    ({"model.n_layers": 1}, ["model.n_layers=1 differs from model.n_layers=2", "train.steps"]),
    ({"train.lr": 0.001}, ["train.lr=0.001 differs"]),  # the restored scheduler would ignore it
    ({"infusion.ratio": 0.25, "infusion.domain": "X"}, ["infusion.ratio=0.25 differs"]),
])
def test_resume_into_other_settings_is_refused_before_writing(world_corpus, ref_copy, capsys, extra, needles):
    from kis_megatron.train import main

    if "infusion.domain" in extra:
        extra["infusion.domain"] = world_corpus["shards"]["domain"]
    before = snapshot(ref_copy)
    rc = main(tiny_overrides(world_corpus, ref_copy, **{"train.steps": 6, "checkpoint.resume": "auto",
                                                        **extra}))
    clear_error(capsys, rc, *needles)
    assert snapshot(ref_copy) == before  # config.yaml, run.json, metrics, checkpoints


@pytest.mark.slow
def test_resume_may_extend_train_steps(world_corpus, ref_copy):
    t = trainer(world_corpus, ref_copy, **{"train.steps": 5, "checkpoint.resume": "auto",
                                           "checkpoint.interval": 2, "log.interval": 2})
    assert t.step == 4
    t.fit()
    assert steps_logged(ref_copy) == [1, 2, 3, 4, 5] and run_json(ref_copy)["status"] == "finished"


@pytest.mark.parametrize("extra, needle", [
    ({"model.dim": 16, "model.n_heads": 2}, "model.tok_embeddings.weight has shape [400, 32] in the "
                                            "checkpoint but [400, 16] in the model"),
    ({"model.n_layers": 1}, "holds model.layers.1.attn_norm.weight (shape [32]), which the model lacks"),
    ({"model.n_layers": 3}, "lacks model.layers.2.attn_norm.weight (shape [32] in the model)"),
])
def test_a_checkpoint_of_another_model_names_the_first_tensor(world_corpus, ref_run, tmp_path, capsys,
                                                              extra, needle):
    """The tensors themselves are checked, even where the settings recorded with a checkpoint
    claim the new model (here: a copy whose config.yaml was replaced)."""
    from kis_megatron.config import config_yaml
    from kis_megatron.train import main

    new, ckpt = tmp_path / "new", tmp_path / "copied" / "step_00000004"
    shutil.copytree(ref_run / "checkpoints" / "step_00000004", ckpt)
    overrides = tiny_overrides(world_corpus, new, **{"checkpoint.resume": str(ckpt), **extra})
    (ckpt / "config.yaml").write_text(config_yaml(load_config(None, overrides)))
    rc = main(overrides)
    clear_error(capsys, rc, needle)
    assert not new.exists()


def test_a_checkpoint_of_another_model_is_refused_by_its_settings(world_corpus, ref_run, tmp_path, capsys):
    from kis_megatron.train import main

    new = tmp_path / "new"
    rc = main(tiny_overrides(world_corpus, new, **{
        "checkpoint.resume": str(ref_run / "checkpoints" / "step_00000004"), "model.n_layers": 3}))
    clear_error(capsys, rc, "model.n_layers=3 differs from model.n_layers=2")
    assert not new.exists()


# ----------------------------------------------------------------------------- damaged checkpoints


def _cut(path: Path, keep: float = 0.5) -> None:
    os.truncate(path, int(path.stat().st_size * keep))


@pytest.mark.parametrize("damage, reason", [
    (lambda c: _cut(c / "__0_0.distcp"), "__0_0.distcp is truncated"),
    (lambda c: (c / ".metadata").unlink(), "missing .metadata"),
    (lambda c: _cut(c / ".metadata"), ".metadata is unreadable"),
    (lambda c: _cut(c / "extra_rank0.pt"), "extra_rank0.pt is cut or damaged"),
], ids=["cut_distcp", "no_metadata", "cut_metadata", "cut_extra"])
def test_a_damaged_latest_checkpoint_falls_back_to_an_older_one(world_corpus, ref_copy, capsys,
                                                                damage, reason):
    latest = ref_copy / "checkpoints" / "step_00000004"
    damage(latest)
    t = trainer(world_corpus, ref_copy, **{"checkpoint.resume": "auto", "train.steps": 6})
    assert t.step == 2
    err = capsys.readouterr().err
    assert f"warning: checkpoint {latest} is damaged ({reason}" in err
    assert f"falling back to {ref_copy / 'checkpoints' / 'step_00000002'}" in err


def test_bytes_damaged_in_place_are_one_error(world_corpus, ref_copy):
    """Damage that keeps every size (found only when the data is read) cannot be passed over,
    but is one clear error naming the checkpoint, not a traceback."""
    latest = ref_copy / "checkpoints" / "step_00000004"
    with open(latest / "__0_0.distcp", "r+b") as f:
        f.seek(10)
        f.write(b"\xff" * 40)
    with pytest.raises(ck.CheckpointError, match=f"{latest} cannot be read, it is damaged"):
        trainer(world_corpus, ref_copy, **{"checkpoint.resume": "auto"})


@pytest.mark.slow
def test_a_checkpoint_saved_after_a_fallback_is_kept(world_corpus, ref_copy):
    """Resumed from step 2 past a damaged step 4, with keep=1: the save at step 3 must not be
    pruned in favour of the damaged (higher) step 4."""
    _cut(ref_copy / "checkpoints" / "step_00000004" / "__0_0.distcp")
    trainer(world_corpus, ref_copy, **{"checkpoint.resume": "auto", "train.steps": 3,
                                       "checkpoint.keep": 1}).fit()
    path, skipped = ck.CheckpointManager(ref_copy / "checkpoints").resumable()
    assert path.name == "step_00000003" and skipped == []
    assert not (ref_copy / "checkpoints" / "step_00000002").exists()  # keep=1 still holds


def test_every_checkpoint_damaged_is_one_error_and_an_explicit_one_too(world_corpus, ref_copy):
    for c in (ref_copy / "checkpoints").glob("step_*"):
        _cut(c / "extra_rank0.pt")
    before = snapshot(ref_copy)
    with pytest.raises(ck.CheckpointError, match="every checkpoint in .* is damaged: step_00000004: "
                                                  "extra_rank0.pt.*step_00000002"):
        trainer(world_corpus, ref_copy, **{"checkpoint.resume": "auto"})
    path = ref_copy / "checkpoints" / "step_00000002"
    with pytest.raises(ck.CheckpointError, match=f"{path} cannot be loaded: extra_rank0.pt"):
        trainer(world_corpus, ref_copy.parent / "other", **{"checkpoint.resume": str(path)})
    assert snapshot(ref_copy) == before


# ----------------------------------------------------------------------------- data


def _copy_shard(src: str, dst: Path) -> str:
    for f in Path(src).parent.glob(Path(src).name + ".*"):
        shutil.copy(f, dst / f.name)
    return str(dst / Path(src).name)


def test_shards_of_two_tokenizers_are_refused_without_data_tokenizer(world_corpus, tmp_path):
    domain = _copy_shard(world_corpus["shards"]["domain"], tmp_path)
    meta = json.loads(Path(domain + ".meta.json").read_text())
    meta.update(tokenizer_sha256="ab" * 32, tokenizer_model="other.model")
    Path(domain + ".meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=f"infusion.domain: shard {domain} was tokenized with other.model"
                                        ".*but data.train: shard"):
        trainer(world_corpus, tmp_path / "run", **{"data.tokenizer": "", "infusion.domain": domain,
                                                   "infusion.ratio": 0.25})


@pytest.mark.slow
def test_a_token_id_beyond_the_vocabulary_names_its_shard(world_corpus, tmp_path):
    """The sidecar is intact (it still says max id < 400), so only the batch check sees it."""
    general = _copy_shard(world_corpus["shards"]["general"], tmp_path)
    tokens = np.memmap(general + ".bin", dtype="<u2", mode="r+")
    tokens[::97] = 999
    tokens.flush()
    run = tmp_path / "run"
    t = trainer(world_corpus, run, **{"data.train": general, "checkpoint.interval": 1})
    with pytest.raises(DataError, match=f"data.train: shard {general} .*holds token id 999, outside "
                                        r"the model's vocabulary \[0, 400\)"):
        t.fit()
    assert run_json(run)["status"] == "failed" and not (run / "checkpoints").exists()


def test_idx_sizes_that_disagree_with_the_pointers_are_refused(world_corpus, tmp_path):
    from kis_megatron.data.indexed_dataset import _HEADER, IndexedDataset

    general = _copy_shard(world_corpus["shards"]["general"], tmp_path)
    raw = bytearray(Path(general + ".idx").read_bytes())
    sizes = np.frombuffer(raw, "<i4", 2, _HEADER.size) + np.array([1, -1], dtype="<i4")
    raw[_HEADER.size:_HEADER.size + 8] = sizes.tobytes()  # same total, another split
    Path(general + ".idx").write_bytes(bytes(raw))
    with pytest.raises(DataError, match=f"{general}.idx: sequence 1 starts at byte .*sizes and "
                                        "pointers disagree"):
        IndexedDataset(general)


def test_invalid_utf8_is_reported_at_its_line(world_corpus, tmp_path, capsys):
    corpus = tmp_path / "c.txt"
    corpus.write_bytes(b"".join(b"line %d of plain text\n" % i for i in range(3000)) + b"bad \xff\n")
    rc = tool("preprocess_data")(["--input", str(corpus), "--format", "text", "--output-prefix",
                                  str(tmp_path / "out"), "--tokenizer-model", world_corpus["tokenizer"],
                                  "--no-progress"])
    clear_error(capsys, rc, f"{corpus}:3001: not valid UTF-8")
    assert not list(tmp_path.glob("out*"))


# ----------------------------------------------------------------------------- metrics readers


def test_a_cut_final_evaluation_leaves_the_run_out(ref_copy):
    path = ref_copy / "metrics.jsonl"
    lines = path.read_text().splitlines()
    assert "retention" not in lines[-1] and "val_loss" in lines[-1]  # the final evaluation
    path.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:25])
    rows, note = read_run(str(ref_copy))
    assert rows == []
    assert "final evaluation (step 4) is missing" in note and "the last one is at step 2" in note
    assert f"{path}:{len(lines)}: the line is cut" in note
    path.write_text("\n".join(lines[:2] + ["{oops"] + lines[2:]) + "\n")
    from kis_megatron.law.table import LawInputError

    with pytest.raises(LawInputError, match=f"{path}:3: invalid JSON"):
        read_run(str(ref_copy))


def test_a_finished_log_with_a_nan_loss_is_left_out_unless_the_step_was_skipped(ref_copy):
    """Logs written before divergence was caught (or by another framework): a NaN loss
    (logged as null) means the run diverged, however its evaluations look."""
    path = ref_copy / "metrics.jsonl"
    records = [json.loads(x) for x in path.read_text().splitlines()]
    for r in records:
        if r["step"] == 3 and "loss" in r:
            r["loss"] = None
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    rows, note = read_run(str(ref_copy))
    assert rows == [] and "training loss is not finite at step 3" in note
    for r in records:
        if r["step"] == 3 and "loss" in r:
            r["skipped"] = True  # the trainer skipped that update (train.skip_nonfinite_steps)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    rows, note = read_run(str(ref_copy))
    assert rows and note is None


# ----------------------------------------------------------------------------- entry points


def test_a_malformed_probe_file_is_a_clear_error_in_kis_train(world_corpus, tmp_path, capsys):
    from kis_megatron.train import main

    probes = tmp_path / "probes.jsonl"
    probes.write_text('{"question": "x"}\n')
    rc = main(tiny_overrides(world_corpus, tmp_path / "run", **{"eval.probes.domain": str(probes)}))
    clear_error(capsys, rc, f"{probes}:1:")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name, argv, needle", [
    ("eval_retention", ["{tmp}"], "not a run directory"),
    ("export_hf", ["{tmp}", "--out", "{tmp}/hf"], "neither a run directory"),
    ("import_hf", ["{tmp}/missing", "--out", "{tmp}/x.yaml"], "not a Hugging Face model folder"),
    ("extract_metrics", ["{tmp}/missing", "--out", "{tmp}/t.csv"], "not a directory"),
    ("make_knowledge", ["--out", "{tmp}/w", "--triplets", "{tmp}/none.jsonl"], "--templates"),
    ("train_tokenizer", ["--input", "{tmp}/none.txt", "--model-prefix", "{tmp}/tok", "--vocab-size", "50"],
     "not found"),
    ("sweep", ["{tmp}/none.yaml"], "sweep file not found"),
])
def test_every_tool_prints_one_error_and_exits_2(tmp_path, capsys, name, argv, needle):
    rc = tool(name)([a.format(tmp=tmp_path) for a in argv])
    clear_error(capsys, rc, needle)


def test_every_user_error_class_derives_from_kis_error():
    from kis_megatron.data.errors import InfusionError
    from kis_megatron.knowledge.triplets import KnowledgeError
    from kis_megatron.interop.hf import InteropError
    from kis_megatron.law.table import LawInputError

    for cls in (ConfigError, DataError, InfusionError, KnowledgeError, LawInputError, InteropError,
                ck.CheckpointError, TrainingDiverged):
        assert issubclass(cls, KisError), cls


# ----------------------------------------------------------------------------- sweeps


@pytest.mark.parametrize("text, needle", [
    ("base: b.yaml\nout: o\naxes: {m: [{name: a}]\n", "not valid YAML"),
    ("- base: b.yaml\n", "the top level must be a mapping"),
    ("base: b.yaml\nout: o\noverrides: [model.dim=3]\naxes: {m: [{name: a}]}\n",
     "'overrides' must be a mapping"),
    ("base: b.yaml\nout: o\naxes: {m: [{name: a, overrides: [model.dim=3]}]}\n",
     "point 'a': overrides must be a mapping"),
    ("base: b.yaml\nout: o\naxes: {m: [{name: ../../x}]}\n", "run id '../../x'"),
    ("base: b.yaml\nout: o\naxes: {m: [{name: /abs}]}\n", "run id '/abs'"),
    ("base: b.yaml\nout: o\naxes: {m: [{name: a/b}], n: [{name: c}]}\n", "run id 'a/b-c'"),
    ("base: b.yaml\nout: o\naxes: {m: [{name: .hidden}]}\n", "run id '.hidden'"),
])
def test_bad_sweep_files_are_clear_errors(tmp_path, capsys, text, needle):
    (tmp_path / "b.yaml").write_text("train: {steps: 2}\n")
    path = tmp_path / "s.yaml"
    path.write_text(text)
    rc = tool("sweep")([str(path), "--list"])
    clear_error(capsys, rc, needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.yaml", "s.yaml"]


# ============================================================================= second round (issue 19)
# Each class of the second catalogue: the exit code, the one line naming the key or path,
# nothing written or replaced, and for the record class the realised infusion value.

DOMAIN = "/data/domain"  # configs that fail validation never open it


def config_error(overrides: dict) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"{k}={v}" for k, v in overrides.items()])
    return str(e.value)


# ----------------------------------------------------------------------------- 1. the record is what trained


@pytest.mark.parametrize("overrides, needles", [
    ({"infusion.domain": DOMAIN, "infusion.facts": 64, "infusion.ratio": 0},
     ["infusion.facts: 64 has no effect with infusion.ratio=0"]),
    ({"infusion.domain": DOMAIN, "infusion.ratio": 0}, ["infusion.domain: is set but infusion.ratio=0"]),
    ({"infusion.kind": "domian_facts"}, ["infusion.kind='domian_facts'", "ratio, domain_facts, custom"]),
    ({"infusion.domain": DOMAIN, "infusion.ratio": 0.3, "infusion.domains": "[{name: b, path: x, ratio: 0.1}]"},
     ["infusion.domains: set either infusion.domain", "not both"]),
    ({"infusion.domains": "[{name: b, path: x, ratio: 0.1}]", "infusion.ratio": 0.2},
     ["infusion.ratio: 0.2 applies to infusion.domain"]),
    ({"infusion.domain": DOMAIN, "infusion.ratio": 0.3, "infusion.value": 5},
     ["infusion.value: 5.0 contradicts infusion.kind=ratio"]),
    ({"infusion.domain": DOMAIN, "infusion.ratio": 0.3, "infusion.kind": "domain_facts",
      "infusion.facts": 64, "infusion.value": 32}, ["infusion.value: 32.0 contradicts infusion.facts=64"]),
    ({"infusion.kind": "custom"}, ["infusion.value: infusion.kind=custom records"]),
    ({"infusion.domain": DOMAIN, "infusion.ratio": 0.3, "infusion.window_end": 0.5},
     ["infusion.window_start/window_end apply to infusion.schedule=window, not constant"]),
    ({"infusion.domain": DOMAIN, "infusion.ratio": 0.3, "infusion.ratio_steps": "{10: 0.1}"},
     ["infusion.ratio_steps: applies to infusion.schedule=steps"]),
    ({"infusion.domains": "[{name: b, path: x, ratio: 0.6}, {name: c, path: y, ratio: 0.5}]"},
     ["the ratios sum to 1.1"]),
    ({"infusion.domains": "[{name: b, path: x}]"}, ["infusion.domains[0].ratio=0.0: must lie in (0, 1)"]),
])
def test_infusion_knobs_that_are_ignored_or_contradicted_are_errors(overrides, needles):
    message = config_error(overrides)
    for needle in needles:
        assert needle in message, (needle, message)


@pytest.mark.slow
def test_run_json_records_the_infusion_the_blender_realised(world_corpus, tmp_path, capsys):
    """kind=domain_facts without infusion.facts records the shard's own fact count (what the
    blender infused), and a claimed infusion.value that differs from it is refused before
    anything is written."""
    from kis_megatron.train import main

    domain = {"infusion.domain": world_corpus["shards"]["domain"], "infusion.ratio": 0.3,
              "infusion.kind": "domain_facts"}
    t = trainer(world_corpus, tmp_path / "all", **domain, **{"train.steps": 1})
    t.fit()
    facts = t.stream.describe()["domain_facts"]
    assert facts > 8 and run_json(tmp_path / "all")["infusion"]["value"] == facts
    t = trainer(world_corpus, tmp_path / "some", **domain, **{"train.steps": 1, "infusion.facts": 8})
    t.fit()
    assert run_json(tmp_path / "some")["infusion"] == {**run_json(tmp_path / "some")["infusion"],
                                                       "kind": "domain_facts", "value": 8.0}
    rc = main(tiny_overrides(world_corpus, tmp_path / "claim", **domain, **{"infusion.value": facts + 1}))
    clear_error(capsys, rc, f"infusion.value={facts + 1}, but infusion.domain", f"infuses {facts} facts")
    assert not (tmp_path / "claim").exists()


# ----------------------------------------------------------------------------- 2. config files say what runs


def test_a_repeated_key_or_section_in_yaml_is_refused(tmp_path, capsys):
    from kis_megatron.train import main

    cfg = tmp_path / "run.yaml"
    cfg.write_text("train:\n  steps: 5\nmodel:\n  dim: 32\ntrain:\n  lr: 0.1\n")
    rc = main(["--config", str(cfg), f"log.dir={tmp_path / 'run'}"])
    clear_error(capsys, rc, str(cfg), "key 'train' appears twice (lines 1 and 5)")
    cfg.write_text("train: {steps: 5, steps: 6}\n")
    with pytest.raises(ConfigError, match="key 'steps' appears twice"):
        load_config(cfg)
    sweep = tmp_path / "s.yaml"
    sweep.write_text("base: run.yaml\nout: o\naxes: {m: [{name: a}]}\nout: p\n")
    clear_error(capsys, tool("sweep")([str(sweep), "--list"]), "key 'out' appears twice")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_resume_without_config_yaml_uses_the_checkpoints_copy(world_corpus, ref_copy, capsys):
    """config.yaml deleted: the checkpoint's own copy is compared (a changed seed is named as
    train.seed) and a matching resume rebuilds config.yaml; with no copy either, refused."""
    from kis_megatron.train import main

    saved = (ref_copy / "config.yaml").read_text()
    (ref_copy / "config.yaml").unlink()
    before = snapshot(ref_copy)
    rc = main(tiny_overrides(world_corpus, ref_copy, **{"train.steps": 4, "train.seed": 7,
                                                        "checkpoint.resume": "auto"}))
    clear_error(capsys, rc, "train.seed=7 differs from train.seed=1234")
    assert snapshot(ref_copy) == before
    for ckpt in (ref_copy / "checkpoints").glob("step_*"):
        (ckpt / "config.yaml").unlink()
    before = snapshot(ref_copy)
    rc = main(tiny_overrides(world_corpus, ref_copy, **{"train.steps": 4, "checkpoint.resume": "auto"}))
    clear_error(capsys, rc, "config.yaml is missing and the checkpoint holds no copy")
    assert snapshot(ref_copy) == before
    assert "seed: 1234" in saved


def test_a_config_file_in_its_own_log_dir_is_never_overwritten(world_corpus, tmp_path, capsys):
    from kis_megatron.train import main

    folder = tmp_path / "mine"
    folder.mkdir()
    cfg = folder / "config.yaml"
    cfg.write_text(yaml.safe_dump({"train": {"steps": 2}, "log": {"dir": str(folder)}}))
    before = snapshot(folder)
    rc = main(["--config", str(cfg), *tiny_overrides(world_corpus, folder, **{"train.steps": 2})])
    clear_error(capsys, rc, f"log.dir={folder} holds config.yaml but no run that kis-train started")
    assert snapshot(folder) == before


# ----------------------------------------------------------------------------- 3. every value range-checked


@pytest.mark.parametrize("key, value, needle", [
    ("train.beta1", 1.5, "train.beta1=1.5: must lie in [0, 1)"),
    ("train.beta2", -0.1, "train.beta2=-0.1: must lie in [0, 1)"),
    ("train.eps", -1, "train.eps=-1.0: must be > 0"),
    ("train.weight_decay", -0.5, "train.weight_decay=-0.5: must be >= 0"),
    ("train.seed", -1, "train.seed=-1: must lie in [0, 4294967295]"),
    ("model.init_std", -0.02, "model.init_std=-0.02: must be > 0"),
    ("model.norm_eps", -10, "model.norm_eps=-10.0: must be > 0"),
    ("model.rope_theta", 0, "model.rope_theta=0.0: must be > 0"),
    ("model.ffn_dim", 0, "model.ffn_dim=0: must be >= 1"),
    ("eval.probe_batch", 0, "eval.probe_batch=0: must be >= 1"),
    ("eval.val_batches", -1, "eval.val_batches=-1: must be >= 1"),
    ("infusion.ratio", 1.0, "infusion.ratio=1.0: must lie in [0, 1)"),
    ("infusion.window_end", 2, "infusion.window_end=2.0: must lie in [0, 1]"),
    ("parallel.timeout_s", 0, "parallel.timeout_s=0: must be >= 1"),
    ("train.recompute", "some", "train.recompute='some': must be one of none, selective, full"),
])
def test_out_of_range_values_name_the_key_and_the_value(world_corpus, tmp_path, capsys, key, value, needle):
    from kis_megatron.train import main

    rc = main(tiny_overrides(world_corpus, tmp_path / "run", **{key: value}))
    clear_error(capsys, rc, needle)
    assert not (tmp_path / "run").exists()


def test_every_numeric_config_key_has_a_domain():
    """A numeric key added without its domain fails here (infusion.value is the user's own
    knob, any number; ratio_steps and pp_layers are checked entry by entry)."""
    import dataclasses
    import typing

    from kis_megatron import config as c

    free = {"InfusionConfig.value", "InfusionConfig.ratio_steps", "ParallelConfig.pp_layers"}
    missing = []
    for cls in (c.ModelConfig, c.ParallelConfig, c.DataConfig, c.DomainSourceConfig, c.InfusionConfig,
                c.TrainConfig, c.EvalConfig, c.CheckpointConfig, c.LogConfig):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = {a for a in typing.get_args(hints[f.name]) if a is not type(None)} or {hints[f.name]}
            if tp & {int, float} and bool not in tp and f"{cls.__name__}.{f.name}" not in free:
                if "domain" not in f.metadata:
                    missing.append(f"{cls.__name__}.{f.name}")
    assert missing == []


# ----------------------------------------------------------------------------- 4. outputs never replaced unasked


def test_tools_refuse_to_replace_their_outputs_unless_forced(world_corpus, ref_run, tmp_path, capsys):
    src = world_corpus["dir"] / "world/general/train.jsonl"
    tok = tmp_path / "tok" / "tok"
    args = ["--input", str(src), "--format", "jsonl", "--model-prefix", str(tok), "--vocab-size", "400"]
    assert tool("train_tokenizer")(args) == 0
    before = snapshot(tmp_path / "tok")
    clear_error(capsys, tool("train_tokenizer")(args), f"{tok}.model, {tok}.vocab already exist", "--force")
    assert snapshot(tmp_path / "tok") == before
    assert tool("train_tokenizer")([*args, "--force"]) == 0
    prefix = tmp_path / "shards" / "s"
    pargs = ["--input", str(src), "--output-prefix", str(prefix), "--tokenizer-model", f"{tok}.model",
             "--no-progress"]
    assert tool("preprocess_data")(pargs) == 0
    before = snapshot(tmp_path / "shards")
    clear_error(capsys, tool("preprocess_data")(pargs), f"{prefix}.bin", "already exist", "--force")
    assert snapshot(tmp_path / "shards") == before
    assert tool("preprocess_data")([*pargs, "--force"]) == 0
    world = tmp_path / "world"
    world.mkdir()
    (world / "mine.txt").write_text("keep me")
    clear_error(capsys, tool("make_knowledge")(["--out", str(world), "--general-entities", "4"]),
                f"{world} already exists", "--force")
    assert (world / "mine.txt").read_text() == "keep me"
    notes = tmp_path / "notes.csv"
    notes.write_text("my,notes\n1,2\n")
    clear_error(capsys, tool("extract_metrics")([str(ref_run), "--out", str(notes)]), f"{notes} already exists")
    assert notes.read_text() == "my,notes\n1,2\n"
    table = tmp_path / "table.csv"
    for _ in range(2):  # a table it wrote is rebuilt from the runs
        assert tool("extract_metrics")([str(ref_run), "--out", str(table)]) == 0


@pytest.mark.slow
def test_a_log_dir_with_checkpoints_but_no_metrics_is_not_overwritten(world_corpus, ref_copy, tmp_path, capsys):
    from kis_megatron.train import main

    other = tmp_path / "other"
    other.mkdir()
    shutil.copytree(ref_copy / "checkpoints", other / "checkpoints")
    before = snapshot(other)
    for resume, needle in (("none", f"log.dir={other} holds checkpoints but no run that kis-train started"),
                           ("auto", "model.dim=64 differs from model.dim=32")):
        rc = main(tiny_overrides(world_corpus, other, **{"train.steps": 2, "model.dim": 64,
                                                         "checkpoint.resume": resume}))
        clear_error(capsys, rc, needle)
    assert snapshot(other) == before
    export = tmp_path / "hf"
    export.mkdir()
    (export / "x").write_text("mine")
    clear_error(capsys, tool("export_hf")([str(ref_copy), "--out", str(export)]), f"{export} already exists")
    assert (export / "x").read_text() == "mine"


# ----------------------------------------------------------------------------- 5. finished runs stay finished


@pytest.mark.slow
def test_a_finished_run_is_never_unfinished(world_corpus, ref_copy, capsys):
    from kis_megatron.train import main

    before = snapshot(ref_copy)
    rc = main(tiny_overrides(world_corpus, ref_copy, **{"train.steps": 2, "checkpoint.resume": "auto"}))
    clear_error(capsys, rc, "train.steps=2 is below step 4 of checkpoint", "cannot be shortened")
    assert snapshot(ref_copy) == before and run_json(ref_copy)["status"] == "finished"
    rc = main(tiny_overrides(world_corpus, ref_copy, **{"train.steps": 4, "checkpoint.resume": "auto"}))
    assert rc == 0 and "finished at step 4 already" in capsys.readouterr().err
    assert snapshot(ref_copy) == before
    rc = main(tiny_overrides(world_corpus, ref_copy, **{"train.steps": 6, "train.stop_after": 3,
                                                        "checkpoint.resume": "auto"}))
    clear_error(capsys, rc, "train.stop_after=3 is not after step 4")
    assert snapshot(ref_copy) == before


# ----------------------------------------------------------------------------- 6. one writer per run directory


@pytest.mark.slow
def test_a_second_writer_on_one_log_dir_fails_fast_and_a_dead_holder_does_not_block(world_corpus, tmp_path,
                                                                                   capsys):
    from kis_megatron.train import main

    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from kis_megatron.run_dir import RunDir
        lock = RunDir({str(run)!r}).lock(); lock.announce()
        print("held", flush=True); time.sleep(120)
    """)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "held"
        rc = main(tiny_overrides(world_corpus, run, **{"train.steps": 2}))
        clear_error(capsys, rc, f"log.dir={run} is in use by another kis-train (pid {holder.pid} on host")
        assert sorted(p.name for p in run.iterdir()) == [".lock"]
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # SIGKILL leaves .lock naming a dead process; the kernel dropped the lock, so a run goes on.
    assert main(tiny_overrides(world_corpus, run, **{"train.steps": 2})) == 0
    assert run_json(run)["status"] == "finished" and not (run / ".lock").exists()


# ----------------------------------------------------------------------------- 7. environment failures


@pytest.mark.parametrize("where, needle", [
    ("{tmp}/afile", "is a file, not a directory"),
    ("/dev/full/run", "cannot create the run directory: Not a directory"),
    ("/proc/kis-megatron-run", "cannot create the run directory"),
])
def test_an_unusable_log_dir_is_one_line(world_corpus, tmp_path, capsys, where, needle):
    from kis_megatron.train import main

    (tmp_path / "afile").write_text("x")
    where = where.format(tmp=tmp_path)
    rc = main(tiny_overrides(world_corpus, Path(where), **{"train.steps": 1}))
    clear_error(capsys, rc, f"log.dir={where}", needle)


@pytest.mark.slow
def test_a_full_disk_during_a_save_is_one_line_and_marks_the_run_failed(world_corpus, tmp_path, capsys,
                                                                        monkeypatch):
    import errno

    from kis_megatron.train import main

    real = ck.atomic_write_text

    def full(path, text):
        if Path(path).name == "COMPLETE":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path, text)

    monkeypatch.setattr(ck, "atomic_write_text", full)
    run = tmp_path / "run"
    rc = main(tiny_overrides(world_corpus, run, **{"train.steps": 3, "checkpoint.interval": 2}))
    err = clear_error(capsys, rc, "at step 2:", "COMPLETE: No space left on device")
    assert err.count("error:") == 1
    info = run_json(run)
    assert info["status"] == "failed" and "No space left on device" in info["error"]
    assert not [p for p in (run / "checkpoints").glob("step_*")]  # no checkpoint that looks whole


# ----------------------------------------------------------------------------- 8. inputs that cannot mean anything


def test_inputs_the_tools_cannot_mean_are_refused_where_they_enter(world_corpus, tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine line\nbroken \xff byte\n")
    clear_error(capsys, tool("train_tokenizer")(["--input", str(bad), "--model-prefix", str(tmp_path / "t"),
                                                 "--vocab-size", "300"]), f"{bad}:2: not valid UTF-8")
    assert not list(tmp_path.glob("t.*"))
    good = world_corpus["dir"] / "world/general/train.jsonl"
    for flag, value, needle in (("--input-sentence-size", "-4", "input_sentence_size must be an integer >= 0"),
                                ("--threads", "0", "num_threads must be an integer >= 1"),
                                ("--character-coverage", "5", "character_coverage must lie in [0.98, 1]")):
        clear_error(capsys, tool("train_tokenizer")(["--input", str(good), "--format", "jsonl", flag, value,
                                                     "--model-prefix", str(tmp_path / "t"), "--vocab-size",
                                                     "300"]), needle)
    corpus = tmp_path / "facts.jsonl"
    corpus.write_text('{"text": "a b", "fact_id": 0}\n{"text": "c d", "fact_id": -3}\n')
    clear_error(capsys, tool("preprocess_data")(["--input", str(corpus), "--doc-key", "fact_id",
                                                 "--output-prefix", str(tmp_path / "s"),
                                                 "--tokenizer-model", world_corpus["tokenizer"]]),
                f"{corpus}:2: document label 'fact_id' must be an integer >= 0", "got -3")
    assert not list(tmp_path.glob("s.*"))
    table = tmp_path / "t.csv"
    rows = ["model_params,tokens,infusion,metric,value"]
    rows += [f"{n},1e6,{f},retention/domain,{100 * v:g}" for n in (1e5, 2e5)
             for f, v in ((10, 0.9), (20, 0.88), (40, 0.6), (80, 0.3), (160, 0.25))]
    table.write_text("\n".join(rows) + "\n")
    clear_error(capsys, tool("fit_law")(["--table", str(table), "--out", str(tmp_path / "law")]),
                "retention/domain is fitted as an accuracy, a fraction in [0, 1], but is 90",
                "percentages? divide them by 100")
    assert not (tmp_path / "law").exists()
    with pytest.raises(SystemExit) as e:
        tool("fit_law")(["--table", str(table), "--out", str(tmp_path / "law"), "--chance", "20"])
    assert e.value.code == 2 and "20 is not an accuracy in [0, 1)" in capsys.readouterr().err


# ----------------------------------------------------------------------------- 9. messages name what the user set


@pytest.mark.slow
def test_a_changed_fact_count_on_resume_names_infusion_facts(world_corpus, tmp_path, capsys):
    from kis_megatron.train import main

    domain = {"infusion.domain": world_corpus["shards"]["domain"], "infusion.ratio": 0.3,
              "infusion.kind": "domain_facts", "infusion.facts": 8, "train.steps": 2}
    run = tmp_path / "run"
    assert main(tiny_overrides(world_corpus, run, **domain)) == 0
    before = snapshot(run)
    rc = main(tiny_overrides(world_corpus, run, **{**domain, "infusion.facts": 12, "train.steps": 3,
                                                   "checkpoint.resume": "auto"}))
    err = clear_error(capsys, rc, "infusion.facts=12 differs from infusion.facts=8")
    assert "infusion.value" not in err
    assert snapshot(run) == before
