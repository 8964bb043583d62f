"""Multi-node pre-training without a cluster: the job's resources as snakemake-executor-plugin-slurm
turns them into sbatch options, the launcher's srun + torchrun command and rendezvous, and the config
errors a multi-node job meets before any job (tests/test_slurm_multinode.py runs it on two SLURM nodes)."""

from __future__ import annotations

import subprocess
from types import SimpleNamespace

import pytest
import yaml

from conftest import snakemake_cmd
from openmind_bench import config as omb_config
from openmind_bench.engine import launch
from openmind_bench.pretrain import settings as run_settings


def resources(**overrides) -> dict:
    return omb_config.deep_update(omb_config.defaults()["pretrain"]["resources"], overrides)


class _Resources(dict):
    """A job's resources as the plugin reads them (`.get` and attribute access)."""

    def __getattr__(self, name):
        return self[name]


def sbatch(job: dict, threads: int) -> str:
    """The plugin's own sbatch command for a job with these resources (and its GPU options)."""
    from snakemake_executor_plugin_slurm.submit_string import get_submit_command
    from snakemake_executor_plugin_slurm.utils import set_gres_string

    fake = SimpleNamespace(resources=_Resources(job), threads=threads)
    params = {"run_uuid": "x", "slurm_logfile": "log", "comment_str": "c", "account": "", "partition": "-p gpu",
              "workdir": "."}
    return get_submit_command(fake, params) + set_gres_string(fake)


def test_one_node_keeps_the_portable_gpu_resources():
    job = run_settings.job_resources(resources(gpu=4, cpus_per_gpu=8))
    assert job == {"gpu": 4, "cpus_per_gpu": 8, "mem_mb": 128000, "runtime": 4320}
    assert run_settings.job_shape(job) == (1, 4, True)
    assert run_settings.job_shape(run_settings.job_resources(resources(gpu=0))) == (1, 1, False)
    command = sbatch(job, threads=32)
    assert "--gpus=4" in command and "--cpus-per-gpu=8" in command and "--nodes" not in command


def test_several_nodes_are_the_plugins_mpi_job_with_one_task_and_all_gpus_per_node():
    job = run_settings.job_resources(resources(gpu=4, nodes=2, cpus_per_gpu=8, mem_mb=64000))
    assert job == {"nodes": 2, "mpi": "srun", "tasks": 2, "tasks_per_gpu": 0, "gres": "gpu:4", "cpus_per_task": 32,
                   "mem_mb": 64000, "runtime": 4320}
    assert run_settings.job_shape(job) == (2, 4, True)
    command = sbatch(job, threads=32).split()
    # two nodes, one task on each with all its CPUs, four GPUs on every node, memory per node
    assert {"--nodes=2", "--ntasks=2", "--cpus-per-task=32", "--gres=gpu:4"} <= set(command), command
    assert command[command.index("--mem") + 1] == "64000"
    assert not [c for c in command if c.startswith(("--ntasks-per-gpu", "--gpus", "--cpus-per-gpu"))], command
    cpu = run_settings.job_resources(resources(gpu=0, nodes=3, cpu_multinode=True, cpus_per_gpu=2))
    assert run_settings.job_shape(cpu) == (3, 1, False)
    assert {"--nodes=3", "--ntasks=3", "--cpus-per-task=2"} <= set(sbatch(cpu, threads=2).split())


def test_cpu_nodes_and_nodes_outside_slurm_are_config_errors():
    with pytest.raises(omb_config.ConfigError, match=r"'pretrain.resources.nodes'.*gpu 0.*cpu_multinode"):
        run_settings.job_resources(resources(gpu=0, nodes=2))
    with pytest.raises(omb_config.ConfigError, match=r"'pretrain.resources.nodes': 2 nodes need the SLURM executor"):
        run_settings.check_executor(resources(nodes=2), "local")
    for executor in ("slurm", "slurm-jobstep"):
        run_settings.check_executor(resources(nodes=2), executor)
    run_settings.check_executor(resources(), "local")
    with pytest.raises(omb_config.ConfigError, match="pretrain.resources.nodes"):
        omb_config.validate({"pretrain": {"resources": {"nodes": 0}}}, omb_config.SCHEMA_PATH)


