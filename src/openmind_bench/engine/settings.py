"""Run settings as JSON: what a launcher writes next to a run and every torchrun process reads back.
A stage's settings dataclass mixes this in; its fields come from the validated config only."""

from __future__ import annotations

import copy
import json
from dataclasses import MISSING, asdict, fields
from pathlib import Path

from openmind_bench import atomic


class JsonSettings:
    """to_dict / from_dict (unknown keys are an error naming them) / write / read for a dataclass."""

    LABEL = "run settings"

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, data: dict):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{cls.LABEL}: unknown key(s) {unknown}")
        missing = sorted(f.name for f in fields(cls) if f.name not in data and not _has_default(f))
        if missing:
            raise ValueError(f"{cls.LABEL}: missing key(s) {missing}")
        return cls(**copy.deepcopy(data))

    def write(self, path: str | Path) -> None:
        atomic.write_json(path, self.to_dict())

    @classmethod
    def read(cls, path: str | Path):
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read {cls.LABEL} {path}: {e}") from e


def _has_default(f) -> bool:
    return f.default is not MISSING or f.default_factory is not MISSING
