"""Settings of one fine-tuning run and the runs a config asks for (torch-free: the workflow reads them
at start-up). Run names and the results layout are `openmind_bench.names`'. Every function takes the
validated workflow config (`openmind_bench.config.load` / the Snakefile's `config`): defaults come from
config/schema.yaml alone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from openmind_bench import names, nets
from openmind_bench.downstream import lora
from openmind_bench.config import ConfigError
from openmind_bench.downstream import probes
from openmind_bench.engine.record import RunRecord
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
    steps_per_epoch: int | None  # segmentation only (None for classification, as every field below that only
    batch_size: int | None  # one engine reads: _SEGMENTATION_ONLY / _CLASSIFICATION_ONLY)
    patch_size: list | None  # None: the checkpoint's recommended downstream patch
    scratch_patch_size: list
    spacing: list | None  # target spacing (mm); None: keep every case's own grid
    seed: int
    amp: bool | None
    amp_dtype: str | None
    sliding_window_overlap: float | None
    test_time_mirroring: bool | None
    label_smoothing: float | None
    head_dropout: float | None
    schedule_config: dict  # peak_lr / warmup_epochs / poly_exponent / custom_schedules (+ lora: lora runs)
    architecture_presets: dict  # this run's architecture's entry of `pretrain.architecture_presets`, if any
    low_data_subset: str | None  # JSON path of the low-data subset (written once)
    split_settings: dict
    save_predictions: bool
    keep_checkpoint: bool | None
    preemption_exit_code: int
    nnunet: dict | None  # config downstream.nnunet (segmentation runs in nnU-Net; None for classification)
    classification: dict | None  # config downstream.classification (the classification protocol; None for seg)
    registry_entries: dict  # the registry values the job reads (registry.entry_values)
    # an external checkpoint's provenance and check summary (checkpoints.settings.provenance): the
    # source, sha256 and architecture this run fine-tunes, recorded in its metrics.json; None otherwise
    external_checkpoint: dict | None
    probes: dict | None  # config downstream.probes (linear_probe / knn runs only; None otherwise)
    threads: int = 0  # set by the launcher


_SETTING_KEYS = ("patch_size", "scratch_patch_size", "spacing", "seed", "sliding_window_overlap", "test_time_mirroring",
                 "label_smoothing", "head_dropout", "amp", "amp_dtype", "save_predictions", "keep_checkpoint",
                 "preemption_exit_code")
_SCHEDULE_KEYS = ("peak_lr", "warmup_epochs", "poly_exponent", "custom_schedules")


# Settings that do not shape the trained model: `sliding_window_overlap` and `test_time_mirroring` only
# shape the evaluation, which a job always runs anew (a segmentation model is predicted with the job's own values).
_NOT_SHAPING = ("out_dir", "threads", "save_predictions", "keep_checkpoint", "preemption_exit_code",
                "sliding_window_overlap", "test_time_mirroring")


def run_record(settings: FinetuneSettings) -> RunRecord:
    """The run's record: its training settings and the sha256 of the pre-trained checkpoint, the
    split and the low-data subset it trains from."""
    return RunRecord.of(settings.to_dict(), ignore=_NOT_SHAPING,
                        files={"checkpoint": settings.checkpoint, "split": settings.split,
                               "low_data_subset": settings.low_data_subset})


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

    if config["downstream"]["build_demo"]:
        # the demo's sets do not exist yet when the first run plans its jobs: a fingerprint taken then
        # would differ from the next one and re-run every split; the demo rule's output is the split's
        # input instead (its mtime), and the fine-tuning jobs still check their files against the split
        return "built by rule demo_downstream"
    return data_fingerprint(cached_registry(config).get(dataset))


def split_path(config: dict, dataset: str, low_data_n: int | None = None, seed: int | None = None) -> str:
    """`{downstream.splits_dir}/{dataset}.json`, and `{dataset}__n{N}.json` for a low-data subset
    (`{dataset}__n{N}__s{S}.json` for the runs of seed S of `finetune.seeds`: each seed draws its own
    N training cases, so the spread over seeds holds the choice of the cases too)."""
    folder = config["downstream"]["splits_dir"]
    low = f"__n{low_data_n}" if low_data_n else ""
    return f"{folder}/{dataset}{low}{f'__s{seed}' if low and seed is not None else ''}.json"


# Fields only one engine reads: the other task's jobs get None, so a change of them re-runs only the
# jobs that use them (Snakemake's params trigger compares these settings).
_SEGMENTATION_ONLY = ("steps_per_epoch", "batch_size", "nnunet", "sliding_window_overlap", "test_time_mirroring")
_CLASSIFICATION_ONLY = ("classification", "label_smoothing", "head_dropout", "amp", "amp_dtype", "keep_checkpoint")
# What a probe run (linear_probe, knn) never reads: a change of the training protocol re-runs no probe.
_PROBE_UNUSED = (*_SEGMENTATION_ONLY, "classification", "label_smoothing", "amp", "amp_dtype", "keep_checkpoint",
                 "schedule_config")


def dataset_entries(config: dict, dataset: str) -> dict:
    """The registry values a job of `dataset` reads (its entry, and its zero-shot source's), as plain
    data for the job's params: a registry edit re-runs exactly the jobs of the datasets it touches."""
    from openmind_bench.registry import entry_values

    registry = cached_registry(config)
    spec = registry.get(dataset)
    entries = {dataset: entry_values(spec)}
    if spec.zero_shot_from:
        entries[spec.zero_shot_from] = entry_values(registry.get(spec.zero_shot_from))
    return entries


def cached_registry(config: dict):
    """The registry of `config`, read once per file version (the workflow resolves every job's settings)."""
    from openmind_bench.registry import cached_registry as read

    return read(registry_path(config), config["downstream"]["root"])


def checkpoint_architecture(settings: FinetuneSettings) -> str | None:
    """The architecture preset that reads the run's checkpoint when it has no adaptation plan: the
    external entry's `architecture` (the check's preset); None otherwise (the plan says)."""
    return _planless_preset(settings.external_checkpoint)


def _planless_preset(external: dict | None) -> str | None:
    if not external or external["adaptation_plan"]:
        return None
    return external["architecture"]["preset"]


def resolve(config: dict, dataset: str, run: str, fold: str, *, split: str, out_dir: str | None = None,
            pretrained_checkpoint: str | None = None, low_data_subset: str | None = None,
            external_checkpoint: dict | None = None) -> FinetuneSettings:
    """One run's settings from the validated workflow config (`finetune`, `downstream`, `pretrain`):
    what this run reads and nothing else (the other task's fields are None; the schedule table holds
    this run's custom schedule only; the architecture presets this run's architecture only).
    An external checkpoint's run takes `external_checkpoint` (its provenance, read after its check)."""
    section, downstream, pretrain = config["finetune"], config["downstream"], config["pretrain"]
    name = parse_run(run)
    if name.external and external_checkpoint is None:
        raise ValueError(f"run {run} fine-tunes external checkpoint {name.checkpoint}: its provenance is needed")
    # the architecture whose config preset the run may build: its own, or a plan-less checkpoint's
    architecture = name.architecture or _planless_preset(external_checkpoint)
    if name.epochs not in [int(e) for e in downstream["epochs"]]:
        log.warning("run %s: %d epochs is not among downstream.epochs %s", run, name.epochs, downstream["epochs"])
    out_dir = out_dir or names.finetune_metrics(dataset, run, fold).rsplit("/", 1)[0]
    entries = dataset_entries(config, dataset)
    schedule_config = {k: downstream[k] for k in _SCHEDULE_KEYS}
    schedule_config["custom_schedules"] = {k: v for k, v in (downstream["custom_schedules"] or {}).items()
                                           if k == name.schedule}
    if lora.uses_lora(name.schedule):  # the adapters' settings, in the records of lora runs only
        schedule_config["lora"] = lora.adapter_config(downstream)
    values = dict(
        dataset=dataset, fold=str(fold), run=run, out_dir=out_dir,
        registry=registry_path(config), root=downstream["root"], registry_entries=entries,
        steps_per_epoch=int(downstream["steps_per_epoch"]), batch_size=int(downstream["batch_size"]),
        split=split, checkpoint=pretrained_checkpoint, epochs=name.epochs,
        schedule_config=schedule_config,
        architecture_presets={k: v for k, v in pretrain["architecture_presets"].items() if k == architecture},
        external_checkpoint=external_checkpoint,
        low_data_subset=low_data_subset, split_settings=split_settings(config),
        nnunet=dict(downstream["nnunet"]), classification=dict(downstream["classification"]), probes=None,
        **{k: section[k] for k in _SETTING_KEYS},
    )
    if name.seed is not None:  # a run of `finetune.seeds`
        values["seed"] = name.seed
    unused = _CLASSIFICATION_ONLY if entries[dataset]["task"] == "seg" else _SEGMENTATION_ONLY
    values.update({k: None for k in unused})
    if probes.is_probe(name.schedule):  # a probe reads its own settings, and none of the training's
        values.update({k: None for k in _PROBE_UNUSED}, probes=dict(downstream["probes"]))
    return FinetuneSettings(**values)


def run_names(config: dict, pretrain_runs: list[str], checkpoints: dict[str, dict] | None = None) -> list[str]:
    """Every fine-tuning run the config asks for: each selected pre-training run and each external
    checkpoint (`checkpoints`: name -> config entry; its `schedules` where it lists them) x schedule x
    epochs, the from-scratch baselines x epochs, and their low-data variants. The scratch baselines of
    the external checkpoints' architectures are known after their checks (`scratch_runs`)."""
    section, downstream = config["finetune"], config["downstream"]
    checkpoints = checkpoints or {}
    chosen = pretrain_runs if section["pretrained_runs"] is None else list(section["pretrained_runs"])
    unknown = sorted(set(chosen) - set(pretrain_runs))
    if unknown:
        off = "" if config["stages"]["pretrain"] else " (stages.pretrain is off: this config pre-trains nothing)"
        raise ConfigError(f"config key 'finetune.pretrained_runs': {unknown} are not pre-training runs of this "
                         f"config ({pretrain_runs}){off}")
    methods = {run.split(names.SEP)[0] for run in chosen}
    for i, name in enumerate(checkpoints):
        if name in methods:  # its rows would carry the label of the config's own runs
            raise ConfigError(f"config key 'checkpoints[{i}].name': {name!r} is also a pre-training method of this "
                              "config; name the checkpoint apart")
    check_schedules(config, chosen, checkpoints)
    for i, entry in enumerate(checkpoints.values()):  # in config order
        for j, schedule in enumerate(entry.get("schedules") or []):
            if schedule not in downstream["schedules"]:
                raise ConfigError(f"config key 'checkpoints[{i}].schedules[{j}]': {schedule!r} is not one of "
                                  f"downstream.schedules {list(downstream['schedules'])}")
    unknown = sorted(set(downstream["lora"]["pretrained_runs"] or []) - {*chosen, *checkpoints})
    if unknown:
        raise ConfigError(f"config key 'downstream.lora.pretrained_runs': {unknown} are neither pre-training runs "
                          f"this config fine-tunes ({chosen}) nor its checkpoints ({sorted(checkpoints)})")
    for i, arch in enumerate(section["scratch_architectures"]):
        try:
            nets.resolve(arch, config["pretrain"]["architecture_presets"])
        except ValueError as e:
            raise ConfigError(f"config key 'finetune.scratch_architectures[{i}]': {e}") from None
    epochs = [int(e) for e in downstream["epochs"]]
    lora_sources = downstream["lora"]["pretrained_runs"]
    runs = [f"{p}__{s}__{e}" for p in [*chosen, *checkpoints] for s in downstream["schedules"] for e in epochs
            if (not lora.uses_lora(s) or lora_sources is None or p in lora_sources)
            and s in (checkpoints.get(p, {}).get("schedules") or downstream["schedules"])]
    runs = _with_low_data(config, runs) + scratch_runs(config, section["scratch_architectures"])
    for r in runs:
        parse_run(r)  # fails early on a name the rules could not take apart
    return runs


def _with_low_data(config: dict, runs: list[str]) -> list[str]:
    """`runs` (unless `downstream.low_data_only`) and their low-data variants, each once per seed of
    `finetune.seeds` when it lists any."""
    downstream = config["downstream"]
    if downstream["low_data_only"] and not downstream["low_data_n"]:
        raise ConfigError("config key 'downstream.low_data_only' is true but 'downstream.low_data_n' is empty: "
                          "no run would be left")
    low = [f"{r}__n{int(n)}" for r in runs for n in downstream["low_data_n"]]
    runs = low if downstream["low_data_only"] else runs + low
    seeds = config["finetune"]["seeds"]
    return [f"{r}__s{int(s)}" for r in runs for s in seeds] if seeds else runs


def scratch_runs(config: dict, architectures) -> list[str]:
    """The from-scratch baselines of `architectures` x epochs, with their low-data variants."""
    epochs = [int(e) for e in config["downstream"]["epochs"]]
    return _with_low_data(config, [f"{SCRATCH}__{a}__{e}" for a in architectures for e in epochs])


def check_schedules(config: dict, pretrain_runs: list[str], checkpoints: dict[str, dict] | None = None) -> None:
    """Every schedule of `downstream.schedules` is a built-in or custom one and can be built at every
    epoch count for the families of the runs: an error naming the key, before any job runs. An
    external checkpoint's family is known here only when its entry names an `architecture`; the
    others' schedules are built by their jobs."""
    from openmind_bench.downstream import schedules

    downstream = config["downstream"]
    custom = downstream["custom_schedules"] or {}
    table = {k: downstream[k] for k in _SCHEDULE_KEYS}
    presets = config["pretrain"]["architecture_presets"]
    cls = downstream["classification"]
    lengths = [int(cls["epochs"])] if cls["epochs"] is not None else [int(e) for e in downstream["epochs"]]
    for epochs in lengths:  # the classification protocol's warm-start must fit its length
        try:
            schedules.build_schedule("cosine", epochs, float(cls["peak_lr"]), 1, whole_warmup=int(cls["warmup_epochs"]))
        except ValueError as e:
            raise ConfigError(f"config key 'downstream.classification.warmup_epochs' ({cls['warmup_epochs']}) at "
                              f"{epochs} classification epochs: {e}") from None
    architectures = [run.split(names.SEP)[1] for run in pretrain_runs]
    architectures += [e["architecture"] for e in (checkpoints or {}).values() if e.get("architecture")]
    families = sorted({schedules.family_of(arch, presets) for arch in architectures})
    for i, schedule in enumerate(downstream["schedules"]):
        key = f"downstream.schedules[{i}]"
        names.check_name(schedule, key)
        if lora.uses_lora(schedule):
            lora.check_config(downstream["lora"])
        if probes.is_probe(schedule):  # trains nothing: no lr curve to build
            if schedule in custom:
                raise ConfigError(f"config key 'downstream.custom_schedules.{schedule}': {schedule!r} names a probe; "
                                  "name the custom schedule apart")
            continue
        if schedule not in schedules.SCHEDULE_NAMES and schedule not in custom:
            raise ConfigError(f"config key '{key}': unknown schedule {schedule!r} (built-in: "
                              f"{list(schedules.SCHEDULE_NAMES)}; probes: {list(probes.PROBES)}; custom: "
                              f"{sorted(custom)})")
        for family in families:
            for epochs in downstream["epochs"]:
                try:
                    schedules.configured_schedule(schedule, family, int(epochs), 1.0, 1, table)
                except ValueError as e:
                    raise ConfigError(f"config key '{key}': {schedule!r} at {epochs} epochs ({family}): {e}") from None


def dataset_folds(config: dict) -> dict[str, list[str]]:
    """dataset -> the folds it is evaluated on: `test` (the fixed split) for every dataset, fold
    numbers for development sets only. Reads the registry (a small YAML file); a dataset whose folder
    is missing is a config error (unless the demo builds it)."""
    section = config["finetune"]
    registry = cached_registry(config)
    datasets = registry.names() if section["datasets"] is None else list(section["datasets"])
    out = {}
    for name in datasets:
        spec = registry.get(name)  # a dataset the config names but the registry cannot use: error naming it
        if not config["downstream"]["build_demo"] and not spec.source.is_dir():
            where = "finetune.datasets" if section["datasets"] is not None else "downstream_registry"
            raise ConfigError(f"config key '{where}': dataset {name} of the registry {registry.path} has no folder "
                              f"{spec.source} (registry field datasets.{name}.source, under downstream.root); "
                              "put the data there or leave the dataset out of finetune.datasets")
        folds = [str(f) for f in section["evaluate_folds"] if str(f) == "test" or spec.role == "dev"]
        if folds:
            out[name] = folds
    return out


def leakage_datasets(config: dict) -> list[str]:
    """The downstream datasets whose test cases no selection may hold (`curation.leakage`): every usable
    registry dataset whose data is present (its folder exists, or the demo builds it), whether or not the
    config fine-tunes on it, and every dataset it fine-tunes on. A selection (and the pre-training on it)
    then stays the same when `finetune.datasets` changes."""
    if not config["curation"]["leakage"]:
        return []
    registry = cached_registry(config)
    present = [n for n in registry.names() if config["downstream"]["build_demo"] or registry.get(n).source.is_dir()]
    return sorted(set(present) | set(dataset_folds(config)))


def targets(config: dict, pretrain_runs: list[str], folds: dict[str, list[str]] | None = None,
            checkpoints: dict[str, dict] | None = None, runs: list[str] | None = None) -> list[str]:
    """Every metrics.json the config asks for (or of `runs`); `folds` as `dataset_folds(config)` (read
    when not given)."""
    runs = run_names(config, pretrain_runs, checkpoints) if runs is None else runs
    folds = dataset_folds(config) if folds is None else folds
    lora_datasets = config["downstream"]["lora"]["datasets"]
    if lora_datasets is not None:
        unknown = sorted(set(lora_datasets) - set(folds))
        if unknown:
            raise ConfigError(f"config key 'downstream.lora.datasets': {unknown} are not datasets this config "
                              f"fine-tunes on ({sorted(folds)})")
    return [names.finetune_metrics(d, r, f) for d, fs in folds.items() for r in runs for f in fs
            if runs_on(config, r, d)]


def runs_on(config: dict, run: str, dataset: str) -> bool:
    """Whether the workflow runs `run` on `dataset`: everywhere, but a `lora` run only on the datasets
    of `downstream.lora.datasets` (null = everywhere), and probes (linear_probe, knn) only on
    classification datasets (a probe classifies: a segmentation dataset with a probe schedule is no
    target, its rows stay empty and no job fails)."""
    schedule = parse_run(run).schedule
    if probes.is_probe(schedule):
        return cached_registry(config).get(dataset).task == "cls"
    chosen = config["downstream"]["lora"]["datasets"]
    return chosen is None or not lora.uses_lora(schedule) or dataset in chosen
