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


def _extrusion(brain: np.ndarray, world: np.ndarray, axis: int, forward: bool, erosion_mm: float,
               cell_mm: float) -> np.ndarray:
    """Voxels beyond some brain voxel along world axis `axis` (`forward`: towards larger values) whose
    position across that axis lies in the brain's footprint eroded by `erosion_mm` (in world space,
    so that a tilted head is extruded along the head's real axis, not a voxel axis)."""
    across = [a for a in range(3) if a != axis]
    cells = [np.floor((world[a] - world[a].min()) / cell_mm).astype(np.int64) for a in across]
    shape2 = (int(cells[0].max()) + 1, int(cells[1].max()) + 1)
    flat = np.ravel_multi_index((cells[0], cells[1]), shape2)
    along = world[axis]
    if forward:  # the most backward brain voxel of each cell: everything in front of it
        edge = np.full(shape2[0] * shape2[1], np.inf)
        np.minimum.at(edge, flat[brain], along[brain])
    else:  # the highest brain voxel of each cell: everything below it
        edge = np.full(shape2[0] * shape2[1], -np.inf)
        np.maximum.at(edge, flat[brain], along[brain])
    footprint = np.isfinite(edge).reshape(shape2)
    footprint = ndi.binary_fill_holes(footprint)
    inner = ndi.distance_transform_edt(footprint, sampling=cell_mm) > erosion_mm
    inside = inner.ravel()[flat]
    edge_of = edge[flat]
    beyond = (along >= edge_of) if forward else (along <= edge_of)
    return inside & beyond & np.isfinite(edge_of)


def _removed_head(brain: np.ndarray, affine: np.ndarray, spacing, s: ClassicalSettings) -> np.ndarray:
    """The head a skull-stripping removed: a skull-and-scalp shell around the brain, the neck below
    it (the brain's footprint extruded inferiorly, eroded) and the face in front of its lower half
    (the lower brain extruded anteriorly, eroded); directions in world (RAS) space."""
    head = ndi.distance_transform_edt(~brain, sampling=spacing) <= s.shell_mm
    ijk = np.indices(brain.shape, dtype=np.float32).reshape(3, -1)
    world = (affine[:3, :3] @ ijk + affine[:3, 3:]).astype(np.float32)
    cell = float(max(min(spacing), 1.0))
    b = brain.ravel()
    head = head.ravel()
    head |= _extrusion(b, world, 2, False, s.extrusion_erosion_mm, cell)
    lower = world[2] < float(world[2][b].mean())
    head |= _extrusion(b & lower, world, 1, True, s.face_erosion_mm, cell) & lower
    return head.reshape(brain.shape) & ~brain


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
    for i, box in enumerate(ndi.find_objects(labels), start=1):
        box = tuple(slice(max(b.start - 1, 0), b.stop + 1) for b in box)  # room for the rim
        comp = labels[box] == i
        ring = ndi.binary_dilation(comp) & ~comp
        if (ring & fg[box]).sum() < settings.contact_fraction * max(ring.sum(), 1):
            continue  # featureless air (zero-padded corners) away from the head
        anon[box] |= comp
        if zeroed[box][comp].mean() > 0.5:
            kind = "defaced"
        elif kind == "none":
            kind = "face_blurred"
    head = _largest(ndi.binary_fill_holes(ndi.binary_closing(fg | anon, iterations=2)))
    if kind == "face_blurred" or (anon & ~zeroed).any():
        grown = ndi.binary_dilation(anon & ~zeroed, iterations=settings.blur_margin)
        anon |= grown & head & ~zeroed
    anon &= head | zeroed
    return Masks(anat=head & ~anon, anon=anon, kind=kind)
