"""The pre-training augmentations: rotation, scaling and mirroring (nnssl's MAE pipeline).

nnssl's `BaseMAETrainer` uses batchgenerators' SpatialTransform with rotation of +-30 degrees
about each axis (probability 0.2 per sample), isotropic scaling in [0.7, 1.4] (probability 0.2)
and mirroring along each axis (probability 0.5). We keep those distributions and differ in two
places, both for CPU cost: interpolation is trilinear (MONAI `Affine`, torch grid_sample;
batchgenerators v1 used cubic, which costs about ten times as much at 160^3), and the
parameters are drawn before reading, so a transformed patch reads exactly the box its sampling
grid covers instead of a fixed enlarged patch. Masks are interpolated with the image and
thresholded at 0.5 (nnssl's MAE pipeline leaves them untransformed, misaligned with the image).

Parameters come from the caller's numpy Generator, so a patch is a function of the seed alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from monai.transforms import Affine
from monai.transforms.utils import create_rotate, create_scale


@dataclass(frozen=True)
class Augmentation:
    """Distributions of the spatial augmentations (defaults: nnssl's MAE pre-training)."""

    p_rotation: float = 0.2
    max_rotation_deg: float = 30.0
    p_scaling: float = 0.2
    scaling: tuple[float, float] = (0.7, 1.4)  # > 1 samples a larger region: anatomy looks smaller
    mirror_axes: tuple[int, ...] = (0, 1, 2)
    p_mirror: float = 0.5

    def sample(self, rng: np.random.Generator) -> "AugmentationParams":
        rotate = rng.random() < self.p_rotation
        scale = rng.random() < self.p_scaling
        limit = math.radians(self.max_rotation_deg)
        angles = tuple(float(a) for a in rng.uniform(-limit, limit, 3)) if rotate else None
        factor = float(rng.uniform(*self.scaling)) if scale else None
        flips = tuple(int(a) for a in self.mirror_axes if rng.random() < self.p_mirror)
        return AugmentationParams(angles, factor, flips)


@dataclass(frozen=True)
class AugmentationParams:
    angles: tuple[float, float, float] | None  # radians about x, y, z
    scale: float | None
    flips: tuple[int, ...]

    @property
    def spatial(self) -> bool:
        return self.angles is not None or self.scale is not None

    def matrix(self) -> np.ndarray:
        """3x3 map from centred output-patch coordinates to input coordinates (voxels)."""
        m = np.eye(4)
        if self.angles is not None:
            m = m @ create_rotate(3, self.angles)
        if self.scale is not None:
            m = m @ create_scale(3, (self.scale,) * 3)
        return m[:3, :3]


def source_box(centre: Sequence[float], size: Sequence[int], matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Half-open voxel box [lo, hi) an output patch centred at `centre` samples from (with one
    voxel of margin for trilinear interpolation)."""
    half = (np.asarray(size, dtype=float) - 1) / 2
    extent = np.abs(matrix) @ half
    centre = np.asarray(centre, dtype=float)
    return np.floor(centre - extent).astype(int) - 1, np.ceil(centre + extent).astype(int) + 2


def warp(region: torch.Tensor, region_lower: Sequence[int], centre: Sequence[float], size: Sequence[int],
         matrix: np.ndarray) -> torch.Tensor:
    """Resample `region` (C, *R), which starts at absolute voxel `region_lower`, onto a patch of
    `size` centred at absolute position `centre`, output coordinates mapped through `matrix`;
    zeros outside the region."""
    affine = np.eye(4)
    affine[:3, :3] = matrix
    # MONAI centres both grids: input index = matrix @ (o - (P-1)/2) + t + (R-1)/2
    affine[:3, 3] = (np.asarray(centre, float) - np.asarray(region_lower, float)
                     - (np.asarray(region.shape[1:], float) - 1) / 2)
    out = Affine(affine=torch.as_tensor(affine), spatial_size=tuple(int(s) for s in size), mode="bilinear",
                 padding_mode="zeros", image_only=True)(region)
    return out.as_tensor() if hasattr(out, "as_tensor") else out
