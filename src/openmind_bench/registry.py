"""The downstream dataset registry (`config/downstream_datasets.yaml`): the one reader of that file,
used by the downstream stage (datasets, splits, fine-tuning) and the aggregation stage (dataset
order, task, ID/OOD domain). Its path is the config key `downstream_registry`.

File shape::

    root: data/downstream            # where `source` paths start; config `downstream.root` wins
    datasets:
      ATL:
        task: seg                    # seg | cls
        role: dev                    # dev (method development, k folds) | test
        domain: id                   # id | ood (relative to the pre-training data)
        title: ATLAS R2.0 stroke lesions
        source: Dataset203_ATLAS     # under root (or absolute): nnU-Net raw folder / image folder
        modalities: [T1w]            # input channels, in channel order
        labels: {background: 0, lesion: 1}   # seg: nnU-Net labels (a list = region); cls: class -> index
        nsd_tolerance_mm: 1.0        # seg only
        metadata: case_metadata.csv  # optional, under source: case,subject[,site] (patient grouping)
        subject_pattern: '^(?P<subject>.+)_ses'   # optional alternative: subject id from the case id
        zero_shot_from: BRM          # optional: also scored with models fine-tuned on BRM, untrained here
        zero_shot_channels: [T1w, T1ce, T1ce, FLAIR]   # optional: this set's modality feeding each of
                                     # the source model's channels (default: the same channels in order)
        reference: Liew et al. 2022, Sci Data
        openneuro: {dataset: ds004884, subjects: [r001s001]}   # optional: test subjects also on OpenNeuro (never pre-trained on)
        uncertain: {role: why it is uncertain, ...}   # one note per field the papers do not settle

Classification folders hold `images_dir` (default `imagesTr`) with `{case}_{0000..}{file_ending}`
and `labels_csv` (default `labels.csv`, columns case,label[,subject][,site]).

Problems are reported per dataset: a bad entry is left out and its error, naming the dataset and
the field, is kept in `Registry.errors`; the other datasets stay usable. Only a file that is not a
registry at all raises.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from openmind_bench.names import NAME_PATTERN

log = logging.getLogger(__name__)

ALLOWED = {"task": ("seg", "cls"), "role": ("dev", "test"), "domain": ("id", "ood")}
DEFAULT_ROOT = "data/downstream"
FORMATS = {"seg": "nnunet_raw", "cls": "image_folder"}
REQUIRED = ("task", "role", "domain", "source", "modalities", "labels")
OPTIONAL = ("openneuro", "title", "format", "nsd_tolerance_mm", "metadata", "subject_pattern", "zero_shot_from",
            "zero_shot_channels", "reference", "uncertain", "images_dir", "labels_csv", "file_ending", "notes")
UNCERTAIN_KEYS = set(REQUIRED) | set(OPTIONAL) | {"identity"}


class RegistryError(ValueError):
    """A registry file that cannot be read, or a dataset entry that cannot be used."""


@dataclass(frozen=True)
class DatasetSpec:
    """One checked registry entry; `source` is resolved against the root."""

    name: str
    task: str
    role: str
    domain: str
    source: Path
    modalities: tuple[str, ...]
    labels: dict
    format: str
    title: str = ""
    nsd_tolerance_mm: float | None = None
    metadata: str | None = None
    subject_pattern: str | None = None
    zero_shot_from: str | None = None
    zero_shot_channels: tuple[str, ...] | None = None  # this set's modality per source-model channel
    reference: str = ""
    images_dir: str = "imagesTr"
    labels_csv: str = "labels.csv"
    file_ending: str = ".nii.gz"
    uncertain: dict = field(default_factory=dict)

    @property
    def channels(self) -> int:
        return len(self.modalities)

    @property
    def zero_shot_inputs(self) -> tuple[str, ...]:
        """This set's modality feeding each channel of the zero-shot source model."""
        return self.zero_shot_channels or self.modalities

    def zero_shot_images(self, images) -> list:
        """A case's image files (in `modalities` order) in the source model's channel order."""
        return [images[self.modalities.index(m)] for m in self.zero_shot_inputs]

    @property
    def foreground(self) -> dict:
        """Segmentation labels that are scored (all but background 0)."""
        return {k: v for k, v in self.labels.items() if v != 0}

    @property
    def class_names(self) -> list[str]:
        """Classification classes in index order."""
        return [k for k, _ in sorted(self.labels.items(), key=lambda kv: kv[1])]


