"""Image fingerprints: one compact, learned-free vector per preprocessed image (a 3D perceptual hash).

The preprocessed image (RAS, cropped to its non-zero box, z-scored, at the store's spacing) is
reduced to a canonical low-resolution volume and described by its lowest spatial frequencies:

1. intensities shifted so the background (2nd percentile) is 0, negative values clipped;
2. block means of `step_mm` (anti-aliasing), then `grid`^3 samples `step_mm` apart centred on the
   intensity centre of mass (trilinear; outside the image is background): a 256 mm field of view at
   the defaults, whatever the crop, so a translated or slightly cropped copy lands on the same grid;
3. the orthonormal 3D DCT-II of that volume, of which the `keep`^3 lowest coefficients are kept,
   each weighted by its spatial frequency |f| (so the constant term, the mean, drops out), and the
   vector scaled to unit length.

Because the DCT is orthonormal, the distance between two fingerprints is the distance between the
two volumes low-pass filtered, differentiated once (the |f| weight: how a gradient magnitude weighs
frequencies) and normalised, i.e. sqrt(2 - 2 r) with r their correlation; 0 for identical content,
about 1.4 for unrelated content. The weight matters: unweighted, the head's outline (the lowest
frequencies) dominates and two contrasts of one subject come within 4x of the planted duplicates'
largest distance on the demo; weighted, within 4.6x (docs/stages.md, Curation by content). Invariant to intensity
scale and offset (z-scoring over another crop, another scanner gain), axis order and flips on disk
(preprocessing reorients to RAS), translation; robust to noise (block means) and small crops (the
centre of mass moves by a fraction of the removed part). Not invariant to rotation: another session
of the same subject, positioned anew, is a different image, as it should be for deduplication.
Why not a learned embedding: nothing to download, the same numbers on every machine, and a distance
with a meaning that thresholds can be set on. The cost is a few tenths of a second for a 256^3
image (benchmarks/curation_neighbours.py --fingerprint), small beside preprocessing itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import fft, ndimage

from openmind_bench import config


class FingerprintError(ValueError):
    """The image has no usable content for a fingerprint (all zero, constant, degenerate shape)."""


# `curation.fingerprint` defaults of config/schema.yaml, read once
_DEFAULTS = config.section("curation")["fingerprint"]


@dataclass(frozen=True)
class FingerprintSettings:
    grid: int = _DEFAULTS["grid"]
    step_mm: float = _DEFAULTS["step_mm"]
    keep: int = _DEFAULTS["keep"]
    min_extent_mm: float = _DEFAULTS["min_extent_mm"]

    @classmethod
    def from_config(cls, values: dict | None = None) -> "FingerprintSettings":
        merged = {**_DEFAULTS, **(values or {})}
        if merged["keep"] > merged["grid"]:
            raise ValueError(f"curation.fingerprint.keep ({merged['keep']}) exceeds grid ({merged['grid']})")
        return cls(grid=int(merged["grid"]), step_mm=float(merged["step_mm"]), keep=int(merged["keep"]),
                   min_extent_mm=float(merged["min_extent_mm"]))

    @property
    def dimension(self) -> int:
        return self.keep**3 - 1


def _block_mean(a: np.ndarray, factors: tuple[int, ...]) -> np.ndarray:
    pads = [(0, (-s) % f) for s, f in zip(a.shape, factors)]
    if any(p for _, p in pads):
        a = np.pad(a, pads)
    shape = []
    for s, f in zip(a.shape, factors):
        shape += [s // f, f]
    return a.reshape(shape).mean(axis=(1, 3, 5), dtype=np.float64).astype(np.float32)


def canonical_volume(image: np.ndarray, spacing, settings: FingerprintSettings) -> np.ndarray:
    """The `grid`^3 low-resolution volume (step_mm apart, centred on the centre of mass) of `image`."""
    a = np.asarray(image, dtype=np.float32)
    if a.ndim != 3:
        raise FingerprintError(f"not a 3D image: shape {a.shape}")
    if min(a.shape) < 2:
        raise FingerprintError(f"degenerate shape {a.shape}")
    spacing = np.asarray([float(s) for s in spacing], float)
    if spacing.shape != (3,) or not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise FingerprintError(f"invalid spacing {spacing.tolist()}")
    extent = np.asarray(a.shape) * spacing
    if extent.min() < settings.min_extent_mm:
        raise FingerprintError(f"too small for a fingerprint: {'x'.join(f'{e:g}' for e in extent)} mm, under "
                               f"min_extent_mm {settings.min_extent_mm:g} along an axis (a few fingerprint steps "
                               "would be all it holds)")
    sample = a[::4, ::4, ::4] if a.size > 64**3 else a
    if not np.isfinite(sample).all() or not np.isfinite(a).all():
        raise FingerprintError("non-finite voxel values")
    lo, hi = np.percentile(sample, [2.0, 99.9])
    if not hi > lo:
        lo, hi = float(a.min()), float(a.max())
    if not hi > lo:
        raise FingerprintError("constant image (all zero after preprocessing?)")
    w = np.clip(a - lo, 0.0, None)
    total = float(w.sum(dtype=np.float64))
    if total <= 0:
        raise FingerprintError("no voxel above the background")
    factors = tuple(max(1, int(round(settings.step_mm / s))) for s in spacing)
    reduced = _block_mean(w, factors)
    # centre of mass in mm (voxel centres at index * spacing)
    com = np.array(ndimage.center_of_mass(reduced), float)  # in reduced voxels
    block_mm = np.asarray(factors) * spacing
    com_mm = com * block_mm + (np.asarray(factors) - 1) / 2 * spacing
    offsets = (np.arange(settings.grid) - (settings.grid - 1) / 2) * settings.step_mm
    coords = []
    for axis in range(3):
        mm = com_mm[axis] + offsets
        coords.append((mm - (factors[axis] - 1) / 2 * spacing[axis]) / block_mm[axis])
    grid = np.meshgrid(*coords, indexing="ij")
    return ndimage.map_coordinates(reduced, grid, order=1, mode="constant", cval=0.0).astype(np.float32)


def _frequency(k: int) -> np.ndarray:
    """|f| of each kept DCT coefficient (0 for the constant term)."""
    i = np.arange(k, dtype=np.float64) ** 2
    return np.sqrt(i[:, None, None] + i[None, :, None] + i[None, None, :])


def fingerprint(image: np.ndarray, spacing, settings: FingerprintSettings = FingerprintSettings()) -> np.ndarray:
    """The unit-length fingerprint (float32, `settings.dimension` values) of a preprocessed image.

    FingerprintError when it cannot be computed (the caller records the image as rejected)."""
    volume = canonical_volume(image, spacing, settings)
    k = settings.keep
    coefficients = fft.dctn(volume.astype(np.float64), norm="ortho")[:k, :k, :k] * _frequency(k)
    coefficients = coefficients.ravel()[1:]
    norm = float(np.linalg.norm(coefficients))
    if not np.isfinite(norm) or norm <= 1e-12 * max(float(np.abs(volume).max()), 1e-30):
        raise FingerprintError("no structure at the fingerprint's scale (a uniform image)")
    return (coefficients / norm).astype(np.float32)
