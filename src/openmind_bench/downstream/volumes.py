"""Classification cases as arrays: the pre-training preprocessing (z-score per channel over the
whole image, resampling to the run's spacing), training augmentation and the test-time centre crop
with MONAI transforms. Arrays are channel-first (C, X, Y, Z) in the file's voxel order.
(Segmentation cases are nnU-Net's: `downstream.nnunet`.)
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


def classification_augmentation(patch_size: Sequence[int]):
    """A random crop (padded first), Gaussian noise (p 0.1), brightness (0.15), contrast/gamma (0.15)
    and mirroring on every axis (0.5)."""
    from monai import transforms as mt

    patch = tuple(int(p) for p in patch_size)
    return mt.Compose([
        mt.SpatialPadd("image", spatial_size=patch),
        mt.RandSpatialCropd("image", roi_size=patch, random_size=False),
        mt.RandGaussianNoised("image", prob=0.1, std=0.1),
        mt.RandScaleIntensityd("image", factors=0.25, prob=0.15),
        mt.RandAdjustContrastd("image", prob=0.15, gamma=(0.7, 1.5)),
        mt.RandFlipd("image", prob=0.5, spatial_axis=0),
        mt.RandFlipd("image", prob=0.5, spatial_axis=1),
        mt.RandFlipd("image", prob=0.5, spatial_axis=2),
    ])


def centre_crop(image: np.ndarray, patch_size: Sequence[int]) -> torch.Tensor:
    """Classification input at test time: padded, then the centre patch (the reference protocol: 160^3 centre crop)."""
    from monai import transforms as mt

    patch = tuple(int(p) for p in patch_size)
    return torch.as_tensor(mt.Compose([mt.SpatialPad(patch), mt.CenterSpatialCrop(patch)])(image))


def augmented_sample(transform, volume: Volume, seed: int) -> dict:
    """One augmented sample; the random draws are a function of `seed` only."""
    transform.set_random_state(seed=seed % (2**32))
    out = transform({"image": torch.as_tensor(volume.image)})
    if isinstance(out, list):
        out = out[0]
    return {k: torch.as_tensor(v).as_subclass(torch.Tensor) for k, v in out.items()}
