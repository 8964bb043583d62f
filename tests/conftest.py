"""Shared fixtures: the demo mirror is built once per test session (about a minute on 2 cores)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def demo_mirror(tmp_path_factory) -> Path:
    """The embedded demo mirror (with its injected faults), shared read-only by tests."""
    from openmind_bench.demo import build_demo

    root = tmp_path_factory.mktemp("demo") / "mirror"
    build_demo(root, seed=0)
    return root


@pytest.fixture(scope="session")
def demo_truth(demo_mirror) -> dict:
    return json.loads((demo_mirror / "ground_truth" / "ground_truth.json").read_text())


def snakemake_cmd(workdir: Path, *args: str) -> list[str]:
    exe = shutil.which("snakemake", path=str(VENV_BIN)) or "snakemake"
    return [exe, "-s", str(REPO / "Snakefile"), "--directory", str(workdir), *args]


def run_snakemake(workdir: Path, *args: str, timeout: int = 600, env: dict | None = None):
    proc = subprocess.run(snakemake_cmd(workdir, *args), capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    return proc
