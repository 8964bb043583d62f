"""compute.json of a tiny fine-tuning run: segmentation inside nnU-Net and classification on the engine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("nnunetv2")

from openmind_bench.downstream import classification  # noqa: E402
from openmind_bench.downstream.nnunet import run as nnrun  # noqa: E402
from openmind_bench.engine.ledger import FIELDS, LEDGER_FILE  # noqa: E402
from test_classification import CLS, _settings as classification_settings  # noqa: E402
from test_nnunet import lesion_set, settings_for  # noqa: E402,F401  (lesion_set: a fixture)


def check_common(doc: dict, steps: int) -> None:
    assert set(doc) == set(FIELDS) and doc["status"] == "finished"
    assert (doc["device_type"], doc["device_count"], doc["nodes"]) == ("cpu", 1, 1)
    assert doc["steps"] == steps and doc["steps_per_second"] == pytest.approx(steps / doc["train_seconds"])
    assert 0 < doc["train_seconds"] < doc["wall_seconds"]
    assert doc["cpu_hours"] > 0 and doc["gpu_hours"] is None
    assert doc["flops_per_step"] > 0 and doc["flops_note"] is None
    assert doc["peak_memory_bytes"][0] > 0 and doc["data_wait_seconds"][0] > 0
    assert doc["mfu"] is None


@pytest.mark.slow  # a whole nnU-Net run (preprocessing, training, prediction), twice
def test_segmentation_finetuning_in_nnunet_writes_its_ledger(lesion_set, tmp_path):  # noqa: F811
    s = settings_for(lesion_set, "scratch__ResEncTiny__2", epochs_steps=2)
    assert nnrun.finetune_segmentation(s, threads=1) == "finished"
    out = Path(s.out_dir)
    doc = json.loads((out / LEDGER_FILE).read_text())
    check_common(doc, steps=4)  # 2 epochs x 2 iterations
    assert doc["stage"] == "finetune_segmentation" and doc["run"] == s.run
    assert doc["workload"] == {"task": "seg", "architecture": "ResEncTiny", "patch_size": [32, 32, 32],
                               "batch_size": 2}
    # forced again with the same settings: the model is reused, its training's ledger stands
    (out / "metrics.json").unlink()
    assert nnrun.finetune_segmentation(s, threads=1) == "finished"
    assert json.loads((out / LEDGER_FILE).read_text()) == doc


def test_classification_finetuning_writes_its_ledger(downstream_root, tmp_path):
    run = "scratch__PrimusTiny__2"
    s = classification_settings(downstream_root, tmp_path, CLS, run)
    assert classification.run(s) == "finished"
    doc = json.loads((Path(s.out_dir) / LEDGER_FILE).read_text())
    check_common(doc, steps=2)  # 2 epochs x 1 optimiser step of 2 accumulated micro-batches
    assert doc["stage"] == "finetune_classification" and doc["threads_per_process"] == 2
    assert doc["workload"] == {"task": "cls", "architecture": "PrimusTiny", "patch_size": [32, 32, 32],
                               "batch_size": 4}
