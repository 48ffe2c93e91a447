import csv
import math

import numpy as np
import pytest

from kis_megatron.law.table import LawInputError, read_table, select_curves, write_table


def test_csv_round_trip_keeps_values_exactly(tmp_path, make_rows):
    rows = make_rows(sizes=(1e6, 3.3e7))
    rows[0]["value"] = 1 / 3
    rows[1]["exposures"] = 12.25
    path = tmp_path / "t.csv"
    write_table(rows, str(path))
    back = read_table(str(path))
    assert len(back) == len(rows)
    for a, b in zip(rows, back):
        for col in ("model_params", "tokens", "infusion", "value", "step", "seed"):
            assert b[col] == a[col]  # repr round-trips floats bit-exactly
        assert b["metric"] == a["metric"] and b["run_id"] == a["run_id"]
    assert back[0]["exposures"] is None and back[1]["exposures"] == 12.25
    assert not [p for p in tmp_path.iterdir() if p.name != "t.csv"]  # no temp file left


def test_curves_are_grouped_sorted_and_hold_all_seeds(make_rows):
    rows = make_rows(sizes=(1e7, 1e6), tokens=(2e9, 1e9), seeds=2)
    curves, kind = select_curves(rows, "retention/domain")
    assert kind == "ratio"
    assert [(c.model_params, c.tokens) for c in curves] == [
        (1e6, 1e9), (1e6, 2e9), (1e7, 1e9), (1e7, 2e9)]
    for c in curves:
        assert c.infusion.size == 18 and np.all(np.diff(c.infusion) >= 0)


def _write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return str(path)


def test_missing_columns_are_named(tmp_path):
    path = _write_csv(tmp_path / "t.csv", ["model_params", "infusion", "value"], [[1e6, 0.1, 0.5]])
    with pytest.raises(LawInputError, match="lacks column\\(s\\) tokens, metric"):
        read_table(path)


def test_non_numeric_cell_is_located(tmp_path):
    path = _write_csv(tmp_path / "t.csv", ["model_params", "tokens", "infusion", "metric", "value"],
                      [[1e6, 1e9, 0.1, "retention/domain", "high"]])
    with pytest.raises(LawInputError, match="line 2: column 'value'"):
        read_table(path)


def _has_pyarrow():
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        return False
    return True


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(LawInputError, match="does not exist"):
        read_table(str(tmp_path / "nope.csv"))


@pytest.mark.skipif(_has_pyarrow(), reason="pyarrow is installed")
def test_parquet_without_pyarrow_is_a_clear_error(tmp_path):
    with pytest.raises(LawInputError, match="pip install pyarrow"):
        write_table([{"model_params": 1}], str(tmp_path / "t.parquet"))
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(not _has_pyarrow(), reason="needs pyarrow")
def test_parquet_round_trip(tmp_path, make_rows):
    rows = make_rows(sizes=(1e6, 1e7))
    write_table(rows, str(tmp_path / "t.parquet"))
    back = read_table(str(tmp_path / "t.parquet"))
    assert [(r["model_params"], r["infusion"], r["value"]) for r in back] == [
        (r["model_params"], r["infusion"], r["value"]) for r in rows]


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda r: r[3].update(value=math.nan), "'value' is empty, NaN or infinite .*table row\\(s\\) 4"),
        (lambda r: r[0].update(value=None), "'value' is empty"),
        (lambda r: r[5].update(infusion=0.0), "'infusion' must be > 0 .*table row\\(s\\) 6"),
        (lambda r: r[2].update(model_params=-5.0), "'model_params' must be > 0"),
        (lambda r: r[1].update(tokens=math.inf), "'tokens' is empty, NaN or infinite"),
    ],
)
def test_bad_values_are_clear_errors(make_rows, change, message):
    rows = make_rows(sizes=(1e6, 1e7))
    change(rows)
    with pytest.raises(LawInputError, match=message):
        select_curves(rows, "retention/domain")


def test_nan_in_another_metric_does_not_block(make_rows):
    rows = make_rows(sizes=(1e6, 1e7))
    rows.append(dict(rows[0], metric="val_loss", value=math.nan))
    curves, _ = select_curves(rows, "retention/domain")
    assert len(curves) == 2


def test_one_model_size_is_an_error(make_rows):
    with pytest.raises(LawInputError, match="one model size only .*N=1e\\+06"):
        select_curves(make_rows(sizes=(1e6,)), "retention/domain")


def test_unknown_metric_lists_the_available_ones(make_rows):
    with pytest.raises(LawInputError, match="'retention/dom' is not in the table; it has: retention/domain"):
        select_curves(make_rows(), "retention/dom")


def test_mixed_infusion_kinds_need_a_choice(make_rows):
    rows = make_rows(sizes=(1e6, 1e7)) + make_rows(sizes=(1e6, 1e7), kind="domain_facts")
    with pytest.raises(LawInputError, match="mix infusion kinds \\(domain_facts, ratio\\)"):
        select_curves(rows, "retention/domain")
    curves, kind = select_curves(rows, "retention/domain", "domain_facts")
    assert kind == "domain_facts" and len(curves) == 2
    with pytest.raises(LawInputError, match="no retention/domain rows have infusion_kind 'window'"):
        select_curves(rows, "retention/domain", "window")


def test_too_few_infusion_levels(make_rows):
    rows = make_rows(sizes=(1e6, 1e7), levels=np.array([0.1, 0.2, 0.4]))
    with pytest.raises(LawInputError, match="3 distinct infusion level\\(s\\); .* at least 4"):
        select_curves(rows, "retention/domain")


def test_exposures_at_interpolates_in_log_log_between_levels():
    from kis_megatron.law.table import Curve

    x = np.array([32.0, 32.0, 128.0, 512.0])
    c = Curve(1e6, 1e9, x, np.array([1.0, 0.9, 0.5, 0.2]), exposures=np.array([400.0, 400.0, 100.0, 25.0]))
    assert c.exposures_at(64.0) == pytest.approx(200.0)  # exposures ~ 1 / facts: exact in log-log
    assert c.exposures_at(512.0) == pytest.approx(25.0)
    assert c.exposures_at(1024.0) is None and Curve(1e6, 1e9, x, x).exposures_at(64.0) is None
