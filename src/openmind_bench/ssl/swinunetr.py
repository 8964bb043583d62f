"""SwinUNETR-style pre-training (Tang et al.; nnssl `swinunetr_pretrain/`, `swinunetr_loss.py`) on our
backbones: two views of each patch, each rotated by k x 90 degrees in axes (0, 1) (k in 0..3) and
then cut out: boxes of side up to 25% of the patch side filled with Gaussian noise, covering up to
30% of the voxels. Heads on the pooled bottleneck (the deepest stage / the token mean on Primus):
rotation (4 classes, cross-entropy) and contrastive (512-d, NT-Xent at temperature 0.5 over all DDP
ranks); in-painting: the backbone's own full output (the U-Net decoder / Primus' patch decoder)
reconstructs the rotated clean view, L1. Weights 1/1/1; gradient clipping 12 on the CNN (nnssl).

Departures: nnssl's reconstruction head sits on the bottleneck tokens; ours is the backbone's own
decoder (skips included), which keeps these weights useful to fine-tuning. nnssl's optional swap of
cut-outs with another sample is left out.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from openmind_bench.nets import primus
from openmind_bench.ssl import features, views

# The method makes its own views: no spatial augmentation in the loader.
LOADER_AUGMENTATION = False

DEFAULTS = {
    "max_cutout_fraction": 0.3,
    "max_box_fraction": 0.25,
    "contrastive_dim": 512,
    "temperature": 0.5,
    "weights": [1.0, 1.0, 1.0],  # rotation, contrastive, in-painting
    "grad_clip": {"cnn": 12.0},
}


def cutout_boxes(r: np.random.Generator, patch: Sequence[int], max_fraction: float, max_box: float):
    """Boxes (start, size) whose volumes add up to at most a U(0, max_fraction) share of the patch
    (so the covered share, overlaps counted once, never exceeds `max_fraction`)."""
    total = float(np.prod(patch))
    budget = float(r.uniform(0.0, max_fraction)) * total
    boxes, used = [], 0.0
    for _ in range(200):
        size = [int(r.integers(1, max(1, int(max_box * p)) + 1)) for p in patch]
        volume = float(np.prod(size))
        if used + volume > budget:
            break
        start = [int(r.integers(0, p - s + 1)) for p, s in zip(patch, size)]
        boxes.append((start, size))
        used += volume
    return boxes


class SwinUNETRStyle(nn.Module):
    views_on_device = True

    def __init__(self, backbone: nn.Module, patch_size: Sequence[int], *, anon_aware: bool,
                 max_cutout_fraction: float, max_box_fraction: float, contrastive_dim: int, temperature: float,
                 weights: Sequence[float]):
        super().__init__()
        if anon_aware:
            raise ValueError("swinunetr has no anonymisation-aware ('_anon') variant")
        self.backbone = backbone
        self.patch_size = tuple(int(p) for p in patch_size)
        if self.patch_size[0] != self.patch_size[1]:
            raise ValueError(f"swinunetr rotates in axes (0, 1): the patch {list(patch_size)} must be square there")
        self.max_cutout, self.max_box = float(max_cutout_fraction), float(max_box_fraction)
        self.temperature = float(temperature)
        self.weights = [float(w) for w in weights]
        width = features.bottleneck_width(backbone)
        self.rotation_head = nn.Linear(width, 4)
        self.contrastive_head = nn.Linear(width, int(contrastive_dim))
        self.family = features.family_of(backbone)
        if self.family == "transformer":
            token = backbone.down_projection.proj.kernel_size
            self.grid = tuple(p // t for p, t in zip(self.patch_size, token))

    def make_view(self, batch: dict, seeds: Sequence[int]) -> dict:
        image = batch["image"]
        inputs, targets, rotations = [], [], []
        for view in range(2):
            for i, seed in enumerate(seeds):
                r = views.rng(seed, 41 + view)
                k = int(r.integers(0, 4))
                clean = torch.rot90(image[i], k, dims=(1, 2))
                corrupted = clean.clone()
                g = views.device_generator(int(r.integers(2**62)), image.device)
                for start, size in cutout_boxes(r, self.patch_size, self.max_cutout, self.max_box):
                    region = (slice(None),) + tuple(slice(s, s + n) for s, n in zip(start, size))
                    corrupted[region] = torch.randn(corrupted[region].shape, generator=g, device=image.device,
                                                    dtype=image.dtype)
                inputs.append(corrupted)
                targets.append(clean)
                rotations.append(k)
        return {
            "input": torch.stack(inputs),
            "target": torch.stack(targets),
            "rotation": torch.tensor(rotations, dtype=torch.long, device=image.device),
        }

    def forward(self, view: dict) -> torch.Tensor:
        feats = features.encode(self.backbone, view["input"])
        if self.family == "transformer":
            reconstruction = primus.decode_tokens(self.backbone, feats[0], self.grid)
        else:
            reconstruction = self.backbone.decoder(feats)
        pooled = features.pool_bottleneck(feats)
        rotation = F.cross_entropy(self.rotation_head(pooled).float(), view["rotation"])
        z1, z2 = self.contrastive_head(pooled).chunk(2)
        contrastive = features.nt_xent(z1, z2, self.temperature)
        inpainting = (reconstruction.float() - view["target"].float()).abs().mean()
        w = self.weights
        return w[0] * rotation + w[1] * contrastive + w[2] * inpainting


def build(backbone: nn.Module, arch_kwargs: dict, patch_size: Sequence[int], *, anon_aware: bool,
          grad_clip=None, **settings) -> SwinUNETRStyle:
    return SwinUNETRStyle(backbone, patch_size, anon_aware=anon_aware, **settings)
