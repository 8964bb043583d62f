"""The package's layering (docs/architecture.md): import-linter contracts from pyproject.toml, and no
stage reaches into another package's private names."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "openmind_bench"


def test_import_linter_contracts_are_kept(repo):
    lint = Path(sys.executable).with_name("lint-imports")
    proc = subprocess.run([str(lint), "--no-cache"], cwd=repo, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(repo / "src"), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


def _top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "openmind_bench" else parts[0]


def test_no_package_imports_another_packages_private_names():
    offenders = []
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 50
    for path in files:
        own = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("openmind_bench"):
                if _top(node.module) == own:
                    continue
                private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                private += [p for p in node.module.split(".") if p.startswith("_") and p != "__main__"]
                if private:
                    offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.module} {private}")
    assert offenders == []
