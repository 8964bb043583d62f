"""The vocabulary every stage shares: run names and their parsing, architecture families, metric
names, the results path layout and the wildcard patterns the rules constrain their wildcards with.

It sits below every stage (it imports nothing of the package), so the downstream, aggregation and
metrics stages agree on one spelling of each term. See docs/architecture.md for the contracts.

Run names
- pre-training: `{method}__{arch}__{selection}`;
- fine-tuning: `{method}__{arch}__{selection}__{schedule}__{epochs}` (from a pre-training run of the
  config), `{checkpoint}__{schedule}__{epochs}` (from an external checkpoint, config `checkpoints`:
  its architecture comes from its adaptation plan, never from a name) or `scratch__{arch}__{epochs}`;
  `__n{N}` appended marks a low-data run on N training cases, then `__s{S}` a run of seed S
  (config `finetune.seeds`: the same run repeated over seeds, whose results the tables average).
Each part is a *name*: letters and digits, single `.`, `-` or `_` between them (`t1.v2`,
`t1-only`, `openmind_t1`); never `__`, which separates parts, so every run name parses one way.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# ---- architecture families: what picks the optimiser, the schedules and the method implementations
CNN = "cnn"  # ResEnc (dynamic-network-architectures ResidualEncoderUNet)
TRANSFORMER = "transformer"  # Primus
FAMILIES = (CNN, TRANSFORMER)

# ---- runs
SCRATCH = "scratch"
SEP = "__"
# One name part (selection, architecture, schedule): the config schema uses the same pattern.
NAME_PATTERN = r"[A-Za-z0-9]+(?:[._-][A-Za-z0-9]+)*"
METHOD_PATTERN = r"[a-z0-9]+(?:_[a-z0-9]+)*"
ARCH_PATTERN = r"[A-Za-z0-9]+"
_NAME = re.compile(rf"^{NAME_PATTERN}$")

# ---- metrics (fractions in [0, 1], higher is better), in table order
METRICS = ("DSC", "NSD", "balanced_accuracy", "AUROC")
METRIC_TASK = {"DSC": "seg", "NSD": "seg", "balanced_accuracy": "cls", "AUROC": "cls"}
NO_SCHEDULE = "none"  # the schedule column of from-scratch runs that name none

# ---- results layout (relative to the working directory of the workflow)
PRETRAIN_DIR = "results/pretrain/{run}"
PRETRAIN_CHECKPOINT = "results/pretrain/{method}__{arch}__{selection}/checkpoint_final.pt"
DOWNSTREAM_ROOT = "results/downstream"
METRICS_FILE = "metrics.json"
FINETUNE_METRICS = "results/downstream/{target_dataset}/{finetune_run}/fold_{fold}/metrics.json"
BENCHMARK_DIR = "results/benchmark"

# ---- wildcard constraints of the rules (`wildcard_constraints: **names.WILDCARDS`)
# (the second form is an external checkpoint's run: `scratch` is no checkpoint name, so the third is apart)
FINETUNE_RUN_PATTERN = (rf"(?:{METHOD_PATTERN}__{ARCH_PATTERN}__{NAME_PATTERN}__{NAME_PATTERN}"
                        rf"|{NAME_PATTERN}__{NAME_PATTERN}|{SCRATCH}__{ARCH_PATTERN})__\d+(?:__n\d+)?(?:__s\d+)?")
WILDCARDS = {
    "dataset": r"ds\d{6}",
    "source": r"[a-z_]+",
    "shard": r"\d+",
    "selection": NAME_PATTERN,
    "method": METHOD_PATTERN,
    "arch": ARCH_PATTERN,
    "target_dataset": NAME_PATTERN,
    "finetune_run": FINETUNE_RUN_PATTERN,
    "fold": r"test|\d+",
    "checkpoint": NAME_PATTERN,  # external checkpoints (config `checkpoints`)
    # per-image files of the shard stages (rules preprocess_image, masks_image, dwi_file): an image id is
    # `{dataset}__{BIDS stem}`, never ending in the store's `__anat`/`__anon` mask suffixes
    "image_id": r"ds\d{6}__(?:(?!__an(?:at|on)\.b2nd$)[^/])+",
    "subject_dir": r"sub-[^/]+",
    "session_dir": r"ses-[^/]+",
    "mask_dir": r"sub-[^/]+(?:/ses-[^/]+)?",
    "mask_stem": r"[^/]+",
    "mask_kind": r"anatomy|anonymization",
    "dwi_dir": r"sub-[^/]+(?:/ses-[^/]+)?",
    "dwi_stem": r"[^/]+",
    "dwi_desc": r"(?:T2w|ADC|FA)_dwimap|brain_mask",
    "dwi_ext": r"nii\.gz|json",
}


# ---- probes during pre-training: progress.csv columns and TensorBoard tags of their scores
def probe_column(dataset: str, probe: str, metric: str) -> str:
    """progress.csv column and TensorBoard tag of one probe score."""
    return f"probe/{dataset}/{probe}/{metric}"


def parse_probe_column(column: str) -> tuple[str, str, str] | None:
    """(dataset, probe, metric) of a `probe_column`; None for any other column."""
    parts = column.split("/")
    return tuple(parts[1:]) if len(parts) == 4 and parts[0] == "probe" else None


class InvalidName(ValueError):
    """A run or name part that does not follow the naming rules (the message names the key)."""


def check_name(value: str, key: str) -> str:
    """`value` if it is a valid name part, else an error naming the config key."""
    if not isinstance(value, str) or not _NAME.match(value):
        raise InvalidName(f"config key '{key}': {value!r} is not a valid name (letters and digits, with single "
                         "'.', '-' or '_' between them; '__' separates the parts of run names)")
    return value


def pretrain_run(method: str, arch: str, selection: str) -> str:
    return SEP.join((method, arch, selection))


def pretrain_checkpoint(run: str) -> str:
    return f"{PRETRAIN_DIR.format(run=run)}/checkpoint_final.pt"


def finetune_metrics(target_dataset: str, finetune_run: str, fold) -> str:
    return FINETUNE_METRICS.format(target_dataset=target_dataset, finetune_run=finetune_run, fold=fold)


@dataclass(frozen=True)
class RunName:
    """A fine-tuning run's parts; `str()` gives the name back. An external checkpoint's run has
    `checkpoint` (also its `method`, the label of its rows) and no architecture or selection: its
    architecture is its plan's (the check's report)."""

    architecture: str | None
    epochs: int
    method: str = SCRATCH
    selection: str | None = None
    schedule: str | None = None
    low_data_n: int | None = None
    checkpoint: str | None = None
    seed: int | None = None  # a run of `finetune.seeds`; None: the run of `finetune.seed`, named without one

    @property
    def pretrained(self) -> bool:
        return self.method != SCRATCH

    @property
    def external(self) -> bool:
        return self.checkpoint is not None

    @property
    def pretrain_run(self) -> str | None:
        """The config's pre-training run this run fine-tunes (None for scratch and external runs)."""
        if not self.pretrained or self.external:
            return None
        return pretrain_run(self.method, self.architecture, self.selection)

    def __str__(self) -> str:
        if self.external:
            base = SEP.join((self.checkpoint, self.schedule, str(self.epochs)))
        elif self.pretrained:
            base = SEP.join((self.pretrain_run, self.schedule, str(self.epochs)))
        else:
            base = SEP.join((SCRATCH, self.architecture, str(self.epochs)))
        return (base + (f"{SEP}n{self.low_data_n}" if self.low_data_n else "")
                + (f"{SEP}s{self.seed}" if self.seed is not None else ""))


