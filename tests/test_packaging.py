"""pyproject.toml and envs/openmind.yaml list the same run-time packages with the same bounds."""

import re
import tomllib

import yaml

# PyPI name -> conda-forge name, where they differ
CONDA_NAME = {"torch": "pytorch", "simpleitk": "simpleitk", "blosc2": "python-blosc2"}


def _split(requirement: str) -> tuple[str, str]:
    m = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*(.*)$", requirement)
    return m.group(1).lower().replace("_", "-"), m.group(2).replace(" ", "")


def test_env_file_matches_pyproject(repo):
    project = tomllib.loads((repo / "pyproject.toml").read_text())["project"]
    env = yaml.safe_load((repo / "envs" / "openmind.yaml").read_text())
    conda, pip = {}, {}
    for dep in env["dependencies"]:
        if isinstance(dep, dict):
            pip.update(_split(d) for d in dep["pip"])
        else:
            name, spec = _split(dep)
            conda[name] = spec
    for requirement in project["dependencies"]:
        name, spec = _split(requirement)
        if name in pip:
            assert pip[name] == spec, f"{name}: pyproject {spec!r}, env pip {pip[name]!r}"
        else:
            conda_name = CONDA_NAME.get(name, name)
            assert conda_name in conda, f"{name} missing from envs/openmind.yaml"
            assert conda[conda_name] == spec, f"{name}: pyproject {spec!r}, env {conda[conda_name]!r}"
    listed = {_split(r)[0] for r in project["dependencies"]}
    extra = {n for n in conda if n not in {"python", "pip"} and n not in {CONDA_NAME.get(x, x) for x in listed}}
    assert not extra, f"envs/openmind.yaml lists packages pyproject does not: {extra}"


def test_torch_is_a_range_not_a_pin(repo):
    project = tomllib.loads((repo / "pyproject.toml").read_text())["project"]
    torch = [d for d in project["dependencies"] if d.startswith("torch")]
    assert torch == ["torch>=2.4"], torch


def _touches_sys_path(source: str) -> list[int]:
    """Lines of `source` that use `sys.path` (any edit starts with reading the attribute) or import it."""
    import ast

    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name) \
                and node.value.id == "sys":
            lines.append(node.lineno)
        if isinstance(node, ast.ImportFrom) and node.module == "sys" and any(a.name == "path" for a in node.names):
            lines.append(node.lineno)
    return lines


def test_sys_path_check_sees_an_edit():
    assert _touches_sys_path("import sys\nsys.path.insert(0, 'src')\n") == [2]
    assert _touches_sys_path("from sys import path\npath.append('x')\n") == [1]
    assert _touches_sys_path("import os\nos.path.join('a')\n") == []


def test_no_workflow_script_edits_sys_path(repo):
    """rules/common.smk puts this checkout's src/ on every job's PYTHONPATH: a script needs no sys.path edit,
    and one would hide a job environment that lacks it."""
    offenders = {p.name: lines for p in sorted((repo / "workflow_scripts").glob("*.py"))
                 if (lines := _touches_sys_path(p.read_text()))}
    assert not offenders, f"workflow scripts touching sys.path (file: lines): {offenders}"
