"""Masks shipped by the source (the OpenMind release's `deface_mask` / `fb_mask`): used as they
are, after checking that they lie on the image's grid and that their polarity is right."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi


class ReleaseMaskProblem(ValueError):
    """A shipped mask that cannot be trusted (other grid, unreadable, inverted)."""


def load_on_grid(path: str | Path, what: str, shape: tuple, affine: np.ndarray) -> np.ndarray:
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except Exception as e:  # nibabel raises many types for a broken file
        raise ReleaseMaskProblem(f"{what} {path} is unreadable: {type(e).__name__}: {e}") from e
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if tuple(data.shape) != tuple(shape):
        raise ReleaseMaskProblem(f"{what} {path} has shape {tuple(data.shape)}, its image {tuple(shape)}")
    diff = float(np.abs(img.affine - affine).max())
    if diff > 1e-2:
        raise ReleaseMaskProblem(f"{what} {path} is not on its image's grid (affines differ by up to {diff:.3g})")
    return np.asarray(data) >= 0.5


def foreground(image: np.ndarray) -> np.ndarray:
    """Voxels clearly above the background (Otsu on the smoothed magnitude)."""
    from skimage.filters import threshold_otsu

    smooth = ndi.gaussian_filter(np.abs(np.asarray(image, np.float32)), 1.0)
    return smooth > threshold_otsu(smooth) if smooth.max() > smooth.min() else np.zeros(image.shape, bool)


def check_polarity(image: np.ndarray, anat: np.ndarray | None, anon: np.ndarray | None,
                   max_anon_share: float, min_anat_share: float) -> list[str]:
    """Why the masks look inverted (empty list when they look right).

    An anonymised region is near-empty in the image: it holds a small share of the bright
    foreground; an anatomy mask holds most of it.
    """
    fg = foreground(image)
    n = max(int(fg.sum()), 1)
    problems = []
    if anon is not None and anon.any():
        share = float((fg & anon).sum()) / n
        if share > max_anon_share:
            problems.append(f"anonymisation mask covers {share:.0%} of the image's foreground (looks inverted)")
    if anat is not None:
        share = float((fg & anat).sum()) / n
        if share < min_anat_share:
            problems.append(f"anatomy mask covers only {share:.0%} of the image's foreground (looks inverted)")
    return problems
