"""Per-case, per-class Dice (DSC) and normalised surface distance (NSD) with nnU-Net's conventions.

Conventions (those of nnU-Net's `compute_metrics` and of the OpenMind fine-tuning fork's
evaluation, which adds NSD the same way):

- DSC = 2 TP / (2 TP + FP + FN). When reference and prediction are both empty (TP + FP + FN = 0)
  the value is NaN and is left out of every mean (nnU-Net averages with `nanmean`). One empty and
  the other not gives 0.
- NSD at tolerance tau (mm): the share of both segmentation surfaces lying within tau of the other
  surface, distances in physical units with the image's (possibly anisotropic) voxel spacing.
  Both empty: NaN, as DSC; one empty: 0. The surface is measured as DeepMind's `surface-distance`
  does (surface elements between voxels weighted by their area; this is what the public
  evaluation code used for the papers' NSD), computed by MONAI's `compute_surface_dice` with
  `use_subvoxels=True`. `surface="voxels"` counts boundary voxels instead (MONAI's default).
- Per case, the class values are averaged over the classes that are not NaN; a case whose classes
  are all NaN is NaN itself. Per dataset the aggregation stage averages cases (skipping NaN).

MONAI's `DiceMetric` is not used for DSC: its `ignore_empty` gives NaN whenever the reference is
empty, also when the prediction is not, where nnU-Net scores 0.
"""

from __future__ import annotations

import math
import warnings
from typing import Mapping, Sequence

import numpy as np

SURFACES = ("surfels", "voxels")


def region_mask(segmentation: np.ndarray, value: int | Sequence[int]) -> np.ndarray:
    """Voxels of a label, or of a region (several labels together, nnU-Net's region notation)."""
    if np.isscalar(value):
        return segmentation == value
    return np.isin(segmentation, np.asarray(list(value)))


def confusion(reference: np.ndarray, prediction: np.ndarray) -> tuple[int, int, int]:
    """(TP, FP, FN) voxel counts of two boolean masks."""
    reference, prediction = reference.astype(bool), prediction.astype(bool)
    tp = int(np.count_nonzero(reference & prediction))
    fp = int(np.count_nonzero(prediction & ~reference))
    fn = int(np.count_nonzero(reference & ~prediction))
    return tp, fp, fn


def dice(reference: np.ndarray, prediction: np.ndarray) -> float:
    tp, fp, fn = confusion(reference, prediction)
    if tp + fp + fn == 0:
        return math.nan
    return 2.0 * tp / (2.0 * tp + fp + fn)


def _crop_to_union(reference: np.ndarray, prediction: np.ndarray, margin: int = 2):
    """Both masks cut to their union's bounding box plus a zero margin (surfaces do not change;
    the distance transform then runs on the box instead of the whole image)."""
    union = reference | prediction
    if not union.any():
        return reference, prediction
    idx = np.argwhere(union)
    lo, hi = idx.min(0), idx.max(0) + 1
    pad = [(margin, margin)] * reference.ndim
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    return np.pad(reference[box], pad), np.pad(prediction[box], pad)


def surface_dice(reference: np.ndarray, prediction: np.ndarray, spacing: Sequence[float], tolerance_mm: float,
                 surface: str = "surfels") -> float:
    """NSD of two boolean masks; `spacing` in mm along the array's axes, in the array's axis order."""
    import torch
    from monai.metrics import compute_surface_dice

    if surface not in SURFACES:
        raise ValueError(f"surface must be one of {SURFACES}, got {surface!r}")
    reference, prediction = reference.astype(bool), prediction.astype(bool)
    if reference.shape != prediction.shape:
        raise ValueError(f"reference {reference.shape} and prediction {prediction.shape} differ in shape")
    if len(spacing) != reference.ndim:
        raise ValueError(f"spacing {tuple(spacing)} does not match a {reference.ndim}-D mask")
    if not math.isfinite(tolerance_mm) or tolerance_mm < 0:
        raise ValueError(f"NSD tolerance must be a finite number >= 0 mm, got {tolerance_mm}")
    if not reference.any() and not prediction.any():
        return math.nan
    if not reference.any() or not prediction.any():
        return 0.0
    reference, prediction = _crop_to_union(reference, prediction)
    y = torch.from_numpy(reference[None, None].astype(np.float32))
    y_pred = torch.from_numpy(prediction[None, None].astype(np.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI warns about empty classes, handled above
        value = compute_surface_dice(y_pred, y, [float(tolerance_mm)], include_background=True,
                                     spacing=[float(s) for s in spacing], use_subvoxels=surface == "surfels")
    return float(value[0, 0])


def _nanmean(values) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


def case_metrics(reference: np.ndarray, prediction: np.ndarray, labels: Mapping[str, int | Sequence[int]],
                 spacing: Sequence[float], tolerance_mm: float, surface: str = "surfels") -> dict:
    """DSC and NSD of every foreground label (name -> value or region) of one case.

    Returns {"DSC": case mean, "NSD": case mean, "per_class": {name: {DSC, NSD, tp, fp, fn}}}.
    """
    if reference.shape != prediction.shape:
        raise ValueError(f"reference {reference.shape} and prediction {prediction.shape} differ in shape")
    per_class = {}
    for name, value in labels.items():
        ref, pred = region_mask(reference, value), region_mask(prediction, value)
        tp, fp, fn = confusion(ref, pred)
        per_class[name] = {
            "DSC": math.nan if tp + fp + fn == 0 else 2.0 * tp / (2.0 * tp + fp + fn),
            "NSD": surface_dice(ref, pred, spacing, tolerance_mm, surface),
            "tp": tp, "fp": fp, "fn": fn,
        }
    return {
        "DSC": _nanmean(v["DSC"] for v in per_class.values()),
        "NSD": _nanmean(v["NSD"] for v in per_class.values()),
        "per_class": per_class,
    }


def foreground_labels(labels: Mapping[str, int | Sequence[int]]) -> dict:
    """The labels scored: every entry but the background (value 0)."""
    return {name: value for name, value in labels.items()
            if not (np.isscalar(value) and int(value) == 0)}


def evaluate_case_files(reference_path, prediction_path, labels: Mapping[str, int | Sequence[int]],
                        tolerance_mm: float, surface: str = "surfels") -> dict:
    """`case_metrics` of two label images on the same grid (NIfTI); spacing from the reference header."""
    import nibabel as nib

    ref_img, pred_img = nib.load(str(reference_path)), nib.load(str(prediction_path))
    if ref_img.shape != pred_img.shape:
        raise ValueError(f"prediction {prediction_path} has shape {pred_img.shape}, "
                         f"its reference {reference_path} {ref_img.shape}")
    if not np.allclose(ref_img.affine, pred_img.affine, atol=1e-3):
        raise ValueError(f"prediction {prediction_path} is not on the grid of its reference {reference_path} "
                         "(affines differ)")
    spacing = [float(z) for z in ref_img.header.get_zooms()[:3]]
    reference = np.asarray(ref_img.dataobj).astype(np.int32)
    prediction = np.asarray(pred_img.dataobj).astype(np.int32)
    return case_metrics(reference, prediction, foreground_labels(labels), spacing, tolerance_mm, surface)
