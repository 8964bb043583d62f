"""Defaults are written once, in config/schema.yaml: the package reads them from there."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import yaml

from openmind_bench import config
from openmind_bench.downstream.settings import FinetuneSettings
from openmind_bench.downstream.splits import SplitSettings
from openmind_bench.pretrain.settings import PretrainSettings

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "openmind_bench"
# Set at run time by the launcher, not configuration.
RUNTIME_FIELDS = {"threads"}
# Method implementations keep their own hyperparameter tables (the schema's `method_settings` only
# overrides them, default {}), so those DEFAULTS exist once.
OWN_DEFAULT_TABLES = {"ssl"}


def _object_nodes(node: dict, path: str = ""):
    if not isinstance(node, dict):
        return
    if node.get("type") == "object" or "properties" in node:
        yield path, node
    for key, child in (node.get("properties") or {}).items():
        yield from _object_nodes(child, f"{path}.{key}" if path else key)
    if isinstance(node.get("items"), dict):
        yield from _object_nodes(node["items"], f"{path}[]")


def test_schema_objects_with_properties_default_to_empty(repo):
    """A section whose keys carry their own defaults must not repeat them in its own default."""
    schema = yaml.safe_load((repo / "config" / "schema.yaml").read_text())
    repeated = [path for path, node in _object_nodes(schema)
                if path and node.get("properties") and node.get("default") not in ({}, None)]
    assert repeated == []


def test_settings_dataclasses_take_every_value_from_the_config():
    for cls in (PretrainSettings, FinetuneSettings):
        with_default = [f.name for f in dataclasses.fields(cls)
                        if f.name not in RUNTIME_FIELDS
                        and (f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING)]
        assert with_default == [], f"{cls.__name__} repeats defaults of the schema: {with_default}"


def test_split_settings_defaults_are_read_from_the_schema():
    downstream = config.defaults()["downstream"]
    assert SplitSettings() == SplitSettings(downstream["test_fraction"], downstream["folds"], downstream["split_seed"],
                                            downstream["volume_bins"], downstream["split_max_nodes"])


def test_no_module_keeps_a_defaults_table():
    offenders = []
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 50
    for path in files:
        if path.relative_to(PACKAGE).parts[0] in OWN_DEFAULT_TABLES:
            continue
        for node in ast.parse(path.read_text()).body:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
            for target in targets:
                if isinstance(target, ast.Name) and target.id.endswith("DEFAULTS") and isinstance(node.value, ast.Dict):
                    offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {target.id}")
    assert offenders == []


def test_config_sections_fill_defaults_and_name_bad_keys():
    section = config.section("pretrain", {"optimisation": {"transformer": {"warmup_epochs": 5}}})
    assert section["optimisation"]["transformer"]["warmup_epochs"] == 5
    assert section["optimisation"]["transformer"]["lr"] == config.defaults()["pretrain"]["optimisation"]["transformer"]["lr"]
    import pytest

    with pytest.raises(config.ConfigError, match="pretrain.epochs"):
        config.section("pretrain", {"epochs": 0})


def _schema_defaults(node, out=None) -> dict[str, list]:
    """key name -> the defaults the schema gives keys of that name (anywhere in the tree)."""
    out = {} if out is None else out
    if isinstance(node, dict):
        for key, child in (node.get("properties") or {}).items():
            if isinstance(child, dict) and "default" in child:
                out.setdefault(key, []).append(child["default"])
            _schema_defaults(child, out)
        if isinstance(node.get("items"), dict):
            _schema_defaults(node["items"], out)
    return out


def _same(literal, default) -> bool:
    if isinstance(literal, (tuple, list)) and isinstance(default, list):
        return list(literal) == default
    return literal == default


def _is_literal(node) -> bool:
    if isinstance(node, ast.Constant):
        return node.value is not None
    if isinstance(node, (ast.Tuple, ast.List)):
        return all(_is_literal(e) for e in node.elts)
    if isinstance(node, ast.BinOp):
        return _is_literal(node.left) and _is_literal(node.right)
    if isinstance(node, ast.UnaryOp):
        return _is_literal(node.operand)
    return False


def test_no_dataclass_repeats_a_schema_default_as_a_literal(repo):
    """A dataclass field named like a config key takes its default from the schema, never the same
    value written again as a literal."""
    defaults = _schema_defaults(yaml.safe_load((repo / "config" / "schema.yaml").read_text()))
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.relative_to(PACKAGE).parts[0] in OWN_DEFAULT_TABLES:
            continue
        for cls in (n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.ClassDef)):
            if not any("dataclass" in ast.unparse(d) for d in cls.decorator_list):
                continue
            for stmt in cls.body:
                if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                        and stmt.target.id not in RUNTIME_FIELDS and stmt.value is not None
                        and _is_literal(stmt.value)):
                    value = eval(compile(ast.Expression(stmt.value), "<literal>", "eval"), {})  # constants only
                    if any(_same(value, d) for d in defaults.get(stmt.target.id, [])):
                        offenders.append(f"{path.relative_to(PACKAGE)}:{stmt.lineno} {cls.name}.{stmt.target.id}")
    assert offenders == []
