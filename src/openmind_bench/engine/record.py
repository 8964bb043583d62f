"""A training run's record: the settings and input files (by sha256) its state was made from.

Snakemake re-runs a job when its params or inputs change, or when it is forced, but it removes only
the job's declared outputs (the final checkpoint, `metrics.json`). What a training run leaves beside
them (nnU-Net's `checkpoint_final.pth`, a `checkpoint_latest.pt` to resume from, predictions, logs)
stays. A job that found such state and used it would report numbers of other settings. So every
training job starts with `prepare_run_dir`: its state is kept (to resume, or to re-evaluate a trained
model) only when the record written beside it equals the job's own exactly; otherwise the state is
removed and the job trains anew. Either way the job says which, and why, in its log.

`run_record.json` = {"settings": {...}, "inputs": {name: {"path", "sha256"}}, "digest": ...}; the
digest covers settings and input hashes (not paths: a moved results folder keeps its state).
Torch-free: the launchers call it before torchrun starts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

from openmind_bench import atomic
from openmind_bench.digests import file_digest

log = logging.getLogger(__name__)

RECORD = "run_record.json"


def _canonical(value) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


@dataclass
class RunRecord:
    """What a run's result depends on: result-shaping settings and input files (hashed)."""

    settings: dict
    inputs: dict = field(default_factory=dict)  # name -> {"path": str, "sha256": str}

    @classmethod
    def of(cls, settings: Mapping, *, ignore: Iterable[str] = (), files: Mapping[str, str | Path | None] = ()) -> "RunRecord":
        """The record of `settings` less the keys in `ignore` (those that do not shape the result:
        threads, logging, where the run is written) and of the `files` given (None: no such input)."""
        ignored = set(ignore)
        kept = json.loads(_canonical({k: v for k, v in settings.items() if k not in ignored}))
        inputs = {}
        for name, path in dict(files).items():
            if path is None:
                continue
            if not Path(path).is_file():
                raise FileNotFoundError(f"input {name} of the run does not exist: {path}")
            inputs[name] = {"path": str(path), "sha256": file_digest(path)}
        return cls(kept, inputs)

    @property
    def digest(self) -> str:
        hashes = {name: entry["sha256"] for name, entry in self.inputs.items()}
        return hashlib.sha256(_canonical({"settings": self.settings, "inputs": hashes}).encode()).hexdigest()

    def to_dict(self) -> dict:
        return {"settings": self.settings, "inputs": self.inputs, "digest": self.digest}

    def summary(self) -> dict:
        """What a results file keeps of it: the digest and the input hashes."""
        return {"digest": self.digest, "inputs": {k: dict(v) for k, v in self.inputs.items()}}

    def write(self, out_dir: str | Path) -> None:
        atomic.write_json(Path(out_dir) / RECORD, self.to_dict())

    @classmethod
    def read(cls, out_dir: str | Path) -> "RunRecord | None":
        path = Path(out_dir) / RECORD
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
            return cls(dict(data["settings"]), dict(data.get("inputs") or {}))
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("unreadable run record %s (%s): treated as absent", path, e)
            return None

    def differences(self, other: "RunRecord") -> list[str]:
        """Human-readable differences from `other` (the recorded run) to this one."""
        out = []
        for key in sorted(set(self.settings) | set(other.settings)):
            old, new = other.settings.get(key, "<absent>"), self.settings.get(key, "<absent>")
            if _canonical(old) != _canonical(new):
                out.append(f"{key}: {_short(old)} -> {_short(new)}")
        for name in sorted(set(self.inputs) | set(other.inputs)):
            old = (other.inputs.get(name) or {}).get("sha256", "<absent>")
            new = (self.inputs.get(name) or {}).get("sha256", "<absent>")
            if old != new:
                out.append(f"{name} sha256: {old[:12]} -> {new[:12]}")
        return out


def _short(value, limit: int = 120) -> str:
    text = _canonical(value)
    return text if len(text) <= limit else text[:limit] + "..."


def prepare_run_dir(out_dir: str | Path, record: RunRecord, state: Iterable[str], label: str = "run") -> bool:
    """Make `out_dir` ready for a run of `record`. Returns True when the state found there (the
    names in `state`) was made by a run with exactly this record and is kept; otherwise that state
    is removed (the run starts anew) and False is returned. The record is written in both cases."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    present = [out / name for name in state if (out / name).exists() or (out / name).is_symlink()]
    previous = RunRecord.read(out)
    if previous is not None and previous.digest == record.digest:
        if present:
            log.info("%s: settings and inputs equal the recorded run's (digest %s%s): keeping its state %s",
                     label, record.digest[:12], _input_note(record), sorted(p.name for p in present))
        record.write(out)
        return bool(present)
    if present:
        why = ("no record of the settings that made it" if previous is None
               else "; ".join(record.differences(previous)) or "record changed")
        log.warning("%s: removing state of an earlier run with other settings or inputs (%s): %s; training anew",
                    label, why, sorted(p.name for p in present))
        for path in present:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
    record.write(out)
    return False


def _input_note(record: RunRecord) -> str:
    if not record.inputs:
        return ""
    return "; " + ", ".join(f"{name} sha256 {entry['sha256'][:12]}" for name, entry in sorted(record.inputs.items()))