@dataclass
class Registry:
    path: Path
    root: Path
    datasets: dict[str, DatasetSpec]
    errors: dict[str, str]

    def get(self, name: str) -> DatasetSpec:
        if name in self.datasets:
            return self.datasets[name]
        if name in self.errors:
            raise RegistryError(self.errors[name])
        raise RegistryError(f"dataset {name!r} is not in the registry {self.path} "
                            f"(known: {sorted(set(self.datasets) | set(self.errors))})")

    def names(self, task: str | None = None, role: str | None = None, domain: str | None = None) -> list[str]:
        """Usable datasets in registry order, optionally filtered."""
        return [n for n, d in self.datasets.items()
                if (task is None or d.task == task) and (role is None or d.role == role)
                and (domain is None or d.domain == domain)]


def _fail(path: Path, name: str, key: str, message: str) -> RegistryError:
    return RegistryError(f"dataset registry {path}: datasets.{name}.{key}: {message}")


def _choice(path, name, fields, key) -> str:
    value = fields.get(key)
    if value is None:
        raise _fail(path, name, key, "missing")
    value = str(value).strip().lower()
    if value not in ALLOWED[key]:
        raise _fail(path, name, key, f"{fields.get(key)!r} is not one of {list(ALLOWED[key])}")
    return value


def _labels(path, name, task, raw) -> dict:
    if not isinstance(raw, dict) or not raw:
        raise _fail(path, name, "labels", "must be a non-empty mapping of label name -> value")
    labels = {}
    for label, value in raw.items():
        if task == "seg" and isinstance(value, list) and value and all(isinstance(v, int) for v in value):
            labels[str(label)] = tuple(value)  # an nnU-Net region
        elif isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            labels[str(label)] = value
        else:
            raise _fail(path, name, "labels", f"{label!r}: {value!r} is not a non-negative integer"
                        + (" or a list of them (a region)" if task == "seg" else ""))
    ints = [v for v in labels.values() if isinstance(v, int)]
    if len(ints) != len(set(ints)):
        raise _fail(path, name, "labels", "two labels share a value")
    if task == "seg":
        if 0 not in ints:
            raise _fail(path, name, "labels", "needs the background label with value 0 (nnU-Net convention)")
        if len(labels) < 2:
            raise _fail(path, name, "labels", "needs at least one foreground label")
    else:
        if sorted(ints) != list(range(len(labels))) or len(ints) != len(labels):
            raise _fail(path, name, "labels", f"class indices must be 0..{len(labels) - 1}, got {sorted(labels.values())}")
        if len(labels) < 2:
            raise _fail(path, name, "labels", "a classification set needs at least two classes")
    return labels


