"""Pre-training on two nodes of a real SLURM cluster (two slurmd on this machine, tests/slurm_cluster.py),
submitted through the profile with the real executor plugin: one torchrun per node through srun, c10d
rendezvous on the first node, gloo between the nodes. The 2 x 1 run ends with the weights of the 1 x 2
run of the same config; a run that `scontrol requeue` cuts (what a preemption with `slurm-requeue:
true` does) checkpoints on SLURM's SIGTERM, goes back to the queue, resumes and ends there too."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import snakemake_cmd
from openmind_bench import config as omb_config
from openmind_bench.engine import checkpoint
from openmind_bench.pretrain import settings as run_settings, worker
from slurm_cluster import SlurmCluster, available, free_port

pytestmark = [pytest.mark.slurm,
              pytest.mark.skipif(not available(), reason="slurm-wlm and munge are not installed")]

RUN = "mae__ResEncTiny__demo"
CHECKPOINT = f"results/pretrain/{RUN}/checkpoint_final.pt"
TRAIN = "results/selections/demo/pretrain_data__preprocessed_train.json"
VAL = "results/selections/demo/pretrain_data__preprocessed_val.json"
# Tiny and short, on the MNI152 template (no data stages): 3 epochs x 4 steps of 1 sample per process.
OVERLAY = {
    "pretrain": {
        "methods": ["mae"], "architectures": ["ResEncTiny"], "selections": ["demo"],
        "epochs": 3, "steps_per_epoch": 4, "val_steps": 1, "total_batch_size": 2,
        "batch_source": "openmind_bench.pretrain.batches:template_batches",
        # runtime above the profile's --signal=USR1@600 (else the warning comes at the start)
        "resources": {"gpu": 0, "nodes": 2, "cpu_multinode": True, "cpus_per_gpu": 1, "mem_mb": 1500, "runtime": 30},
        "probe_every": 0,  # the demo probes every epoch; this test compares weights only
    },
    "finetune": {"pretrained_runs": [RUN]},
    "downstream": {"lora": {"pretrained_runs": None}},  # the demo's lora row names a run this overlay drops
}


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    root = tmp_path_factory.mktemp("slurm2")  # short path: the munge socket path must fit in a sockaddr_un
    c = SlurmCluster(root, free_port(), [free_port(), free_port()]).start()
    yield c
    c.stop()


def _section(repo: Path) -> dict:
    demo = yaml.safe_load((repo / "config" / "demo.yaml").read_text())["pretrain"]
    return omb_config.deep_update(demo, OVERLAY["pretrain"])


def _weights(path: Path) -> dict:
    state = checkpoint.load(path)
    return {**state["network_weights"], **{f"pretext.{k}": v for k, v in state["pretext_weights"].items()}}


def _workdir(path: Path, repo: Path) -> Path:
    """A workflow folder whose selection lists exist (the template batches read none), so that the
    pretrain job is the only one to run."""
    path.mkdir()
    (path / "config").symlink_to(repo / "config")
    for name in (TRAIN, VAL):
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text("{}\n")
    (path / "overlay.yaml").write_text(yaml.safe_dump(OVERLAY))
    return path


@pytest.fixture(scope="module")
def one_node_two_processes(tmp_path_factory, repo) -> dict:
    """The same run as 1 node x 2 torchrun processes (gloo), here, outside SLURM."""
    work = _workdir(tmp_path_factory.mktemp("one_node") / "work", repo)
    settings = run_settings.resolve(_section(repo), "mae", "ResEncTiny", out_dir=str(work / "run"),
                                    train_data=str(work / TRAIN), val_data=str(work / VAL), selection="demo")
    assert worker.launch(settings, nproc=2, threads=2) == 0
    return _weights(work / "run" / "checkpoint_final.pt")


def _profile_command(work: Path, repo: Path) -> list[str]:
    return snakemake_cmd(
        work, "--profile", str(repo / "profiles" / "slurm"),
        "--configfile", str(repo / "config" / "demo.yaml"), str(work / "overlay.yaml"),
        # no accounting database on the test cluster: squeue, and quick status polls
        "--slurm-status-command", "squeue", "--seconds-between-status-checks", "2",
        "--slurm-init-seconds-before-status-checks", "2", "--latency-wait", "5", "--retries", "0", CHECKPOINT)


def _assert_same_weights(work: Path, reference: dict) -> None:
    weights = _weights(work / CHECKPOINT)
    assert weights.keys() == reference.keys()
    for key in weights:
        assert torch.allclose(weights[key], reference[key], rtol=1e-5, atol=1e-7), key


def _allocations(cluster: SlurmCluster) -> dict[str, str]:
    ctld = (cluster.root / "slurmctld.log").read_text()
    return dict(re.findall(r"(?:Allocate|Started) JobId=(\d+).*? (?:NodeList=|on )(\S+)", ctld))


def test_two_nodes_through_the_profile_equal_one_node(tmp_path, repo, two_nodes, one_node_two_processes):
    work = _workdir(tmp_path / "work", repo)
    proc = subprocess.run(_profile_command(work, repo), capture_output=True, text=True, timeout=400,
                          env={**os.environ, **two_nodes.env})
    out = proc.stdout + proc.stderr
    log = (work / "logs" / "pretrain" / f"{RUN}.log").read_text() if (work / "logs").exists() else ""
    assert proc.returncode == 0, out[-4000:] + log[-4000:] + two_nodes.logs()
    # the plugin's sbatch asked for both nodes (--nodes=2 --ntasks=2), and the job got them
    job = re.findall(r"submitted with SLURM jobid (\d+)", out)
    assert len(job) == 1 and _allocations(two_nodes)[job[0]] == "n[1-2]", two_nodes.logs()
    # one torchrun per node through srun, meeting at the first node's address under the job's id
    assert re.search(r"starting srun --nodes=2 --ntasks=2 --ntasks-per-node=1 .* --nnodes=2 --rdzv-backend=c10d "
                     rf"--rdzv-endpoint=127\.0\.0\.1:\d+ --rdzv-id={job[0]} --nproc-per-node=1 ", log), log[-3000:]
    compute = json.loads((work / "results" / "pretrain" / RUN / "compute.json").read_text())
    assert (compute["nodes"], compute["processes"], compute["segments"]) == (2, 2, 1)
    _assert_same_weights(work, one_node_two_processes)


def test_requeued_two_node_job_resumes_to_the_uncut_weights(tmp_path, repo, two_nodes, one_node_two_processes):
    """`scontrol requeue` in mid-run: SLURM sends SIGTERM to the job (the batch script's launcher and the
    srun step's torchruns and workers), rank 0 writes checkpoint_latest.pt, the job goes back to the
    queue (the profile's slurm-requeue: true submits with --requeue), starts again under the same job id
    and Snakemake's job inside it resumes from the checkpoint. Snakemake sees one job that finished."""
    work = _workdir(tmp_path / "work", repo)
    env = {**os.environ, **two_nodes.env}
    proc = subprocess.Popen(_profile_command(work, repo), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env)
    progress = work / "results" / "pretrain" / RUN / "progress.csv"
    try:
        deadline = time.monotonic() + 240
        while not (progress.exists() and progress.stat().st_size) and proc.poll() is None:
            assert time.monotonic() < deadline, two_nodes.logs()
            time.sleep(0.2)
        assert proc.poll() is None, "the workflow ended before the requeue"
        job = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, env=env).stdout.split()
        assert len(job) == 1, job
        subprocess.run(["scontrol", "requeue", job[0]], check=True, env=env)
        out, _ = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = (work / "logs" / "pretrain" / f"{RUN}.log").read_text()
    assert proc.returncode == 0, out[-4000:] + log[-4000:] + two_nodes.logs()
    assert re.search(rf"Requeuing JobId={job[0]}\b", (two_nodes.root / "slurmctld.log").read_text())
    # the rule's log is the second segment's (Snakemake starts it anew): it found the first one's
    # checkpoint and preemption marker, and resumed
    assert re.search(r"keeping its state \[.*'checkpoint_latest\.pt'.*'preempted\.json'", log), log[-3000:]
    assert re.search(r"resuming from \S+checkpoint_latest\.pt at epoch \d+, step \d+", log), log[-3000:]
    compute = json.loads((work / "results" / "pretrain" / RUN / "compute.json").read_text())
    assert compute["segments"] == 2 and compute["steps"] == 12
    _assert_same_weights(work, one_node_two_processes)


def _worker_of_rank(rank: int, workdir: Path) -> int | None:
    """The pid of the pre-training worker of global `rank` running in `workdir` (from /proc)."""
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            environ = (proc / "environ").read_bytes().split(b"\0")
            cwd = os.readlink(proc / "cwd")
        except (OSError, ValueError):
            continue
        if (b"openmind_bench.pretrain.worker" in cmdline and f"RANK={rank}".encode() in environ
                and cwd == str(workdir)):
            return int(proc.name)
    return None


def test_a_dead_process_fails_the_job_with_torchruns_message_and_the_retry_resumes(tmp_path, repo, two_nodes,
                                                                                   one_node_two_processes):
    """kill -9 of the training process on the second node after the first epoch's checkpoint: torchrun
    there reports the failure, srun ends the other node's torchrun too, the job fails with both in the
    rule's log; Snakemake's retry (a new SLURM job) resumes from checkpoint_latest.pt."""
    work = _workdir(tmp_path / "work", repo)
    env = {**os.environ, **two_nodes.env}
    command = _profile_command(work, repo)
    command[command.index("--retries") + 1] = "1"
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    run_dir = work / "results" / "pretrain" / RUN
    try:
        deadline = time.monotonic() + 240
        while not (run_dir / checkpoint.LATEST).exists() and proc.poll() is None:
            assert time.monotonic() < deadline, two_nodes.logs()
            time.sleep(0.2)
        pid = _worker_of_rank(1, work)
        assert pid is not None and proc.poll() is None
        os.kill(pid, 9)
        out, _ = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-4000:] + two_nodes.logs()
    jobs = re.findall(r"submitted with SLURM jobid (\d+)", out)
    assert len(jobs) == 2, out[-3000:]  # the failed job and its retry
    slurm_logs = work / ".snakemake" / "slurm_logs" / "rule_pretrain" / "mae_ResEncTiny_demo"
    failed = (slurm_logs / f"{jobs[0]}.log").read_text()
    assert "ChildFailedError" in failed and re.search(r"exitcode\s*:\s*-9", failed), failed[-4000:]
    assert re.search(r"pre-training into \S+ failed \(torchrun exit code \d+\)", failed), failed[-3000:]
    log = (work / "logs" / "pretrain" / f"{RUN}.log").read_text()
    assert re.search(r"resuming from \S+checkpoint_latest\.pt at epoch [1-3], step 0", log), log[-3000:]
    _assert_same_weights(work, one_node_two_processes)
