"""Settings of one pre-training run, resolved once from the `pretrain` config section.

`DEFAULTS` is the `pretrain` section of the full benchmark (the schema fragment carries the same
values); `resolve` merges a config over it and narrows it to one method x architecture run. The
result is written next to the checkpoints (`settings.json`) and inside every checkpoint.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from openmind_bench import atomic, nets, ssl

DEFAULTS: dict = {
    "methods": ["mae", "spark3d", "simmim", "models_genesis", "simclr", "voco", "volume_fusion", "swinunetr",
                "barlow_twins", "vicreg"],
    "architectures": ["ResEncL", "PrimusM"],
    "selections": ["all"],
    "epochs": 1000,
    "steps_per_epoch": 250,
    "val_steps": 50,
    "total_batch_size": 8,
    "patch_size": [160, 160, 160],
    "seed": 0,
    "checkpoint_every": 50,
    "num_workers": 6,
    "amp": True,
    "amp_dtype": "float16",
    "compile": False,
    "log_every_steps": 25,
    "recommended_downstream_patch_size": [160, 160, 160],
    "preemption_exit_code": 0,
    "optimisation": {
        "cnn": {
            "optimizer": "sgd",
            "lr": 1.0e-2,
            "momentum": 0.99,
            "nesterov": True,
            "weight_decay": 3.0e-5,
            "schedule": "poly",
            "poly_exponent": 0.9,
            "warmup_epochs": 0,
            "grad_clip": 12.0,
        },
        "transformer": {
            "optimizer": "adamw",
            "lr": 3.0e-4,
            "betas": [0.9, 0.98],
            "weight_decay": 0.05,
            "schedule": "poly",
            "poly_exponent": 0.9,
            "warmup_epochs": 50,
            "grad_clip": 1.0,
        },
    },
    "method_settings": {},
    "architecture_presets": {},
    "pretrain_plan": {
        "spacing": [1.0, 1.0, 1.0],
        "normalization_schemes": ["ZScoreNormalization"],
        "data_identifier": "openmind_bench_onemmiso",
    },
    "batch_source": "openmind_bench.train.batches:loader_batches",
    "resources": {"gpu": 4, "cpus_per_gpu": 8, "mem_mb": 128000, "runtime": 4320},
}

# Keys of the config section that describe the workflow (which runs exist, on what resources),
# not one run.
_WORKFLOW_KEYS = ("methods", "architectures", "selections", "resources")


def deep_update(base: dict, new: dict) -> dict:
    """`base` updated in place by `new`: dicts merge key by key, everything else replaces."""
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            deep_update(base[key], value)
        else:
            base[key] = copy.deepcopy(value)
    return base


def merged(config_section: dict | None) -> dict:
    """DEFAULTS deep-updated by `config_section`."""
    return deep_update(copy.deepcopy(DEFAULTS), config_section or {})


@dataclass
class PretrainSettings:
    method: str
    architecture: str
    out_dir: str
    train_data: str | None = None
    val_data: str | None = None
    selection: str = ""
    epochs: int = DEFAULTS["epochs"]
    steps_per_epoch: int = DEFAULTS["steps_per_epoch"]
    val_steps: int = DEFAULTS["val_steps"]
    total_batch_size: int = DEFAULTS["total_batch_size"]
    patch_size: list = field(default_factory=lambda: list(DEFAULTS["patch_size"]))
    seed: int = DEFAULTS["seed"]
    checkpoint_every: int = DEFAULTS["checkpoint_every"]
    num_workers: int = DEFAULTS["num_workers"]
    threads: int = 0  # torch threads per process on CPU; 0 = torch's default
    amp: bool = DEFAULTS["amp"]
    amp_dtype: str = DEFAULTS["amp_dtype"]
    compile: bool = DEFAULTS["compile"]
    log_every_steps: int = DEFAULTS["log_every_steps"]
    recommended_downstream_patch_size: list = field(
        default_factory=lambda: list(DEFAULTS["recommended_downstream_patch_size"])
    )
    preemption_exit_code: int = DEFAULTS["preemption_exit_code"]
    optimisation: dict = field(default_factory=dict)  # the architecture family's entry
    method_settings: dict = field(default_factory=dict)  # overrides of the method implementation's DEFAULTS
    architecture_presets: dict = field(default_factory=dict)
    pretrain_plan: dict = field(default_factory=lambda: copy.deepcopy(DEFAULTS["pretrain_plan"]))
    # "module:callable" taking these settings and returning the batch source (see train.batches).
    batch_source: str = DEFAULTS["batch_source"]

    def arch(self) -> nets.Architecture:
        return nets.resolve(self.architecture, self.architecture_presets)

    @property
    def loader_patch_size(self) -> list[int]:
        """What the batch source crops: `patch_size`, or the method's region (SimCLR, VoCo)."""
        return ssl.patch_sizes(self.method, self.arch().family, self.patch_size, self.method_settings)[0]

    @property
    def loader_augmentation(self) -> bool:
        return ssl.loader_augmentation(self.method, self.arch().family)

    @property
    def anatomy_aware(self) -> bool:
        return ssl.parse(self.method).anatomy_aware

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, data: dict) -> "PretrainSettings":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"pre-training settings: unknown key(s) {unknown}")
        return cls(**copy.deepcopy(data))

    def write(self, path: str | Path) -> None:
        atomic.write_json(path, self.to_dict())

    @classmethod
    def read(cls, path: str | Path) -> "PretrainSettings":
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read pre-training settings {path}: {e}") from e


def resolve(config_section: dict | None, method: str, architecture: str, *, out_dir: str,
            train_data: str | None = None, val_data: str | None = None, selection: str = "") -> PretrainSettings:
    """One run's settings; raises ValueError naming the problem (unknown method or architecture, a
    method without an implementation for the architecture's family, a patch the network cannot take).
    Imports no torch: the workflow calls it for every job when it builds the DAG."""
    cfg = merged(config_section)
    arch = nets.resolve(architecture, cfg["architecture_presets"])
    arch.check_patch_size(cfg["patch_size"])
    family = arch.family
    if family not in cfg["optimisation"]:
        raise ValueError(f"pretrain.optimisation has no entry for the {family!r} family")
    run = {k: v for k, v in cfg.items() if k not in _WORKFLOW_KEYS}
    run.update(
        method=method,
        architecture=architecture,
        out_dir=str(out_dir),
        train_data=None if train_data is None else str(train_data),
        val_data=None if val_data is None else str(val_data),
        selection=selection,
        optimisation=cfg["optimisation"][family],
        method_settings=dict(cfg["method_settings"].get(ssl.implementation(method, family), {})),
    )
    settings = PretrainSettings.from_dict(run)
    if settings.total_batch_size < 1 or settings.epochs < 1 or settings.steps_per_epoch < 1:
        raise ValueError("pretrain: epochs, steps_per_epoch and total_batch_size must be positive")
    return settings
