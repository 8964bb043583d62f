"""Downstream metrics: per-case, per-class DSC and NSD (nnU-Net conventions), balanced accuracy and
AUROC, and the `metrics.json` the aggregation stage collects."""

from openmind_bench.metrics.classification import classification_metrics
from openmind_bench.metrics.report import RunIdentity, classification_document, segmentation_document, write_metrics
from openmind_bench.metrics.segmentation import (
    case_metrics,
    dice,
    evaluate_case_files,
    foreground_labels,
    surface_dice,
)

__all__ = [
    "RunIdentity",
    "case_metrics",
    "classification_document",
    "classification_metrics",
    "dice",
    "evaluate_case_files",
    "foreground_labels",
    "segmentation_document",
    "surface_dice",
    "write_metrics",
]
