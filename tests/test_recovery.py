"""The recoveries docs/running.md documents, with real Snakemake processes on a tiny workflow state: after a
kill -9, `--unlock` then the same command; while another run holds the folder's lock, the tables come
from `openmind-bench benchmark-table` (Snakemake's own `benchmark_table` is refused). Also the swap
of a whole output folder that lets two writers of results/benchmark/ meet safely."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import REPO, VENV_BIN, run_snakemake, snakemake_cmd

JOB_SCRIPT = ".snakemake/scripts/"  # where Snakemake puts a running `script:` job


def _workdir(tmp_path: Path) -> tuple[Path, list[str]]:
    """The demo config, and one fine-tuning result on disk, nothing else: `benchmark_table` is one job."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "config").symlink_to(REPO / "config")
    (work / "overlay.yaml").write_text(yaml.safe_dump({"aggregate": {"bootstrap_samples": 20}}))
    # a run folder name no rule makes (an imported result): the table needs no fine-tuning job
    metrics = work / "results/downstream/DemoLesionT1/imported_run/fold_test/metrics.json"
    metrics.parent.mkdir(parents=True)
    metrics.write_text(json.dumps({"dataset": "DemoLesionT1", "method": "scratch", "architecture": "ResEncTiny",
                                   "epochs": 2, "fold": "test",
                                   "cases": [{"case": "c1", "DSC": 0.5}, {"case": "c2", "DSC": 0.75}]}))
    configs = ["--configfile", str(REPO / "config/demo.yaml"), str(work / "overlay.yaml")]
    return work, configs


