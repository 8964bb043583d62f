"""Settings of one fine-tuning run and the run names (torch-free: the workflow reads them at start-up).

Run names: `{method}__{arch}__{selection}__{schedule}__{epochs}` (a pre-trained checkpoint,
`results/pretrain/{method}__{arch}__{selection}/checkpoint_final.pt`) or `scratch__{arch}__{epochs}`;
`__n{N}` appended marks a low-data run on N training cases. `DEFAULTS` is the `finetune` config
section of the full benchmark; `resolve` narrows a config to one run.
"""

from __future__ import annotations

import copy
import json
import logging
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from openmind_bench import atomic
from openmind_bench.aggregate.results import SCRATCH
from openmind_bench.train import settings as pretrain_settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunName:
    architecture: str
    epochs: int
    method: str = SCRATCH
    selection: str | None = None
    schedule: str | None = None
    low_data_n: int | None = None

    @property
    def pretrained(self) -> bool:
        return self.method != SCRATCH

    @property
    def pretrain_run(self) -> str | None:
        return f"{self.method}__{self.architecture}__{self.selection}" if self.pretrained else None

    def __str__(self) -> str:
        base = (f"{self.pretrain_run}__{self.schedule}__{self.epochs}" if self.pretrained
                else f"{SCRATCH}__{self.architecture}__{self.epochs}")
        return base + (f"__n{self.low_data_n}" if self.low_data_n else "")


def parse_run(run: str) -> RunName:
    """The parts of a run name (see the module doc); the selection may itself hold `__`."""
    parts = run.split("__")
    low = None
    if len(parts) > 1 and re.fullmatch(r"n\d+", parts[-1]):
        low, parts = int(parts[-1][1:]), parts[:-1]
    if not parts[-1].isdigit():
        raise ValueError(f"run {run!r}: the fine-tuning epochs (last part) are not a number")
    if parts[0] == SCRATCH and len(parts) == 3:
        return RunName(parts[1], int(parts[2]), low_data_n=low)
    if len(parts) < 5:
        raise ValueError(f"run {run!r} is neither {{method}}__{{arch}}__{{selection}}__{{schedule}}__{{epochs}} "
                         "nor scratch__{arch}__{epochs}")
    return RunName(parts[1], int(parts[-1]), parts[0], "__".join(parts[2:-2]), parts[-2], low)


@dataclass
class FinetuneSettings:
    dataset: str
    fold: str
    run: str
    out_dir: str
    registry: str
    split: str  # split JSON (written once by the split rule / ensure_split)
    root: str | None = None  # downstream data root (config downstream.root)
    checkpoint: str | None = None  # pre-training checkpoint; None for scratch
    epochs: int = 150
    steps_per_epoch: int = 250
    batch_size: int = 2
    patch_size: list | None = None  # None: the checkpoint's recommended downstream patch
    scratch_patch_size: list = field(default_factory=lambda: [160, 160, 160])
    spacing: list | None = None  # target spacing (mm); None: keep every case's own grid
    seed: int = 0
    threads: int = 0
    amp: bool = True
    amp_dtype: str = "bfloat16"
    sliding_window_overlap: float = 0.5
    label_smoothing: float = 0.2
    head_dropout: float = 0.2
    schedule_config: dict = field(default_factory=dict)  # peak_lr / warmup_epochs / poly_exponent / custom_schedules
    optimisation: dict = field(default_factory=lambda: dict(pretrain_settings.DEFAULTS["optimisation"]))
    architecture_presets: dict = field(default_factory=dict)
    low_data_subset: str | None = None  # JSON path of the low-data subset (written once)
    split_settings: dict = field(default_factory=dict)
    save_predictions: bool = True
    keep_checkpoint: bool = True
    preemption_exit_code: int = 0
    nnunet: dict = field(default_factory=dict)  # config downstream.nnunet (segmentation runs in nnU-Net)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "FinetuneSettings":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown fine-tuning settings {unknown}")
        return cls(**data)

    def write(self, path: str | Path) -> None:
        atomic.write_json(path, self.to_dict())

    @classmethod
    def read(cls, path: str | Path) -> "FinetuneSettings":
        return cls.from_dict(json.loads(Path(path).read_text()))


# The `finetune` config section of the full benchmark (the schema fragment carries the same values).
# Schedules, epochs, steps per epoch, batch size and low-data sizes live in the `downstream` section
# (with the splits and the schedule tables); `DOWNSTREAM_DEFAULTS` repeats its schema defaults.
DEFAULTS: dict = {
    "datasets": None,  # None: every usable dataset of the registry
    "scratch_architectures": ["ResEncL", "PrimusM"],
    "pretrained_runs": None,  # None: every pre-training run of the config
    "evaluate_folds": ["test"],
    "patch_size": None,  # None: the checkpoint's recommended downstream patch
    "scratch_patch_size": [160, 160, 160],
    "spacing": [1.0, 1.0, 1.0],  # the pre-training data's spacing; None: every case's own grid
    "seed": 0,
    "sliding_window_overlap": 0.5,
    "label_smoothing": 0.2,
    "head_dropout": 0.2,
    "amp": True,
    "amp_dtype": "bfloat16",
    "save_predictions": True,
    "keep_checkpoint": True,
    "preemption_exit_code": 0,
    "resources": {"gpu": 1, "cpus_per_gpu": 8, "mem_mb": 64000, "runtime": 1440},
}
DOWNSTREAM_DEFAULTS: dict = {"schedules": ["sawtooth", "warmup"], "epochs": [150], "steps_per_epoch": 250,
                             "batch_size": 2, "low_data_n": []}
