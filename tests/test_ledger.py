"""The compute ledger (engine.ledger): compute.json of a tiny CPU pre-training run, its FLOP count
against an independent count, a counter that fails, a preempted and resumed run, the peak table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from openmind_bench import ssl
from openmind_bench.engine import ledger as engine_ledger
from openmind_bench.engine.step import derive_seed, sample_seeds
from openmind_bench.pretrain import trainer
from openmind_bench.pretrain.batches import TemplateBatches
from test_trainer import sigterm_at, small_settings

pytestmark = pytest.mark.usefixtures("one_thread")


def read_ledger(out_dir) -> dict:
    return json.loads((Path(out_dir) / engine_ledger.LEDGER_FILE).read_text())


def test_pretraining_writes_every_field_with_a_flop_count_of_the_real_step(tmp_path):
    s = small_settings(tmp_path / "run", "mae", epochs=2, steps_per_epoch=2)
    assert trainer.run(s).status == "finished"
    doc = read_ledger(s.out_dir)
    assert set(doc) == set(engine_ledger.FIELDS)
    assert doc["stage"] == "pretrain" and doc["run"] == "run" and doc["status"] == "finished"
    assert (doc["device_type"], doc["device_count"], doc["nodes"], doc["processes"]) == ("cpu", 1, 1, 1)
    assert doc["precision"] == "float32" and doc["threads_per_process"] == 1
    assert doc["steps"] == 4 and doc["segments"] == 1
    assert 0 < doc["train_seconds"] < doc["wall_seconds"]  # validation and set-up are outside the loop
    assert doc["steps_per_second"] == pytest.approx(4 / doc["train_seconds"])
    assert doc["gpu_hours"] is None and doc["cpu_hours"] == pytest.approx(doc["wall_seconds"] / 3600)
    assert doc["peak_memory_kind"] == "host_max_rss" and len(doc["peak_memory_bytes"]) == 1
    assert doc["peak_memory_bytes"][0] > 50e6
    assert len(doc["data_wait_seconds"]) == 1 and 0 < doc["data_wait_seconds"][0] < doc["train_seconds"]
    assert 0 < doc["data_wait_fraction"] < 1
    assert doc["data_wait_ms_per_step"] == pytest.approx(1000 * doc["data_wait_seconds"][0] / 4)
    assert doc["mfu"] is None and doc["peak_flops_per_device"] is None  # no peak for a CPU
    assert doc["workload"] == {"method": "mae", "architecture": "ResEncTiny", "patch_size": [32, 32, 32],
                               "batch_size": 2}

    # The same count, made independently: forward + backward of the method on the first batch.
    arch = s.arch()
    torch.manual_seed(derive_seed(s.seed, 0))
    method = ssl.build(s.method, arch.build(s.patch_size), arch, s.patch_size, s.method_settings)
    batch = next(iter(TemplateBatches(s).train(epoch=0, first_step=0, steps=1, rank=0, world_size=1,
                                               batch_size=2, seed=derive_seed(s.seed, 1, 0))))
    view = trainer.make_view(method, batch, sample_seeds(s.seed, 2, 0, 0, 0, 2), torch.device("cpu"))
    flops, note = engine_ledger.count_flops(lambda: method(view).backward())
    assert note is None and flops > 0
    assert doc["flops_per_step"] == flops and doc["flops_note"] is None


def test_a_flop_counter_that_fails_leaves_the_field_empty_and_the_run_finishes(tmp_path, monkeypatch):
    import torch.utils.flop_counter as flop_counter

    class Broken:
        def __init__(self, *args, **kwargs):
            raise RuntimeError("aten::mystery_op is not supported")

    monkeypatch.setattr(flop_counter, "FlopCounterMode", Broken)
    s = small_settings(tmp_path / "run", "mae", epochs=1, steps_per_epoch=2)
    assert trainer.run(s).status == "finished"
    doc = read_ledger(s.out_dir)
    assert doc["flops_per_step"] is None and doc["mfu"] is None
    assert "mystery_op" in doc["flops_note"]
    assert doc["steps"] == 2


def test_a_preempted_run_adds_its_segments(tmp_path):
    SignalAtStep = sigterm_at(epoch=1, step=0)
    s = small_settings(tmp_path / "run", "mae", epochs=2, steps_per_epoch=3)
    assert trainer.run(s, SignalAtStep(s)).status == "preempted"
    first = read_ledger(s.out_dir)
    assert (first["status"], first["steps"], first["segments"]) == ("preempted", 4, 1)
    assert trainer.run(s, TemplateBatches(s)).status == "finished"
    both = read_ledger(s.out_dir)
    assert (both["status"], both["steps"], both["segments"]) == ("finished", 6, 2)
    assert both["wall_seconds"] > first["wall_seconds"]
    assert both["cpu_hours"] == pytest.approx(both["wall_seconds"] / 3600)
    assert both["flops_per_step"] == first["flops_per_step"] > 0


def test_peak_table_and_mfu():
    assert engine_ledger.peak_flops("NVIDIA H100 80GB HBM3", "bfloat16") == 989e12
    assert engine_ledger.peak_flops("NVIDIA H100 PCIe", "float16") == 756e12
    assert engine_ledger.peak_flops("NVIDIA H200", "bfloat16") == 989e12
    assert engine_ledger.peak_flops("NVIDIA A100-SXM4-80GB", "float16") == 312e12
    assert engine_ledger.peak_flops("NVIDIA A100-SXM4-80GB", "float32") is None
    assert engine_ledger.peak_flops("NVIDIA GeForce RTX 4090", "bfloat16") is None
    assert engine_ledger.mfu(1e12, 100.0, 1e15) == pytest.approx(0.1)
    assert engine_ledger.mfu(None, 100.0, 1e15) is None


def test_a_compiled_model_is_not_counted_and_a_rescored_run_keeps_its_ledger(tmp_path):
    from openmind_bench.engine.distributed import Context

    ctx = Context(0, 1, 0, torch.device("cpu"))
    ledger = engine_ledger.ComputeLedger(tmp_path, ctx, stage="pretrain", run="r", precision="float32", compiled=True)
    weight = torch.randn(64, 64, requires_grad=True)
    for _ in ledger.timed([1, 2]):
        with ledger.step():
            (weight @ weight).sum().backward()
    doc = ledger.finish("finished")
    assert doc["steps"] == 2 and doc["flops_per_step"] is None and doc["flops_note"].startswith("not counted")
    # a job that trains nothing (a finished model scored again) leaves the training's ledger
    again = engine_ledger.ComputeLedger(tmp_path, ctx, stage="pretrain", run="r", precision="float32")
    assert again.finish("finished") == doc and read_ledger(tmp_path) == doc
    # a counted step: one 64^3 matmul forward and two backward (a gradient per operand), 2 FLOPs per multiply-add
    counted = engine_ledger.ComputeLedger(tmp_path / "counted", ctx, stage="pretrain", run="r", precision="float32")
    with counted.step():
        (weight @ weight).sum().backward()
    assert counted.finish("finished")["flops_per_step"] == 3 * 2 * 64**3
