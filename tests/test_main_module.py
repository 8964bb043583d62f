"""`openmind_bench.__main__` starts the command line only when run (`python -m openmind_bench`), never on import."""

import subprocess
import sys

import pytest

from conftest import REPO

SRC = REPO / "src"


def _python(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, cwd=cwd,
                          env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"})


def test_importing_main_runs_nothing():
    proc = _python("-c", "import openmind_bench.__main__")
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")


def test_python_dash_m_still_runs_the_cli():
    proc = _python("-m", "openmind_bench", "--version")
    assert proc.returncode == 0 and proc.stdout.strip(), proc.stderr


def test_nnunet_trainer_search_over_src_finds_the_trainer():
    """nnU-Net's search for an external trainer (`nnUNet_extTrainer=src`, a likely guess) imports every module
    below the folder, `__main__` included; it must find our trainer instead of exiting through the CLI."""
    pytest.importorskip("nnunetv2")
    script = (
        "import sys\n"
        "from nnunetv2.utilities.find_class_by_name import recursive_find_python_class\n"
        "cls = recursive_find_python_class(sys.argv[1], 'nnUNetTrainer_OpenMind', None, base_folder=sys.argv[1],\n"
        "                                  cleanup_imports_from_base_folder=True)\n"
        "print(cls.__module__, cls.__name__)\n"
    )
    proc = _python("-c", script, str(SRC))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "openmind_bench.downstream.nnunet.trainer nnUNetTrainer_OpenMind"
