"""SwinUNETR-style pre-training (Tang et al.; nnssl `swinunetr_pretrain/`, `swin_unetr_transform.py`,
`swinunetr_loss.py`) on our backbones. Views, as nnssl's transform: two views of each patch; each is
rotated by k x 90 degrees (k in 0..3) in spatial axes (1, 2) (nnssl `np.rot90(x, k, (2, 3))` on
(C, X, Y, Z), as the MONAI original), then cut out: boxes with sides of 5-25% of the patch side
(clipped at the border) filled with N(0, 1) noise rescaled to [0, 1] per box, until they cover a
U(0, 30%) share of the voxels (the last box may pass it); then a random sample of the local batch is
drawn as partner, and when it is another sample a second set of boxes (its own share) takes that
sample's voxels (its current view: cut out already when it comes earlier in the batch).

Heads, as nnssl's `swinunetr_architecture.py`: the bottleneck (the deepest stage / the Primus tokens)
flattened to tokens in (x y z) order; rotation (4 classes, cross-entropy) reads token 0 and the
contrastive head (512-d, NT-Xent at temperature 0.5 over this rank's batch; `gather_negatives: true`
takes all ranks') token 1 (`head_tokens: null` pools the bottleneck for both instead); in-painting:
the backbone's own full output (the U-Net decoder / Primus' patch decoder) reconstructs the rotated
clean view, L1. Weights 1/1/1; gradient clipping 12 on the CNN (nnssl).

Departure: nnssl's reconstruction head is a stack of convolutions and upsamplings on the bottleneck;
ours is the backbone's own decoder (skips included), which keeps these weights useful to fine-tuning.
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

# Spatial axes of (X, Y, Z) the rotations turn (nnssl: array axes (2, 3) of (C, X, Y, Z)).
ROTATION_AXES = (1, 2)

# On a Primus the reconstruction runs through the up-projection: every parameter gets a gradient.
TRAINS_PRIMUS_UP_PROJECTION = True

DEFAULTS = {
    "max_cutout_fraction": 0.3,
    "max_box_fraction": 0.25,
    "min_box_fraction": 0.05,  # nnssl patch_rand_drop's tolr
    "contrastive_dim": 512,
    "temperature": 0.5,
    "gather_negatives": False,  # nnssl: negatives from the rank's own batch
    "head_tokens": [0, 1],  # bottleneck tokens of the rotation and contrastive heads; null = pooled
    "weights": [1.0, 1.0, 1.0],  # rotation, contrastive, in-painting
    "grad_clip": {"cnn": 12.0},
}


def cutout_boxes(r: np.random.Generator, patch: Sequence[int], max_fraction: float, max_box: float,
                 min_box: float) -> list[tuple[list[int], list[int]]]:
    """nnssl's `patch_rand_drop` boxes as (start, stop): corners in [0, side - min side], sides in
    [min side, max side] (int(fraction x side)), stops clipped to the patch, drawn until their volumes
    add up to at least a U(0, max_fraction) share of the patch."""
    budget = float(r.uniform(0.0, max_fraction)) * float(np.prod(patch))
    low = [int(min_box * p) for p in patch]
    high = [int(max_box * p) for p in patch]
    boxes, used = [], 0
    while used < budget:
        start = [int(r.integers(0, p - lo + 1)) for p, lo in zip(patch, low)]
        stop = [min(int(r.integers(lo, hi + 1)) + s, p) for s, lo, hi, p in zip(start, low, high, patch)]
        boxes.append((start, stop))
        used += int(np.prod([b - a for a, b in zip(start, stop)]))
    return boxes


def unit_noise(shape, generator, device, dtype) -> torch.Tensor:
    """N(0, 1) noise min-max rescaled to [0, 1] (nnssl's cut-out fill)."""
    noise = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
    lo, hi = noise.min(), noise.max()
    return ((noise - lo) / (hi - lo).clamp_min(1e-12)).to(dtype)


def cut_out(clean: list[torch.Tensor], rngs: Sequence[np.random.Generator], patch: Sequence[int],
            max_fraction: float, max_box: float, min_box: float) -> list[torch.Tensor]:
    """nnssl's `inner_cutout_rand` on one view of the local batch, sample by sample: noise boxes, then
    a partner drawn from the batch and, if it is another sample, boxes of its current view."""
    corrupted = [c.clone() for c in clean]
    for i, r in enumerate(rngs):
        g = views.device_generator(int(r.integers(2**62)), clean[i].device)
        for start, stop in cutout_boxes(r, patch, max_fraction, max_box, min_box):
            if any(b <= a for a, b in zip(start, stop)):
                continue  # an empty box (possible below 20 voxels a side, where the 5% minimum side is 0)
            region = (slice(None),) + tuple(slice(a, b) for a, b in zip(start, stop))
            corrupted[i][region] = unit_noise(corrupted[i][region].shape, g, clean[i].device, clean[i].dtype)
        partner = int(r.integers(0, len(clean)))
        if partner != i:
            for start, stop in cutout_boxes(r, patch, max_fraction, max_box, min_box):
                region = (slice(None),) + tuple(slice(a, b) for a, b in zip(start, stop))
                corrupted[i][region] = corrupted[partner][region]
    return corrupted


class SwinUNETRStyle(nn.Module):
    views_on_device = True

    def __init__(self, backbone: nn.Module, patch_size: Sequence[int], *, anon_aware: bool,
                 max_cutout_fraction: float, max_box_fraction: float, min_box_fraction: float, contrastive_dim: int,
                 temperature: float, gather_negatives: bool, head_tokens, weights: Sequence[float]):
        super().__init__()
        if anon_aware:
            raise ValueError("swinunetr has no anonymisation-aware ('_anon') variant")
        self.backbone = backbone
        self.patch_size = tuple(int(p) for p in patch_size)
        a, b = ROTATION_AXES
        if self.patch_size[a] != self.patch_size[b]:
            raise ValueError(f"swinunetr rotates in spatial axes {ROTATION_AXES}: the patch {list(patch_size)} "
                             "must be square there")
        self.max_cutout, self.max_box = float(max_cutout_fraction), float(max_box_fraction)
        self.min_box = float(min_box_fraction)
        if not 0 <= self.min_box <= self.max_box or any(int(self.max_box * p) < 1 for p in self.patch_size):
            raise ValueError(f"swinunetr: box fractions [{min_box_fraction}, {max_box_fraction}] of the patch "
                             f"{list(patch_size)} must give sides of at least one voxel")
        self.temperature = float(temperature)
        self.gather_negatives = bool(gather_negatives)
        self.head_tokens = None if head_tokens is None else tuple(int(t) for t in head_tokens)
        self.weights = [float(w) for w in weights]
        width = features.bottleneck_width(backbone)
        self.rotation_head = nn.Linear(width, 4)
        self.contrastive_head = nn.Linear(width, int(contrastive_dim))
        self.family = features.family_of(backbone)
        if self.family == "transformer":
            token = backbone.down_projection.proj.kernel_size
            self.grid = tuple(p // t for p, t in zip(self.patch_size, token))

    def make_view(self, batch: dict, seeds: Sequence[int]) -> dict:
        """Both views of the batch (view-major): rotated clean targets, cut-out inputs, rotation labels.
        Sample i's draws come from its stream (seed, 41 + view): k, the noise seed, boxes, partner, boxes."""
        image = batch["image"]
        inputs, targets, rotations = [], [], []
        dims = tuple(a + 1 for a in ROTATION_AXES)
        for view in range(2):
            rngs = [views.rng(seed, 41 + view) for seed in seeds]
            ks = [int(r.integers(0, 4)) for r in rngs]
            clean = [torch.rot90(image[i], k, dims=dims) for i, k in enumerate(ks)]
            inputs += cut_out(clean, rngs, self.patch_size, self.max_cutout, self.max_box, self.min_box)
            targets += clean
            rotations += ks
        return {
            "input": torch.stack(inputs),
            "target": torch.stack(targets),
            "rotation": torch.tensor(rotations, dtype=torch.long, device=image.device),
        }

    def head_inputs(self, feats: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(rotation head input, contrastive head input), each (B, C): bottleneck tokens or the pool."""
        if self.head_tokens is None:
            pooled = features.pool_bottleneck(feats)
            return pooled, pooled
        last = feats[-1]
        tokens = last if last.ndim == 3 else last.flatten(2).transpose(1, 2)  # (B, N, C), x slowest
        if max(self.head_tokens) >= tokens.shape[1]:
            raise ValueError(f"swinunetr head_tokens {list(self.head_tokens)}: the bottleneck has only "
                             f"{tokens.shape[1]} token(s) at patch {list(self.patch_size)}")
        return tokens[:, self.head_tokens[0]], tokens[:, self.head_tokens[1]]

    def forward(self, view: dict) -> torch.Tensor:
        feats = features.encode(self.backbone, view["input"])
        if self.family == "transformer":
            reconstruction = primus.decode_tokens(self.backbone, feats[0], self.grid)
        else:
            reconstruction = self.backbone.decoder(feats)
        rotation_in, contrastive_in = self.head_inputs(feats)
        rotation = F.cross_entropy(self.rotation_head(rotation_in).float(), view["rotation"])
        z1, z2 = self.contrastive_head(contrastive_in).chunk(2)
        contrastive = features.nt_xent(z1, z2, self.temperature, gather_ranks=self.gather_negatives)
        inpainting = (reconstruction.float() - view["target"].float()).abs().mean()
        w = self.weights
        return w[0] * rotation + w[1] * contrastive + w[2] * inpainting


def build(backbone: nn.Module, arch_kwargs: dict, patch_size: Sequence[int], *, anon_aware: bool,
          grad_clip=None, **settings) -> SwinUNETRStyle:
    return SwinUNETRStyle(backbone, patch_size, anon_aware=anon_aware, **settings)
