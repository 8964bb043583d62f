"""Views for the two-view methods (SimCLR, Barlow Twins, VICReg): two overlapping crops of one
region, each augmented on its own as nnssl's SimCLR transform does, plus the crop/box helpers the
other contrastive methods share.

The loader delivers the region; the crops and augmentations run in torch on the tensor's device
(the training GPU: the engine hands these methods the batch already moved there), with every random
parameter drawn on the CPU from the sample's seed, so DDP and resumed runs draw the same views.

nnssl (`ssl_data/dataloading/simclr_transform.py`, the batchgenerators transforms it builds), per
crop: Gaussian noise p 0.1 (std U(0, 0.1)); blur p 0.2 then each channel p 0.5 (sigma 0.5-1);
multiplicative brightness x[0.75, 1.25] p 0.15; contrast x[0.75, 1.25] p 0.15 (range preserved);
low resolution p 0.1 then each channel p 0.5 (zoom 0.5-1, nearest down; nnssl upsamples with cubic
splines, torch has trilinear only); gamma (0.7, 1.5) inverted p 0.1 / normal p 0.3, statistics
kept; mirror on each axis p 0.5; rot90 p 0.3 by 90, 180 or 270 degrees in axes (0, 1)
(batchgenerators' `Rot90Transform` defaults). Brightness, contrast and gamma draw one factor for all
channels (batchgenerators one per channel; the same for the single-channel pre-training data).
nnssl's SimCLR trainer cuts 2 such crop pairs from each region (`num_crops_per_image`), each pair
a positive and every other crop a negative: `pairs_per_image`.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from openmind_bench.ssl import features

# nnssl's SimCLRTransform (ssl_data/dataloading/simclr_transform.py:88-124) with batchgenerators'
# defaults where it passes none (noise std, contrast range, mirror 0.5 per axis, rot90 p 0.3 and k).
AUGMENTATION = {
    "noise_p": 0.1, "noise_std": (0.0, 0.1),
    "blur_p": 0.2, "blur_p_per_channel": 0.5, "blur_sigma": (0.5, 1.0),
    "brightness_p": 0.15, "brightness": (0.75, 1.25),
    "contrast_p": 0.15, "contrast": (0.75, 1.25),
    "lowres_p": 0.1, "lowres_p_per_channel": 0.5, "lowres_zoom": (0.5, 1.0),
    "gamma_inverted_p": 0.1, "gamma_p": 0.3, "gamma": (0.7, 1.5),
    "mirror_p": 0.5, "rot90_p": 0.3, "rot90_k": (1, 2, 3), "rot90_axes": (0, 1),
}


def rng(seed: int, tag: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(tag)])


def overlapping_starts(r: np.random.Generator, region: Sequence[int], crop: Sequence[int],
                       min_overlap: float) -> tuple[list[int], list[int]]:
    """Two crop corners inside `region` whose crops overlap by at least `min_overlap` x crop per axis."""
    first, second = [], []
    for size, c in zip(region, crop):
        if c > size:
            raise ValueError(f"crop {list(crop)} is larger than the region {list(region)}")
        a = int(r.integers(0, size - c + 1))
        shift = int(math.floor((1.0 - min_overlap) * c))
        b = int(r.integers(max(0, a - shift), min(size - c, a + shift) + 1))
        first.append(a)
        second.append(b)
    return first, second


def crop(x: torch.Tensor, start: Sequence[int], size: Sequence[int]) -> torch.Tensor:
    """x[..., start:start+size] over the last three axes."""
    return x[..., start[0]:start[0] + size[0], start[1]:start[1] + size[1], start[2]:start[2] + size[2]]


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (C, X, Y, Z) with edge padding."""
    radius = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(x.dtype)
    out = x[None]
    for axis in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[axis + 2] = kernel.numel()
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = radius
        c = out.shape[1]
        out = F.conv3d(F.pad(out, pad, mode="replicate"), kernel.view(shape).expand(c, 1, *shape[2:]), groups=c)
    return out[0]


def low_resolution(x: torch.Tensor, zoom: float) -> torch.Tensor:
    """One channel (X, Y, Z) down-sampled by `zoom` (nearest) and brought back to its size (trilinear)."""
    size = x.shape
    small = [max(1, int(round(s * zoom))) for s in size]
    return F.interpolate(F.interpolate(x[None, None], size=small, mode="nearest"), size=size, mode="trilinear",
                         align_corners=False)[0, 0]


