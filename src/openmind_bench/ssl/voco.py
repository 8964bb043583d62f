"""VoCo (Wu et al., volume contrast; nnssl `vocoTrainer` + `voco_loss.py`): a (256, 256, 64) region
is cut into a 4 x 4 x 1 grid of 64^3 base crops, and 4 target crops of 64^3 are drawn anywhere in it;
the network predicts each target's overlap with every base crop (volume fraction) from the cosine
similarity of their projected embeddings. Projector as nnssl's (shared with its SimCLR): all encoder
stages pooled and concatenated (Primus: the token mean), then an MLP 2048-2048-2048.

Views (nnssl `voco_transform.py`): in training every base and every target crop is augmented on its
own with the SimCLR pipeline (`views.augment`: noise, blur, brightness, contrast, low resolution,
gamma, mirror, rot90), each crop from its own random stream, so overlapping crops are no longer
pixel-identical; validation views are the plain crops (nnssl's `aug="none"`).

Loss (nnssl's, after the original code): prediction = -log(1 - |overlap - logit|) weighted by the
overlap on overlapping pairs + logit^2 on the others, logit = relu(cosine); regularisation = mean
relu(cosine) between different base crops of the student; weights 1/1. Both terms are normalised per
sample, then averaged (nnssl normalises over the whole batch), so a batch split over DDP ranks gives
the one-process loss.

Momentum teacher (original VoCo, Luffy03/VoCo `models/voco_head.py`, momentum 0.9), on by default:
an EMA copy of the encoder and projector, updated at the start of every training forward (the same as
after the previous step), embeds every crop too, and the logits are the mean of the two original
terms: student targets against teacher bases, and teacher targets against student bases (the
second passes gradient to the student's bases). nnssl has no teacher, and its loss does not decrease
(its open issue #22; on our CPU toy the teacher variants collapse and nnssl's learns, see
docs/fidelity.md); `momentum: null` gives nnssl's variant (student targets against the student's
bases, detached). No gradient clipping, as nnssl.

The network sees 64^3 crops: the checkpoint's plan records 64^3 as the pre-training patch size.
"""

from __future__ import annotations

import copy
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from openmind_bench.ssl import features, views

# The method makes its own views: no spatial augmentation in the loader.
LOADER_AUGMENTATION = False

DEFAULTS = {
    "region_size": [256, 256, 64],
    "base_grid": [4, 4, 1],
    "n_targets": 4,
    # nnssl architectures/voco_architecture.py:37 (VocoProjectionHead, :5-26): pooled stages ->
    # 2048 -> 2048 -> 2048, three linear layers, the same head as its SimCLR
    "projector_dims": [2048, 2048, 2048],
    "momentum": 0.9,
    "pred_weight": 1.0,
    "reg_weight": 1.0,
    "grad_clip": {"cnn": 0.0},
}


