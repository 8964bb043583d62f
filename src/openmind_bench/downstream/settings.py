"""Settings of one fine-tuning run and the runs a config asks for (torch-free: the workflow reads them
at start-up). Run names and the results layout are `openmind_bench.names`'. Every function takes the
validated workflow config (`openmind_bench.config.load` / the Snakefile's `config`): defaults come from
config/schema.yaml alone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from openmind_bench import names, nets
from openmind_bench.config import ConfigError
from openmind_bench.engine.settings import JsonSettings
from openmind_bench.names import SCRATCH, parse_run

log = logging.getLogger(__name__)


@dataclass
class FinetuneSettings(JsonSettings):
    LABEL = "fine-tuning settings"

    dataset: str
    fold: str
    run: str
    out_dir: str
    registry: str
    split: str  # split JSON (written once by the split rule / ensure_split)
    root: str | None  # downstream data root (config downstream.root)
    checkpoint: str | None  # pre-training checkpoint; None for scratch
    epochs: int
    steps_per_epoch: int
    batch_size: int
    patch_size: list | None  # None: the checkpoint's recommended downstream patch
    scratch_patch_size: list
    spacing: list | None  # target spacing (mm); None: keep every case's own grid
    seed: int
    amp: bool
    amp_dtype: str
    sliding_window_overlap: float
    label_smoothing: float
    head_dropout: float
    schedule_config: dict  # peak_lr / warmup_epochs / poly_exponent / custom_schedules
    optimisation: dict  # the `pretrain.optimisation` table (per family)
    architecture_presets: dict
    low_data_subset: str | None  # JSON path of the low-data subset (written once)
    split_settings: dict
    save_predictions: bool
    keep_checkpoint: bool
    preemption_exit_code: int
    nnunet: dict  # config downstream.nnunet (segmentation runs in nnU-Net)
    classification: dict  # config downstream.classification (the classification protocol)
    threads: int = 0  # set by the launcher


_SETTING_KEYS = ("patch_size", "scratch_patch_size", "spacing", "seed",
                 "sliding_window_overlap", "label_smoothing", "head_dropout", "amp", "amp_dtype", "save_predictions",
                 "keep_checkpoint", "preemption_exit_code")
_SCHEDULE_KEYS = ("peak_lr", "warmup_epochs", "poly_exponent", "custom_schedules")


def registry_path(config: dict) -> str:
    return config["downstream_registry"]


# downstream config key -> openmind_bench.downstream.splits.SplitSettings field
_SPLIT_KEYS = {"test_fraction": "test_fraction", "folds": "folds", "split_seed": "seed", "volume_bins": "volume_bins",
               "split_max_nodes": "max_nodes"}


def split_settings(config: dict, role: str = "dev") -> dict:
    """SplitSettings keyword arguments from the `downstream` section. Test-role datasets get no
    folds: this is the one place that rule is written (the split rule, the CLI and fine-tuning use it)."""
    downstream = config["downstream"]
    out = {field_name: downstream[key] for key, field_name in _SPLIT_KEYS.items()}
    if role != "dev":
        out["folds"] = 0
    return out


def split_data_fingerprint(config: dict, dataset: str) -> str:
    """A short digest of the paths, sizes and mtimes of the files the reader reads for `dataset`
    (`readers.data_fingerprint`): a param of rule downstream_split, so a file changed under a split
    (a label rewritten) re-runs the split and its checks (Snakemake's params trigger), then the
    fine-tuning jobs after it."""
    from openmind_bench.downstream.readers import data_fingerprint
    from openmind_bench.registry import load_registry

    return data_fingerprint(load_registry(registry_path(config), config["downstream"]["root"]).get(dataset))


def split_path(config: dict, dataset: str, low_data_n: int | None = None) -> str:
    """`{downstream.splits_dir}/{dataset}.json`, and `{dataset}__n{N}.json` for a low-data subset."""
    folder = config["downstream"]["splits_dir"]
    return f"{folder}/{dataset}{f'__n{low_data_n}' if low_data_n else ''}.json"


def resolve(config: dict, dataset: str, run: str, fold: str, *, split: str, out_dir: str | None = None,
            pretrained_checkpoint: str | None = None, low_data_subset: str | None = None) -> FinetuneSettings:
    """One run's settings from the validated workflow config (`finetune`, `downstream`, `pretrain`)."""
    section, downstream, pretrain = config["finetune"], config["downstream"], config["pretrain"]
    name = parse_run(run)
    if name.epochs not in [int(e) for e in downstream["epochs"]]:
        log.warning("run %s: %d epochs is not among downstream.epochs %s", run, name.epochs, downstream["epochs"])
    out_dir = out_dir or names.finetune_metrics(dataset, run, fold).rsplit("/", 1)[0]
    return FinetuneSettings(
        dataset=dataset, fold=str(fold), run=run, out_dir=out_dir,
        registry=registry_path(config), root=downstream["root"],
        steps_per_epoch=int(downstream["steps_per_epoch"]), batch_size=int(downstream["batch_size"]),
        split=split, checkpoint=pretrained_checkpoint, epochs=name.epochs,
        schedule_config={k: downstream[k] for k in _SCHEDULE_KEYS},
        optimisation=pretrain["optimisation"], architecture_presets=pretrain["architecture_presets"],
        low_data_subset=low_data_subset, split_settings=split_settings(config),
        nnunet=dict(downstream["nnunet"]), classification=dict(downstream["classification"]),
        **{k: section[k] for k in _SETTING_KEYS},
    )


def run_names(config: dict, pretrain_runs: list[str]) -> list[str]:
    """Every fine-tuning run the config asks for: each selected pre-training run x schedule x epochs,
    the from-scratch baselines x epochs, and their low-data variants."""
    section, downstream = config["finetune"], config["downstream"]
    chosen = pretrain_runs if section["pretrained_runs"] is None else list(section["pretrained_runs"])
    unknown = sorted(set(chosen) - set(pretrain_runs))
    if unknown:
        raise ConfigError(f"config key 'finetune.pretrained_runs': {unknown} are not pre-training runs of this "
                         f"config ({pretrain_runs})")
    for i, schedule in enumerate(downstream["schedules"]):
        names.check_name(schedule, f"downstream.schedules[{i}]")
    for i, arch in enumerate(section["scratch_architectures"]):
        try:
            nets.resolve(arch, config["pretrain"]["architecture_presets"])
        except ValueError as e:
            raise ConfigError(f"config key 'finetune.scratch_architectures[{i}]': {e}") from None
    epochs = [int(e) for e in downstream["epochs"]]
    runs = [f"{p}__{s}__{e}" for p in chosen for s in downstream["schedules"] for e in epochs]
    runs += [f"{SCRATCH}__{a}__{e}" for a in section["scratch_architectures"] for e in epochs]
    runs += [f"{r}__n{int(n)}" for r in list(runs) for n in downstream["low_data_n"]]
    for r in runs:
        parse_run(r)  # fails early on a name the rules could not take apart
    return runs


def dataset_folds(config: dict) -> dict[str, list[str]]:
    """dataset -> the folds it is evaluated on: `test` (the fixed split) for every dataset, fold
    numbers for development sets only. Reads the registry (a small YAML file)."""
    from openmind_bench.registry import load_registry

    section = config["finetune"]
    registry = load_registry(registry_path(config), config["downstream"]["root"])
    datasets = registry.names() if section["datasets"] is None else list(section["datasets"])
    out = {}
    for name in datasets:
        spec = registry.get(name)  # a dataset the config names but the registry cannot use: error naming it
        folds = [str(f) for f in section["evaluate_folds"] if str(f) == "test" or spec.role == "dev"]
        if folds:
            out[name] = folds
    return out


def targets(config: dict, pretrain_runs: list[str], folds: dict[str, list[str]] | None = None) -> list[str]:
    """Every metrics.json the config asks for; `folds` as `dataset_folds(config)` (read when not given)."""
    runs = run_names(config, pretrain_runs)
    folds = dataset_folds(config) if folds is None else folds
    return [names.finetune_metrics(d, r, f) for d, fs in folds.items() for r in runs for f in fs]