def augment(x: torch.Tensor, r: np.random.Generator, generator: torch.Generator | None,
            p: dict = AUGMENTATION) -> torch.Tensor:
    """One crop (C, X, Y, Z) augmented as nnssl's SimCLR transform; parameters from `r`."""
    if r.random() < p["noise_p"]:
        std = float(r.uniform(*p["noise_std"]))
        x = x + std * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    if r.random() < p["blur_p"]:
        x = torch.stack([gaussian_blur(c[None], float(r.uniform(*p["blur_sigma"])))[0]
                         if r.random() < p["blur_p_per_channel"] else c for c in x])
    if r.random() < p["brightness_p"]:
        x = x * float(r.uniform(*p["brightness"]))
    if r.random() < p["contrast_p"]:
        lo, hi, mean = x.amin(), x.amax(), x.mean()
        x = ((x - mean) * float(r.uniform(*p["contrast"])) + mean).clamp(lo, hi)
    if r.random() < p["lowres_p"]:
        x = torch.stack([low_resolution(c, float(r.uniform(*p["lowres_zoom"])))
                         if r.random() < p["lowres_p_per_channel"] else c for c in x])
    for inverted, prob in ((True, p["gamma_inverted_p"]), (False, p["gamma_p"])):
        if r.random() < prob:
            low, high = p["gamma"]
            g = float(r.uniform(low, 1.0) if r.random() < 0.5 and low < 1 else r.uniform(max(low, 1.0), high))
            y = -x if inverted else x
            mean, std = y.mean(), y.std()
            lo, span = y.amin(), (y.amax() - y.amin()).clamp_min(1e-7)
            y = ((y - lo) / span).pow(g) * span + lo
            y = (y - y.mean()) / y.std().clamp_min(1e-7) * std + mean  # retain stats, as nnU-Net
            x = -y if inverted else y
    flips = [axis + 1 for axis in range(3) if r.random() < p["mirror_p"]]
    if flips:
        x = torch.flip(x, flips)
    if r.random() < p["rot90_p"]:
        a, b = p["rot90_axes"]
        k = int(r.choice(p["rot90_k"]))
        if x.shape[a + 1] == x.shape[b + 1]:
            x = torch.rot90(x, k, dims=(a + 1, b + 1))
    return x


def device_generator(seed: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(int(seed) % (2**63))


def augment_crop(x: torch.Tensor, key: Sequence[int], p: dict = AUGMENTATION) -> torch.Tensor:
    """`augment` with every parameter from the stream `key` (e.g. (sample seed, tag, crop index)): each
    crop of a view draws its own, as batchgenerators draws per sample of the batch of crops."""
    r = np.random.default_rng([int(k) for k in key])
    return augment(x, r, device_generator(int(r.integers(2**62)), x.device), p)


def two_views(image: torch.Tensor, seeds: Sequence[int], crop_size: Sequence[int], min_overlap: float,
              augmentation: bool = True, pairs_per_image: int = 1) -> torch.Tensor:
    """(2 B P, C, *crop) for P pairs per sample: the first crops of every pair (sample-major), then
    the second ones in the same order."""
    region = image.shape[2:]
    first, second = [], []
    for i, seed in enumerate(seeds):
        r = rng(seed, 11)
        for _ in range(int(pairs_per_image)):
            a, b = overlapping_starts(r, region, crop_size, min_overlap)
            g = device_generator(int(r.integers(2**62)), image.device)
            views = []
            for start in (a, b):
                v = crop(image[i], start, crop_size)
                views.append(augment(v, r, g) if augmentation else v)
            first.append(views[0])
            second.append(views[1])
    return torch.stack(first + second).contiguous()


# The view pipeline and projector shared by SimCLR, Barlow Twins and VICReg (nnssl's SimCLR values);
# each method's DEFAULTS adds its loss weights to these.
TWO_VIEW_DEFAULTS = {
    "region_size": [192, 192, 64],
    "crop_size": [64, 64, 64],
    "min_overlap": 0.5,
    "pairs_per_image": 2,  # nnssl simCLR/simCLRTrainer.py:65 num_crops_per_image
    "projector_dims": [2048, 2048, 2048],
    "grad_clip": {"cnn": 0.1},
}


class TwoViewMethod(nn.Module):
    """Two overlapping crops of the loader's region, one encoder, a projector MLP over all encoder
    stages pooled and concatenated (the token mean on Primus), and `pair_loss` on the two embeddings
    (SimCLR, Barlow Twins and VICReg differ only there)."""

    views_on_device = True

    def __init__(self, backbone: nn.Module, *, pair_loss: Callable, crop_size: Sequence[int],
                 region_size: Sequence[int], min_overlap: float, pairs_per_image: int, projector_dims: Sequence[int],
                 anon_aware: bool, name: str):
        super().__init__()
        self.pair_loss = pair_loss
        if anon_aware:
            raise ValueError(f"{name} has no anonymisation-aware ('_anon') variant")
        self.backbone = backbone
        self.crop_size = tuple(int(c) for c in crop_size)
        self.region_size = tuple(int(c) for c in region_size)
        if any(c > r for c, r in zip(self.crop_size, self.region_size)):
            raise ValueError(f"{name}: crop_size {list(crop_size)} is larger than region_size {list(region_size)}")
        self.min_overlap = float(min_overlap)
        self.pairs_per_image = int(pairs_per_image)
        if self.pairs_per_image < 1:
            raise ValueError(f"{name}: pairs_per_image must be >= 1, got {pairs_per_image}")
        self.projector = features.mlp([features.pooled_width(backbone), *projector_dims])

    def make_view(self, batch: dict, seeds: Sequence[int]) -> dict:
        return {"views": two_views(batch["image"], seeds, self.crop_size, self.min_overlap,
                                   pairs_per_image=self.pairs_per_image)}

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(features.pool(features.encode(self.backbone, x)))

    def forward(self, view: dict) -> torch.Tensor:
        z = self.embed(view["views"])
        z1, z2 = z.chunk(2)
        return self.pair_loss(z1, z2)


def sizes(settings: dict, patch_size: Sequence[int]) -> tuple[list[int], list[int]]:
    """(loader patch, network patch) of a two-view method: the region, and the crop the network sees."""
    return [int(v) for v in settings["region_size"]], [int(v) for v in settings["crop_size"]]
