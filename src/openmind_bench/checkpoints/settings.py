"""The `checkpoints` config list, checked when the workflow starts (torch-free): names unique and
usable as folder names, every source parseable, the registry's channel counts the check runs."""

from __future__ import annotations

from pathlib import Path

from openmind_bench.config import ConfigError
from openmind_bench.names import SCRATCH

CHECKPOINTS_DIR = "results/checkpoints"
SOURCE_RECORD = "source.json"
CHECK_REPORT = "check.json"
SCORECARD = ("scores.csv", "scores.md")  # the checkpoint's rows against its scratch baseline


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
    """The checkpoint file a fetch brought (`source.json`); a published layout's adaptation_plan.json
    lies beside it, where the readers look."""
    import json

    from openmind_bench.checkpoints.sources import checkpoint_file_of

    dest = Path(dest_dir)
    record = json.loads((dest / SOURCE_RECORD).read_text())
    return dest / checkpoint_file_of(record["files"])


# the check's transfer figures a run's provenance keeps (per input-channel count in check.json)
_CHECK_SUMMARY = ("moved", "left_new", "unexpected", "in_proj_repeated")


def provenance(dest_dir: str | Path, channels: int | None = None) -> dict:
    """What a fine-tuning run of the fetched checkpoint in `dest_dir` records (FinetuneSettings.
    external_checkpoint, then its metrics.json): the source and pinned revision, the sha256, the format
    and architecture from its check, and the check's transfer figures for `channels` input channels.
    Torch-free: read from source.json and check.json once the check has run."""
    import json

    dest = Path(dest_dir)
    record = json.loads((dest / SOURCE_RECORD).read_text())
    report = json.loads((dest / CHECK_REPORT).read_text())
    transfers = {t["input_channels"]: t for t in report["transfers"]}
    transfer = transfers.get(channels) or next(iter(transfers.values()))
    return {
        "name": record["checkpoint"], "source": record["source"], "kind": record["kind"],
        "revision": record.get("revision"), "commit": record.get("commit"),
        "sha256": record["sha256"], "checkpoint_file": record["checkpoint_file"],
        "format": report["format"], "adaptation_plan": report["adaptation_plan"],
        "architecture": report["architecture"],
        "check": {**{k: transfer[k] for k in _CHECK_SUMMARY}, "input_channels": transfer["input_channels"],
                  "finetune_patch_size": report["finetune_patch_size"],
                  "pretrain_patch_size": report["pretrain_patch_size"],
                  "position_embedding": transfer.get("position_embedding")},
    }


def channel_counts(config: dict) -> list[int]:
    """The input-channel counts of the downstream datasets the config fine-tunes on (the check runs
    the transfer for each); [1] without a registry."""
    from openmind_bench.downstream.settings import cached_registry

    registry = cached_registry(config)
    chosen = config["finetune"]["datasets"] or registry.names()
    counts = {registry.get(name).channels for name in chosen}
    return sorted(counts) or [1]


def reads_demo_hub(entry: dict, hub: dict) -> bool:
    """Whether config entry `entry` reads the repository the demo places in its hub cache (`demo.hub`)."""
    from openmind_bench.checkpoints.sources import parse_source

    if not entry["source"].startswith("hf://"):
        return False
    source = parse_source(entry["source"], name=entry["name"], revision=entry.get("revision"))
    return source.repo_id == hub["repo_id"] and Path(entry.get("cache_dir") or "") == Path(hub["cache_dir"])


def hub_ref(hub: dict) -> str:
    """The file the demo's hub placement writes last (`refs/main` of its repository)."""
    from openmind_bench.checkpoints.hub_cache import repo_folder

    return str(repo_folder(hub["cache_dir"], hub["repo_id"]) / "refs" / "main")


def check_demo_hub(hub: dict | None, pretrain_runs: list[str]) -> None:
    """`demo.hub` names a pre-training run of this config (an error naming the key otherwise)."""
    if hub and hub["run"] not in pretrain_runs:
        raise ConfigError(f"config key 'demo.hub.run': {hub['run']!r} is not a pre-training run of this config "
                          f"({pretrain_runs})")


def scratch_architectures(reports) -> list[str]:
    """The scratch-baseline architectures (check.json `architecture.scratch_architecture`) of these
    check reports, each once, in order; a checkpoint no preset matches has none."""
    import json

    out = []
    for report in reports:
        name = json.loads(Path(report).read_text())["architecture"].get("scratch_architecture")
        if name and name not in out:
            out.append(name)
    return out
