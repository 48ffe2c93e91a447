"""tools/eval_retention.py scores any saved checkpoint on any fixed probe set."""

import json
import subprocess
import sys

import pytest

from _corpus import ROOT, tiny_overrides
from kis_megatron.config import load_config
from kis_megatron.train import Trainer


@pytest.mark.slow
def test_checkpoint_scores_match_the_runs_own_final_evaluation(world_corpus, tmp_path):
    run = tmp_path / "run"
    probes = world_corpus["probes"]
    final = Trainer(load_config(None, tiny_overrides(world_corpus, run, **{
        "train.steps": 20, "eval.probes.general": probes["general"],
        "eval.probes.domain": probes["domain"]}))).fit()
    out = tmp_path / "m.json"
    proc = subprocess.run([sys.executable, str(ROOT / "tools/eval_retention.py"), str(run), "--out", str(out)],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(out.read_text())
    assert got["step"] == 20
    for key in ("retention/general", "retention/domain", "retention_heldout/general", "probes/domain"):
        assert got[key] == final[key], key
    # another probe set, named on the command line, with exact match
    proc = subprocess.run([sys.executable, str(ROOT / "tools/eval_retention.py"), str(run), "--probes",
                           f"only={probes['domain']}", "--exact-match"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert got["retention/only"] == final["retention/domain"] and "exact_match/only" in got
    bad = subprocess.run([sys.executable, str(ROOT / "tools/eval_retention.py"), str(tmp_path)],
                         capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and "not a run directory" in bad.stderr
