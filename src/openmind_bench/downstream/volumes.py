"""Classification cases as arrays: the pre-training preprocessing (z-score per channel over the
whole image, resampling to the run's spacing), the reference's training augmentation
(batchgeneratorsv2) and the test-time centre crop (MONAI). Arrays are channel-first (C, X, Y, Z)
in the file's voxel order. (Segmentation cases are nnU-Net's: `downstream.nnunet`.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from openmind_bench.downstream.readers import Case


@dataclass
class Volume:
    case_id: str
    image: np.ndarray  # (C, X, Y, Z) float32, z-scored, at the run's spacing
    target: int | None  # class index
    native_shape: tuple[int, ...]
    native_spacing: tuple[float, ...]


def resampled_shape(shape: Sequence[int], spacing: Sequence[float], target: Sequence[float] | None) -> tuple[int, ...]:
    if target is None:
        return tuple(int(s) for s in shape)
    return tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, target))


def resize(array: np.ndarray | torch.Tensor, shape: Sequence[int], mode: str) -> torch.Tensor:
    """(C, X, Y, Z) -> (C, *shape); `trilinear` for intensities, `nearest` for labels."""
    tensor = torch.as_tensor(array)
    if tuple(tensor.shape[1:]) == tuple(shape):
        return tensor
    kwargs = {"align_corners": False} if mode == "trilinear" else {}
    return torch.nn.functional.interpolate(tensor[None].float(), size=tuple(int(s) for s in shape), mode=mode,
                                           **kwargs)[0]


def zscore(image: np.ndarray) -> np.ndarray:
    """Per channel over the whole image (nnssl's pre-training normalisation)."""
    out = np.empty_like(image, dtype=np.float32)
    for c, channel in enumerate(image):
        std = float(channel.std())
        out[c] = (channel - channel.mean()) / (std if std > 1e-8 else 1.0)
    return out


def load_case(case: Case, spacing: Sequence[float] | None) -> Volume:
    """Read, normalise and resample one case (`spacing` None: keep the native grid)."""
    import nibabel as nib

    channels, native_spacing, shape = [], None, None
    for path in case.images:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj, dtype=np.float32)
        if data.ndim == 4 and data.shape[3] == 1:
            data = data[..., 0]
        if not np.isfinite(data).all():
            raise ValueError(f"{path}: image holds NaN or Inf values")
        channels.append(data)
        native_spacing = tuple(float(z) for z in img.header.get_zooms()[:3])
        shape = data.shape
    image = zscore(np.stack(channels))
    target_shape = resampled_shape(shape, native_spacing, spacing)
    image = resize(image, target_shape, "trilinear").numpy().astype(np.float32)
    return Volume(case.case_id, image, case.target, tuple(shape), native_spacing)


# SSL3D_classification's training transforms (`augmentation/policies/batchgenerators.py`, the data
# configs' `rotation_for_DA: 0.523599`, `mirror_axes: [0, 1, 2]`). The rotation is the scalar it
# passes: a rotated sample turns by exactly 30 degrees about every axis (nnU-Net draws from +-30).
ROTATION_RAD = 0.523599
MIRROR_AXES = (0, 1, 2)


def classification_augmentation(patch_size: Sequence[int]):
    """nnU-Net-style augmentation from batchgeneratorsv2 with the reference's values: a centre crop
    to `patch_size` (rotation p 0.2, isotropic scaling 0.7-1.4 p 0.2, no elastic deformation), then
    Gaussian noise (p 0.1), blur (0.2), brightness (0.15), contrast (0.15), low resolution (0.25),
    inverted gamma (0.1), gamma (0.3) and mirroring on every axis."""
    from batchgeneratorsv2.transforms.intensity.brightness import MultiplicativeBrightnessTransform
    from batchgeneratorsv2.transforms.intensity.contrast import BGContrast, ContrastTransform
    from batchgeneratorsv2.transforms.intensity.gamma import GammaTransform
    from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform
    from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform
    from batchgeneratorsv2.transforms.spatial.low_resolution import SimulateLowResolutionTransform
    from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
    from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
    from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
    from batchgeneratorsv2.transforms.utils.random import RandomTransform

    patch = tuple(int(p) for p in patch_size)
    return ComposeTransforms([
        SpatialTransform(patch, patch_center_dist_from_border=0, random_crop=False, p_elastic_deform=0,
                         p_rotation=0.2, rotation=ROTATION_RAD, p_scaling=0.2, scaling=(0.7, 1.4),
                         p_synchronize_scaling_across_axes=1, bg_style_seg_sampling=False),
        RandomTransform(GaussianNoiseTransform(noise_variance=(0, 0.1), p_per_channel=1, synchronize_channels=True),
                        apply_probability=0.1),
        # benchmark=False: the reference times FFT against convolution per shape and keeps the faster,
        # which makes the blurred values depend on the machine's timings
        RandomTransform(GaussianBlurTransform(blur_sigma=(0.5, 1.0), synchronize_channels=False,
                                              synchronize_axes=False, p_per_channel=0.5, benchmark=False),
                        apply_probability=0.2),
        RandomTransform(MultiplicativeBrightnessTransform(multiplier_range=BGContrast((0.75, 1.25)),
                                                          synchronize_channels=False, p_per_channel=1),
                        apply_probability=0.15),
        RandomTransform(ContrastTransform(contrast_range=BGContrast((0.75, 1.25)), preserve_range=True,
                                          synchronize_channels=False, p_per_channel=1),
                        apply_probability=0.15),
        RandomTransform(SimulateLowResolutionTransform(scale=(0.5, 1), synchronize_channels=False,
                                                       synchronize_axes=True, ignore_axes=None, allowed_channels=None,
                                                       p_per_channel=0.5),
                        apply_probability=0.25),
        RandomTransform(GammaTransform(gamma=BGContrast((0.7, 1.5)), p_invert_image=1, synchronize_channels=False,
                                       p_per_channel=1, p_retain_stats=1),
                        apply_probability=0.1),
        RandomTransform(GammaTransform(gamma=BGContrast((0.7, 1.5)), p_invert_image=0, synchronize_channels=False,
                                       p_per_channel=1, p_retain_stats=1),
                        apply_probability=0.3),
        MirrorTransform(allowed_axes=MIRROR_AXES),
    ])


def centre_crop(image: np.ndarray, patch_size: Sequence[int]) -> torch.Tensor:
    """Classification input at test time: padded, then the centre patch (the reference protocol: 160^3 centre crop)."""
    from monai import transforms as mt

    patch = tuple(int(p) for p in patch_size)
    return torch.as_tensor(mt.Compose([mt.SpatialPad(patch), mt.CenterSpatialCrop(patch)])(image))


def augmented_sample(transform, volume: Volume, seed: int) -> dict:
    """One augmented sample; the random draws are a function of `seed` only (batchgeneratorsv2 draws
    from numpy's and torch's global generators: both are seeded here and restored afterwards)."""
    numpy_state = np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed % (2**63))
            np.random.seed(seed % (2**32))
            # a copy: batchgeneratorsv2 changes views of its input in place (the crop of an unrotated
            # sample is a view), which would alter the case kept in memory for the next epoch
            out = transform(image=torch.tensor(volume.image, dtype=torch.float32))
    finally:
        np.random.set_state(numpy_state)
    return {"image": out["image"].contiguous()}
