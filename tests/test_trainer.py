"""The pre-training engine on the small networks and crops of the MNI152 template: schedules, logs,
DDP over two gloo processes, exact resume after kill -9, and checkpoint-and-exit on SIGTERM/SIGUSR1."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from openmind_bench import config as omb_config
from openmind_bench.engine import checkpoint, optimisation, step as engine_step
from openmind_bench.pretrain import settings as run_settings, trainer
from openmind_bench.pretrain import worker as launch
from openmind_bench.pretrain.batches import TemplateBatches

SRC = str(Path(__file__).resolve().parents[1] / "src")

SMALL = {
    "patch_size": [32, 32, 32],
    "epochs": 3,
    "steps_per_epoch": 3,
    "val_steps": 1,
    "total_batch_size": 2,
    "checkpoint_every": 1,
    "log_every_steps": 1,
    "method_settings": {"mae_cnn": {"block_size": 8}, "spark3d": {"block_size": 8}},
    "optimisation": {"transformer": {"warmup_epochs": 1}},
}


def sigterm_at(epoch: int, step: int) -> type:
    """A template batch source that sends this process SIGTERM as it yields (epoch, step), 0-based:
    a preemption at a chosen place in the run."""

    class SignalAtStep(TemplateBatches):
        def train(self, *, epoch: int, first_step: int, **kwargs):
            for at, batch in enumerate(super().train(epoch=epoch, first_step=first_step, **kwargs), first_step):
                if (epoch, at) == place:
                    os.kill(os.getpid(), signal.SIGTERM)
                yield batch

    place = (epoch, step)
    return SignalAtStep


def small_settings(out_dir: Path, method: str = "mae", arch: str = "ResEncTiny", **overrides):
    section = omb_config.deep_update(json.loads(json.dumps(SMALL)), overrides)
    settings = run_settings.resolve(section, method, arch, out_dir=str(out_dir))
    settings.batch_source = "openmind_bench.pretrain.batches:template_batches"
    settings.threads = 1
    return settings


pytestmark = pytest.mark.usefixtures("one_thread")


def final_weights(out_dir: Path) -> dict:
    state = checkpoint.load(Path(out_dir) / checkpoint.FINAL)
    return {**state["network_weights"], **{f"pretext.{k}": v for k, v in state["pretext_weights"].items()}}


def progress_rows(out_dir: Path) -> list[dict]:
    path = Path(out_dir) / "progress.csv"
    return list(csv.DictReader(path.open())) if path.exists() else []


def worker_env() -> dict:
    return {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}


def test_schedules_follow_nnssl():
    cnn = omb_config.defaults()["pretrain"]["optimisation"]["cnn"]
    assert optimisation.learning_rate(cnn, 0, 1000) == pytest.approx(1e-2)
    assert optimisation.learning_rate(cnn, 500, 1000) == pytest.approx(1e-2 * 0.5**0.9)
    assert optimisation.learning_rate(cnn, 999, 1000) == pytest.approx(1e-2 * 0.001**0.9)
    primus = omb_config.defaults()["pretrain"]["optimisation"]["transformer"]
    assert optimisation.learning_rate(primus, 0, 1000) == pytest.approx(3e-4 / 50)
    assert optimisation.learning_rate(primus, 49, 1000) == pytest.approx(3e-4)
    assert optimisation.learning_rate(primus, 50, 1000) == pytest.approx(3e-4)
    assert optimisation.learning_rate(primus, 525, 1000) == pytest.approx(3e-4 * 0.5**0.9)
    with pytest.raises(ValueError, match="warmup_epochs"):
        optimisation.learning_rate(primus, 0, 50)
    sgd = optimisation.build_optimizer(torch.nn.Linear(2, 2).parameters(), cnn, torch.device("cpu"))
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["nesterov"] and sgd.defaults["momentum"] == 0.99
    adamw = optimisation.build_optimizer(torch.nn.Linear(2, 2).parameters(), primus, torch.device("cpu"))
    assert isinstance(adamw, torch.optim.AdamW) and adamw.defaults["betas"] == (0.9, 0.98)


def test_settings_resolve_per_run(tmp_path):
    s = run_settings.resolve({}, "spark3d_anat_anon", "ResEncL", out_dir=str(tmp_path), selection="sel")
    assert s.optimisation["optimizer"] == "sgd" and s.optimisation["grad_clip"] == 12.0
    assert s.method_settings == {}  # overrides only; DEFAULTS of the implementation apply in the job
    assert run_settings.resolve({"method_settings": {"spark3d": {"block_size": 32}}}, "spark3d", "ResEncL",
                                out_dir=str(tmp_path)).method_settings == {"block_size": 32}
    assert s.anatomy_aware and s.epochs == 1000 and s.steps_per_epoch == 250 and s.total_batch_size == 8
    assert run_settings.PretrainSettings.from_dict(s.to_dict()) == s
    p = run_settings.resolve({"optimisation": {"transformer": {"warmup_epochs": 5}}}, "mae", "PrimusM",
                             out_dir=str(tmp_path))
    assert p.optimisation == {**omb_config.defaults()["pretrain"]["optimisation"]["transformer"], "warmup_epochs": 5}
    with pytest.raises(ValueError, match="no implementation for transformer"):
        run_settings.resolve({}, "spark3d", "PrimusM", out_dir=str(tmp_path))
    with pytest.raises(ValueError, match="token size"):
        run_settings.resolve({"patch_size": [100, 100, 100]}, "mae", "PrimusM", out_dir=str(tmp_path))
    with pytest.raises(ValueError, match="unknown key"):
        run_settings.PretrainSettings.from_dict({**s.to_dict(), "epochz": 3})


def test_run_logs_checkpoints_and_a_rerun_trains_again(tmp_path):
    s = small_settings(tmp_path / "run", "spark3d_anon", epochs=2)
    outcome = trainer.run(s)
    assert outcome.status == "finished"
    out = Path(s.out_dir)
    assert (out / checkpoint.FINAL).exists() and not (out / checkpoint.LATEST).exists()
    rows = progress_rows(out)
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert all(float(r["val_loss"]) > 0 and float(r["train_loss"]) > 0 for r in rows)
    assert float(rows[1]["lr"]) < float(rows[0]["lr"])
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert json.loads((out / "settings.json").read_text())["method"] == "spark3d_anon"
    assert not list(out.glob(".*tmp*"))  # atomic writes leave no temporary files
    # A job Snakemake runs again (settings changed, or forced) trains anew: never "already done".
    stamp = (out / checkpoint.FINAL).stat().st_mtime_ns
    assert trainer.run(s).status == "finished"
    assert (out / checkpoint.FINAL).stat().st_mtime_ns > stamp


def test_ddp_two_gloo_processes_equal_one_process(tmp_path):
    """torchrun with 2 gloo processes (1 sample each) ends with the weights of 1 process on the
    2-sample batch. Spark3D with anonymisation-aware loss: per-sample mask ratios and loss weights."""
    one = small_settings(tmp_path / "one", "spark3d_anon", epochs=2, steps_per_epoch=2)
    two = small_settings(tmp_path / "two", "spark3d_anon", epochs=2, steps_per_epoch=2)
    assert launch.launch(two, nproc=2, threads=2) == 0
    assert trainer.run(one).status == "finished"
    a, b = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=1e-4, atol=1e-6), key
    torch.manual_seed(engine_step.derive_seed(one.seed, 0))  # the engine's initial weights
    initial = one.arch().build(one.patch_size).state_dict()
    moved = [k for k, v in initial.items() if v.is_floating_point() and not torch.allclose(v, a[k])]
    assert len(moved) > 0.5 * len(initial)  # training happened: the equality is not the initial state's
    rows_one, rows_two = progress_rows(tmp_path / "one"), progress_rows(tmp_path / "two")
    for r1, r2 in zip(rows_one, rows_two):
        assert float(r1["train_loss"]) == pytest.approx(float(r2["train_loss"]), rel=1e-4)
        assert float(r1["val_loss"]) == pytest.approx(float(r2["val_loss"]), rel=1e-4)


def test_kill_9_then_resume_equals_uninterrupted_run(tmp_path):
    reference = small_settings(tmp_path / "reference", "mae_anon", "PrimusTiny", epochs=5, steps_per_epoch=4)
    assert trainer.run(reference).status == "finished"

    killed = small_settings(tmp_path / "killed", "mae_anon", "PrimusTiny", epochs=5, steps_per_epoch=4)
    Path(killed.out_dir).mkdir(parents=True)
    killed.write(Path(killed.out_dir) / "settings.json")
    proc = subprocess.Popen([sys.executable, "-m", "openmind_bench.pretrain.worker", str(Path(killed.out_dir) /
                                                                                    "settings.json")],
                            env=worker_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while len(progress_rows(killed.out_dir)) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (Path(killed.out_dir) / checkpoint.FINAL).exists(), "the run ended before it was killed"
    state = checkpoint.load(Path(killed.out_dir) / checkpoint.LATEST)
    assert 1 <= state["current_epoch"] < 5 and state["step_in_epoch"] == 0

    assert trainer.run(killed).status == "finished"
    a, b = final_weights(tmp_path / "reference"), final_weights(tmp_path / "killed")
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=1e-5, atol=1e-7), key
    assert [r["epoch"] for r in progress_rows(killed.out_dir)] == [str(e) for e in range(1, 6)]


def test_sigterm_mid_epoch_checkpoints_then_resumes_exactly(tmp_path):
    """SIGTERM arriving at step 2 of epoch 2: the run checkpoints that step and returns; resumed, it
    ends exactly where an uninterrupted run ends (the template source can seek)."""

    SignalAtStep = sigterm_at(epoch=1, step=1)
    reference = small_settings(tmp_path / "reference", "simmim_anon", "PrimusTiny", epochs=3, steps_per_epoch=4)
    assert trainer.run(reference).status == "finished"
    s = small_settings(tmp_path / "stopped", "simmim_anon", "PrimusTiny", epochs=3, steps_per_epoch=4)
    outcome = trainer.run(s, SignalAtStep(s))
    assert outcome.status == "preempted"
    out = Path(s.out_dir)
    state = checkpoint.load(out / checkpoint.LATEST)
    assert (state["current_epoch"], state["step_in_epoch"]) == (1, 2)
    assert json.loads((out / checkpoint.PREEMPTED).read_text())["signal"] == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is gone again

    assert trainer.run(s, TemplateBatches(s)).status == "finished"
    assert not (out / checkpoint.PREEMPTED).exists()
    a, b = final_weights(tmp_path / "reference"), final_weights(out)
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=1e-5, atol=1e-7), key


def test_launcher_turns_sigusr1_into_a_checkpoint_and_the_preemption_code(tmp_path, caplog):
    """SLURM's warning signal (SIGUSR1) reaches the launcher, which torchrun would not survive: the
    launcher passes SIGTERM on, the worker checkpoints and exits, and the launcher returns
    `preemption_exit_code` (resuming is tested in-process above)."""
    s = small_settings(tmp_path / "run", "simmim", "PrimusTiny", epochs=2, steps_per_epoch=25,
                       preemption_exit_code=75)

    def signal_after_first_epoch():
        deadline = time.time() + 120
        while not progress_rows(s.out_dir) and time.time() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGUSR1)  # to this process, where the launcher runs

    watcher = threading.Thread(target=signal_after_first_epoch, daemon=True)
    watcher.start()
    with caplog.at_level(logging.INFO, logger="openmind_bench"):
        code = launch.launch(s, nproc=1, threads=1)
    watcher.join()
    assert code == 75
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # the launcher's handler is gone again
    out = Path(s.out_dir)
    assert not (out / checkpoint.FINAL).exists()
    state = checkpoint.load(out / checkpoint.LATEST)
    assert state["current_epoch"] >= 1 and state["nnssl_adaptation_plan"]["key_to_encoder"] == "eva"
    assert "SIGTERM" in (out / checkpoint.PREEMPTED).read_text()
    assert "stopped by SIGUSR1" in caplog.text
    assert "epoch 1/2" in caplog.text  # the workers' log reaches the job's log through the launcher


def test_resume_refuses_a_checkpoint_of_other_settings(tmp_path):
    s = small_settings(tmp_path / "run", "mae", epochs=1, steps_per_epoch=1)
    trainer.run(s)
    out = Path(s.out_dir)
    (out / checkpoint.FINAL).rename(out / checkpoint.LATEST)
    other = small_settings(tmp_path / "run", "mae_anon", epochs=2, steps_per_epoch=1)
    with pytest.raises(ValueError, match=r"checkpoint_latest.pt was written by a run with other settings \(method\)"):
        trainer.run(other)


def test_a_short_batch_source_is_an_error(tmp_path):
    class Short(TemplateBatches):
        def train(self, *, steps, **kwargs):
            return super().train(steps=steps - 1, **kwargs)

    s = small_settings(tmp_path / "run", epochs=1)
    with pytest.raises(RuntimeError, match="ended after 2 of 3 steps"):
        trainer.run(s, Short(s))


def test_cli_parses_overrides_into_the_pretrain_section():
    import argparse

    from openmind_bench import config as cli_config
    from openmind_bench.pretrain import cli

    assert cli_config.parse_overrides(["epochs=2", "optimisation.transformer.warmup_epochs=1", "patch_size=[32, 32, 32]"]) == {
        "epochs": 2, "optimisation": {"transformer": {"warmup_epochs": 1}}, "patch_size": [32, 32, 32]}
    with pytest.raises(ValueError, match="key=value"):
        cli_config.parse_overrides(["epochs"])
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    args = parser.parse_args(["pretrain", "--method", "mae", "--arch", "PrimusTiny", "--train-data", "t.json",
                              "--out", "run", "--nproc", "2", "--set", "epochs=2"])
    assert args.func is cli.run and args.nproc == 2 and args.set == ["epochs=2"]


def _processes_with(text: str) -> list[int]:
    """PIDs whose command line contains `text` (this test's own run folder)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def test_killing_the_job_process_group_leaves_no_trainer_and_the_rerun_resumes(tmp_path, caplog):
    """kill -9 on the job's process group (what killing Snakemake does): torchrun's worker lives in a
    session of its own, yet it must not outlive the job. It stops as on a preemption (checkpoint), and
    the same job run again resumes from that checkpoint instead of starting at epoch 1."""
    s = small_settings(tmp_path / "run", "simmim", "PrimusTiny", epochs=6, steps_per_epoch=25)
    settings_file = tmp_path / "job_settings.json"
    s.write(settings_file)
    job = ("import sys\n"
           "from openmind_bench.pretrain.settings import PretrainSettings\n"
           "from openmind_bench.pretrain.worker import launch\n"
           "sys.exit(launch(PretrainSettings.read(sys.argv[1]), nproc=1, threads=1))\n")
    env = {**worker_env(), "PET_SHUTDOWN_TIMEOUT": "30"}
    proc = subprocess.Popen([sys.executable, "-c", job, str(settings_file)], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while not progress_rows(s.out_dir) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert proc.poll() is None, "the job ended before it could be killed"
    run_dir = str(Path(s.out_dir) / "settings.json")  # on every torchrun / worker command line
    assert _processes_with(run_dir), "no worker process found"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 90
    while _processes_with(run_dir) and time.time() < deadline:
        time.sleep(0.2)
    assert not _processes_with(run_dir), "a training process outlived its job"
    out = Path(s.out_dir)
    assert not (out / checkpoint.FINAL).exists(), "the orphaned worker finished the run"
    state = checkpoint.load(out / checkpoint.LATEST)  # the worker checkpointed as on a preemption
    assert state["current_epoch"] >= 1 or state["step_in_epoch"] > 0

    with caplog.at_level(logging.INFO, logger="openmind_bench"):
        assert launch.launch(s, nproc=1, threads=1) == 0
    assert "resuming from" in caplog.text and "keeping its state" in caplog.text
    assert [int(r["epoch"]) for r in progress_rows(out)] == list(range(1, 7))


class _LossOf(torch.nn.Module):
    """A one-weight model whose loss is the view's `value` times the weight (inf = an fp16 overflow)."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(()))

    def forward(self, view):
        return view["value"] * self.weight


def test_a_non_finite_loss_skips_its_step_and_lowers_the_scale_until_too_many_in_a_row():
    from openmind_bench.engine import distributed

    ctx = distributed.Context(0, 1, 0, torch.device("cpu"))
    model = _LossOf()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    guard = engine_step.NonFiniteSteps(3)

    def step(value):
        return engine_step.train_step(model, {"value": torch.tensor(value)}, optimizer, scaler, 12.0,
                                      torch.autocast("cpu", dtype=torch.float16), ctx, None, guard)

    step(float("inf"))
    assert guard.last_skipped and float(model.weight.detach()) == 1.0  # the optimiser never saw it
    assert scaler.get_scale() == 2.0**15
    step(1.0)
    assert not guard.last_skipped and float(model.weight.detach()) == pytest.approx(0.9)
    step(float("nan"))
    step(float("inf"))  # two in a row: still below the limit
    assert scaler.get_scale() == 2.0**13 and guard.skipped == 3
    with pytest.raises(FloatingPointError, match="3 steps in a row"):
        step(float("inf"))
    with pytest.raises(FloatingPointError, match="non-finite loss"):  # without a guard: the first one raises
        engine_step.train_step(model, {"value": torch.tensor(float("inf"))}, optimizer, None, 12.0,
                               torch.autocast("cpu", enabled=False), ctx, None)


def test_a_transient_non_finite_loss_does_not_stop_pre_training(tmp_path):
    """One batch with an inf voxel (the loss overflows) in the middle of a run: the step is skipped,
    the run finishes, and the epoch's logged loss is the mean of the other steps."""

    class OneBadBatch(TemplateBatches):
        def train(self, *, epoch, first_step, **kwargs):
            for step, batch in enumerate(super().train(epoch=epoch, first_step=first_step, **kwargs), first_step):
                if (epoch, step) == (0, 1):
                    batch["image"][:] = float("inf")
                yield batch

    s = small_settings(tmp_path / "run", "mae", epochs=2, steps_per_epoch=3)
    assert trainer.run(s, OneBadBatch(s)).status == "finished"
    rows = progress_rows(s.out_dir)
    assert all(math.isfinite(float(r["train_loss"])) for r in rows)
    assert all(torch.isfinite(v).all() for v in final_weights(s.out_dir).values() if v.is_floating_point())


TWO_VIEW = {"region_size": [32, 32, 16], "crop_size": [16, 16, 16], "pairs_per_image": 1, "projector_dims": [32, 32]}


class GlobalRandomBatches(TemplateBatches):
    """Template crops plus noise drawn from the process-wide generators (python, numpy, torch), as a
    plugged-in batch source or a library's augmentation draws; SIGUSR1 (SLURM's warning) at
    `stop_at`: ("train", epoch, step) inside that step, ("val", epoch) during that epoch's validation."""

    def __init__(self, settings, stop_at=None):
        super().__init__(settings)
        self.stop_at = stop_at
        self.noise = True  # False: the template's crops alone

    def train(self, *, epoch, first_step, **kwargs):
        for step, batch in enumerate(super().train(epoch=epoch, first_step=first_step, **kwargs), first_step):
            shape = batch["image"].shape
            noise = (random.random() + torch.from_numpy(np.random.standard_normal(shape)).float()
                     + torch.randn(shape))
            if self.noise:
                batch["image"] = batch["image"] + 0.05 * noise
            if self.stop_at == ("train", epoch, step):
                os.kill(os.getpid(), signal.SIGUSR1)
            yield batch

    def val(self, **kwargs):
        batches = list(super().val(**kwargs))
        self.validations = getattr(self, "validations", 0) + 1
        if self.stop_at == ("val", self.validations - 1):
            os.kill(os.getpid(), signal.SIGUSR1)
        return batches


def _exact_settings(out_dir, method):
    arch = "ResEncTiny"
    extra = {"method_settings": {"simclr": TWO_VIEW}, "patch_size": [16, 16, 16]} if method == "simclr" else {}
    return small_settings(out_dir, method, arch, epochs=3, steps_per_epoch=3, **extra)


@pytest.mark.parametrize("method", ["mae", "simclr"])
def test_preempted_at_any_step_the_resumed_run_has_the_uncut_weights_bit_for_bit(tmp_path, method):
    """SIGUSR1 inside step 2 of epoch 2 (the checkpoint holds 2 of its 3 steps), inside its last step,
    and during epoch 1's validation (the checkpoint falls on the epoch boundary): each resumed run ends
    with exactly the weights and the logged losses of the uncut run. The batch source draws from
    python's, numpy's and torch's process-wide generators, so their states must carry over too."""
    reference = _exact_settings(tmp_path / "reference", method)
    assert trainer.run(reference, GlobalRandomBatches(reference)).status == "finished"
    expected = final_weights(reference.out_dir)
    # mid-epoch; in the epoch's last step (its validation still to come); between epochs
    for stop_at, position in ((("train", 1, 1), (1, 2)), (("train", 1, 2), (1, 3)), (("val", 0), (1, 0))):
        s = _exact_settings(tmp_path / "_".join(map(str, stop_at)), method)
        assert trainer.run(s, GlobalRandomBatches(s, stop_at)).status == "preempted"
        state = checkpoint.load(Path(s.out_dir) / checkpoint.LATEST)
        assert (state["current_epoch"], state["step_in_epoch"]) == position
        assert json.loads((Path(s.out_dir) / checkpoint.PREEMPTED).read_text())["signal"] == "SIGUSR1"
        assert trainer.run(s, GlobalRandomBatches(s)).status == "finished"
        resumed = final_weights(s.out_dir)
        assert resumed.keys() == expected.keys()
        different = [k for k in expected if not torch.equal(expected[k], resumed[k])]
        assert not different, (stop_at, different[:5])
        assert progress_rows(s.out_dir) == [
            {**row, "epoch_seconds": mine["epoch_seconds"], "samples_per_second": mine["samples_per_second"]}
            for row, mine in zip(progress_rows(reference.out_dir), progress_rows(s.out_dir))]


def _pretrain_rank(rank: int, world: int, tmp: str, settings: dict, stop_at):
    """One of `world` gloo ranks of a pre-training run that rank 1 alone stops with SIGUSR1 at
    `stop_at`, then of its resumed run (each round's process group made here; the engine's
    `distributed.init` finds it, its `shutdown` ends it)."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    s = run_settings.PretrainSettings.from_dict(settings)
    for attempt, stop in enumerate((stop_at, None)):
        dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous-{attempt}", rank=rank, world_size=world)
        source = GlobalRandomBatches(s, stop if rank == 1 else None)
        source.noise = False
        assert trainer.run(s, source).status == ("preempted" if stop else "finished")


def test_the_logged_loss_of_an_epoch_cut_on_two_ranks_is_the_uncut_one(tmp_path):
    """Two gloo ranks, SIGUSR1 on rank 1 in step 2 of epoch 2: both ranks stop, the checkpoint holds
    the partial loss sum of both ranks, and the resumed run logs the epoch losses of one process on
    the whole batch (before: rank 0's partial sum counted twice, rank 1's lost)."""
    import torch.multiprocessing as mp

    reference = small_settings(tmp_path / "reference", "mae", epochs=2, steps_per_epoch=3)
    assert trainer.run(reference).status == "finished"
    cut = small_settings(tmp_path / "cut", "mae", epochs=2, steps_per_epoch=3)
    mp.spawn(_pretrain_rank, args=(2, str(tmp_path), cut.to_dict(), ("train", 1, 1)), nprocs=2, join=True)
    state = checkpoint.load(Path(cut.out_dir) / checkpoint.FINAL)
    assert [h["epoch"] for h in state["history"]] == [1, 2]
    expected, got = progress_rows(reference.out_dir), progress_rows(cut.out_dir)
    assert [float(r["train_loss"]) for r in got] == pytest.approx([float(r["train_loss"]) for r in expected],
                                                                  rel=1e-5)


def test_weight_decay_reaches_every_parameter_as_in_nnssl():
    """nnssl builds one parameter group over `network.parameters()` (AbstractTrainer SGD,
    BaseEvaMAETrainer AdamW): norms, biases, LayerScale, position embeddings and the mask token
    decay too. We follow it (docs/fidelity.md)."""
    from openmind_bench import nets, ssl

    for arch_name, overrides in (("PrimusTiny", {}), ("ResEncTiny", {"block_size": 8})):
        arch = nets.resolve(arch_name)
        model = ssl.build("mae", arch.build([32, 32, 32]), arch, [32, 32, 32], overrides)
        cfg = omb_config.defaults()["pretrain"]["optimisation"][arch.family]
        optimizer = optimisation.build_optimizer(model.parameters(), cfg, torch.device("cpu"))
        assert len(optimizer.param_groups) == 1 and optimizer.param_groups[0]["weight_decay"] == cfg["weight_decay"]
        decayed = {id(p) for p in optimizer.param_groups[0]["params"]}
        names = {n for n, p in model.named_parameters() if id(p) in decayed}
        assert names == {n for n, _ in model.named_parameters()}
        if arch.family == "transformer":
            assert {"mask_token", "backbone.eva.pos_embed", "backbone.eva.norm.weight"} <= names


SMALL_METHODS = {"simclr": TWO_VIEW, "barlow_twins": TWO_VIEW, "vicreg": TWO_VIEW,
                 "voco": {"region_size": [32, 32, 16], "base_grid": [2, 2, 1], "projector_dims": [32, 32]},
                 "volume_fusion": {"min_box_size": 2, "n_boxes": [4, 10]}, "swinunetr": {"contrastive_dim": 32},
                 "mae_cnn": {"block_size": 8}, "spark3d": {"block_size": 8}}


def test_ddp_searches_for_unused_parameters_only_where_a_method_has_some():
    """One forward and backward of every method on both tiny networks: the parameters without a
    gradient exist exactly where `ssl.unused_parameters` says (then DDP must search for them each
    step; elsewhere the search is a wasted pass over the graph). Primus MAE, SimMIM, Models Genesis
    and SwinUNETR-style train every parameter."""
    from types import SimpleNamespace

    from openmind_bench import nets, ssl

    every_parameter_trained = set()
    for arch_name in ("PrimusTiny", "ResEncTiny"):
        arch = nets.resolve(arch_name)
        for method in ssl.METHODS:
            if not ssl.compatible(method, arch.family):
                continue
            overrides = SMALL_METHODS.get(ssl.implementation(method, arch.family), {})
            region, network_patch = ssl.patch_sizes(method, arch.family, [32, 32, 32], overrides)
            torch.manual_seed(0)
            model = ssl.build(method, arch.build(network_patch), arch, [32, 32, 32], overrides)
            source = TemplateBatches(SimpleNamespace(loader_patch_size=region))
            batch = next(iter(source.train(epoch=0, first_step=0, steps=1, rank=0, world_size=1, batch_size=2,
                                           seed=0)))
            model(model.make_view(batch, [1, 2])).backward()
            unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
            assert bool(unused) == ssl.unused_parameters(method, arch.family), (arch_name, method, unused[:3])
            if not unused:
                every_parameter_trained.add((arch.family, method))
    assert every_parameter_trained == {("transformer", m) for m in ("mae", "simmim", "models_genesis", "swinunetr")}


def test_a_job_s_cpus_are_shared_by_its_processes_and_their_loader_workers():
    """4 GPU processes x 8 CPUs each with 6 loader workers apiece: 2 torch/OpenMP threads per
    training process (was 8, i.e. 56 busy threads on 32 CPUs)."""
    from openmind_bench.engine import launch as engine_launch

    assert engine_launch.threads_per_process(32, 4, 6) == 2
    assert engine_launch.threads_per_process(8, 1, 0) == 8
    assert engine_launch.threads_per_process(4, 1, 6) == 1  # never below one
    assert engine_launch.threads_per_process(0, 4, 6) == 0  # torch's default


def test_cudnn_picks_its_fastest_convolutions_on_cuda_only(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    engine_step.configure_backends(torch.device("cpu"))
    assert torch.backends.cudnn.benchmark is False
    engine_step.configure_backends(torch.device("cuda", 0))
    assert torch.backends.cudnn.benchmark is True
    configured = []
    monkeypatch.setattr(trainer, "configure_backends", configured.append)
    assert trainer.run(small_settings(tmp_path / "run", epochs=1, steps_per_epoch=1)).status == "finished"
    assert configured == [torch.device("cpu")]
