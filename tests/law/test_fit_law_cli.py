import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kis_megatron.law.table import write_table

REPO = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fit_law(*args):
    return subprocess.run([sys.executable, "tools/fit_law.py", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True)


def test_end_to_end_from_a_table(tmp_path, make_rows):
    table = tmp_path / "t.csv"
    write_table(make_rows(seed=4), str(table))
    out = tmp_path / "fit"
    res = fit_law("--table", table, "--out", out, "--chance", "0.2", "--bootstrap", 50,
                  "--predict", "1e9")
    assert res.returncode == 0, res.stderr
    law = json.loads((out / "law.json").read_text())
    # DESIGN.md keys
    assert law["exponent"] == pytest.approx(0.3, rel=0.05)
    assert law["coefficient"] > 0 and len(law["exponent_ci"]) == 2
    assert law["exponent_ci"][0] < law["exponent"] < law["exponent_ci"][1]
    assert len(law["collapse_points"]) == 5
    for p in law["collapse_points"]:
        assert {"model_params", "tokens", "collapse_infusion", "ci", "status"} <= set(p)
        assert p["status"] == "collapse" and p["ci"][0] < p["collapse_infusion"] < p["ci"][1]
        assert p["collapse_infusion"] == pytest.approx(3e-3 * p["model_params"] ** 0.3, rel=0.1)
    pred = law["prediction"]
    assert pred["model_params"] == 1e9
    assert pred["interval"][0] < pred["collapse_infusion"] < pred["interval"][1]
    assert law["heldout"]["possible"] and law["heldout"]["held_out_model_params"] == 1e8
    for name in ("retention_curves.png", "law.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    report = (out / "report.md").read_text()
    for section in ("## Method", "## Collapse points", "## Law", "## Held-out check",
                    "## Prediction", "## Caveats"):
        assert section in report
    assert f"{law['exponent']:.4g}" in report

    # Running again into the same directory replaces the earlier output as a whole.
    res = fit_law("--table", table, "--out", out, "--chance", "0.2", "--bootstrap", 10)
    assert res.returncode == 0, res.stderr
    assert json.loads((out / "law.json").read_text())["prediction"] is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fit", "t.csv"]  # no temp dirs left


def test_end_to_end_from_run_directories(tmp_path, make_run, true_retention):
    levels = np.geomspace(0.02, 2.0, 7)
    for n in (1e5, 1e6, 1e7):
        cp = 3e-3 * n**0.3
        for x in levels:
            make_run(tmp_path / "runs", f"n{n:g}/x{x:.3g}", model_params=int(n), infusion=float(x),
                     retention_domain=lambda s, x=x, cp=cp: true_retention(x, cp, width=0.2))
    out = tmp_path / "fit"
    res = fit_law("--runs", tmp_path / "runs", "--out", out, "--chance", "auto",
                  "--bootstrap", 20, "--predict", "1e8")
    assert res.returncode == 0, res.stderr
    law = json.loads((out / "law.json").read_text())
    assert law["exponent"] == pytest.approx(0.3, abs=0.005)  # noise-free curves
    assert law["method"]["chance"] == pytest.approx(0.2)
    assert law["infusion_kind"] == "ratio" and len(law["sources"]) == 21
    assert (out / "table.csv").is_file()
    assert law["prediction"]["collapse_infusion"] == pytest.approx(3e-3 * 1e8**0.3, rel=0.02)


def test_bad_inputs_exit_2_and_write_nothing(tmp_path, make_rows):
    one = tmp_path / "one.csv"
    write_table(make_rows(sizes=(1e6,)), str(one))
    out = tmp_path / "out" / "fit"
    res = fit_law("--table", one, "--out", out)
    assert res.returncode == 2
    assert res.stderr.startswith("error: ") and "one model size only" in res.stderr
    assert "Traceback" not in res.stderr
    assert not out.exists()

    narrow = tmp_path / "narrow.csv"  # every collapse beyond the measured range
    write_table(make_rows(levels=np.geomspace(1e-3, 0.05, 6)), str(narrow))
    res = fit_law("--table", narrow, "--out", out, "--chance", "0.2", "--bootstrap", 10)
    assert res.returncode == 2 and "no law can be fitted" in res.stderr
    assert not out.parent.exists()  # not even the parent was created

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("keep me")
    res = fit_law("--table", narrow, "--out", busy)
    assert res.returncode == 2 and "without law.json" in res.stderr
    assert [p.name for p in busy.iterdir()] == ["notes.txt"]
