"""What the tables need from the downstream dataset registry: order, task, role and domain.

`config/downstream_datasets.yaml` is a mapping::

    datasets:
      D1_MSFLAIR: {task: seg, role: test, domain: id, ...}
      ...

(a list of mappings with a `name` key is accepted too). Every field may be missing: a dataset
without `domain` only leaves the ID/OOD means empty. Fields that are present must be valid.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import yaml

log = logging.getLogger(__name__)

DEFAULT_PATH = "config/downstream_datasets.yaml"
ALLOWED = {"task": ("seg", "cls"), "role": ("dev", "test"), "domain": ("id", "ood")}


class RegistryError(ValueError):
    """The registry file exists but cannot be used."""


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    task: str | None = None
    role: str | None = None
    domain: str | None = None


def load_registry(path: str | Path | None) -> dict[str, DatasetInfo]:
    """Datasets in registry order; empty (with a warning) when the file is absent."""
    if path is None:
        log.warning("no dataset registry given: ID/OOD means stay empty")
        return {}
    path = Path(path)
    if not path.is_file():
        log.warning("dataset registry %s not found: ID/OOD means stay empty", path)
        return {}
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise RegistryError(f"dataset registry {path} is not valid YAML: {e}") from None
    entries = doc.get("datasets", {}) if isinstance(doc, dict) else None
    if isinstance(entries, list):
        named = {}
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict) or not entry.get("name"):
                raise RegistryError(f"dataset registry {path}: datasets[{i}] has no 'name'")
            named[str(entry["name"])] = entry
        entries = named
    if not isinstance(entries, dict):
        raise RegistryError(f"dataset registry {path}: 'datasets' must be a mapping of name -> fields")

    registry = {}
    for name, fields in entries.items():
        fields = fields or {}
        if not isinstance(fields, dict):
            raise RegistryError(f"dataset registry {path}: datasets.{name} must be a mapping")
        values = {}
        for key, allowed in ALLOWED.items():
            value = fields.get(key)
            if value is None:
                values[key] = None
                continue
            value = str(value).strip().lower()
            if value not in allowed:
                raise RegistryError(
                    f"dataset registry {path}: datasets.{name}.{key} is {fields.get(key)!r}, "
                    f"expected one of {list(allowed)}"
                )
            values[key] = value
        registry[str(name)] = DatasetInfo(name=str(name), **values)
    return registry


def ordered_datasets(names, registry: dict[str, DatasetInfo]) -> list[str]:
    """Registry order first (as the papers list them), then unknown datasets by name."""
    names = set(names)
    known = [n for n in registry if n in names]
    return known + sorted(names - set(known))
