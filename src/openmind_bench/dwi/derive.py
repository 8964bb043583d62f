"""One 4D DWI scan -> T2w (mean b0), ADC and FA maps and a brain mask, step by step.

Steps (OpenMind appendix A): (i) denoise, (ii) Gibbs-ringing removal, (iii) motion: every
volume registered to the b0 reference (dipy) with the b-vectors rotated in world space,
(iv) N4 bias field (SimpleITK) estimated on the mean b0 and divided out of every volume,
(v) brain mask, (vi) the maps. (i), (ii), (v) and the tensor fit come from the chosen backend.
Every step is switchable in config; each records its seconds and outcome.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from openmind_bench.dwi.backends import TensorMaps, make_backend
from openmind_bench.dwi.gradients import DwiRejected, Gradients, read_gradients, rotate_bvecs
from openmind_bench.nifti import image_file_problem

log = logging.getLogger(__name__)

STEPS = ("load", "gradients", "denoise", "degibbs", "motion", "bias", "mask", "tensor")


@dataclass(frozen=True)
class DwiSettings:
    """The validated `dwi` config section (config/schema.yaml holds every default)."""

    backend: str
    b0_threshold: float
    max_tensor_bval: float
    min_directions: int
    denoise: bool
    degibbs: bool
    motion: bool
    bias: bool
    mask: bool
    threads: int
    denoise_patch_radius: int
    motion_pipeline: tuple[str, ...]
    motion_level_iters: tuple[int, ...]
    n4_shrink: int
    n4_iterations: tuple[int, ...]
    mask_median_radius: int
    mask_numpass: int

    @classmethod
    def from_config(cls, cfg: dict) -> "DwiSettings":
        cfg = dict(cfg)
        for key in ("motion_pipeline", "motion_level_iters", "n4_iterations"):
            cfg[key] = tuple(cfg[key])
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in cfg.items() if k in known})

    def describe(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


@dataclass
class DerivedScan:
    affine: np.ndarray
    mask: np.ndarray
    t2w: np.ndarray | None
    adc: np.ndarray | None
    fa: np.ndarray | None
    v1: np.ndarray | None
    gradients: Gradients
    status: list[dict] = field(default_factory=list)  # step, seconds, outcome
    notes: list[str] = field(default_factory=list)  # why a map is missing, table fixes


def load_series(path: str | Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(float32 data X x Y x Z x N, affine, notes); DwiRejected for a file that is no DWI series."""
    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as e:  # nibabel raises many types for broken files
        raise DwiRejected("load", f"{path}: unreadable NIfTI ({type(e).__name__}: {e})") from e
    # nibabel stops at the last voxel: a bad CRC-32 or length trailer is seen by a full pass only,
    # and the maps derived here would be whole files that hide it
    problem = image_file_problem(path)
    if problem:
        raise DwiRejected("load", problem)
    if data.ndim == 5 and data.shape[3] == 1:
        data = data[:, :, :, 0, :]
    if data.ndim == 3 or (data.ndim == 4 and data.shape[3] == 1):
        raise DwiRejected("load", f"{path}: a 3D image labelled dwi (shape {data.shape}), not a diffusion series")
    if data.ndim != 4:
        raise DwiRejected("load", f"{path}: expected a 4D series, got shape {data.shape}")
    notes = []
    bad = ~np.isfinite(data)
    if bad.any():
        if bad.mean() > 0.5:
            raise DwiRejected("load", f"{path}: {bad.mean():.0%} of the voxels are NaN/Inf")
        data[bad] = 0.0
        notes.append(f"{int(bad.sum())} NaN/Inf voxel values set to 0")
    return data, img.affine, notes


def _timed(status: list[dict], step: str, fn, *args):
    t0 = time.perf_counter()
    try:
        out = fn(*args)
    except DwiRejected:
        status.append({"step": step, "seconds": round(time.perf_counter() - t0, 3), "outcome": "rejected"})
        raise
    except Exception as e:  # an unforeseen failure of one step is that scan's rejection
        status.append({"step": step, "seconds": round(time.perf_counter() - t0, 3), "outcome": "failed"})
        raise DwiRejected(step, f"{type(e).__name__}: {e}") from e
    status.append({"step": step, "seconds": round(time.perf_counter() - t0, 3), "outcome": "done"})
    return out


def _skip(status: list[dict], step: str, why: str) -> None:
    status.append({"step": step, "seconds": 0.0, "outcome": f"skipped: {why}"})


def mean_b0(data: np.ndarray, grad: Gradients) -> np.ndarray:
    """Mean of the b0 volumes, or of the lowest shell when there is none (the motion/N4/mask reference)."""
    pick = grad.b0_mask if grad.n_b0 else grad.bvals <= grad.bvals.min() + 1e-6
    return data[..., pick].mean(axis=-1)


def motion_correct(data, affine, grad: Gradients, settings: DwiSettings):
    """Register every volume to the b0 reference; rotate b-vectors by each volume's rotation."""
    from dipy.align import register_dwi_series
    from dipy.core.gradients import gradient_table

    gtab = gradient_table(grad.bvals, bvecs=grad.bvecs, b0_threshold=0.0)
    reg, affines = register_dwi_series(data, gtab, affine=affine, b0_ref=int(np.flatnonzero(grad.b0_mask)[0]),
                                       pipeline=list(settings.motion_pipeline),
                                       level_iters=list(settings.motion_level_iters))
    return np.asarray(reg.dataobj, dtype=np.float32), rotate_bvecs(grad, affines, affine)


