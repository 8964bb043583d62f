"""Gradient tables as OpenNeuro ships them: read, check, normalise, and move between frames.

BIDS stores `.bval`/`.bvec` in the FSL convention: one row of b-values, three rows of unit vectors
given in the image's voxel frame, with the x axis flipped when the voxel-to-world matrix has a
positive determinant (FSL's "radiological" voxel order). Real files also come as N x 3 columns,
with unnormalised or NaN vectors on b0 rows, with b = 5 or 10 meaning b0, with several b0s or none;
`read_gradients` turns all of these into one checked table or a `DwiRejected` that says why.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


class DwiRejected(Exception):
    """A scan the DWI stage cannot derive maps from; `step` is where it failed."""

    def __init__(self, step: str, reason: str):
        super().__init__(f"{step}: {reason}")
        self.step = step
        self.reason = reason


@dataclass
class Gradients:
    bvals: np.ndarray  # (N,) s/mm^2, b <= threshold set to 0
    bvecs: np.ndarray  # (N, 3) FSL frame, unit length; zero rows on b0 volumes
    b0_threshold: float
    notes: list[str]

    @property
    def b0_mask(self) -> np.ndarray:
        return self.bvals <= 0

    @property
    def n_b0(self) -> int:
        return int(self.b0_mask.sum())

    def subset(self, keep: np.ndarray) -> "Gradients":
        return Gradients(self.bvals[keep], self.bvecs[keep], self.b0_threshold, list(self.notes))

    def n_directions(self, tol_deg: float = 1.0) -> int:
        """Distinct non-collinear diffusion directions (antipodal pairs count once)."""
        vecs = self.bvecs[~self.b0_mask]
        kept: list[np.ndarray] = []
        cos_tol = np.cos(np.deg2rad(tol_deg))
        for v in vecs:
            if all(abs(float(v @ k)) < cos_tol for k in kept):
                kept.append(v)
        return len(kept)

    def write_fsl(self, bval_path: str | Path, bvec_path: str | Path) -> None:
        np.savetxt(bval_path, self.bvals[None, :], fmt="%.6g")
        np.savetxt(bvec_path, self.bvecs.T, fmt="%.8f")


def _load_table(path: Path, what: str) -> np.ndarray:
    try:
        text = path.read_text()
    except OSError as e:
        raise DwiRejected("gradients", f"{path}: cannot read the {what} file ({e.strerror or e})") from e
    rows = [line.replace(",", " ").split() for line in text.splitlines() if line.strip()]
    if not rows:
        raise DwiRejected("gradients", f"{path}: the {what} file is empty")
    if len({len(r) for r in rows}) != 1:
        raise DwiRejected("gradients", f"{path}: the {what} file has rows of unequal length {[len(r) for r in rows]}")
    try:
        return np.array(rows, dtype=float)
    except ValueError as e:
        raise DwiRejected("gradients", f"{path}: the {what} file holds a non-number ({e})") from e


def read_gradients(bval_path: str | Path | None, bvec_path: str | Path | None, n_volumes: int,
                   b0_threshold: float) -> Gradients:
    """The checked table of an `n_volumes` DWI series, or DwiRejected naming the file and the problem."""
    if not bval_path or not bvec_path:
        raise DwiRejected("gradients", "no .bval/.bvec applies to this scan (none beside it or inherited)")
    bval_path, bvec_path = Path(bval_path), Path(bvec_path)
    notes: list[str] = []
    bvals = _load_table(bval_path, "bval")
    if 1 not in bvals.shape:
        raise DwiRejected("gradients", f"{bval_path}: expected one row or column of b-values, got {bvals.shape}")
    bvals = bvals.ravel()
    if bvals.size != n_volumes:
        raise DwiRejected("gradients", f"{bval_path}: {bvals.size} b-values for {n_volumes} volumes")
    if not np.all(np.isfinite(bvals)) or (bvals < 0).any():
        raise DwiRejected("gradients", f"{bval_path}: negative or non-finite b-values")
    bvecs = _load_table(bvec_path, "bvec")
    if bvecs.shape == (3, n_volumes):
        bvecs = bvecs.T
    elif bvecs.shape == (n_volumes, 3):
        notes.append("bvec stored as N x 3 columns")
    else:
        raise DwiRejected("gradients", f"{bvec_path}: shape {bvecs.shape} does not match 3 x {n_volumes} volumes")

    b0 = bvals <= b0_threshold
    if (b0 & (bvals > 0)).any():
        notes.append(f"b-values {sorted(set(bvals[b0 & (bvals > 0)].tolist()))} <= {b0_threshold} taken as b0")
    bvals = np.where(b0, 0.0, bvals)
    norms = np.linalg.norm(np.nan_to_num(bvecs, nan=0.0), axis=1)
    bad = ~b0 & (~np.all(np.isfinite(bvecs), axis=1) | (norms < 1e-3))
    if bad.any():
        raise DwiRejected("gradients", f"{bvec_path}: diffusion-weighted volume(s) {np.flatnonzero(bad).tolist()[:5]} "
                                       "have a zero or non-finite direction")
    if (np.abs(norms[~b0] - 1) > 0.05).any():
        notes.append("bvecs normalised to unit length")
    bvecs = np.where(b0[:, None], 0.0, np.nan_to_num(bvecs, nan=0.0))
    bvecs[~b0] /= norms[~b0, None]
    if b0.sum() == 0:
        notes.append(f"no b0 volume (lowest b = {bvals.min():g} > {b0_threshold:g})")
    return Gradients(bvals=bvals, bvecs=bvecs, b0_threshold=float(b0_threshold), notes=notes)


def rotation_of(affine: np.ndarray) -> np.ndarray:
    """The voxel-to-world rotation (directions) of an affine, zooms removed."""
    m = np.asarray(affine, float)[:3, :3]
    return m / np.linalg.norm(m, axis=0)


def fsl_to_world(vecs: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """(N, 3) vectors in the FSL frame of an image -> world (scanner RAS) unit vectors."""
    vox = np.array(vecs, float, copy=True)
    if np.linalg.det(np.asarray(affine)[:3, :3]) > 0:
        vox[..., 0] *= -1
    world = vox @ rotation_of(affine).T
    norm = np.linalg.norm(world, axis=-1, keepdims=True)
    return np.divide(world, norm, out=np.zeros_like(world), where=norm > 0)


def world_to_fsl(vecs: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Inverse of `fsl_to_world` (world unit vectors -> the image's FSL frame)."""
    vox = np.asarray(vecs, float) @ np.linalg.inv(rotation_of(affine)).T
    if np.linalg.det(np.asarray(affine)[:3, :3]) > 0:
        vox[..., 0] *= -1
    norm = np.linalg.norm(vox, axis=-1, keepdims=True)
    return np.divide(vox, norm, out=np.zeros_like(vox), where=norm > 0)


def rotate_bvecs(grad: Gradients, world_affines: np.ndarray, image_affine: np.ndarray) -> Gradients:
    """Rotate each volume's direction by the inverse of its registration's rotation, in world space.

    `world_affines` (4, 4, N) map the reference's world coordinates to each volume's (dipy's
    registration output); the resampled volume saw its gradient rotated by the inverse.
    """
    world = fsl_to_world(grad.bvecs, image_affine)
    for i in np.flatnonzero(~grad.b0_mask):
        u, _, vt = np.linalg.svd(world_affines[:3, :3, i])
        rot = u @ vt  # nearest rotation (polar decomposition)
        world[i] = rot.T @ world[i]
    bvecs = world_to_fsl(world, image_affine)
    bvecs[grad.b0_mask] = 0.0
    return Gradients(grad.bvals.copy(), bvecs, grad.b0_threshold, list(grad.notes))
