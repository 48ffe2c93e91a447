"""Test helpers: a tiny synthetic-world corpus, tokenized into shards with the project's own
tools (as a user would), and the overrides of a seconds-long training run on it."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_tool(name: str, *args: str) -> subprocess.CompletedProcess:
    """Run ``tools/<name>.py`` in a subprocess; fail the test with its stderr on error."""
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / f"{name}.py"), *args],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise AssertionError(f"tools/{name}.py failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def build_world_corpus(d: Path) -> dict:
    """A general world (40 people) and a domain world (24 compounds), a 400-piece tokenizer,
    and shards: general, domain (with fact labels) and valid (a world of other people)."""
    run_tool("make_knowledge", "--out", str(d / "world"), "--general-entities", "40",
             "--domain-entities", "24", "--seed", "0")
    run_tool("make_knowledge", "--out", str(d / "vworld"), "--general-entities", "12",
             "--domain-entities", "0", "--seed", "1")
    tok = d / "tok" / "tok"
    run_tool("train_tokenizer", "--input", str(d / "world/general/train.jsonl"),
             str(d / "world/domain/train.jsonl"), "--format", "jsonl", "--model-prefix", str(tok),
             "--vocab-size", "400")
    shards = {}
    for name, src, key in (("general", "world/general", ["--doc-key", "fact_id"]),
                           ("domain", "world/domain", ["--doc-key", "fact_id"]),
                           ("valid", "vworld/general", [])):
        prefix = d / "shards" / name
        run_tool("preprocess_data", "--input", str(d / src / "train.jsonl"), "--output-prefix",
                 str(prefix), "--tokenizer-model", f"{tok}.model", "--no-progress", *key)
        shards[name] = str(prefix)
    return {"dir": d, "tokenizer": f"{tok}.model", "shards": shards,
            "probes": {"general": str(d / "world/general/probes.jsonl"),
                       "domain": str(d / "world/domain/probes.jsonl")}}


def tiny_overrides(corpus: dict, run_dir: Path, **extra) -> list[str]:
    """Dotted overrides for a seconds-long CPU training run on ``world_corpus``."""
    base = {
        "model.preset": "tiny", "model.vocab_size": 400, "model.dim": 32, "model.n_layers": 2,
        "model.n_heads": 4, "model.n_kv_heads": 2, "model.max_seq_len": 64,
        "data.train": corpus["shards"]["general"], "data.valid": corpus["shards"]["valid"],
        "data.tokenizer": corpus["tokenizer"], "data.seq_len": 32,
        "train.steps": 6, "train.global_batch": 8, "train.micro_batch": 4, "train.lr": 0.005,
        "train.warmup_steps": 2, "train.threads": 1, "eval.val_batches": 2,
        "log.dir": str(run_dir), "log.interval": 1, "log.progress": "none", "log.tensorboard": False,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def write_base_config(corpus: dict, path: Path, **extra) -> Path:
    """A sweep's base config at ``path``: the tiny run of :func:`tiny_overrides` (with
    ``extra``) as YAML sections, without log.dir (the sweep gives every run its own)."""
    import yaml

    base: dict = {}
    for item in tiny_overrides(corpus, Path("unused"), **extra):
        key, value = item.split("=", 1)
        section, name = key.split(".", 1)
        base.setdefault(section, {})[name] = yaml.safe_load(value)
    del base["log"]["dir"]
    path.write_text(yaml.safe_dump(base))
    return path


def torchrun(nproc: int, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node=nproc ARGS`` on CPU (gloo), one thread a rank.

    Whatever ends the wait early (its ``timeout``, the test's timeout from pytest-timeout,
    Ctrl-C) stops torchrun and its ranks (see ``_stop``) before the error goes on, so no rank
    is left waiting on a collective. Output goes through files: a rank that outlived torchrun
    could hold a pipe open forever."""
    import os
    import tempfile

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, cwd=ROOT, env=env,
                                start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        except BaseException:
            _stop(proc)
            raise
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(cmd, proc.returncode, out.read(), err.read())


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to torchrun, which then stops its ranks (each runs in a session of its own, so
    only torchrun can reach them); SIGKILL to its process group if it has not ended in 30 s."""
    import os
    import signal

    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def train_rows(run_dir: Path) -> dict[int, dict]:
    """The training lines of a run's metrics.jsonl, by step."""
    import json

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "loss" in r}
