"""Aggregation of the compute ledgers: compute.csv from hand-made compute.json files, the Cost column
of the Markdown table, the GPU-hours figure."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from openmind_bench.aggregate import OUTPUT_NAMES, benchmark_table
from openmind_bench.aggregate.compute import COLUMNS, cost_labels, hours_by_method_and_architecture, read_table
from test_aggregate import _texts_outside_canvas

MAE = "mae__ResEncL__all__default__150"
SCRATCH = "scratch__ResEncL__150"


def write_json(path: Path, doc: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    return path


def metrics(root: Path, dataset: str, run: str, method: str, schedule: str | None, value: float) -> Path:
    doc = {"dataset": dataset, "run": run, "method": method, "architecture": "ResEncL", "selection": "all",
           "epochs": 150, "fold": "test", "cases": [{"case": "c1", "DSC": value}, {"case": "c2", "DSC": value / 2}]}
    if schedule:
        doc["schedule"] = schedule
    return write_json(root / "downstream" / dataset / run / "fold_test" / "metrics.json", doc)


def ledger(stage: str, hours: float, gpu: bool = True) -> dict:
    return {"stage": stage, "status": "finished", "segments": 1, "device_type": "cuda" if gpu else "cpu",
            "device_name": "NVIDIA H100 80GB HBM3" if gpu else "some CPU", "device_count": 4 if gpu else 1,
            "nodes": 1, "precision": "float16", "wall_seconds": hours * 900, "steps": 1000,
            "gpu_hours": hours if gpu else None, "cpu_hours": None if gpu else hours,
            "steps_per_second": 2.5, "peak_memory_bytes": [20 * 2**30, 22 * 2**30], "flops_per_step": 3e13,
            "flops_note": None, "mfu": 0.3, "data_wait_ms_per_step": 4.0, "data_wait_fraction": 0.01}


@pytest.fixture
def results(tmp_path) -> tuple[Path, list[Path]]:
    root = tmp_path / "results"
    paths = [metrics(root, "d_1", MAE, "mae", "default", 0.8), metrics(root, "d_2", MAE, "mae", "default", 0.6),
             metrics(root, "d_1", SCRATCH, "scratch", None, 0.7), metrics(root, "d_2", SCRATCH, "scratch", None, 0.5)]
    write_json(root / "pretrain" / "mae__ResEncL__all" / "compute.json", ledger("pretrain", 100.0))
    write_json(paths[0].parent / "compute.json", ledger("finetune_segmentation", 2.0))
    write_json(paths[1].parent / "compute.json", ledger("finetune_segmentation", 3.0))
    write_json(paths[2].parent / "compute.json", ledger("finetune_segmentation", 4.0))
    return root, paths  # d_2's scratch run has no ledger (a run of an earlier version)


def test_compute_csv_cost_column_and_figure(results, tmp_path):
    root, paths = results
    out = tmp_path / "benchmark"
    outputs = benchmark_table(paths, out, registry=None, bootstrap_samples=20, seed=0)
    assert outputs.compute == out / OUTPUT_NAMES["compute"]
    table = read_table(outputs.compute)
    assert list(table.columns) == COLUMNS
    assert sorted(zip(table.kind, table.run, table.dataset.fillna(""))) == [
        ("finetune", MAE, "d_1"), ("finetune", MAE, "d_2"), ("finetune", SCRATCH, "d_1"),
        ("pretrain", "mae__ResEncL__all", "")]
    pre = table[table.kind == "pretrain"].iloc[0]
    assert (pre.method, pre.architecture, pre.gpu_hours, pre.peak_memory_gib) == ("mae", "ResEncL", 100.0, 22.0)
    fine = table[(table.kind == "finetune") & (table.run == MAE)]
    assert set(fine.pretrain_run) == {"mae__ResEncL__all"} and set(fine.schedule) == {"default"}

    md = (out / "benchmark_table.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| Method"))
    assert header.rstrip(" |").endswith("Cost")
    mae_line = next(line for line in md.splitlines() if line.startswith("| mae "))
    scratch_line = next(line for line in md.splitlines() if line.startswith("| scratch "))
    assert mae_line.rstrip(" |").endswith("105 GPU-h")  # 100 pre-training + 2 + 3 fine-tuning
    assert scratch_line.rstrip(" |").endswith("4 GPU-h")
    assert (out / "plots" / "compute_hours.png").stat().st_size > 10_000


def test_cpu_runs_cost_cpu_hours_and_the_figure_says_so(results, tmp_path):
    root, paths = results
    for path in root.rglob("compute.json"):
        doc = json.loads(path.read_text())
        path.write_text(json.dumps(ledger(doc["stage"], doc["gpu_hours"] / 100, gpu=False)))
    from openmind_bench.aggregate.collect import gather
    from openmind_bench.aggregate.compute import ledger_table

    frame = ledger_table(paths, gather(paths).run_labels)
    assert cost_labels(frame) == {("mae", "ResEncL", "default"): "1.05 CPU-h", ("scratch", "ResEncL", "none"): "0.04 CPU-h"}
    hours, unit = hours_by_method_and_architecture(frame)
    assert unit == "CPU-hours"
    assert hours.loc[("mae", "ResEncL")].tolist() == pytest.approx([1.0, 0.05])
    from openmind_bench.aggregate import plots

    fig = plots.compute_hours(frame, tmp_path / "hours.png")
    assert fig.axes[0].get_xlabel() == "CPU-hours" and not _texts_outside_canvas(fig)


def test_without_ledgers_the_csv_is_empty_and_the_table_has_no_cost(results, tmp_path):
    root, paths = results
    for path in root.rglob("compute.json"):
        path.unlink()
    out = tmp_path / "benchmark"
    benchmark_table(paths, out, registry=None, bootstrap_samples=20, seed=0)
    assert pd.read_csv(out / "compute.csv").empty
    assert "Cost" not in (out / "benchmark_table.md").read_text()
    assert not (out / "plots" / "compute_hours.png").exists()