def crop_size(settings: dict) -> list[int]:
    region, grid = settings["region_size"], settings["base_grid"]
    if any(int(r) % int(g) for r, g in zip(region, grid)):
        raise ValueError(f"voco: base_grid {list(grid)} does not tile region_size {list(region)}")
    return [int(r) // int(g) for r, g in zip(region, grid)]


def sizes(settings: dict, patch_size: Sequence[int]) -> tuple[list[int], list[int]]:
    return [int(v) for v in settings["region_size"]], crop_size(settings)


def base_boxes(region: Sequence[int], grid: Sequence[int]) -> np.ndarray:
    """(n_base, 2, 3) corners (start, stop) of the base crops, x slowest."""
    size = [r // g for r, g in zip(region, grid)]
    out = []
    for i in range(grid[0]):
        for j in range(grid[1]):
            for k in range(grid[2]):
                start = np.array([i * size[0], j * size[1], k * size[2]])
                out.append([start, start + size])
    return np.array(out)


def overlaps(targets: np.ndarray, bases: np.ndarray) -> np.ndarray:
    """(n_target, n_base): the fraction of each target crop's volume inside each base crop."""
    lo = np.maximum(targets[:, None, 0], bases[None, :, 0])
    hi = np.minimum(targets[:, None, 1], bases[None, :, 1])
    inter = np.clip(hi - lo, 0, None).prod(-1)
    return inter / (targets[:, 1] - targets[:, 0]).prod(-1)[:, None]


# Stream tag of the crop augmentations (views.augment_crop keys: sample seed, tag, crop index).
_TAG_CROPS = 22


def assign(target: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """(B, Nt, Nb) relu(cosine) of every target embedding (B, Nt, D) with every base embedding (B, Nb, D):
    the original's `online_assign`."""
    return F.relu(F.cosine_similarity(base[:, None], target[:, :, None], dim=-1))


def prediction_loss(logits: torch.Tensor, overlap: torch.Tensor) -> torch.Tensor:
    """logits and overlap (B, Nt, Nb)."""
    positive = (overlap > 0).to(logits.dtype)
    pos = (-torch.log(1 - (overlap - logits).abs() + 1e-6)) * overlap
    pos = pos.sum((1, 2)) / overlap.sum((1, 2)).clamp_min(1e-6)
    neg = (logits**2 * (1 - positive)).sum((1, 2)) / ((1 - positive).sum((1, 2)) + 1e-6)
    return (pos + neg).mean()


def regularization_loss(base: torch.Tensor) -> torch.Tensor:
    """Mean relu(cosine) over the pairs of different base crops of a sample, averaged over samples."""
    sim = F.relu(F.cosine_similarity(base[:, None], base[:, :, None], dim=-1))
    n = sim.shape[-1]
    upper = torch.ones(n, n, device=sim.device).triu(diagonal=1)
    return ((sim * upper).sum((1, 2)) * 2 / (n * (n - 1))).mean()


class VoCo(nn.Module):
    views_on_device = True

    def __init__(self, backbone: nn.Module, *, anon_aware: bool, region_size, base_grid, n_targets: int,
                 projector_dims, momentum, pred_weight: float, reg_weight: float):
        super().__init__()
        if anon_aware:
            raise ValueError("voco has no anonymisation-aware ('_anon') variant")
        self.backbone = backbone
        self.region_size = tuple(int(v) for v in region_size)
        self.base_grid = tuple(int(v) for v in base_grid)
        self.crop_size = tuple(crop_size({"region_size": region_size, "base_grid": base_grid}))
        self.bases = base_boxes(self.region_size, self.base_grid)
        self.n_targets = int(n_targets)
        self.projector = features.mlp([features.pooled_width(backbone), *projector_dims])
        self.momentum = None if momentum is None else float(momentum)
        self.weights = (float(pred_weight), float(reg_weight))
        if self.momentum is not None:
            self.teacher = nn.ModuleDict({"backbone": copy.deepcopy(backbone),
                                          "projector": copy.deepcopy(self.projector)})
            for p in self.teacher.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.momentum is not None:
            self.teacher.eval()  # no drop-path in the teacher
        return self

    def target_boxes(self, seed: int) -> np.ndarray:
        r = views.rng(seed, 21)
        starts = np.stack([r.integers(0, s - c + 1, size=self.n_targets)
                           for s, c in zip(self.region_size, self.crop_size)], 1)
        return np.stack([starts, starts + np.array(self.crop_size)], 1)

    def make_view(self, batch: dict, seeds: Sequence[int]) -> dict:
        """Base and target crops, each augmented on its own in training (keys (seed, 22, crop index):
        the sample's bases in base_boxes' order, then its targets)."""
        image = batch["image"]
        if tuple(image.shape[2:]) != self.region_size:
            raise ValueError(f"voco expects regions of {list(self.region_size)}, got {list(image.shape[2:])}")
        b = image.shape[0]
        gx, gy, gz = self.base_grid
        cx, cy, cz = self.crop_size
        # (B, C, gx*cx, gy*cy, gz*cz) -> (B * n_base, C, cx, cy, cz), x slowest as base_boxes
        bases = image.reshape(b, -1, gx, cx, gy, cy, gz, cz).permute(0, 2, 4, 6, 1, 3, 5, 7)
        bases = bases.reshape(b * gx * gy * gz, -1, cx, cy, cz)
        n_base = len(self.bases)
        targets, overlap = [], []
        for i, seed in enumerate(seeds):
            boxes = self.target_boxes(seed)
            targets += [views.crop(image[i], box[0], self.crop_size) for box in boxes]
            overlap.append(overlaps(boxes, self.bases))
        if self.training:
            bases = torch.stack([views.augment_crop(crop, (seeds[j // n_base], _TAG_CROPS, j % n_base))
                                 for j, crop in enumerate(bases)])
            targets = [views.augment_crop(crop, (seeds[j // self.n_targets], _TAG_CROPS,
                                                 n_base + j % self.n_targets))
                       for j, crop in enumerate(targets)]
        return {
            "bases": bases.contiguous(),
            "targets": torch.stack(targets),
            "overlap": torch.as_tensor(np.stack(overlap), dtype=torch.float32, device=image.device),
        }

    def embed(self, x: torch.Tensor, teacher: bool = False) -> torch.Tensor:
        if teacher:
            return self.teacher["projector"](features.pool(features.encode(self.teacher["backbone"], x)))
        return self.projector(features.pool(features.encode(self.backbone, x)))

    @torch.no_grad()
    def update_teacher(self) -> None:
        students = list(self.backbone.parameters()) + list(self.projector.parameters())
        teachers = list(self.teacher["backbone"].parameters()) + list(self.teacher["projector"].parameters())
        torch._foreach_mul_(teachers, self.momentum)
        torch._foreach_add_(teachers, students, alpha=1.0 - self.momentum)

    def forward(self, view: dict) -> torch.Tensor:
        b, n_target, n_base = view["overlap"].shape
        crops = torch.cat([view["bases"], view["targets"]])
        student = self.embed(crops).float()
        base = student[: b * n_base].reshape(b, n_base, -1)
        target = student[b * n_base:].reshape(b, n_target, -1)
        if self.momentum is not None:
            if self.training:
                self.update_teacher()
            with torch.no_grad():
                teacher = self.embed(crops, teacher=True).float()
            teacher_base = teacher[: b * n_base].reshape(b, n_base, -1)
            teacher_target = teacher[b * n_base:].reshape(b, n_target, -1)
            logits = 0.5 * (assign(target, teacher_base) + assign(teacher_target, base))
        else:
            logits = assign(target, base.detach())
        return self.weights[0] * prediction_loss(logits, view["overlap"]) + self.weights[1] * regularization_loss(base)


def build(backbone: nn.Module, arch_kwargs: dict, patch_size: Sequence[int], *, anon_aware: bool,
          grad_clip=None, **settings) -> VoCo:
    return VoCo(backbone, anon_aware=anon_aware, **settings)