_FINETUNE_RUN = re.compile(rf"^{FINETUNE_RUN_PATTERN}$")


def parse_run(run: str) -> RunName:
    """The parts of a fine-tuning run name (see the module doc)."""
    if not _FINETUNE_RUN.match(run):
        raise InvalidName(f"run {run!r} is neither {{method}}__{{arch}}__{{selection}}__{{schedule}}__{{epochs}}, "
                         "{checkpoint}__{schedule}__{epochs} nor scratch__{arch}__{epochs} (optionally + __n{N}, "
                         "then + __s{S}), "
                         "with parts that are valid names")
    parts = run.split(SEP)
    seed = low = None
    if re.fullmatch(r"s\d+", parts[-1]):
        seed, parts = int(parts[-1][1:]), parts[:-1]
    if re.fullmatch(r"n\d+", parts[-1]):
        low, parts = int(parts[-1][1:]), parts[:-1]
    if parts[0] == SCRATCH and len(parts) == 3:
        return RunName(parts[1], int(parts[2]), low_data_n=low, seed=seed)
    if len(parts) == 3:
        checkpoint, schedule, epochs = parts
        return RunName(None, int(epochs), checkpoint, schedule=schedule, low_data_n=low, checkpoint=checkpoint,
                       seed=seed)
    method, arch, selection, schedule, epochs = parts
    return RunName(arch, int(epochs), method, selection, schedule, low, seed=seed)
