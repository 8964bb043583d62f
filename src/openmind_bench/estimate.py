"""`openmind-bench estimate`: the GPU-hours of `all` for a config, before anything runs.

The training jobs `all` asks for are listed from the config alone, as the workflow lists them
(pre-training runs; fine-tuning runs x datasets x folds, zero-shot scores left out: they train
nothing). Each job's GPU-hours come from one of two sources, and the table says which:

- measured: a `compute.json` (engine.ledger) of a GPU run with the same workload (method or task,
  architecture, patch, batch) under the results folder or the `estimate.ledgers` folders: steps /
  its steps/s x its device count. The ledger's steps/s is over the training loop only;
- FLOPs: the FLOPs of one step (`FlopCounterMode` on the meta device: the network's forward and
  backward on the step's batch, no memory, no data) against `estimate.assumed_mfu` of the peak of
  `estimate.device` (engine.ledger.PEAK_TFLOPS) at the run's autocast type. The network is the
  architecture's U-Net (pre-training, segmentation) or its encoder with the pooled head
  (classification); a method's own heads, dropped tokens or extra views are not counted.

Not counted: validation, inference, preprocessing and the CPU stages (they use no GPU).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

from openmind_bench import config as omb_config
from openmind_bench import names, nets, ssl

log = logging.getLogger(__name__)

MEASURED, FLOPS, UNKNOWN = "measured", "FLOPs", "unknown"
STAGES = ("pretrain", "finetune_segmentation", "finetune_classification")
# Where the workflow's ledgers lie (names' results layout), below the results folder.
LEDGER_PATTERNS = ("pretrain/*/compute.json", "downstream/*/*/fold_*/compute.json")


@dataclass(frozen=True)
class Job:
    """One training job of `all`: what it computes (`workload`, the ledgers' key) and how many steps."""

    stage: str
    run: str
    dataset: str | None
    steps: int
    workload: dict
    precision: str
    channels: int = 1
    classes: int = 1
    samples_per_step: int = 1  # forward passes of `workload.batch_size // samples_per_step` samples per step
    network_patch: tuple | None = None  # what the network sees, where the method crops (SimCLR, VoCo)


@dataclass
class Line:
    stage: str
    source: str
    jobs: int = 0
    steps: int = 0
    gpu_hours: float = 0.0
    notes: set = field(default_factory=set)


def key_of(workload: dict) -> str:
    return json.dumps(workload, sort_keys=True)


# ---------------------------------------------------------------------------------------- jobs


def _folds(config: dict, registry) -> dict[str, list[str]]:
    """dataset -> evaluated folds, as `downstream.settings.dataset_folds` but without looking for the
    data (it may not be there yet); zero-shot sets train nothing and are left out."""
    section = config["finetune"]
    datasets = registry.names() if section["datasets"] is None else list(section["datasets"])
    out = {}
    for name in datasets:
        spec = registry.get(name)
        if spec.zero_shot_from:
            continue
        folds = [str(f) for f in section["evaluate_folds"] if str(f) == "test" or spec.role == "dev"]
        if folds:
            out[name] = folds
    return out


def _classification_cases(config: dict, dataset: str, fold: str) -> tuple[int, bool]:
    """(training cases, read from its split?): the split when it exists, else the assumption."""
    from openmind_bench.downstream import settings as downstream_settings, splits

    path = Path(downstream_settings.split_path(config, dataset))
    if path.is_file():
        return len(splits.partition(splits.read_split(path), fold)[0]), True
    return int(config["estimate"]["classification_training_cases"]), False


def jobs(config: dict) -> list[Job]:
    """Every training job of `all` for a validated config."""
    from openmind_bench.downstream import probes, settings as downstream_settings
    from openmind_bench.pretrain import settings as pretrain_settings

    pre, down, fine = config["pretrain"], config["downstream"], config["finetune"]
    presets = pre["architecture_presets"]
    out = []
    pretrain_runs = (pretrain_settings.run_names(pre, list(omb_config.named_selections(config)))
                     if config["stages"]["pretrain"] else [])
    for run in pretrain_runs:
        method, arch, _ = run.split(names.SEP)
        family = nets.resolve(arch, presets).family
        _, network_patch = ssl.patch_sizes(method, family, pre["patch_size"],
                                           pre["method_settings"].get(ssl.implementation(method, family), {}))
        # the workload as the pre-training loop's ledger records it (pretrain.trainer)
        out.append(Job("pretrain", run, None, int(pre["epochs"]) * int(pre["steps_per_epoch"]),
                       {"method": method, "architecture": arch, "patch_size": list(pre["patch_size"]),
                        "batch_size": int(pre["total_batch_size"])},
                       _precision(pre["amp"], pre["amp_dtype"], pre["resources"]["gpu"]),
                       network_patch=tuple(network_patch)))
    checkpoints = {c["name"]: c for c in config.get("checkpoints") or []}
    registry = downstream_settings.cached_registry(config)
    cls = down["classification"]
    for run in downstream_settings.run_names(config, pretrain_runs, checkpoints):
        name = names.parse_run(run)
        if probes.is_probe(name.schedule):  # no training steps: a probe costs a forward pass per case
            continue
        arch = name.architecture or (checkpoints.get(name.checkpoint) or {}).get("architecture")
        patch = fine["patch_size"] or (pre["recommended_downstream_patch_size"] if name.pretrained
                                       else fine["scratch_patch_size"])
        for dataset, folds in _folds(config, registry).items():
            if not downstream_settings.runs_on(config, run, dataset):
                continue
            spec = registry.get(dataset)
            for fold in folds:
                if spec.task == "seg":
                    # nnU-Net autocasts to float16 on CUDA
                    out.append(Job("finetune_segmentation", run, dataset, name.epochs * int(down["steps_per_epoch"]),
                                   {"task": "seg", "architecture": arch, "patch_size": list(patch),
                                    "batch_size": int(down["batch_size"])}, "float16", spec.channels,
                                   len(spec.labels)))
                    continue
                cases, _ = _classification_cases(config, dataset, fold)
                batch, accumulation = int(cls["batch_size"]), int(cls["accumulation_steps"])
                per_epoch = (int(cls["steps_per_epoch"]) if cls["steps_per_epoch"] is not None
                             else math.ceil(math.ceil(cases / batch) / accumulation))
                epochs = int(cls["epochs"]) if cls["epochs"] is not None else name.epochs
                out.append(Job("finetune_classification", run, dataset, epochs * per_epoch,
                               {"task": "cls", "architecture": arch, "patch_size": list(patch),
                                "batch_size": batch * accumulation},
                               _precision(fine["amp"], fine["amp_dtype"], fine["resources"]["gpu"]),
                               spec.channels, len(spec.labels), samples_per_step=accumulation))
    return out


def _precision(amp: bool, amp_dtype: str, gpus: int) -> str:
    return amp_dtype if amp and gpus > 0 else "float32"


# ------------------------------------------------------------------------------------ measured


def find_ledgers(results: str | Path, extra=()) -> dict[str, dict]:
    """workload key -> the GPU ledger with the most steps among the workflow's ledgers under
    `results` and every compute.json under the `extra` folders (CPU ledgers say nothing of a GPU)."""
    from openmind_bench.engine import ledger as engine_ledger

    paths = [p for pattern in LEDGER_PATTERNS for p in Path(results).glob(pattern)]
    for folder in extra:
        paths += sorted(Path(folder).rglob(engine_ledger.LEDGER_FILE))
    best: dict[str, dict] = {}
    for path in paths:
        try:
            doc = engine_ledger.read(path)
        except (OSError, ValueError) as e:
            log.warning("skipped %s: %s", path, e)
            continue
        if doc.get("device_type") != "cuda" or not doc.get("steps_per_second") or not doc.get("workload"):
            continue
        key = key_of(doc["workload"])
        if key not in best or doc["steps"] > best[key]["steps"]:
            best[key] = {**doc, "path": str(path)}
    return best


# --------------------------------------------------------------------------------------- FLOPs


@functools.lru_cache(maxsize=None)
def step_flops(stage: str, architecture: str, presets_json: str, patch: tuple, batch: int, channels: int,
               classes: int, samples_per_step: int) -> tuple[float | None, str | None]:
    """(FLOPs of one optimiser step, None) or (None, why): the network's forward + backward on the
    meta device (`samples_per_step` passes of batch // samples_per_step samples)."""
    import torch

    from openmind_bench.engine.ledger import count_flops

    try:
        arch = nets.resolve(architecture, json.loads(presets_json))
        with torch.device("meta"):
            micro = max(1, batch // samples_per_step)
            if stage == "finetune_classification":
                from openmind_bench.downstream.classification import PooledEncoderClassifier

                net = PooledEncoderClassifier(arch.build(list(patch), channels, 1), classes)
            else:
                net = arch.build(list(patch), channels, classes)
            image = torch.empty(micro, channels, *patch)

            def step():
                out = net(image)
                out = out[0] if isinstance(out, (list, tuple)) else out
                out.float().sum().backward()

            flops, note = count_flops(step)
    except Exception as e:  # noqa: BLE001 - an estimate says what it cannot count
        return None, f"{architecture}: {type(e).__name__}: {e}"
    return (None, note) if flops is None else (float(flops) * samples_per_step, None)


# -------------------------------------------------------------------------------------- estimate


def estimate(config: dict, results: str | Path = "results") -> list[Line]:
    """One line per stage and source (module doc) for a validated config."""
    from openmind_bench.engine.ledger import peak_flops

    section = config["estimate"]
    measured = find_ledgers(results, section["ledgers"])
    device, mfu = section["device"], float(section["assumed_mfu"])
    presets = json.dumps(config["pretrain"]["architecture_presets"], sort_keys=True)
    lines: dict[tuple[str, str], Line] = {}
    for job in jobs(config):
        ledger = measured.get(key_of(job.workload))
        if ledger is not None:
            hours = job.steps / ledger["steps_per_second"] * int(ledger.get("device_count") or 1) / 3600
            source, note = MEASURED, f"{ledger['device_name']}: {ledger['steps_per_second']:.3g} steps/s"
        else:
            hours, source, note = _flops_hours(job, presets, device, mfu, peak_flops)
        line = lines.setdefault((job.stage, source), Line(job.stage, source))
        line.jobs += 1
        line.steps += job.steps
        line.gpu_hours += hours or 0.0
        if note:
            line.notes.add(note)
    return sorted(lines.values(), key=lambda ln: (STAGES.index(ln.stage), ln.source))


def _flops_hours(job: Job, presets: str, device: str, mfu: float, peak_flops):
    arch = job.workload.get("architecture")
    if not arch:
        return None, UNKNOWN, f"{job.run}: architecture known only after its checkpoint's check"
    peak = peak_flops(device, job.precision)
    if peak is None:
        return None, UNKNOWN, f"no peak for {device} at {job.precision} (engine.ledger.PEAK_TFLOPS)"
    patch = tuple(job.network_patch or job.workload["patch_size"])
    flops, why = step_flops(job.stage, arch, presets, patch, int(job.workload["batch_size"]), job.channels,
                            job.classes, job.samples_per_step)
    if flops is None:
        return None, UNKNOWN, why
    return (job.steps * flops / (mfu * peak) / 3600, FLOPS,
            f"{arch} {'x'.join(map(str, patch))}: {_tflop(flops)} TFLOP/step")


def _tflop(flops: float) -> str:
    tflop = flops / 1e12
    return f"{tflop:.0f}" if tflop >= 10 else f"{tflop:.2g}"


def render(lines: list[Line], config: dict, config_name: str) -> str:
    section = config["estimate"]
    out = [f"GPU-hours of `all` for {config_name} (measured: steps/s of a matching GPU ledger; FLOPs: "
           f"FLOPs per step at {section['assumed_mfu']:g} MFU of {section['device']})", ""]
    out.append(f"{'stage':<26}{'source':<10}{'jobs':>8}{'steps':>14}{'GPU-hours':>12}")
    for line in lines:
        hours = f"{line.gpu_hours:,.0f}" if line.source != UNKNOWN else "?"
        out.append(f"{line.stage:<26}{line.source:<10}{line.jobs:>8}{line.steps:>14,}{hours:>12}")
    for stage in STAGES:
        total = sum(ln.gpu_hours for ln in lines if ln.stage == stage)
        if any(ln.stage == stage for ln in lines):
            out.append(f"{stage + ' total':<58}{total:>12,.0f}")
    unknown = sum(ln.jobs for ln in lines if ln.source == UNKNOWN)
    out.append(f"{'all':<58}{sum(ln.gpu_hours for ln in lines):>12,.0f}"
               + (f"  (+ {unknown} jobs not estimated)" if unknown else ""))
    out += ["", "CPU stages (download, index, DWI, masks, quality, preprocessing, curation, tables), validation "
            "and inference are not counted.", "Per source:"]
    for line in lines:
        for note in sorted(line.notes)[:6]:
            out.append(f"  {line.stage} ({line.source}): {note}")
    return "\n".join(out)


# ------------------------------------------------------------------------------------------ CLI


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "estimate",
        help="GPU-hours per stage and the total of `all` for a config, before anything runs",
        description=__doc__.split("\n\n")[1],
    )
    p.add_argument("--configfile", type=Path, default=Path("config/config.yaml"),
                   help="workflow config (default: config/config.yaml); keys left out take the schema's defaults")
    p.add_argument("--results", type=Path, default=Path("results"),
                   help="results folder whose compute.json files give measured steps/s (default: results)")
    p.add_argument("--json", type=Path, help="also write the lines as JSON here")
    p.set_defaults(func=estimate_command)


def estimate_command(args: argparse.Namespace) -> int:
    config = omb_config.load(args.configfile)
    lines = estimate(config, args.results)
    print(render(lines, config, str(args.configfile)))
    if args.json:
        from openmind_bench import atomic

        atomic.write_json(args.json, [{**vars(ln), "notes": sorted(ln.notes)} for ln in lines])
    return 0
