"""`openmind-bench estimate` on a small config: GPU-hours from FLOPs per step at the assumed MFU, and
from a measured ledger where one matches the workload."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from openmind_bench import config as omb_config, nets
from openmind_bench.cli import main
from openmind_bench.engine.ledger import count_flops, peak_flops
from openmind_bench.estimate import FLOPS, MEASURED, estimate, jobs

SMALL = {
    "downstream_registry": "config/downstream_demo.yaml",
    "selections": [{"name": "demo"}],
    "pretrain": {"methods": ["mae"], "architectures": ["ResEncTiny"], "selections": ["demo"], "epochs": 2,
                 "steps_per_epoch": 5, "total_batch_size": 2, "patch_size": [32, 32, 32],
                 "recommended_downstream_patch_size": [32, 32, 32], "resources": {"gpu": 1}},
    "downstream": {"schedules": ["default"], "epochs": [3], "steps_per_epoch": 4, "batch_size": 2,
                   "classification": {"epochs": None, "warmup_epochs": 1, "batch_size": 1,
                                      "accumulation_steps": 2, "steps_per_epoch": None}},
    "finetune": {"datasets": ["DemoLesionT1", "DemoPatientCls"], "scratch_architectures": [],
                 "scratch_patch_size": [32, 32, 32], "resources": {"gpu": 1}},
    "estimate": {"device": "H100", "assumed_mfu": 0.5, "classification_training_cases": 7},
}


def small_config() -> dict:
    return omb_config.validate(json.loads(json.dumps(SMALL)), omb_config.SCHEMA_PATH)


def real_flops(batch: int, channels: int, classes: int) -> int:
    """Forward + backward of ResEncTiny on real CPU tensors (the estimate counts on the meta device)."""
    net = nets.resolve("ResEncTiny").build([32, 32, 32], channels, classes)
    image = torch.randn(batch, channels, 32, 32, 32)

    def step():
        out = net(image)
        (out[0] if isinstance(out, (list, tuple)) else out).float().sum().backward()

    flops, note = count_flops(step)
    assert note is None
    return flops


def test_jobs_of_a_small_config():
    listed = {(j.stage, j.run, j.dataset): j for j in jobs(small_config())}
    assert set(listed) == {("pretrain", "mae__ResEncTiny__demo", None),
                           ("finetune_segmentation", "mae__ResEncTiny__demo__default__3", "DemoLesionT1"),
                           ("finetune_classification", "mae__ResEncTiny__demo__default__3", "DemoPatientCls")}
    assert listed["pretrain", "mae__ResEncTiny__demo", None].steps == 10
    assert listed["finetune_segmentation", "mae__ResEncTiny__demo__default__3", "DemoLesionT1"].steps == 12
    cls = listed["finetune_classification", "mae__ResEncTiny__demo__default__3", "DemoPatientCls"]
    assert cls.steps == 3 * 4  # 3 epochs x ceil(7 cases / batch 1 / 2 accumulated)
    assert cls.workload == {"task": "cls", "architecture": "ResEncTiny", "patch_size": [32, 32, 32], "batch_size": 2}


def test_flops_source_against_an_independent_count(tmp_path):
    lines = {ln.stage: ln for ln in estimate(small_config(), tmp_path / "results")}
    pre = lines["pretrain"]
    assert pre.source == FLOPS and pre.jobs == 1 and pre.steps == 10
    flops = real_flops(2, 1, 1)
    # the pre-training runs at float16 autocast (the schema's default) on an H100 at the assumed 0.5 MFU
    assert pre.gpu_hours == pytest.approx(10 * flops / (0.5 * peak_flops("H100", "float16")) / 3600, rel=1e-6)
    seg = lines["finetune_segmentation"]
    assert seg.source == FLOPS and seg.gpu_hours > 0


def test_a_matching_gpu_ledger_is_used_and_said(tmp_path):
    results = tmp_path / "results"
    ledger = {"stage": "pretrain", "status": "finished", "device_type": "cuda", "device_name": "NVIDIA H100 80GB HBM3",
              "device_count": 4, "steps": 1000, "wall_seconds": 600.0, "steps_per_second": 2.0,
              "workload": {"method": "mae", "architecture": "ResEncTiny", "patch_size": [32, 32, 32], "batch_size": 2}}
    path = results / "pretrain" / "mae__ResEncTiny__other" / "compute.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(ledger))
    cpu = results / "pretrain" / "mae__ResEncTiny__cpu" / "compute.json"  # a CPU ledger says nothing of a GPU
    cpu.parent.mkdir(parents=True)
    cpu.write_text(json.dumps({**ledger, "device_type": "cpu", "steps": 5000, "steps_per_second": 0.01}))
    lines = {ln.stage: ln for ln in estimate(small_config(), results)}
    pre = lines["pretrain"]
    assert pre.source == MEASURED and pre.gpu_hours == pytest.approx(10 / 2.0 * 4 / 3600)
    assert any("2 steps/s" in n for n in pre.notes)
    assert lines["finetune_segmentation"].source == FLOPS  # no ledger of that workload


def test_command_prints_stages_sources_and_the_total(tmp_path, capsys):
    configfile = tmp_path / "small.yaml"
    configfile.write_text(yaml.safe_dump(SMALL))
    assert main(["estimate", "--configfile", str(configfile), "--results", str(tmp_path / "results"),
                 "--json", str(tmp_path / "estimate.json")]) == 0
    printed = capsys.readouterr().out
    assert "pretrain" in printed and "finetune_classification" in printed and "FLOPs" in printed
    total = next(line for line in printed.splitlines() if line.startswith("all "))
    saved = json.loads((tmp_path / "estimate.json").read_text())
    assert float(total.split()[1].replace(",", "")) == pytest.approx(sum(ln["gpu_hours"] for ln in saved), abs=0.5)


def test_a_lora_run_is_estimated_where_its_scope_runs_it():
    config = json.loads(json.dumps(SMALL))
    config["downstream"].update(schedules=["default", "lora"], lora={"datasets": ["DemoPatientCls"]})
    listed = {(j.stage, j.run, j.dataset) for j in jobs(omb_config.validate(config, omb_config.SCHEMA_PATH))}
    assert ("finetune_classification", "mae__ResEncTiny__demo__lora__3", "DemoPatientCls") in listed
    assert not any(run.endswith("__lora__3") and dataset == "DemoLesionT1" for _, run, dataset in listed)
