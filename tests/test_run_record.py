"""A re-run trains with the settings it was given: a run folder's state (checkpoints, nnU-Net model
folders, logs) is used only when the record written beside it equals the job's own; the pre-training
and classification launchers follow it (segmentation: test_nnunet.py)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from openmind_bench.downstream import worker as finetune_worker
from openmind_bench.engine import checkpoint
from openmind_bench.engine.record import RECORD, RunRecord, prepare_run_dir
from openmind_bench.pretrain import trainer
from openmind_bench.pretrain import worker as pretrain_worker

from test_classification import CLS, _settings as cls_settings
from test_trainer import progress_rows, small_settings


def test_record_digest_covers_settings_and_file_contents_not_ignored_keys_or_paths(tmp_path):
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(b"weights")
    b.write_bytes(b"weights")
    base = RunRecord.of({"lr": 0.1, "threads": 4}, ignore=["threads"], files={"checkpoint": a, "split": None})
    assert RunRecord.of({"lr": 0.1, "threads": 8}, ignore=["threads"], files={"checkpoint": a}).digest == base.digest
    assert RunRecord.of({"lr": 0.1}, files={"checkpoint": b}).digest == base.digest  # same bytes elsewhere
    assert RunRecord.of({"lr": 0.2}, files={"checkpoint": a}).digest != base.digest
    b.write_bytes(b"other weights")
    changed = RunRecord.of({"lr": 0.1}, files={"checkpoint": b})
    assert changed.digest != base.digest
    assert changed.differences(base) == [f"checkpoint sha256: {base.inputs['checkpoint']['sha256'][:12]} -> "
                                         f"{changed.inputs['checkpoint']['sha256'][:12]}"]
    with pytest.raises(FileNotFoundError, match="input checkpoint of the run does not exist: .*absent.pt"):
        RunRecord.of({}, files={"checkpoint": tmp_path / "absent.pt"})


def test_prepare_keeps_state_of_an_identical_run_and_removes_any_other(tmp_path, caplog):
    out = tmp_path / "run"
    record = RunRecord.of({"steps": 100})
    assert prepare_run_dir(out, record, ["model", "latest.pt"]) is False  # nothing there yet
    (out / "model").mkdir()
    (out / "model" / "final.pth").write_text("trained")
    (out / "keep.txt").write_text("not state")
    assert prepare_run_dir(out, RunRecord.of({"steps": 100}), ["model", "latest.pt"]) is True
    assert (out / "model" / "final.pth").exists()
    with caplog.at_level(logging.WARNING):
        assert prepare_run_dir(out, RunRecord.of({"steps": 50}), ["model", "latest.pt"], label="job") is False
    assert "steps: 100 -> 50" in caplog.text and not (out / "model").exists() and (out / "keep.txt").exists()
    assert json.loads((out / RECORD).read_text())["settings"] == {"steps": 50}
    # state without a record (an older version, a hand-made folder) is never trusted
    (out / RECORD).unlink()
    (out / "latest.pt").write_text("x")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert prepare_run_dir(out, RunRecord.of({"steps": 50}), ["model", "latest.pt"]) is False
    assert "no record of the settings" in caplog.text and not (out / "latest.pt").exists()


def test_pretraining_resumes_only_a_checkpoint_of_the_same_settings(tmp_path, caplog):
    """A preempted run whose settings then change (more epochs) trains anew; it used to resume the
    old run with a warning, mixing two settings in one checkpoint."""
    s = small_settings(tmp_path / "run", "mae", epochs=2, steps_per_epoch=1)
    assert pretrain_worker.launch(s, nproc=1, threads=1) == 0
    out = Path(s.out_dir)
    (out / checkpoint.FINAL).rename(out / checkpoint.LATEST)  # as if stopped before its end

    longer = small_settings(tmp_path / "run", "mae", epochs=3, steps_per_epoch=1)
    with caplog.at_level(logging.INFO, logger="openmind_bench"):
        assert pretrain_worker.launch(longer, nproc=1, threads=1) == 0
    assert "epochs: 2 -> 3" in caplog.text and "resuming" not in caplog.text
    assert [int(r["epoch"]) for r in progress_rows(out)] == [1, 2, 3]
    state = checkpoint.load(out / checkpoint.FINAL)
    assert state["trainer_settings"]["epochs"] == 3 and [h["epoch"] for h in state["history"]] == [1, 2, 3]

    # the same settings once more, final checkpoint present (outside Snakemake): it is the result
    caplog.clear()
    stamp = (out / checkpoint.FINAL).stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="openmind_bench"):
        assert pretrain_worker.launch(longer, nproc=1, threads=1) == 0
    assert "it is the result" in caplog.text and (out / checkpoint.FINAL).stat().st_mtime_ns == stamp


def _kept(settings, **changes):
    settings.keep_checkpoint = True
    for key, value in changes.items():
        setattr(settings, key, value)
    return settings


def test_classification_reuses_only_an_identical_finished_run(downstream_root, tmp_path, caplog):
    run = "scratch__ResEncTiny__2"
    s = _kept(cls_settings(downstream_root, tmp_path, CLS, run))
    assert finetune_worker.launch(s, nproc=1, threads=1) == 0
    out = Path(s.out_dir)
    final = (out / checkpoint.FINAL).read_bytes()
    (out / "metrics.json").unlink()  # what Snakemake removes before it runs the job again

    with caplog.at_level(logging.INFO, logger="openmind_bench"):
        assert finetune_worker.launch(_kept(cls_settings(downstream_root, tmp_path, CLS, run)), nproc=1,
                                      threads=1) == 0
    doc = json.loads((out / "metrics.json").read_text())
    assert "reusing the trained model" in caplog.text and doc["training"]["reused"] is True
    assert (out / checkpoint.FINAL).read_bytes() == final
    (out / "metrics.json").unlink()

    caplog.clear()
    changed = _kept(cls_settings(downstream_root, tmp_path, CLS, run), label_smoothing=0.05)
    with caplog.at_level(logging.INFO, logger="openmind_bench"):
        assert finetune_worker.launch(changed, nproc=1, threads=1) == 0
    doc = json.loads((out / "metrics.json").read_text())
    assert "label_smoothing: 0.2 -> 0.05" in caplog.text and "reused" not in doc["training"]
    assert (out / checkpoint.FINAL).read_bytes() != final
    assert doc["run_record"]["digest"] == json.loads((out / RECORD).read_text())["digest"]
