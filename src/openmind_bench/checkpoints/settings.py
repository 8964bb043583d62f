"""The `checkpoints` config list, checked when the workflow starts (torch-free): names unique and
usable as folder names, every source parseable, the registry's channel counts the check runs."""

from __future__ import annotations

from pathlib import Path

from openmind_bench.config import ConfigError
from openmind_bench.names import SCRATCH

CHECKPOINTS_DIR = "results/checkpoints"
SOURCE_RECORD = "source.json"
CHECK_REPORT = "check.json"


def configured_checkpoints(config: dict) -> dict[str, dict]:
    """name -> entry of `config["checkpoints"]`, in config order; errors name the key."""
    from openmind_bench.checkpoints.sources import CheckpointSourceError, parse_source

    out, position = {}, {}
    for i, entry in enumerate(config.get("checkpoints") or []):
        name = entry["name"]
        if name in out:
            raise ConfigError(f"config key 'checkpoints[{i}].name': {name!r} is also the name of "
                              f"checkpoints[{position[name]}]; checkpoint names must be unique")
        if name == SCRATCH:
            raise ConfigError(f"config key 'checkpoints[{i}].name': {SCRATCH!r} names the from-scratch baselines")
        try:
            parse_source(entry["source"], name=name, revision=entry.get("revision"), sha256=entry.get("sha256"))
        except (CheckpointSourceError, ValueError) as e:
            raise ConfigError(f"config key 'checkpoints[{i}].source': {e}") from None
        out[name], position[name] = dict(entry), i
    return out


def checkpoint_dir(name: str) -> str:
    return f"{CHECKPOINTS_DIR}/{name}"


def fetched_path(dest_dir: str | Path) -> Path:
    """What a fetch brought (`source.json`): the folder when it holds the published layout (the plan
    beside the weights), else the checkpoint file."""
    import json

    from openmind_bench.checkpoints.sources import checkpoint_file_of

    dest = Path(dest_dir)
    record = json.loads((dest / SOURCE_RECORD).read_text())
    if (dest / "adaptation_plan.json").is_file():
        return dest
    return dest / checkpoint_file_of(record["files"])


def channel_counts(config: dict) -> list[int]:
    """The input-channel counts of the downstream datasets the config fine-tunes on (the check runs
    the transfer for each); [1] without a registry."""
    from openmind_bench.downstream.settings import cached_registry

    registry = cached_registry(config)
    chosen = config["finetune"]["datasets"] or registry.names()
    counts = {registry.get(name).channels for name in chosen}
    return sorted(counts) or [1]