DEFAULT_REGISTRY = "config/downstream_datasets.yaml"
_SETTING_KEYS = ("patch_size", "scratch_patch_size", "spacing", "seed",
                 "sliding_window_overlap", "label_smoothing", "head_dropout", "amp", "amp_dtype", "save_predictions",
                 "keep_checkpoint", "preemption_exit_code")
_SCHEDULE_KEYS = ("peak_lr", "warmup_epochs", "poly_exponent", "custom_schedules")


def merged(finetune_section: dict | None) -> dict:
    return pretrain_settings.deep_update(copy.deepcopy(DEFAULTS), finetune_section or {})


def downstream_run_settings(config: dict) -> dict:
    """schedules, epochs, steps_per_epoch, batch_size, low_data_n from the `downstream` section."""
    downstream = config.get("downstream") or {}
    return {k: downstream.get(k, v) for k, v in DOWNSTREAM_DEFAULTS.items()}


def registry_path(config: dict) -> str:
    return config.get("downstream_registry") or DEFAULT_REGISTRY


# downstream config key -> openmind_bench.downstream.splits.SplitSettings field
_SPLIT_KEYS = {"test_fraction": "test_fraction", "folds": "folds", "split_seed": "seed", "volume_bins": "volume_bins",
               "split_max_nodes": "max_nodes"}
DEFAULT_SPLITS_DIR = "results/downstream/splits"


def split_settings(config: dict, role: str = "dev") -> dict:
    """SplitSettings keyword arguments from the `downstream` section; test-role datasets get no folds
    (as `openmind-bench downstream-splits` writes them)."""
    downstream = config.get("downstream") or {}
    out = {field_name: downstream[key] for key, field_name in _SPLIT_KEYS.items() if key in downstream}
    if role != "dev":
        out["folds"] = 0
    return out


def split_path(config: dict, dataset: str, low_data_n: int | None = None) -> str:
    """`{downstream.splits_dir}/{dataset}.json`, and `{dataset}__n{N}.json` for a low-data subset."""
    folder = (config.get("downstream") or {}).get("splits_dir") or DEFAULT_SPLITS_DIR
    return f"{folder}/{dataset}{f'__n{low_data_n}' if low_data_n else ''}.json"


def resolve(config: dict, dataset: str, run: str, fold: str, *, out_dir: str, split: str,
            pretrained_checkpoint: str | None = None, low_data_subset: str | None = None) -> FinetuneSettings:
    """One run's settings from the workflow config (`finetune`, `downstream`, `pretrain` sections)."""
    section = merged(config.get("finetune"))
    downstream = config.get("downstream") or {}
    lengths = downstream_run_settings(config)
    pretrain = pretrain_settings.merged(config.get("pretrain"))
    name = parse_run(run)
    if name.epochs not in [int(e) for e in lengths["epochs"]]:
        log.warning("run %s: %d epochs is not among downstream.epochs %s", run, name.epochs, lengths["epochs"])
    return FinetuneSettings(
        dataset=dataset, fold=str(fold), run=run, out_dir=out_dir,
        registry=registry_path(config), root=downstream.get("root"),
        steps_per_epoch=int(lengths["steps_per_epoch"]), batch_size=int(lengths["batch_size"]),
        split=split, checkpoint=pretrained_checkpoint, epochs=name.epochs,
        schedule_config={k: downstream[k] for k in _SCHEDULE_KEYS if k in downstream},
        optimisation=pretrain["optimisation"], architecture_presets=pretrain["architecture_presets"],
        low_data_subset=low_data_subset, split_settings=split_settings(config),
        nnunet=dict(downstream.get("nnunet") or {}),
        **{k: section[k] for k in _SETTING_KEYS},
    )


def run_names(config: dict, pretrain_runs: list[str]) -> list[str]:
    """Every fine-tuning run the config asks for: each selected pre-training run x schedule x epochs,
    the from-scratch baselines x epochs, and their low-data variants."""
    section = merged(config.get("finetune"))
    lengths = downstream_run_settings(config)
    chosen = pretrain_runs if section["pretrained_runs"] is None else list(section["pretrained_runs"])
    unknown = sorted(set(chosen) - set(pretrain_runs))
    if unknown:
        raise ValueError(f"config finetune.pretrained_runs: {unknown} are not pre-training runs of this config "
                         f"({pretrain_runs})")
    epochs = [int(e) for e in lengths["epochs"]]
    runs = [f"{p}__{s}__{e}" for p in chosen for s in lengths["schedules"] for e in epochs]
    runs += [f"{SCRATCH}__{a}__{e}" for a in section["scratch_architectures"] for e in epochs]
    runs += [f"{r}__n{int(n)}" for r in list(runs) for n in lengths["low_data_n"]]
    for r in runs:
        parse_run(r)  # fails early on a name the rules could not take apart
    return runs


def dataset_folds(config: dict) -> dict[str, list[str]]:
    """dataset -> the folds it is evaluated on: `test` (the fixed split) for every dataset, fold
    numbers for development sets only. Reads the registry (a small YAML file)."""
    from openmind_bench.downstream.registry import load_registry

    section = merged(config.get("finetune"))
    downstream = config.get("downstream") or {}
    registry = load_registry(registry_path(config), downstream.get("root"))
    names = registry.names() if section["datasets"] is None else list(section["datasets"])
    out = {}
    for name in names:
        spec = registry.get(name)  # a dataset the config names but the registry cannot use: error naming it
        folds = [str(f) for f in section["evaluate_folds"] if str(f) == "test" or spec.role == "dev"]
        if folds:
            out[name] = folds
    return out


def targets(config: dict, pretrain_runs: list[str]) -> list[str]:
    runs = run_names(config, pretrain_runs)
    return [f"results/downstream/{d}/{r}/fold_{f}/metrics.json"
            for d, folds in dataset_folds(config).items() for r in runs for f in folds]
