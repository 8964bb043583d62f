"""Downstream evaluation: dataset readers (over the registry, `openmind_bench.registry`), balanced
patient-grouped splits, the fine-tuning schedules as data; segmentation fine-tuning inside nnU-Net v2
(`downstream.nnunet`), classification on the shared engine (`downstream.classification`). Metrics
live in `openmind_bench.metrics`."""

from openmind_bench.downstream.readers import Case, DatasetError, DownstreamData, case_table, read_dataset, read_datasets
from openmind_bench.registry import DatasetSpec, Registry, RegistryError, load_registry
from openmind_bench.downstream.schedules import SCHEDULE_NAMES, Schedule, ScheduleError, build_schedule, schedule_for_run
from openmind_bench.downstream.splits import SplitError, SplitSettings, ensure_low_data_subset, ensure_split, partition

__all__ = [
    "SCHEDULE_NAMES", "Case", "DatasetError", "DatasetSpec", "DownstreamData", "Registry", "RegistryError",
    "Schedule", "ScheduleError", "SplitError", "SplitSettings", "build_schedule", "case_table",
    "ensure_low_data_subset", "ensure_split", "load_registry", "partition", "read_dataset", "read_datasets",
    "schedule_for_run",
]
