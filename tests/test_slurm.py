"""The SLURM profile on a real single-node cluster (Debian slurm-wlm + munge, on localhost)."""

import os
import re
import subprocess
import sys

import pandas as pd
import pytest
import yaml

from conftest import run_snakemake
from slurm_cluster import SlurmCluster, available, free_port

pytestmark = [pytest.mark.slurm,
              pytest.mark.skipif(not available(), reason="slurm-wlm and munge are not installed")]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    # short path: the munge socket path must fit in a sockaddr_un
    root = tmp_path_factory.mktemp("slurm")
    c = SlurmCluster(root, free_port(), free_port()).start()
    yield c
    c.stop()


def test_profile_runs_targets_through_sbatch(tmp_path, repo, cluster, demo_mirror, demo_truth, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    # the user's command as written: `openmind-bench install-profile` puts the profile into
    # ~/.config/snakemake/slurm, where `snakemake --profile slurm` finds it by name
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    monkeypatch.setenv("HOME", str(home))
    install = subprocess.run([sys.executable, "-m", "openmind_bench", "install-profile",
                              "--partition-cpu", "cpu", "--partition-gpu", "gpu"],
                             capture_output=True, text=True, env=os.environ, cwd=work)
    assert install.returncode == 0, install.stdout + install.stderr
    assert (home / ".config" / "snakemake" / "slurm" / "config.yaml").is_file()
    (work / "config").symlink_to(repo / "config")
    overlay = work / "overlay.yaml"
    overlay.write_text(yaml.safe_dump({"source": {"kind": "local", "root": str(demo_mirror), "build_demo": False}}))
    target = "results/index/datasets/ds990002.parquet"
    proc = run_snakemake(
        work, "--profile", "slurm",
        "--configfile", str(repo / "config" / "demo.yaml"), str(overlay),
        # no accounting database on the test cluster: squeue, and quick status polls
        "--slurm-status-command", "squeue", "--seconds-between-status-checks", "2",
        "--slurm-init-seconds-before-status-checks", "2", "--jobs", "4", "--latency-wait", "5",
        target, timeout=600, env=cluster.env,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:] + cluster.logs()
    assert re.search(r"Using profiles? slurm\b", out), out[:3000]  # found by name
    images = pd.read_parquet(work / target)
    expected = sum(1 for path in demo_truth["images"] if path.startswith("ds990002/"))
    assert set(images.dataset) == {"ds990002"} and len(images) == expected  # the builder's own count

    # both jobs (fetch, index) went through sbatch: the IDs Snakemake reports are the ones
    # slurmctld accepted as batch jobs
    submitted = set(re.findall(r"submitted with SLURM jobid (\d+)", out))
    ctld = (cluster.root / "slurmctld.log").read_text()
    accepted = set(re.findall(r"_slurm_rpc_submit_batch_job: JobId=(\d+)", ctld))
    assert len(submitted) == 2, out[-3000:]
    assert submitted <= accepted, ctld[-3000:]
    assert re.search(r"rule fetch_dataset", out) and re.search(r"rule index_dataset", out)
