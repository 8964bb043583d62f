"""VolumeFusion (Wang et al.; nnssl `volume_fusion/`): two images are mixed voxel-wise with one of
5 fusion levels {0, .25, .5, .75, 1}: every voxel starts at level 0, then 10-39 random boxes of side
U[8, 0.625 x patch side] per axis are painted with a random level each; fused = a * A + (1 - a) * B.
The network segments the level map (5 classes) with Dice (background included, per sample) + CE.

Views (nnssl `VolumeFusionTrainer.py`): the loader reads the centre crop of each image
(`LOADER_SAMPLING = "centre"`, nnssl's `nnsslCenterCropDataLoader3D`), and in training every image is
augmented on its own before the mix (noise p 0.1, blur 0.2, brightness 0.15, contrast 0.15, low
resolution 0.25, inverted gamma 0.1 / gamma 0.3, mirror on each axis p 0.5; no rotation), with the
SimCLR pipeline's implementation (`views.augment`); validation mixes the plain crops, as nnssl.

Partners: nnssl's loader doubles the batch and mixes its halves; here sample i is mixed with sample
i + 1 (cyclically) of the same local batch, so every sample is once foreground and once background
and the batch keeps its size; with a local batch of one the partner is the sample mirrored on all
axes. The level head is a 1^3 convolution of our own on the decoder's last features (a patch decoder
on Primus), so the backbone keeps its 1-channel head and loads into the plain architecture.
Box sides scale with the patch (the lower bound `min_box_size` stays in voxels; small configs lower it).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from openmind_bench.ssl import features, views

# The method makes its own views: no spatial augmentation in the loader, which reads centre crops.
LOADER_AUGMENTATION = False
LOADER_SAMPLING = "centre"

# nnssl VolumeFusionTrainer.get_training_transforms: the SimCLR pipeline's transforms and values,
# except low resolution p 0.25 and no rot90.
AUGMENTATION = {**views.AUGMENTATION, "lowres_p": 0.25, "rot90_p": 0.0}
_TAG_AUGMENT = 32

DEFAULTS = {
    "levels": [0.0, 0.25, 0.5, 0.75, 1.0],
    "n_boxes": [10, 40],
    "min_box_size": 8,
    "max_box_fraction": 0.625,
    "dice_smooth": 1.0e-5,
}


def draw_boxes(seed: int, patch: Sequence[int], n_boxes: Sequence[int], min_box: int, max_fraction: float,
               n_levels: int) -> list[tuple[list[int], list[int], int]]:
    """[(start, size, level)] of one sample: U[n_boxes[0], n_boxes[1]) boxes."""
    r = views.rng(seed, 31)
    out = []
    for _ in range(int(r.integers(n_boxes[0], n_boxes[1]))):
        size = [int(r.integers(min(min_box, p), max(min(min_box, p), int(max_fraction * p)) + 1)) for p in patch]
        start = [int(r.integers(0, p - s + 1)) for p, s in zip(patch, size)]
        out.append((start, size, int(r.integers(0, n_levels))))
    return out


def level_map(boxes, patch: Sequence[int], device) -> torch.Tensor:
    """(*patch) long: the level index of every voxel (later boxes paint over earlier ones)."""
    labels = torch.zeros(tuple(patch), dtype=torch.long, device=device)
    for start, size, level in boxes:
        labels[start[0]:start[0] + size[0], start[1]:start[1] + size[1], start[2]:start[2] + size[2]] = level
    return labels


def soft_dice_loss(logits: torch.Tensor, labels: torch.Tensor, smooth: float) -> torch.Tensor:
    """nnU-Net's SoftDice with background, per sample and class (no batch Dice): -mean Dice."""
    probs = torch.softmax(logits.float(), 1)
    onehot = F.one_hot(labels, logits.shape[1]).permute(0, 4, 1, 2, 3).to(probs.dtype)
    dims = (2, 3, 4)
    intersect = (probs * onehot).sum(dims)
    denominator = probs.sum(dims) + onehot.sum(dims)
    return -((2 * intersect + smooth) / (denominator + smooth).clamp_min(1e-8)).mean()


class VolumeFusion(nn.Module):
    views_on_device = True

    def __init__(self, backbone: nn.Module, patch_size: Sequence[int], *, anon_aware: bool, levels, n_boxes,
                 min_box_size: int, max_box_fraction: float, dice_smooth: float):
        super().__init__()
        if anon_aware:
            raise ValueError("volume_fusion has no anonymisation-aware ('_anon') variant")
        self.backbone = backbone
        self.patch_size = tuple(int(p) for p in patch_size)
        self.levels = [float(v) for v in levels]
        self.n_boxes = (int(n_boxes[0]), int(n_boxes[1]))
        if not 0 <= self.n_boxes[0] < self.n_boxes[1]:
            raise ValueError(f"volume_fusion n_boxes {list(n_boxes)} must be [low, high) with 0 <= low < high")
        self.min_box, self.max_fraction, self.smooth = int(min_box_size), float(max_box_fraction), float(dice_smooth)
        grid = None
        if features.family_of(backbone) == "transformer":
            token = backbone.down_projection.proj.kernel_size
            grid = [p // t for p, t in zip(self.patch_size, token)]
        self.head = features.DenseHead(backbone, len(self.levels), grid)

    def make_view(self, batch: dict, seeds: Sequence[int]) -> dict:
        image = batch["image"]
        if self.training:
            image = torch.stack([views.augment_crop(x, (seed, _TAG_AUGMENT), AUGMENTATION)
                                 for x, seed in zip(image, seeds)])
        b = image.shape[0]
        partner = torch.roll(image, shifts=-1, dims=0) if b > 1 else torch.flip(image, (2, 3, 4))
        levels = torch.tensor(self.levels, device=image.device, dtype=image.dtype)
        labels = torch.stack([
            level_map(draw_boxes(seed, self.patch_size, self.n_boxes, self.min_box, self.max_fraction,
                                 len(self.levels)), self.patch_size, image.device)
            for seed in seeds
        ])
        alpha = levels[labels][:, None]
        return {"input": alpha * image + (1 - alpha) * partner, "labels": labels}

    def forward(self, view: dict) -> torch.Tensor:
        logits = self.head(self.backbone, features.encode(self.backbone, view["input"]))
        ce = F.cross_entropy(logits.float(), view["labels"])
        return ce + soft_dice_loss(logits, view["labels"], self.smooth)


def build(backbone: nn.Module, arch_kwargs: dict, patch_size: Sequence[int], *, anon_aware: bool,
          **settings) -> VolumeFusion:
    return VolumeFusion(backbone, patch_size, anon_aware=anon_aware, **settings)