def _entry(path: Path, root: Path, name: str, fields) -> DatasetSpec:
    if not re.fullmatch(NAME_PATTERN, name):
        # the name becomes a folder of results/downstream/ and a part of file names: no paths, no '__'
        raise RegistryError(f"dataset registry {path}: datasets.{name}: {name!r} is not a valid dataset name "
                            "(letters and digits, with single '.', '-' or '_' between them)")
    if not isinstance(fields, dict):
        raise RegistryError(f"dataset registry {path}: datasets.{name} must be a mapping of fields")
    unknown = sorted(set(fields) - set(REQUIRED) - set(OPTIONAL))
    if unknown:
        raise _fail(path, name, unknown[0], f"unknown field (known: {sorted(set(REQUIRED) | set(OPTIONAL))})")
    task = _choice(path, name, fields, "task")
    role = _choice(path, name, fields, "role")
    domain = _choice(path, name, fields, "domain")
    source = fields.get("source")
    if not isinstance(source, str) or not source.strip():
        raise _fail(path, name, "source", "missing or empty (a folder under the root, or an absolute path)")
    modalities = fields.get("modalities")
    if isinstance(modalities, str):
        modalities = [modalities]
    if not isinstance(modalities, list) or not modalities or not all(isinstance(m, str) and m for m in modalities):
        raise _fail(path, name, "modalities", "must be a non-empty list of channel names, in channel order")
    labels = _labels(path, name, task, fields.get("labels"))
    fmt = fields.get("format", FORMATS[task])
    if fmt != FORMATS[task]:
        raise _fail(path, name, "format", f"{fmt!r}: a {task} dataset is read as {FORMATS[task]!r}")
    tolerance = fields.get("nsd_tolerance_mm")
    if task == "seg":
        if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not tolerance > 0:
            raise _fail(path, name, "nsd_tolerance_mm", f"{tolerance!r}: a segmentation set needs a tolerance > 0 (mm)")
        tolerance = float(tolerance)
    elif tolerance is not None:
        raise _fail(path, name, "nsd_tolerance_mm", "only segmentation sets have an NSD tolerance")
    pattern = fields.get("subject_pattern")
    if pattern is not None:
        try:
            compiled = re.compile(pattern)
        except re.error as e:
            raise _fail(path, name, "subject_pattern", f"not a regular expression: {e}") from None
        if "subject" not in compiled.groupindex:
            raise _fail(path, name, "subject_pattern", "needs a named group (?P<subject>...)")
    uncertain = fields.get("uncertain") or {}
    if not isinstance(uncertain, dict) or not all(isinstance(v, str) and v.strip() for v in uncertain.values()):
        raise _fail(path, name, "uncertain", "must map field names to a note (text)")
    bad = sorted(set(uncertain) - UNCERTAIN_KEYS)
    if bad:
        raise _fail(path, name, "uncertain", f"{bad[0]!r} is not a field of the entry")
    ending = str(fields.get("file_ending", ".nii.gz"))
    if not ending.startswith("."):
        raise _fail(path, name, "file_ending", f"{ending!r} must start with a dot")
    channels = fields.get("zero_shot_channels")
    if channels is not None:
        if fields.get("zero_shot_from") is None:
            raise _fail(path, name, "zero_shot_channels", "only a zero_shot_from dataset maps channels")
        if not isinstance(channels, list) or not channels or not all(c in modalities for c in channels):
            raise _fail(path, name, "zero_shot_channels",
                        f"{channels!r} must list modalities of this dataset ({list(modalities)}), one per channel of "
                        "the source model")
        channels = tuple(channels)
    src = Path(source).expanduser()
    return DatasetSpec(
        name=name, task=task, role=role, domain=domain, source=src if src.is_absolute() else root / src,
        modalities=tuple(modalities), labels=labels, format=fmt, title=str(fields.get("title", "")),
        nsd_tolerance_mm=tolerance, metadata=fields.get("metadata"), subject_pattern=pattern,
        zero_shot_from=fields.get("zero_shot_from"), zero_shot_channels=channels,
        reference=str(fields.get("reference", "")),
        images_dir=str(fields.get("images_dir", "imagesTr")), labels_csv=str(fields.get("labels_csv", "labels.csv")),
        file_ending=ending, uncertain=dict(uncertain),
    )


