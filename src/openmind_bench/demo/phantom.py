"""A head around the real MNI152 brain, in template space: tissue maps and contrast models.

nilearn ships the ICBM 2009a template skull-stripped, with GM/WM probability maps and a brain
mask. OpenMind's images are heads (skull, scalp, face) that are often defaced or skull-stripped,
so the demo grows skull, scalp, face and neck layers around the real brain by distance from the
brain mask. Inside the brain every contrast keeps the template's real anatomy.
"""

from __future__ import annotations

from dataclasses import dataclass

import nibabel as nib
import numpy as np
from scipy import ndimage

# Relative tissue intensities (T1w, T2w, FLAIR, PDw); brain tissue in T1w comes from the template.
CONTRAST = {
    #            csf   gm    wm    skull scalp muscle eye   lesion
    "T1w":     (0.10, 0.55, 0.80, 0.06, 0.85, 0.40, 0.08, 0.45),
    "T2w":     (1.00, 0.55, 0.35, 0.05, 0.45, 0.30, 1.00, 0.85),
    "FLAIR":   (0.06, 0.60, 0.42, 0.05, 0.50, 0.30, 0.05, 0.95),
    "PDw":     (0.90, 0.75, 0.62, 0.08, 0.70, 0.50, 0.90, 0.80),
}


@dataclass
class Head:
    """Template-space volumes (all the same grid)."""

    affine: np.ndarray
    t1_brain: np.ndarray  # real template intensities, 0 outside the brain
    gm: np.ndarray
    wm: np.ndarray
    brain: np.ndarray  # bool
    csf: np.ndarray  # probability inside the brain mask, plus the outer CSF rim
    skull: np.ndarray  # bool
    scalp: np.ndarray  # bool
    muscle: np.ndarray  # bool (face and neck soft tissue)
    eyes: np.ndarray  # bool
    head: np.ndarray  # bool: everything that is anatomy
    face: np.ndarray  # bool: the region a defacing tool removes

    @property
    def shape(self):
        return self.brain.shape


def _pad(img: nib.Nifti1Image, before: tuple[int, int, int], after: tuple[int, int, int]):
    data = np.pad(np.asarray(img.dataobj, dtype=np.float32), list(zip(before, after)))
    affine = img.affine.copy()
    affine[:3, 3] -= affine[:3, :3] @ np.asarray(before, dtype=float)
    return data, affine


def build_head(resolution: int = 2) -> Head:
    from nilearn import datasets

    vox = float(resolution)
    # room for face (anterior, +y) and neck (inferior, -z) that the brain-only template lacks
    before = (int(14 / vox), int(14 / vox), int(40 / vox))
    after = (int(14 / vox), int(34 / vox), int(12 / vox))
    t1, affine = _pad(datasets.load_mni152_template(resolution=resolution), before, after)
    gm, _ = _pad(datasets.load_mni152_gm_template(resolution=resolution), before, after)
    wm, _ = _pad(datasets.load_mni152_wm_template(resolution=resolution), before, after)
    mask, _ = _pad(datasets.load_mni152_brain_mask(resolution=resolution), before, after)
    brain = mask > 0.5
    gm, wm = np.clip(gm, 0, 1) * brain, np.clip(wm, 0, 1) * brain
    csf_in = np.clip(1.0 - gm - wm, 0, 1) * brain

    dist = ndimage.distance_transform_edt(~brain, sampling=vox)
    ii, jj, kk = np.indices(brain.shape)
    world = np.einsum("ij,jxyz->ixyz", affine[:3, :3], np.stack([ii, jj, kk]).astype(np.float32))
    world += affine[:3, 3, None, None, None]
    x, y, z = world

    cranium = dist <= 12.0
    # face: anterior-inferior ellipsoid in front of the frontal lobe, and a neck cylinder
    face_blob = ((x / 62) ** 2 + ((y - 62) / 40) ** 2 + ((z + 38) / 46) ** 2) <= 1.0
    neck = ((x / 48) ** 2 + ((y + 10) / 52) ** 2 <= 1.0) & (z < -30) & (z > -110)
    head = cranium | face_blob | neck
    head = ndimage.binary_closing(head, iterations=2) & (z > -118)
    csf_rim = (dist > 0) & (dist <= 2.5)
    skull = (dist > 2.5) & (dist <= 7.0) & head
    scalp = head & ~brain & ~csf_rim & ~skull
    eyes = (((x - 32) ** 2 + (y - 58) ** 2 + (z + 38) ** 2) <= 12**2) | (
        ((x + 32) ** 2 + (y - 58) ** 2 + (z + 38) ** 2) <= 12**2
    )
    eyes &= head & ~brain
    muscle = (face_blob | neck) & ~cranium & ~eyes
    scalp &= ~muscle & ~eyes
    # what pydeface-like tools remove: in front of and below a plane through the nasion region
    face = head & ~brain & (y > 20 + 0.9 * (z + 10)) & (z < 30)
    return Head(
        affine=affine,
        t1_brain=t1 * brain,
        gm=gm,
        wm=wm,
        brain=brain,
        csf=csf_in + csf_rim * ~brain,
        skull=skull,
        scalp=scalp,
        muscle=muscle,
        eyes=eyes,
        head=head,
        face=face,
    )