def n4_bias(data, affine, grad: Gradients, settings: DwiSettings):
    """N4 (SimpleITK) on the mean b0; the field is divided out of every volume."""
    import SimpleITK as sitk

    ref = mean_b0(data, grad).astype(np.float32)
    image = sitk.GetImageFromArray(ref.T.copy())  # sitk is z, y, x
    zooms = np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)
    image.SetSpacing([float(z) for z in zooms])
    positive = ref > np.percentile(ref[ref > 0], 10) if (ref > 0).any() else ref > 0
    mask = sitk.GetImageFromArray(positive.T.astype(np.uint8).copy())
    mask.CopyInformation(image)
    shrink = max(1, min(settings.n4_shrink, *(s // 4 for s in ref.shape)))
    small, small_mask = sitk.Shrink(image, [shrink] * 3), sitk.Shrink(mask, [shrink] * 3)
    n4 = sitk.N4BiasFieldCorrectionImageFilter()
    n4.SetMaximumNumberOfIterations(list(settings.n4_iterations))
    n4.Execute(small, small_mask)
    log_field = sitk.GetArrayFromImage(n4.GetLogBiasFieldAsImage(image)).T
    field_ = np.exp(log_field).astype(np.float32)
    return data / field_[..., None]


def tensor_volumes(grad: Gradients, settings: DwiSettings, notes: list[str]) -> np.ndarray:
    """b0s + shells with b <= max_tensor_bval; a scan whose lowest shell lies above that (a b=2000
    or 3000 single-shell HARDI) is fitted on its lowest shell (within 10%), as noted."""
    keep = grad.bvals <= settings.max_tensor_bval
    weighted = grad.bvals[~grad.b0_mask]
    if weighted.size and not keep[~grad.b0_mask].any():
        lowest = float(weighted.min())
        keep = grad.b0_mask | (grad.bvals <= lowest * 1.1)
        notes.append(f"no shell with b <= {settings.max_tensor_bval:g}: tensor fitted on the lowest shell (b = {lowest:g})")
    return keep


def derive_scan(path: str | Path, bval: str | Path | None, bvec: str | Path | None, settings: DwiSettings,
                scratch: str | Path | None = None) -> DerivedScan:
    """Run the steps on one scan; DwiRejected(step, reason) when no map can be made."""
    status: list[dict] = []
    data, affine, notes = _timed(status, "load", load_series, path)
    grad = _timed(status, "gradients", read_gradients, bval, bvec, data.shape[3], settings.b0_threshold)
    notes += grad.notes
    backend = make_backend(settings, scratch)
    try:
        window = 2 * settings.denoise_patch_radius + 1
        if not settings.denoise:
            _skip(status, "denoise", "off in config")
        elif min(data.shape[:3]) < window:
            _skip(status, "denoise", f"image {data.shape[:3]} thinner than the {window}-voxel denoising window")
        else:
            data = _timed(status, "denoise", backend.denoise, data, affine, grad)
        if settings.degibbs:
            data = _timed(status, "degibbs", backend.degibbs, data, affine, grad)
        else:
            _skip(status, "degibbs", "off in config")
        if not settings.motion:
            _skip(status, "motion", "off in config")
        elif grad.n_b0 == 0:
            _skip(status, "motion", "no b0 reference")
        else:
            data, grad = _timed(status, "motion", motion_correct, data, affine, grad, settings)
        data = np.clip(data, 0, None)
        if settings.bias:
            data = _timed(status, "bias", n4_bias, data, affine, grad, settings)
        else:
            _skip(status, "bias", "off in config")
        reference = mean_b0(data, grad)
        if settings.mask:
            mask = _timed(status, "mask", backend.mask, data, affine, grad, reference)
            if not mask.any():
                raise DwiRejected("mask", "the brain mask is empty")
        else:
            _skip(status, "mask", "off in config")
            mask = np.ones(data.shape[:3], bool)
        t2w = (reference * mask).astype(np.float32) if grad.n_b0 else None
        if t2w is None:
            notes.append("no T2w: the series has no b0 volume")
        tensor_keep = tensor_volumes(grad, settings, notes)
        sub = grad.subset(tensor_keep)
        maps: TensorMaps | None = None
        if sub.n_directions() < settings.min_directions:
            why = (f"{sub.n_directions()} distinct direction(s) with b <= {settings.max_tensor_bval:g}; "
                   f"a tensor needs {settings.min_directions}")
            notes.append(f"no ADC/FA: {why}")
            _skip(status, "tensor", why)
        else:
            if not tensor_keep.all():
                notes.append(f"tensor fitted on {int(tensor_keep.sum())} of {len(tensor_keep)} volumes "
                             f"(b <= {settings.max_tensor_bval:g})")
            maps = _timed(status, "tensor", backend.tensor, np.ascontiguousarray(data[..., tensor_keep]),
                          affine, sub, mask)
        if t2w is None and maps is None:
            raise DwiRejected("tensor", "; ".join(n for n in notes if n.startswith("no ")))
    finally:
        if hasattr(backend, "close"):
            backend.close()
    return DerivedScan(affine=affine, mask=mask, t2w=t2w, adc=maps.md if maps else None,
                       fa=maps.fa if maps else None, v1=maps.v1 if maps else None, gradients=grad,
                       status=status, notes=notes)