def test_launch_commands_one_node_standalone_several_through_srun():
    one = launch.torchrun_command("s.json", 2, "w")
    assert "--standalone" in one and "srun" not in one and "--nproc-per-node=2" in one
    several = launch.torchrun_command("s.json", 4, "w", nodes=2, rendezvous="10.0.0.1:29411", job_id="11",
                                      threads=32, gpus=True)
    step, run = several[:several.index("-m")], several[several.index("-m"):]
    assert step[0] == "srun" and {"--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
                                  "--cpus-per-task=32", "--gres=gpu:4"} <= set(step)
    assert run[:2] == ["-m", "torch.distributed.run"]
    # each node's task: node 0 hosts the rendezvous store (torchrun reads PET_RDZV_CONF), then torchrun
    shell = step[step.index("sh"):step.index("sh") + 3]
    for node, is_host in (("0", "is_host=1"), ("1", "is_host=0")):
        echo = subprocess.run([*shell, "sh", "-c", 'echo "$PET_RDZV_CONF $0 $*"', "torchrun", "--nnodes=2"],
                              env={"SLURM_NODEID": node, "PATH": "/usr/bin:/bin"}, capture_output=True, text=True)
        assert echo.stdout.strip() == f"{is_host} torchrun --nnodes=2", echo
    assert {"--nnodes=2", "--nproc-per-node=4", "--rdzv-backend=c10d", "--rdzv-endpoint=10.0.0.1:29411",
            "--rdzv-id=11"} <= set(run) and "--standalone" not in run
    assert run[-3:] == ["-m", "w", "s.json"]


def test_rendezvous_on_the_first_nodes_address(monkeypatch):
    asked = []

    def scontrol(*args):
        asked.append(args)
        if args[:2] == ("show", "job"):
            return "JobId=77 JobName=x NodeList=gpu[07-08] BatchHost=gpu07\n"
        if args[:2] == ("show", "hostnames"):
            assert args[2] == "gpu[07-08]"
            return "gpu07\ngpu08\n"
        assert args == ("show", "node", "-o", "gpu07")
        return "NodeName=gpu07 Arch=x86_64 NodeAddr=10.1.0.7 NodeHostName=gpu07\n"

    monkeypatch.setattr(launch, "_scontrol", scontrol)
    # inside the plugin's job only SLURM_JOB_ID is left: the node list comes from slurmctld
    assert launch.slurm_rendezvous({"SLURM_JOB_ID": "77"}) == ("10.1.0.7:29477", "77")
    assert asked[0] == ("show", "job", "-o", "77")
    asked.clear()
    assert launch.slurm_rendezvous({"SLURM_JOB_ID": "1077", "SLURM_JOB_NODELIST": "gpu[07-08]",
                                    launch.RDZV_PORT_ENV: "31000"}) == ("10.1.0.7:31000", "1077")
    assert [a[:2] for a in asked] == [("show", "hostnames"), ("show", "node")]
    with pytest.raises(RuntimeError, match=r"pretrain.resources.nodes.*SLURM_JOB_ID is not set"):
        launch.slurm_rendezvous({})


def test_several_nodes_with_the_local_executor_stop_before_any_job(tmp_path, repo):
    (tmp_path / "config").symlink_to(repo / "config")
    overlay = tmp_path / "nodes.yaml"
    overlay.write_text(yaml.safe_dump({"pretrain": {"resources": {"gpu": 0, "nodes": 2, "cpu_multinode": True}}}))
    proc = subprocess.run(snakemake_cmd(tmp_path, "--configfile", str(repo / "config" / "demo.yaml"), str(overlay),
                                        "--cores", "1", "all"), capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "config key 'pretrain.resources.nodes': 2 nodes need the SLURM executor" in out, out[-3000:]
    assert not (tmp_path / "results").exists() and "Finished job" not in out
