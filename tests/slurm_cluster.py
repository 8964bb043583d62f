"""A real SLURM cluster on localhost, from Debian's slurm-wlm and munge: one node (`localhost`), or
several (`n1`, `n2`, ...: one `slurmd -N nI` each, on its own port, with its own spool, pid and log
files through slurm.conf's `%n`; all share the host's loopback).

Every file lives under one temporary directory; the daemons are started in the foreground
(-D/-F) as children of the test and stopped by PID. The nodes have two partitions, `cpu` and
`gpu`, named as in profiles/slurm/config.yaml so the real profile runs unchanged.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "squeue", "sinfo")


def available() -> bool:
    return all(shutil.which(d) or Path(f"/usr/sbin/{d}").exists() for d in DAEMONS)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _exe(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


SLURM_CONF = """\
ClusterName=omb-test
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# cred_expire: a requeued job waits this long before it starts again (default 120 s)
AuthInfo=socket={root}/munge/munge.socket.2,cred_expire=10
CredType=cred/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd-%n.log
SlurmctldDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/affinity
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
MinJobAge=300
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
DefMemPerCPU=1000
MpiDefault=none
{node_lines}
PartitionName=cpu Nodes={node_names} Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes={node_names} Default=NO MaxTime=INFINITE State=UP
"""
NODE = ("NodeName={name} NodeHostname=localhost NodeAddr=127.0.0.1 Port={port} CPUs={cpus} RealMemory={mem} "
        "State=UNKNOWN")


class SlurmCluster:
    def __init__(self, root: Path, ctld_port: int, d_ports: int | list[int]):
        """One node (`localhost`, all CPUs) for one slurmd port, else one node `nI` (one CPU each) per port."""
        self.root = root
        self.conf = root / "slurm.conf"
        self.procs: list[subprocess.Popen] = []
        ports = [d_ports] if isinstance(d_ports, int) else list(d_ports)
        if len(ports) == 1:
            self.nodes = ["localhost"]
            lines = [NODE.format(name="localhost", port=ports[0], cpus=os.cpu_count() or 2, mem=8000)]
        else:
            self.nodes = [f"n{i + 1}" for i in range(len(ports))]
            lines = [NODE.format(name=name, port=port, cpus=1, mem=4000) for name, port in zip(self.nodes, ports)]
        for sub in ("munge", "state", "bin", *(f"spool/{n}" for n in self.nodes)):
            (root / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(root / "munge", 0o755)  # munged refuses a socket dir others can write to
        self.conf.write_text(SLURM_CONF.format(root=root, ctld_port=ctld_port, node_lines="\n".join(lines),
                                               node_names=",".join(self.nodes)))
        # Job steps lose SLURM_CONF (the plugin's srun runs with a cleaned environment): wrappers
        # first in PATH put it back, as a site's /etc/slurm/slurm.conf would (srun starts the steps,
        # scontrol names the first node of a multi-node job).
        for tool in ("srun", "scontrol"):
            wrapper = root / "bin" / tool
            wrapper.write_text(f'#!/bin/sh\nexport SLURM_CONF={self.conf}\nexec {_exe(tool)} "$@"\n')
            wrapper.chmod(0o755)

    @property
    def env(self) -> dict:
        return {"SLURM_CONF": str(self.conf), "PATH": f"{self.root / 'bin'}:{os.environ['PATH']}"}

    def _spawn(self, args: list[str], log: str) -> None:
        out = open(self.root / log, "w")
        self.procs.append(subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT,
                                           env={**os.environ, **self.env}, start_new_session=True))

    def _wait(self, check, what: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if check():
                return
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"{p.args[0]} exited with {p.returncode} while waiting for {what}: "
                                       + self.logs())
            time.sleep(0.2)
        raise TimeoutError(f"SLURM test cluster: {what} not ready after {timeout} s: " + self.logs())

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted(self.root.glob("*.log")))

    def start(self) -> "SlurmCluster":
        munge = self.root / "munge"
        subprocess.run([_exe("mungekey"), "--create", f"--keyfile={munge / 'munge.key'}", "--force"],
                       check=True, capture_output=True)
        os.chmod(munge / "munge.key", 0o600)
        self._spawn([_exe("munged"), "-F", "--force", f"--key-file={munge / 'munge.key'}",
                     f"--socket={munge / 'munge.socket.2'}", f"--pid-file={munge / 'munged.pid'}",
                     f"--log-file={self.root / 'munged.log'}", f"--seed-file={munge / 'munged.seed'}"],
                    "munged.out")
        self._wait(lambda: (munge / "munge.socket.2").exists(), "munged socket")
        self._spawn([_exe("slurmctld"), "-D", "-i", "-f", str(self.conf)], "slurmctld.out")
        for node in self.nodes:
            self._spawn([_exe("slurmd"), "-D", "-N", node, "-f", str(self.conf)], f"slurmd-{node}.out")

        def idle() -> bool:
            out = subprocess.run([_exe("sinfo"), "-h", "-N", "-o", "%t", "-p", "cpu"], capture_output=True,
                                 text=True, env={**os.environ, **self.env})
            states = out.stdout.split()
            return out.returncode == 0 and len(states) == len(self.nodes) and set(states) <= {"idle", "mix"}

        self._wait(idle, "idle nodes", timeout=60)
        return self

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in reversed(self.procs):
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
