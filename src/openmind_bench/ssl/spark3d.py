"""S3D / Spark3D (Revisiting MAE section 4, after SparK by Tian et al.): a masked autoencoder whose
CNN encoder behaves as a sparse network on the visible blocks.

- Sparse-convolution emulation: every encoder convolution's output is multiplied by the visible-site
  mask at its resolution, and every encoder InstanceNorm takes its statistics over visible sites only
  and writes zeros elsewhere, so masked regions stay exactly zero through the whole encoder.
  The input itself is masked too (nnssl feeds the unmasked image and lets the first convolution read
  one voxel into the masked blocks; SparK masks the input).
- A site of a stage at least as fine as the mask grid is visible when any voxel under it is visible
  (max-pooling of the mask): the exact block mask there. Feature maps coarser than the mask grid
  (the 5^3 bottleneck under the 10^3 grid of 16^3 blocks at 160^3) are dense, as nnssl's
  `spark_utils.py`: no mask there, plain InstanceNorm, no mask token.
- Densification before the decoder, per stage: InstanceNorm without affine parameters (nnssl's
  `InstanceNorm1d(affine=False)`) over the visible sites, a learnable mask token in the masked
  sites, then a 3^3 convolution at every resolution but the highest (identity there), as in the
  paper and nnssl's `SparK3D`.
- Mask ratio ~ U(0.6, 0.9), drawn per sample (nnssl draws one per batch); 16^3 blocks as nnssl.

The encoder's modules change class in place (`__class__`), so state-dict keys and shared module
references stay those of the dynamic-network-architectures ResEnc; a checkpoint loads into a plain one.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from openmind_bench.ssl import masking

DEFAULTS = {"mask_ratio_range": [0.6, 0.9], "block_size": 16}


class VisibleSites:
    """The visible-site mask of the current batch at every resolution the encoder computes."""

    def __init__(self, grid: Sequence[int]):
        self.grid = tuple(int(g) for g in grid)
        self.voxels: torch.Tensor | None = None
        self._by_shape: dict[tuple, torch.Tensor] = {}

    def set(self, visible_voxels: torch.Tensor | None) -> None:
        self.voxels = visible_voxels
        self._by_shape = {}

    def at(self, shape: Sequence[int]) -> torch.Tensor | None:
        if self.voxels is None:
            return None
        shape = tuple(int(s) for s in shape)
        if any(s < g for s, g in zip(shape, self.grid)):
            return None  # coarser than the mask grid: dense
        if shape not in self._by_shape:
            full = tuple(self.voxels.shape[2:])
            if shape == full:
                mask = self.voxels
            else:
                kernel = [f // s for f, s in zip(full, shape)]
                if any(f % s for f, s in zip(full, shape)):
                    raise ValueError(f"feature map {shape} does not tile the patch {full}")
                mask = F.max_pool3d(self.voxels, kernel_size=kernel, stride=kernel)
            self._by_shape[shape] = mask
        return self._by_shape[shape]


class MaskedConv3d(nn.Conv3d):
    visible_sites: VisibleSites

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        mask = self.visible_sites.at(out.shape[2:])
        return out if mask is None else out * mask.to(out.dtype)


def masked_instance_norm(x: torch.Tensor, mask: torch.Tensor, weight, bias, eps: float) -> torch.Tensor:
    """InstanceNorm with statistics over the visible sites only; zero at masked sites."""
    xf = x.float()
    m = mask.float()
    count = m.sum(dim=(2, 3, 4), keepdim=True).clamp_min(1.0)
    mean = (xf * m).sum(dim=(2, 3, 4), keepdim=True) / count
    var = (((xf - mean) * m) ** 2).sum(dim=(2, 3, 4), keepdim=True) / count
    out = (xf - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        out = out * weight[None, :, None, None, None] + bias[None, :, None, None, None]
    return (out * m).to(x.dtype)


class MaskedInstanceNorm3d(nn.InstanceNorm3d):
    visible_sites: VisibleSites

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = self.visible_sites.at(x.shape[2:])
        if mask is None:
            return super().forward(x)
        return masked_instance_norm(x, mask, self.weight, self.bias, self.eps)


def sparsify(encoder: nn.Module, sites: VisibleSites) -> int:
    """Turn every Conv3d / InstanceNorm3d of `encoder` into its masked twin, in place; returns how many."""
    n = 0
    for module in encoder.modules():
        if type(module) is nn.Conv3d:
            module.__class__ = MaskedConv3d
        elif type(module) is nn.InstanceNorm3d:
            module.__class__ = MaskedInstanceNorm3d
        else:
            continue
        module.visible_sites = sites
        n += 1
    return n


class Spark3D(nn.Module):
    views_on_device = True  # masks drawn at the block grid, expanded to voxels on the device (masking)

    def __init__(self, backbone: nn.Module, patch_size: Sequence[int], *, anon_aware: bool,
                 mask_ratio_range: Sequence[float], block_size: int):
        super().__init__()
        self.backbone = backbone
        self.patch_size = tuple(patch_size)
        self.grid = masking.block_grid(patch_size, block_size)
        self.anon_aware = anon_aware
        low, high = (float(v) for v in mask_ratio_range)
        if not 0.0 <= low <= high < 1.0:
            raise ValueError(f"spark3d mask_ratio_range {list(mask_ratio_range)} must satisfy 0 <= low <= high < 1")
        self.mask_ratio_range = (low, high)
        self.visible_sites = VisibleSites(self.grid)
        if sparsify(backbone.encoder, self.visible_sites) == 0:
            raise ValueError("spark3d needs a CNN encoder with Conv3d layers")
        features = list(backbone.encoder.output_channels)
        self.mask_tokens = nn.ParameterList(
            [nn.Parameter(nn.init.trunc_normal_(torch.zeros(1, c, 1, 1, 1), std=0.02, a=-0.02, b=0.02))
             for c in features]
        )
        self.densify_norms = nn.ModuleList([nn.InstanceNorm3d(c, eps=1e-5, affine=False) for c in features])
        self.densify_projs = nn.ModuleList(
            [nn.Identity() if i == 0 else nn.Conv3d(c, c, kernel_size=3, padding=1, bias=True)
             for i, c in enumerate(features)]
        )

    def make_view(self, batch: dict, seeds: Sequence[int]) -> dict:
        image = batch["image"]
        low, high = self.mask_ratio_range
        ratios = [float(np.random.default_rng([int(s), 1]).uniform(low, high)) for s in seeds]
        masked = masking.upsample(masking.random_block_mask(seeds, self.grid, ratios, image.device), self.patch_size)
        return {
            "input": image * (1.0 - masked),
            "visible": 1.0 - masked,
            "target": image,
            "loss_weight": masking.loss_weight(masked, batch.get("anon"), self.anon_aware),
        }

    def encode(self, view: dict) -> list[torch.Tensor]:
        """The sparse encoder's feature maps, highest resolution first (zero at masked sites)."""
        self.visible_sites.set(view["visible"])
        try:
            return self.backbone.encoder(view["input"])
        finally:
            self.visible_sites.set(None)

    def reconstruct(self, view: dict) -> torch.Tensor:
        self.visible_sites.set(view["visible"])
        try:
            features = self.backbone.encoder(view["input"])
            dense = []
            for i, feat in enumerate(features):
                visible = self.visible_sites.at(feat.shape[2:])
                if visible is None:  # dense stage: nothing masked, nothing to fill
                    filled = self.densify_norms[i](feat)
                else:
                    normed = masked_instance_norm(feat, visible, None, None, self.densify_norms[i].eps)
                    filled = torch.where(visible > 0, normed,
                                         self.mask_tokens[i].to(normed.dtype).expand_as(normed))
                dense.append(self.densify_projs[i](filled))
        finally:
            self.visible_sites.set(None)
        return self.backbone.decoder(dense)

    def forward(self, view: dict) -> torch.Tensor:
        return masking.weighted_mse(self.reconstruct(view), view["target"], view["loss_weight"])


def build(backbone: nn.Module, arch_kwargs: dict, patch_size: Sequence[int], *, anon_aware: bool,
          **settings) -> Spark3D:
    return Spark3D(backbone, patch_size, anon_aware=anon_aware, **settings)