def _start(work: Path, *args: str) -> subprocess.Popen:
    """A Snakemake run in its own process group (so the test can stop it and every job it started)."""
    log = open(work.parent / "held_run.log", "w")
    return subprocess.Popen(snakemake_cmd(work, *args), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _job_pid(run: subprocess.Popen, timeout: float = 180) -> int:
    """PID of the `script:` job `run` started (same process group), once it runs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit() or int(proc.name) == run.pid:
                continue
            try:
                pgid = os.getpgid(int(proc.name))
                cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
            except (OSError, ProcessLookupError):
                continue
            if pgid == run.pid and JOB_SCRIPT in cmdline:
                return int(proc.name)
        assert run.poll() is None, f"the run ended (rc {run.returncode}) before its job was seen"
        time.sleep(0.1)
    raise AssertionError(f"no job of the run after {timeout} s")


def _stop_group(run: subprocess.Popen) -> None:
    """kill -9 the run's process group (Snakemake and its jobs), and reap Snakemake."""
    try:
        os.killpg(run.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    run.wait(timeout=30)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_after_kill_9_unlock_then_the_same_command_recovers(tmp_path):
    work, configs = _workdir(tmp_path)
    command = [*configs, "-c1", "benchmark_table"]
    run = _start(work, *command)
    try:
        os.kill(_job_pid(run), signal.SIGSTOP)  # the job is mid-way when the kill comes
        partial = work / "results/benchmark/results_long.csv"
        partial.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text("method,archi")  # what a writer without write-then-rename would leave
    finally:
        _stop_group(run)
    deadline = time.monotonic() + 30
    while _group_alive(run.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert list((work / ".snakemake/locks").iterdir()), "a kill -9 leaves Snakemake's lock behind"

    # the same command alone is refused: Snakemake cannot tell a dead run's lock from a live one
    proc = run_snakemake(work, *command, timeout=300)
    assert proc.returncode != 0 and "LockException" in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[-3000:]

    # README: the same command with --unlock, then the same command
    proc = run_snakemake(work, *command, "--unlock", timeout=300)
    assert proc.returncode == 0 and "Unlocked" in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[-3000:]
    proc = run_snakemake(work, *command, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "Forced execution" in out, out[-3000:]  # the workflow profile's rerun-incomplete re-makes it
    long = pd.read_csv(partial)
    assert sorted(long.value) == [0.5, 0.75]
    assert (work / "results/benchmark/benchmark_table.csv").is_file()


def test_tables_while_another_run_holds_the_lock(tmp_path):
    work, configs = _workdir(tmp_path)
    run = _start(work, *configs, "-c1", "benchmark_table")
    try:
        job = _job_pid(run)
        os.kill(job, signal.SIGSTOP)  # a long run: Snakemake holds the lock while its job works

        # Snakemake's own rule is refused while the lock is held
        proc = run_snakemake(work, *configs, "-c1", "benchmark_table", timeout=300)
        assert proc.returncode != 0 and "LockException" in proc.stdout + proc.stderr, proc.stdout[-3000:]

        # README: the same stage outside Snakemake (no lock, no DAG): what exists now becomes the tables
        cli = subprocess.run([str(VENV_BIN / "openmind-bench"), "benchmark-table", "--registry",
                              "config/downstream_demo.yaml", "--bootstrap", "20"],
                             cwd=work, capture_output=True, text=True, timeout=300,
                             env={**os.environ, "PYTHONPATH": str(REPO / "src")})
        assert cli.returncode == 0, cli.stderr[-3000:]
        table = pd.read_csv(work / "results/benchmark/benchmark_table.csv")
        assert "DemoLesionT1" in table.columns and list(table.method) == ["scratch"]
        assert sorted(p.name for p in (work / "results/benchmark/plots").iterdir())

        # the held run goes on and ends well, writing the same files again
        os.kill(job, signal.SIGCONT)
        assert run.wait(timeout=300) == 0, (work.parent / "held_run.log").read_text()[-3000:]
    finally:
        if run.poll() is None:
            _stop_group(run)
    locks = work / ".snakemake/locks"  # snakemake >= 9.17 removes the folder with its last lock
    assert not locks.exists() or not list(locks.iterdir())
    assert not [p for p in (work / "results/benchmark").iterdir() if p.name.startswith(".")]  # no temporaries


# ------------------------------------------------------------------ one output folder, two writers


def _tree(path: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(path.iterdir())}


def test_a_written_folder_replaces_the_old_tree_whole(tmp_path):
    from openmind_bench import atomic

    plots = tmp_path / "plots"
    plots.mkdir()
    (plots / "old_only.png").write_text("old")
    with atomic.atomic_path(plots) as tmp:
        tmp.mkdir()
        (tmp / "new.png").write_text("new")
    assert _tree(plots) == {"new.png": "new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plots"]


def test_a_second_writer_in_between_makes_the_swap_retry(tmp_path, monkeypatch):
    from openmind_bench import atomic

    plots = tmp_path / "plots"
    plots.mkdir()
    (plots / "a.png").write_text("old")
    new = tmp_path / "new"
    new.mkdir()
    (new / "a.png").write_text("ours")
    real_rename = os.rename
    calls = []

    def rename_then_other_writer_lands(src, dst):
        real_rename(src, dst)
        if not calls:  # right after our first move-aside, the other writer renames its tree in
            other = tmp_path / "other"
            other.mkdir()
            (other / "a.png").write_text("theirs")
            os.replace(other, plots)
        calls.append(dst)

    monkeypatch.setattr(atomic.os, "rename", rename_then_other_writer_lands)
    atomic.replace_directory(new, plots)
    assert _tree(plots) == {"a.png": "ours"} and len(calls) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plots"]


def test_a_failed_swap_keeps_the_old_tree(tmp_path):
    from openmind_bench import atomic

    plots = tmp_path / "plots"
    plots.mkdir()
    (plots / "a.png").write_text("old")
    with pytest.raises(OSError) as raised:
        atomic.replace_directory(tmp_path / "missing", plots)
    assert raised.value.errno == errno.ENOENT
    assert _tree(plots) == {"a.png": "old"}


def test_an_atomic_write_reaches_the_disk_before_and_after_its_rename(tmp_path, monkeypatch):
    """The data are fsynced before the rename (else a node crash can leave an empty file under the
    final name: a `checkpoint_latest.pt` of 0 bytes), and the folder after it (else the rename itself
    can be lost)."""
    from openmind_bench import atomic

    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("rename", str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "fsync", fsync)
    monkeypatch.setattr(atomic.os, "replace", replace)
    target = tmp_path / "checkpoint_latest.pt"
    atomic.write_text(target, "weights")
    assert target.read_text() == "weights"
    assert [kind for kind, _ in events] == ["fsync", "rename", "fsync"]
    assert Path(events[0][1]).name.startswith(".checkpoint_latest.pt.tmp-")
    assert events[2][1] == str(tmp_path)

    events.clear()
    with atomic.atomic_path(tmp_path / "plots") as tmp:  # a folder: each of its files, then the parent
        tmp.mkdir()
        (tmp / "a.png").write_text("a")
        (tmp / "b.png").write_text("b")
    synced = [Path(p).name for kind, p in events if kind == "fsync"]
    assert synced == ["a.png", "b.png", tmp_path.name]
