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


@pytest.fixture(scope="session")
def downstream_demo(tmp_path_factory) -> tuple[Path, dict]:
    """The demo downstream sets (segmentation + classification) and their ground truth, read-only."""
    from openmind_bench.demo.downstream import build_downstream

    root = tmp_path_factory.mktemp("downstream_demo") / "sets"
    truth = build_downstream(root, seed=0)
    return root, truth


@pytest.fixture(scope="session")
def downstream_root(downstream_demo) -> Path:
    return downstream_demo[0]


@pytest.fixture
def one_thread():
    """torch on one thread for the test (opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`):
    the machine is shared, and more threads are slower and less reproducible."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def lying_nifti(path: Path, compress: bool = True) -> Path:
    """A tiny NIfTI whose header claims 1024^3 int16 voxels (2 GiB) over a few bytes of data."""
    import gzip

    import nibabel as nib
    import numpy as np

    header = nib.Nifti1Header()
    header.set_data_shape((1024, 1024, 1024))
    header.set_data_dtype(np.int16)
    header.set_qform(np.eye(4), code=1)
    header.set_sform(np.eye(4), code=1)
    header["vox_offset"] = 352
    raw = header.binaryblock + b"\0" * 4 + np.arange(64, dtype=np.int16).tobytes()
    Path(path).write_bytes(gzip.compress(raw) if compress else raw)
    return Path(path)


def snakemake_cmd(workdir: Path, *args: str) -> list[str]:
    exe = shutil.which("snakemake", path=str(VENV_BIN)) or "snakemake"
    return [exe, "-s", str(REPO / "Snakefile"), "--directory", str(workdir), *args]


def registry_folders(workdir: Path, registry: str = "config/downstream_datasets.yaml") -> None:
    """Empty data folders for every dataset of the shipped registry under `workdir`: the workflow
    refuses a config whose downstream datasets have no folder (checked before any job runs)."""
    from openmind_bench.registry import load_registry

    for spec in load_registry(REPO / registry, workdir / "data" / "downstream").datasets.values():
        spec.source.mkdir(parents=True, exist_ok=True)


def run_snakemake(workdir: Path, *args: str, timeout: int = 600, env: dict | None = None):
    proc = subprocess.run(snakemake_cmd(workdir, *args), capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    return proc


def eval_loss(model, view) -> float:
    """A method's loss on `view` in eval mode, without gradients (training mode restored)."""
    import torch

    model.eval()
    with torch.no_grad():
        value = float(model(view))
    model.train()
    return value