_MASKS = ("brain", "skull", "scalp", "muscle", "eyes", "head", "face")


def subject_head(base: Head, rng: np.random.Generator, max_scale: float = 0.06, displacement_mm: float = 3.0,
                 waves: int = 4, wavelength_mm: tuple[float, float] = (60.0, 120.0)) -> tuple[Head, dict]:
    """The template head with an anatomy of its own: scaled by 1 +- max_scale per axis about the
    brain's centre and warped by a smooth random displacement (per axis a sum of `waves` plane waves
    of random direction, phase and wavelength in `wavelength_mm`, at most `displacement_mm` long).
    Returns the head and what was drawn (for the ground truth)."""
    vox = float(np.sqrt((base.affine[:3, :3] ** 2).sum(0)).mean())
    scale = 1.0 + rng.uniform(-max_scale, max_scale, 3)
    centre = np.array(ndimage.center_of_mass(base.brain), np.float32)
    axes = [np.arange(n, dtype=np.float32) for n in base.shape]
    coords = []
    for a in range(3):
        disp = np.zeros(base.shape, np.float32)
        for _ in range(waves):
            direction = rng.standard_normal(3)
            k = (direction / np.linalg.norm(direction) * 2 * np.pi * vox / rng.uniform(*wavelength_mm)).astype(np.float32)
            phase = np.float32(rng.uniform(0, 2 * np.pi))
            arg = (k[0] * axes[0] + phase)[:, None, None] + (k[1] * axes[1])[None, :, None] + (k[2] * axes[2])[None, None, :]
            disp += np.sin(arg, out=arg)
        disp *= (displacement_mm / vox) / max(float(np.abs(disp).max()), 1e-6)
        shape = [1, 1, 1]
        shape[a] = -1
        coords.append(centre[a] + (axes[a].reshape(shape) - centre[a]) / scale[a] + disp)
    coords = np.stack(coords).astype(np.float32)

    def warp(v, order):
        return ndimage.map_coordinates(v, coords, order=order, mode="constant", cval=0)

    packed = np.zeros(base.shape, np.uint8)  # the boolean maps, one bit each: a single nearest-neighbour warp
    for bit, name in enumerate(_MASKS):
        packed |= getattr(base, name).astype(np.uint8) << bit
    packed = warp(packed, 0)
    masks = {name: ((packed >> bit) & 1).astype(bool) for bit, name in enumerate(_MASKS)}
    head = Head(affine=base.affine, t1_brain=warp(base.t1_brain, 1) * masks["brain"],
                gm=np.clip(warp(base.gm, 1), 0, 1) * masks["brain"], wm=np.clip(warp(base.wm, 1), 0, 1) * masks["brain"],
                csf=np.clip(warp(base.csf, 1), 0, 1), **masks)
    return head, {"scale": [round(float(v), 4) for v in scale], "displacement_mm": displacement_mm}


