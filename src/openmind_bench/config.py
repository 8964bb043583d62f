"""Config loading and validation shared by the Snakefile and the CLI.

The schema (`config/schema.yaml`) gives every key a description and a default, and is the only
place a default is written: validation fills the defaults in place (as
`snakemake.utils.validate(..., set_default=True)` does) and, unlike a raw jsonschema traceback,
names the offending key and value in one line. Stage code reads the validated config (or one
section of it through `section`), never a default of its own.
"""

from __future__ import annotations

import copy
import functools
import math
import re
from pathlib import Path
from typing import Any

import jsonschema
import pandas as pd
import yaml

# The package is used from its checkout (installed editable, as envs/openmind.yaml and .ci/install do),
# so the workflow's own schema is the one it validates against.
SCHEMA_PATH = Path(__file__).resolve().parents[2] / "config" / "schema.yaml"
DATASET_ID = re.compile(r"^ds\d{6}$")
TABLE_COLUMNS = ["dataset_id", "snapshot", "expected_images"]


class ConfigError(ValueError):
    """A config or table value that the workflow cannot run with."""


def _with_defaults(validator_class):
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, sub in properties.items():
                if "default" in sub and name not in instance:
                    # copy so a mutable default is never shared between configs (or with the schema)
                    instance[name] = copy.deepcopy(sub["default"])
        yield from validate_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": set_defaults})


_Validator = _with_defaults(jsonschema.Draft7Validator)


def _key_of(error: jsonschema.ValidationError) -> str:
    parts = [str(p) for p in error.absolute_path]
    if error.validator == "required":
        missing = re.findall(r"'([^']+)' is a required property", error.message)
        parts += missing[:1]
    if error.validator == "additionalProperties":
        extra = re.findall(r"'([^']+)' was unexpected", error.message)
        parts += extra[:1]
    return ".".join(parts) or "<top level>"


@functools.lru_cache(maxsize=8)
def _schema(path: str, mtime_ns: int) -> dict:
    """The parsed schema, read once per file version (parsing it costs ~80 ms; stages validate often)."""
    return yaml.safe_load(Path(path).read_text())


def validate(config: dict, schema_path: str | Path) -> dict:
    """Fill defaults into `config` in place and raise ConfigError naming the first bad key."""
    path = Path(schema_path).resolve()
    schema = _schema(str(path), path.stat().st_mtime_ns)
    errors = sorted(_Validator(schema).iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        lines = []
        for e in errors:
            key = _key_of(e)
            if e.validator in ("required", "additionalProperties"):
                lines.append(f"config key '{key}': {e.message}")
            else:
                lines.append(f"config key '{key}': value {e.instance!r} is invalid: {e.message}")
        raise ConfigError("invalid config (" + str(schema_path) + "):\n  " + "\n  ".join(lines))
    stages = config.get("stages") or {}
    if stages.get("pretrain") and stages.get("openmind_data") is False:
        raise ConfigError("config key 'stages.pretrain': pre-training reads the OpenMind selections, which "
                          "stages.openmind_data turns off; turn both off to evaluate external checkpoints only")
    return config


def load(config_path: str | Path | None = None, schema_path: str | Path = SCHEMA_PATH) -> dict:
    """A config file validated, defaults filled in; no file = every default."""
    config = (yaml.safe_load(Path(config_path).read_text()) or {}) if config_path else {}
    return validate(config, schema_path)


@functools.lru_cache(maxsize=1)
def _defaults() -> dict:
    return validate({}, SCHEMA_PATH)


def defaults() -> dict:
    """The whole config as the schema's defaults make it (a fresh copy)."""
    return copy.deepcopy(_defaults())


def section(name: str, values: dict | None = None) -> dict:
    """Config section `name` with `values` over the schema's defaults, validated (errors name the key)."""
    return validate({name: copy.deepcopy(values or {})}, SCHEMA_PATH)[name]


def deep_update(base: dict, new: dict) -> dict:
    """`base` updated in place by `new`: dicts merge key by key, everything else replaces."""
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            deep_update(base[key], value)
        else:
            base[key] = copy.deepcopy(value)
    return base


def parse_overrides(items: list[str]) -> dict:
    """`key.sub=value` pairs (values as YAML) -> a nested dict (the CLI's `--set`)."""
    out: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r} is not of the form key=value")
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(value)
    return out


def read_datasets_table(path: str | Path) -> pd.DataFrame:
    """The dataset table (`dataset_id, snapshot, expected_images`, more columns allowed)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"datasets table {path} does not exist")
    table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, comment="#")
    missing = [c for c in TABLE_COLUMNS if c not in table.columns]
    if missing:
        raise ConfigError(f"datasets table {path}: missing column(s) {missing}")
    for i, row in table.iterrows():
        line = i + 2  # header is line 1 (comment lines aside)
        if not DATASET_ID.match(row.dataset_id):
            raise ConfigError(
                f"datasets table {path} row {line}: dataset_id {row.dataset_id!r} is not of the form dsNNNNNN"
            )
        if not row.snapshot:
            raise ConfigError(f"datasets table {path} row {line}: snapshot is empty for {row.dataset_id}")
        try:
            n = int(row.expected_images)
        except ValueError:
            n = -1
        if n < 1:
            raise ConfigError(
                f"datasets table {path} row {line}: expected_images {row.expected_images!r} "
                f"for {row.dataset_id} is not a positive integer"
            )
    dup = table.dataset_id[table.dataset_id.duplicated()].tolist()
    if dup:
        raise ConfigError(f"datasets table {path}: duplicated dataset_id(s) {dup}")
    table["expected_images"] = table.expected_images.astype(int)
    return table.set_index("dataset_id", drop=False)


def selected_datasets(config: dict, table: pd.DataFrame) -> list[str]:
    """The datasets the run covers: `config['datasets']` if given, else every table row."""
    wanted = config.get("datasets") or list(table.dataset_id)
    unknown = [d for d in wanted if d not in table.index]
    if unknown:
        raise ConfigError(f"config key 'datasets': {unknown} not in the datasets table")
    return list(wanted)


def num_shards(expected_images: int, shard_size: int) -> int:
    """K_d: known from the table before any data exists, so the DAG depends on config alone."""
    return max(1, math.ceil(int(expected_images) / int(shard_size)))


def get(config: dict, dotted: str, default: Any = None) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def named_selections(config: dict) -> dict[str, dict]:
    """The `selections` entries by name, in config order; a name that is not a valid name part or
    that two entries share is an error naming both keys (the last one would silently win)."""
    from openmind_bench.names import InvalidName, check_name

    out, position = {}, {}
    for i, entry in enumerate(config.get("selections") or []):
        try:
            name = check_name(entry.get("name"), f"selections[{i}].name")
        except InvalidName as e:
            raise ConfigError(str(e)) from None
        if name in out:
            raise ConfigError(f"config key 'selections[{i}].name': {name!r} is also the name of "
                              f"selections[{position[name]}]; selection names must be unique")
        out[name], position[name] = entry, i
    return out