def load_registry(path: str | Path, root: str | Path | None = None) -> Registry:
    """Read and check the registry. `root` (config `downstream.root`) overrides the file's `root`."""
    path = Path(path)
    if not path.is_file():
        raise RegistryError(f"dataset registry {path} does not exist")
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise RegistryError(f"dataset registry {path} is not valid YAML: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("datasets"), dict) or not doc["datasets"]:
        raise RegistryError(f"dataset registry {path}: needs a non-empty mapping 'datasets' of name -> fields")
    root_path = Path(root if root is not None else doc.get("root") or DEFAULT_ROOT).expanduser()
    datasets, errors = {}, {}
    for name, fields in doc["datasets"].items():
        name = str(name)
        try:
            datasets[name] = _entry(path, root_path, name, fields)
        except RegistryError as e:
            errors[name] = str(e)
            log.error("%s", e)
    for name, spec in list(datasets.items()):
        if spec.zero_shot_from is not None:
            other = datasets.get(spec.zero_shot_from)
            problem = None
            if other is None or other.task != spec.task:
                problem = _fail(path, name, "zero_shot_from",
                                f"{spec.zero_shot_from!r} is not a usable {spec.task} dataset of this registry")
            elif len(spec.zero_shot_inputs) != other.channels:
                problem = _fail(path, name, "zero_shot_channels" if spec.zero_shot_channels else "zero_shot_from",
                                f"models fine-tuned on {other.name} take {other.channels} channel(s) "
                                f"{list(other.modalities)}, this dataset gives {len(spec.zero_shot_inputs)} "
                                f"{list(spec.zero_shot_inputs)}; zero_shot_channels maps its modalities onto them")
            if problem is not None:
                errors[name] = str(problem)
                log.error("%s", errors[name])
                del datasets[name]
    return Registry(path=path, root=root_path, datasets=datasets, errors=errors)


# Entry fields that describe a dataset to people (or to the tables) and shape no job's result.
_DESCRIPTIVE = ("title", "reference", "uncertain", "domain")


def entry_values(spec: DatasetSpec) -> dict:
    """The values of a checked entry that downstream jobs read, as plain data (for their params)."""
    import dataclasses

    out = {}
    for f in dataclasses.fields(spec):
        if f.name in _DESCRIPTIVE:
            continue
        value = getattr(spec, f.name)
        if isinstance(value, Path):
            value = str(value)
        elif isinstance(value, tuple):
            value = list(value)
        elif f.name == "labels":  # in value order: how the YAML lists them shapes no result
            ordered = sorted(value.items(), key=lambda kv: (isinstance(kv[1], tuple), kv[1], kv[0]))
            value = {k: list(v) if isinstance(v, tuple) else v for k, v in ordered}
        out[f.name] = value
    return out


def downstream_test_subjects(registry_path) -> set[tuple[str, str]]:
    """(OpenNeuro dataset, subject) pairs of downstream test sets that also live on OpenNeuro.

    Registry field `openneuro: {dataset: dsNNNNNN, subjects: [...]}` of a `role: test` entry;
    without `subjects` every subject of that dataset is a test subject (("ds...", "*")).
    """
    if not registry_path or not Path(registry_path).is_file():
        return set()
    doc = yaml.safe_load(Path(registry_path).read_text()) or {}
    out = set()
    for name, entry in (doc.get("datasets") or {}).items():
        link = (entry or {}).get("openneuro")
        if not link or entry.get("role") != "test":
            continue
        if "dataset" not in link:
            raise RegistryError(f"dataset registry {registry_path}: datasets.{name}.openneuro: needs a 'dataset' "
                                "(dsNNNNNN)")
        subjects = link.get("subjects") or ["*"]
        out |= {(str(link["dataset"]), str(s).removeprefix("sub-")) for s in subjects}
    return out


def cached_registry(path: str | Path, root: str | Path | None = None) -> Registry:
    """`load_registry`, read once per file version: the workflow asks for it for every job when it
    builds the DAG; an edited file (mtime, size) is read anew."""
    try:
        stat = os.stat(path)
        version = (stat.st_mtime_ns, stat.st_size)
    except OSError:
        version = None
    return _cached_registry(str(path), None if root is None else str(root), version)


@functools.lru_cache(maxsize=8)
def _cached_registry(path: str, root: str | None, version) -> Registry:
    return load_registry(path, root)


def usable_datasets(path: str | Path | None) -> dict[str, DatasetSpec]:
    """The usable entries in registry order; empty (with a warning) when there is no registry file,
    so the benchmark table can still be made (without ID/OOD means)."""
    if path is None or not Path(path).is_file():
        log.warning("dataset registry %s not found: ID/OOD means stay empty", path)
        return {}
    return load_registry(path).datasets


def ordered_datasets(names, registry: dict[str, DatasetSpec]) -> list[str]:
    """Registry order first (as the papers list them), then unknown datasets by name."""
    names = set(names)
    known = [n for n in registry if n in names]
    return known + sorted(names - set(known))