def lesion_map(head: Head, rng: np.random.Generator, n: int) -> np.ndarray:
    """Small smooth white-matter hyperintensities (as in a patient cohort)."""
    out = np.zeros(head.shape, np.float32)
    candidates = np.argwhere(head.wm > 0.9)
    if n == 0 or len(candidates) == 0:
        return out
    for centre in candidates[rng.choice(len(candidates), size=n, replace=False)]:
        blob = np.zeros(head.shape, np.float32)
        blob[tuple(centre)] = 1.0
        out += ndimage.gaussian_filter(blob, sigma=rng.uniform(1.0, 2.0))
    return np.clip(out / max(out.max(), 1e-6), 0, 1) * (head.wm > 0.5)


def contrast_image(head: Head, modality: str, lesions: np.ndarray, rng: np.random.Generator,
                   lesion_intensity: float | None = None) -> np.ndarray:
    """`modality`'s contrast of the head with `lesions` (in [0, 1]) at CONTRAST's lesion intensity,
    or `lesion_intensity` where given."""
    csf, gm, wm, skull, scalp, muscle, eye, lesion = CONTRAST[modality]
    lesion = lesion if lesion_intensity is None else float(lesion_intensity)
    if modality == "T1w":
        brain = head.t1_brain / max(head.t1_brain.max(), 1e-6)
    else:
        # keep the real anatomy: tissue probabilities of the template, not labels
        brain = (head.csf * csf + head.gm * gm + head.wm * wm) * head.brain
    img = brain + head.csf * (~head.brain) * csf
    img = img * (1 - lesions) + lesions * lesion
    texture = ndimage.gaussian_filter(rng.standard_normal(head.shape).astype(np.float32), 1.5)
    soft = scalp * head.scalp + muscle * head.muscle + eye * head.eyes + skull * head.skull
    img = img + soft * (1 + 0.15 * texture)
    return np.clip(img, 0, None).astype(np.float32)


def tensor_fields(head: Head) -> dict[str, np.ndarray]:
    """Diffusion tensor of each voxel as principal direction and eigenvalues (mm^2/s)."""
    # WM fibres run along the WM sheet: principal direction orthogonal to the WM gradient
    grad = np.stack(np.gradient(ndimage.gaussian_filter(head.wm, 2.0)), axis=-1)
    e1 = np.cross(grad, np.array([0.0, 0.0, 1.0], np.float32))
    norm = np.linalg.norm(e1, axis=-1, keepdims=True)
    e1 = np.where(norm > 1e-6, e1 / np.maximum(norm, 1e-6), np.array([1.0, 0.0, 0.0], np.float32))
    md = (0.8e-3 * head.gm + 3.0e-3 * head.csf + 0.75e-3 * head.wm).astype(np.float32)
    md = np.where(head.brain | (head.csf > 0), md, 1.0e-3)
    anis = np.clip(head.wm, 0, 1) * 0.7  # FA-like weight
    return {"e1_x": e1[..., 0], "e1_y": e1[..., 1], "e1_z": e1[..., 2],
            "lam_par": md * (1 + 2 * anis), "lam_perp": md * (1 - anis)}


def dwi_signal(s0: np.ndarray, fields: dict[str, np.ndarray], bvals: np.ndarray, bvecs: np.ndarray) -> np.ndarray:
    """S0 * exp(-b g^T D g) on the grid of `s0` and `fields`; (x, y, z, n) float32."""
    e1 = np.stack([fields["e1_x"], fields["e1_y"], fields["e1_z"]], axis=-1)
    e1 /= np.maximum(np.linalg.norm(e1, axis=-1, keepdims=True), 1e-6)
    lam_par, lam_perp = fields["lam_par"], fields["lam_perp"]
    out = np.empty(s0.shape + (len(bvals),), np.float32)
    for n, (b, g) in enumerate(zip(bvals, bvecs.T)):
        g = g / np.linalg.norm(g) if np.linalg.norm(g) > 0 else g
        cos2 = np.clip(e1 @ g.astype(np.float32), -1, 1) ** 2
        out[..., n] = s0 * np.exp(-b * (lam_perp + (lam_par - lam_perp) * cos2))
    return out
