"""CSV/TSV files meant for spreadsheets carry no cell a spreadsheet would run as a formula (OWASP CSV
injection); numbers stay numbers, and machine files (JSON) keep the true values."""

import json

import numpy as np
import pandas as pd
import pytest

from openmind_bench.spreadsheet import neutralise_cell, neutralise_frame

LINK = '=HYPERLINK("http://x","y")'  # what a participants.tsv cell can hold


@pytest.mark.parametrize("value, expected", [
    (LINK, "'" + LINK),
    ("+1+1", "'+1+1"),
    ("-2+3", "'-2+3"),
    ("@SUM(A1)", "'@SUM(A1)"),
    ("\t=1+1", "'\t=1+1"),
    ("\r=1+1", "'\r=1+1"),
    ("-0.5", "-0.5"),  # text that reads as a number is a number to a spreadsheet
    ("+3", "+3"),
    (-0.5, -0.5),
    ("sub-01", "sub-01"),
    ("", ""),
    (None, None),
    ("'" + LINK, "'" + LINK),  # twice changes nothing
])
def test_neutralise_cell(value, expected):
    assert neutralise_cell(value) == expected


def test_neutralise_frame_touches_text_only_and_keeps_the_input():
    frame = pd.DataFrame({"case": [LINK, "sub-02", None], "value": [-0.5, 0.25, np.nan], "-col": ["a", "b", "c"]})
    out = neutralise_frame(frame)
    assert list(out.columns) == ["case", "value", "'-col"]
    assert out.case.tolist()[:2] == ["'" + LINK, "sub-02"] and pd.isna(out.case.iloc[2])
    assert out.value.dtype == float and out.value.iloc[0] == -0.5
    assert frame.case.iloc[0] == LINK  # the caller's frame is not changed


def _metrics_json(root, case):
    path = root / "DemoSet" / "scratch__ResEncTiny__2" / "fold_test" / "metrics.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"dataset": "DemoSet", "run": "scratch__ResEncTiny__2", "fold": "test",
                                "method": "scratch", "architecture": "ResEncTiny", "epochs": 2,
                                "cases": [{"case": case, "DSC": 0.5}, {"case": "sub-02", "DSC": 0.75}]}))
    return path


def test_results_long_csv_neutralises_a_participant_value(tmp_path):
    from openmind_bench.aggregate.collect import write_results

    metrics = _metrics_json(tmp_path / "downstream", LINK)
    out = tmp_path / "results_long.csv"
    write_results([metrics], out)
    long = pd.read_csv(out, keep_default_na=False, dtype=str)
    assert set(long.case) == {"'" + LINK, "sub-02"}
    assert sorted(pd.to_numeric(long.value)) == [0.5, 0.75]
    assert json.loads(metrics.read_text())["cases"][0]["case"] == LINK  # the machine file keeps the truth


def test_benchmark_csvs_neutralise_text(tmp_path):
    from openmind_bench.aggregate import _write_csv

    _write_csv(tmp_path / "t.csv", pd.DataFrame({"method": [LINK], "DSC": [-0.5]}))
    back = pd.read_csv(tmp_path / "t.csv")
    assert back.method.tolist() == ["'" + LINK] and back.DSC.tolist() == [-0.5]


def test_rejected_tsv_and_its_parts_neutralise_text(tmp_path):
    from openmind_bench.qc import Rejections, gather

    rejections = Rejections("index")
    rejections.add(f"data/raw/local/ds1/{LINK}", reason=LINK, dataset="-ds")
    part = tmp_path / "part.tsv"
    rejections.write(part)
    table = tmp_path / "rejected.tsv"
    gather([part], table)
    for path in (part, table):
        row = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False).iloc[0]
        assert (row.reason, row.dataset, row.image) == ("'" + LINK, "'-ds", f"data/raw/local/ds1/{LINK}")


def test_per_case_metrics_csv_neutralises_case_ids(tmp_path):
    from openmind_bench.metrics.report import write_metrics

    doc = {"task": "seg", "cases": [{"case": LINK, "DSC": 0.5, "NSD": None,
                                     "per_class": {"lesion": {"DSC": 0.5, "NSD": None}}}]}
    write_metrics(doc, tmp_path / "metrics.json", tmp_path / "metrics.csv")
    back = pd.read_csv(tmp_path / "metrics.csv", dtype=str, keep_default_na=False)
    assert back.case.tolist() == ["'" + LINK] and back.DSC.tolist() == ["0.5"]
    assert json.loads((tmp_path / "metrics.json").read_text())["cases"][0]["case"] == LINK
