"""Resampling to a target spacing, with nnssl's (nnU-Net's) conventions.

- The new shape is `round(shape * spacing / target)` and the new grid spans the same field of
  view as the old one (voxel edges aligned, as `skimage.transform.resize` and nnssl do), so the
  effective spacing is `spacing * shape / new_shape`, within half a voxel of the target.
- Images: cubic B-spline interpolation (order 3), clipped to the input's range as skimage's
  resize clips it. Masks: linear interpolation (order 1), then thresholded at 0.5.
- Strongly anisotropic images (largest spacing > `anisotropy_threshold` x smallest, one such
  axis) get their own order along the low-resolution axis (nnssl default 0, nearest), to avoid
  cubic ringing across thick slices.

The values are those of `scipy.ndimage.zoom(..., mode="nearest", grid_mode=True)` (tests pin
the agreement). An axis-aligned zoom is separable, so orders 1 and 3 are computed one axis at a
time: scipy's spline prefilter along the axis, then a sparse matrix of 2 or 4 B-spline taps per
output sample. That is 4-14x faster than `ndimage.zoom`, which evaluates all 64 taps of the 3D
cubic kernel per voxel, and makes 1 mm preprocessing of a head scan take seconds, not tens.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage, sparse

# edge padding before the spline prefilter, as scipy.ndimage.zoom pads for mode="nearest"
_PAD = 12


def new_shape_for(shape: Sequence[int], spacing: Sequence[float], target: Sequence[float]) -> tuple[int, ...]:
    """nnssl's `compute_new_shape`: round(shape * spacing / target), at least one voxel."""
    return tuple(max(1, int(round(s * sp / t))) for s, sp, t in zip(shape, spacing, target))


def lowres_axis(spacing: Sequence[float], threshold: float) -> int | None:
    """The single axis resampled with its own order, or None (isotropic enough, or two thick axes)."""
    spacing = np.asarray(spacing, dtype=float)
    if spacing.max() / spacing.min() <= threshold:
        return None
    thick = np.flatnonzero(np.isclose(spacing, spacing.max(), rtol=1e-3))
    return int(thick[0]) if len(thick) == 1 else None


def resampled_affine(affine: np.ndarray, old_shape: Sequence[int], new_shape: Sequence[int]) -> np.ndarray:
    """Voxel-to-world affine of the resampled grid: output voxel j sits at input (j + 0.5) * s - 0.5."""
    s = np.asarray(old_shape, dtype=float) / np.asarray(new_shape, dtype=float)
    grid = np.eye(4)
    grid[:3, :3] = np.diag(s)
    grid[:3, 3] = (s - 1.0) / 2.0
    return affine @ grid


def _taps(n_in: int, n_out: int, order: int) -> sparse.csr_matrix:
    """(n_out, n_in + 2 * _PAD) interpolation weights of an edge-aligned 1D zoom."""
    x = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5 + _PAD
    base = np.floor(x).astype(np.int64)
    t = x - base
    if order == 1:
        cols = np.stack([base, base + 1], 1)
        w = np.stack([1 - t, t], 1)
    else:  # cubic B-spline basis
        cols = np.stack([base - 1, base, base + 1, base + 2], 1)
        w = np.stack([(1 - t) ** 3, 3 * t**3 - 6 * t**2 + 4, -3 * t**3 + 3 * t**2 + 3 * t + 1, t**3], 1) / 6.0
    cols = np.clip(cols, 0, n_in + 2 * _PAD - 1)
    rows = np.repeat(np.arange(n_out), cols.shape[1])
    return sparse.csr_matrix((w.ravel(), (rows, cols.ravel())), shape=(n_out, n_in + 2 * _PAD))


def zoom_axis(volume: np.ndarray, axis: int, n_out: int, order: int) -> np.ndarray:
    """Zoom one axis of `volume` to `n_out` samples (edge-aligned grid, `nearest` boundary)."""
    n_in = volume.shape[axis]
    if n_in == n_out:
        return volume
    if order == 0:
        index = np.floor((np.arange(n_out) + 0.5) * (n_in / n_out)).astype(np.int64)
        return np.take(volume, np.clip(index, 0, n_in - 1), axis=axis)
    if order not in (1, 3):
        factors = [n_out / n_in if a == axis else 1.0 for a in range(volume.ndim)]
        return ndimage.zoom(volume, factors, order=order, mode="nearest", grid_mode=True)
    moved = np.moveaxis(np.asarray(volume, dtype=np.float64), axis, 0)
    padded = np.pad(moved, [(_PAD, _PAD)] + [(0, 0)] * (moved.ndim - 1), mode="edge")
    if order > 1:
        padded = ndimage.spline_filter1d(padded, order=order, axis=0, mode="nearest")
    out = _taps(n_in, n_out, order) @ padded.reshape(padded.shape[0], -1)
    return np.moveaxis(out.reshape((n_out, *moved.shape[1:])), 0, axis)


def zoom_to_shape(volume: np.ndarray, new_shape: Sequence[int], orders: Sequence[int]) -> np.ndarray:
    """Zoom every axis to `new_shape`, axis `a` with spline order `orders[a]`; shrinking axes first."""
    out = volume
    ratios = [n / s for n, s in zip(new_shape, volume.shape)]
    for axis in sorted(range(volume.ndim), key=lambda a: ratios[a]):
        out = zoom_axis(out, axis, int(new_shape[axis]), int(orders[axis]))
    return out


def resample(
    volume: np.ndarray,
    new_shape: Sequence[int],
    spacing: Sequence[float],
    order: int,
    anisotropy_threshold: float = 3.0,
    lowres_order: int = 0,
) -> np.ndarray:
    """Resample a 3D volume to `new_shape` (float32; see the module docstring for the conventions)."""
    if volume.ndim != 3:
        raise ValueError(f"expected a 3D volume, got shape {volume.shape}")
    axis = lowres_axis(spacing, anisotropy_threshold)
    orders = [lowres_order if a == axis else order for a in range(3)]
    out = zoom_to_shape(np.asarray(volume, dtype=np.float32), new_shape, orders)
    out = np.asarray(out, dtype=np.float32)
    if order > 1:
        # cubic splines overshoot at edges; skimage's resize (used by nnssl) clips to the input range
        np.clip(out, volume.min(), volume.max(), out=out)
    return np.ascontiguousarray(out)


def resample_mask(
    mask: np.ndarray,
    new_shape: Sequence[int],
    spacing: Sequence[float],
    order: int = 1,
    anisotropy_threshold: float = 3.0,
) -> np.ndarray:
    """Resample a binary mask (linear by default, nearest along a separated thick axis), binarise at 0.5."""
    if mask.all() or not mask.any():  # constant masks (the defaults) need no interpolation
        return np.full(tuple(int(n) for n in new_shape), 1 if mask.all() else 0, dtype=np.uint8)
    values = resample(mask.astype(np.float32), new_shape, spacing, order, anisotropy_threshold, lowres_order=0)
    return (values >= 0.5).astype(np.uint8)
