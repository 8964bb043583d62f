"""Anatomy and anonymisation masks by classical image analysis (the default backend).

Every MR image carries noise, in air as in tissue. Anonymisation leaves regions without it:
defacing zeroes the face inside the head outline, face blurring smooths it, skull stripping
zeroes everything but the brain. So:

1. *featureless* voxels: exactly zero, or whose local high-frequency energy (image minus a
   Gaussian of it, RMS over a small window) is far below the image's typical level;
2. when most of the field-of-view border is featureless, the background itself was removed:
   the image is brain only (skull-stripped, or a masked derived map). The anatomy is the
   remaining foreground; the anonymised region is the head that was removed, estimated from
   the brain alone: a shell around it (skull and scalp), the neck below it (its footprint
   extruded inferiorly, eroded) and the face in front of its lower half (extruded anteriorly,
   eroded). The head's directions come from the affine;
3. otherwise the head is the thresholded foreground (holes filled); featureless components in
   contact with it are anonymised (zeroed ones exactly, blurred ones grown by the filter's
   reach, inside the head), and the anatomy is the head minus them.

Masks are in the image's own voxel grid. Settings come from config `masks.classical`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

KINDS = ("none", "defaced", "face_blurred", "skull_stripped")


class MaskError(ValueError):
    """The image cannot be given masks (empty, constant, no head)."""


@dataclass(frozen=True)
class ClassicalSettings:
    hf_sigma: float
    hf_window: int
    featureless_ratio: float
    min_component_fraction: float
    contact_fraction: float
    blur_margin: int
    foreground_fraction: float
    shell_mm: float
    extrusion_erosion_mm: float
    face_erosion_mm: float

    @classmethod
    def from_config(cls, cfg: dict) -> "ClassicalSettings":
        return cls(**{k: cfg[k] for k in cls.__dataclass_fields__})


@dataclass
class Masks:
    anat: np.ndarray  # bool, 1 = anatomy
    anon: np.ndarray  # bool, 1 = anonymised
    kind: str  # one of KINDS


def _components(mask: np.ndarray, min_voxels: int) -> np.ndarray:
    labels, n = ndi.label(mask)
    if n == 0:
        return mask
    sizes = ndi.sum(mask, labels, range(1, n + 1))
    keep = np.zeros(n + 1, bool)
    keep[1:] = sizes >= min_voxels
    return keep[labels]


def _largest(mask: np.ndarray) -> np.ndarray:
    labels, n = ndi.label(mask)
    if n == 0:
        return mask
    sizes = ndi.sum(mask, labels, range(1, n + 1))
    return labels == (1 + int(np.argmax(sizes)))


def _border(shape) -> np.ndarray:
    b = np.ones(shape, bool)
    b[1:-1, 1:-1, 1:-1] = False
    return b


def featureless(data: np.ndarray, s: ClassicalSettings) -> np.ndarray:
    """Voxels without the noise every acquired voxel has: zeroed or blurred."""
    hf = data - ndi.gaussian_filter(data, s.hf_sigma)
    local = np.sqrt(np.maximum(ndi.uniform_filter(hf * hf, s.hf_window), 0.0))
    level = float(np.median(local[local > 0])) if (local > 0).any() else 0.0
    flat = (local < s.featureless_ratio * level) | (np.abs(data) <= 1e-6)
    flat = ndi.binary_opening(flat, iterations=1)
    return _components(flat, max(8, int(s.min_component_fraction * data.size)))


def _otsu(values: np.ndarray) -> float:
    from skimage.filters import threshold_otsu

    return float(threshold_otsu(values)) if values.size and values.max() > values.min() else 0.0


def _world_axis(affine: np.ndarray, world: int) -> tuple[int, bool]:
    """Voxel axis closest to world axis `world` (0 R, 1 A, 2 S) and whether it points that way."""
    axis = int(np.argmax(np.abs(affine[world, :3])))
    return axis, bool(affine[world, axis] > 0)


def _extrude(mask: np.ndarray, axis: int, towards_low: bool) -> np.ndarray:
    """Every voxel on the low (or high) index side of a mask voxel along `axis`, the mask included."""
    m = np.moveaxis(mask, axis, -1)
    if towards_low:
        m = np.logical_or.accumulate(m[..., ::-1], axis=-1)[..., ::-1]
    else:
        m = np.logical_or.accumulate(m, axis=-1)
    return np.moveaxis(m, -1, axis)


def _removed_head(brain: np.ndarray, affine: np.ndarray, spacing, s: ClassicalSettings) -> np.ndarray:
    """The head a skull-stripping removed: a skull-and-scalp shell around the brain, the neck below
    it (the brain's footprint extruded inferiorly, eroded) and the face in front of its lower half
    (the lower brain extruded anteriorly, eroded)."""
    head = ndi.distance_transform_edt(~brain, sampling=spacing) <= s.shell_mm
    si, superior = _world_axis(affine, 2)
    head |= ndi.distance_transform_edt(_extrude(brain, si, superior), sampling=spacing) > s.extrusion_erosion_mm
    ap, anterior = _world_axis(affine, 1)
    index = np.indices(brain.shape)[si]
    centre = float(index[brain].mean())
    lower = brain & ((index < centre) if superior else (index > centre))
    face = _extrude(lower, ap, not anterior) & ((index < centre) if superior else (index > centre))
    head |= ndi.distance_transform_edt(face, sampling=spacing) > s.face_erosion_mm
    return head & ~brain


def compute_masks(data: np.ndarray, affine: np.ndarray, settings: ClassicalSettings) -> Masks:
    """Anatomy and anonymisation masks of one 3D image (voxel grid of `data`)."""
    data = np.asarray(data, dtype=np.float32)
    if data.ndim != 3:
        raise MaskError(f"expected a 3D image, got shape {data.shape}")
    if not np.all(np.isfinite(data)):
        data = np.nan_to_num(data, nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = float(data.min()), float(data.max())
    if hi <= lo:
        raise MaskError(f"constant image (all voxels {hi:g}): no head to mask")
    if lo < 0:  # signed maps keep zero as zero; scale by the largest magnitude
        scale = float(np.percentile(np.abs(data), 99.5)) or max(abs(lo), hi)
    else:
        scale = float(np.percentile(data, 99.5)) or hi
    data = data / scale
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    flat = featureless(data, settings)
    smooth = ndi.gaussian_filter(np.abs(data), 1.0)
    if flat[_border(data.shape)].mean() > 0.5:
        brain = _largest(~flat & (smooth > 0))
        brain = ndi.binary_fill_holes(brain)
        if brain.sum() < 8:
            raise MaskError("no foreground left inside the removed background (empty head)")
        anon = _removed_head(brain, affine, spacing, settings)
        return Masks(anat=brain, anon=anon, kind="skull_stripped")
    values = np.clip(smooth[~flat], 0, 1)
    threshold = settings.foreground_fraction * _otsu(values)
    fg = _largest((smooth > threshold) & ~flat)
    if fg.sum() < 8:
        raise MaskError("no head found: nothing stands out of the background")
    labels, n = ndi.label(flat)
    anon = np.zeros(data.shape, bool)
    zeroed = np.abs(data) <= 1e-6
    kind = "none"
    for i in range(1, n + 1):
        comp = labels == i
        ring = ndi.binary_dilation(comp) & ~comp
        if (ring & fg).sum() < settings.contact_fraction * max(ring.sum(), 1):
            continue  # featureless air (zero-padded corners) away from the head
        anon |= comp
        if zeroed[comp].mean() > 0.5:
            kind = "defaced"
        elif kind == "none":
            kind = "face_blurred"
    head = _largest(ndi.binary_fill_holes(ndi.binary_closing(fg | anon, iterations=2)))
    if kind == "face_blurred" or (anon & ~zeroed).any():
        grown = ndi.binary_dilation(anon & ~zeroed, iterations=settings.blur_margin)
        anon |= grown & head & ~zeroed
    anon &= head | zeroed
    return Masks(anat=head & ~anon, anon=anon, kind=kind)
