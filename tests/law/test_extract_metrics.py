import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from kis_megatron.law.runs import extract_runs, find_run_dirs, read_run
from kis_megatron.law.table import LawInputError, read_table

REPO = Path(__file__).resolve().parents[2]
EVAL_METRICS = ["retention/domain", "retention/general", "retention_chance/domain", "val_loss"]


def by_metric(rows):
    return {(r["run_id"], r["step"], r["metric"]): r for r in rows}


def test_final_evaluation_of_finished_runs(tmp_path, make_run):
    make_run(tmp_path, "a", model_params=1000, infusion=0.1, retention_domain=lambda s: s / 200)
    make_run(tmp_path, "b", model_params=5000, infusion=0.3, retention_domain=lambda s: 0.7,
             kind="domain_facts", tokens_per_step=1000)
    rows, notes = extract_runs(find_run_dirs([str(tmp_path)]))
    assert notes == []
    assert sorted(r["metric"] for r in rows if r["run_id"] == "a") == EVAL_METRICS  # no probe counts
    a = by_metric(rows)
    r = a[("a", 100, "retention/domain")]
    assert r["value"] == 0.5 and r["model_params"] == 1000 and r["infusion"] == 0.1
    # tokens: the planned budget tokens_per_step * step, not the padding-dependent count
    assert r["tokens"] == 4096 * 100 and r["exposures"] == 10.0 and r["seed"] == 1234
    assert r["infusion_kind"] == "ratio"
    assert a[("a", 100, "val_loss")]["value"] == pytest.approx(2.5)
    b = a[("b", 100, "retention/general")]
    assert b["value"] == pytest.approx(0.5 + 0.7 / 4) and b["tokens"] == 1000 * 100
    assert b["infusion_kind"] == "domain_facts"


def test_all_evals_and_unfinished_runs(tmp_path, make_run):
    make_run(tmp_path, "done", model_params=1000, infusion=0.1, retention_domain=lambda s: s / 200)
    make_run(tmp_path, "half", model_params=1000, infusion=0.2, retention_domain=lambda s: 0.9,
             status="running")
    dirs = find_run_dirs([str(tmp_path)])
    rows, notes = extract_runs(dirs)
    assert {r["run_id"] for r in rows} == {"done"}
    assert len(notes) == 1 and "half" in notes[0] and "'running'" in notes[0]
    rows, notes = extract_runs(dirs, all_evals=True)
    got = {(r["run_id"], r["step"]): (r["tokens"], r["exposures"]) for r in rows
           if r["metric"] == "retention/domain"}
    assert got == {("done", 50): (4096 * 50, 5.0), ("done", 100): (4096 * 100, 10.0),
                   ("half", 50): (4096 * 50, 5.0)}


def test_resumed_run_keeps_last_record_and_ignores_cut_last_line(tmp_path, make_run):
    d = make_run(tmp_path, "r", model_params=1000, infusion=0.1, retention_domain=lambda s: 0.4)
    with open(d / "metrics.jsonl", "a") as f:
        # the step-100 evaluation logged again after a resume, NaN written as null, then a
        # line cut by a kill
        f.write(json.dumps({"step": 100, "retention/domain": 0.45, "retention/general": None,
                            "val_loss": "inf"}) + "\n")
        f.write('{"step": 110, "loss": 0.')
    rows, _ = read_run(str(d))
    got = {r["metric"]: r["value"] for r in rows}
    assert got["retention/domain"] == 0.45
    assert math.isnan(got["retention/general"]) and got["val_loss"] == math.inf


def test_broken_logs_are_clear_errors(tmp_path, make_run):
    d = make_run(tmp_path, "x", model_params=1000, infusion=0.1, retention_domain=lambda s: 0.4)
    lines = (d / "metrics.jsonl").read_text().splitlines()
    lines[2] = "{not json"
    (d / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(LawInputError, match="metrics.jsonl:3: invalid JSON"):
        read_run(str(d))
    (d / "run.json").write_text(json.dumps({"run_id": "x", "status": "finished"}))
    with pytest.raises(LawInputError, match="run.json needs 'model_params' and 'infusion'"):
        read_run(str(d))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "run.json").write_text(json.dumps({"model_params": 1, "infusion": {"value": 1},
                                                "status": "finished"}))
    with pytest.raises(LawInputError, match="neither metrics.jsonl nor tb/"):
        read_run(str(empty))


def test_finding_run_directories(tmp_path, make_run):
    for name in ("ladder/n1/r1", "ladder/n1/r2", "ladder/n2/r1"):
        make_run(tmp_path, name, model_params=1000, infusion=0.1, retention_domain=lambda s: 0.4)
    found = find_run_dirs([str(tmp_path / "ladder")])
    assert [Path(p).relative_to(tmp_path).as_posix() for p in found] == [
        "ladder/n1/r1", "ladder/n1/r2", "ladder/n2/r1"]
    assert len(find_run_dirs([str(tmp_path / "ladder/*/r1")], use_glob=True)) == 2
    with pytest.raises(LawInputError, match="matches nothing"):
        find_run_dirs([str(tmp_path / "nothing*")], use_glob=True)
    (tmp_path / "plain").mkdir()
    with pytest.raises(LawInputError, match="holds no run directory"):
        find_run_dirs([str(tmp_path / "plain")])
    with pytest.raises(LawInputError, match="is not a directory"):
        find_run_dirs([str(tmp_path / "missing")])


def test_tensorboard_fallback_matches_metrics_jsonl(tmp_path, make_run):
    kw = dict(model_params=2000, infusion=0.25, retention_domain=lambda s: 0.3 + s / 1000)
    make_run(tmp_path / "j", "run", **kw)
    make_run(tmp_path / "t", "run", write_jsonl=False, write_tb=True, **kw)
    for all_evals in (False, True):
        ref, _ = read_run(str(tmp_path / "j" / "run"), all_evals)
        tb, _ = read_run(str(tmp_path / "t" / "run"), all_evals)
        assert len(tb) == len(ref) > 0
        ref_i, tb_i = by_metric(ref), by_metric(tb)
        assert ref_i.keys() == tb_i.keys()
        for k, r in ref_i.items():
            t = tb_i[k]
            assert t["value"] == pytest.approx(r["value"], rel=1e-6)  # TB stores float32
            assert (t["tokens"], t["exposures"], t["infusion"]) == (r["tokens"], r["exposures"], r["infusion"])


def test_cli_writes_the_table(tmp_path, make_run):
    for i, x in enumerate((0.1, 0.2, 0.4)):
        make_run(tmp_path / "runs", f"r{i}", model_params=1000, infusion=x,
                 retention_domain=lambda s, x=x: 1 - x)
    out = tmp_path / "table.csv"
    res = subprocess.run(
        [sys.executable, "tools/extract_metrics.py", str(tmp_path / "runs" / "r*"), "--glob",
         "--out", str(out)], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    rows = read_table(str(out))
    dom = sorted((r["infusion"], r["value"]) for r in rows if r["metric"] == "retention/domain")
    assert dom == [(0.1, 0.9), (0.2, 0.8), (0.4, 0.6)]
    assert set(rows[0]) >= {"model_params", "tokens", "infusion", "metric", "value", "run_id",
                            "step", "exposures", "infusion_kind"}
    bad = subprocess.run(
        [sys.executable, "tools/extract_metrics.py", str(tmp_path / "missing"), "--out",
         str(tmp_path / "t2.csv")], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "Traceback" not in bad.stderr
    assert not (tmp_path / "t2.csv").exists()
