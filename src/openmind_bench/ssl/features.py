"""Shared pieces of the contrastive and pseudo-segmentation methods: what each architecture family
gives them (pooled encoder features, the bottleneck, a dense map with extra channels), the projector
MLP, an autograd-aware all-gather over DDP ranks (optional for NT-Xent, always for Barlow Twins and
VICReg, whose batch statistics want the whole batch), and the losses (NT-Xent, Barlow Twins, VICReg).

Families: `cnn` (ResEnc: the encoder's stage outputs) and `transformer` (Primus: the EVA tokens).
"""

from __future__ import annotations

import functools
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from openmind_bench.nets import primus


def family_of(backbone: nn.Module) -> str:
    return "transformer" if hasattr(backbone, "eva") else "cnn"


def encode(backbone: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """CNN: the encoder's stage outputs (highest resolution first); Primus: [tokens (B, N, C)]."""
    if family_of(backbone) == "transformer":
        return [primus.run_eva(backbone.eva, primus.embed_tokens(backbone, x))]
    return list(backbone.encoder(x))


def pooled_width(backbone: nn.Module) -> int:
    """Width of `pooled`: the sum of all stage widths (nnssl's SimCLR projector input) or the token width."""
    if family_of(backbone) == "transformer":
        return int(backbone.eva.embed_dim if hasattr(backbone.eva, "embed_dim") else backbone.eva.num_features)
    return int(sum(backbone.encoder.output_channels))


def bottleneck_width(backbone: nn.Module) -> int:
    if family_of(backbone) == "transformer":
        return pooled_width(backbone)
    return int(backbone.encoder.output_channels[-1])


def pool(features: list[torch.Tensor]) -> torch.Tensor:
    """Global average of every stage output, concatenated: (B, sum C). Tokens are averaged over N."""
    if features[0].ndim == 3:
        return features[0].mean(dim=1)
    return torch.cat([f.mean(dim=(2, 3, 4)) for f in features], dim=1)


def pool_bottleneck(features: list[torch.Tensor]) -> torch.Tensor:
    last = features[-1]
    return last.mean(dim=1) if last.ndim == 3 else last.mean(dim=(2, 3, 4))


class DenseHead(nn.Module):
    """A per-voxel map with `channels` outputs from the encoder features: the ResEnc decoder run to its
    last stage, then a 1^3 convolution of our own (the backbone keeps its 1-channel head, so its
    weights stay loadable into the plain architecture); on Primus a patch decoder of our own on the
    tokens."""

    def __init__(self, backbone: nn.Module, channels: int, grid: Sequence[int] | None = None):
        super().__init__()
        self.family = family_of(backbone)
        if self.family == "transformer":
            from dynamic_network_architectures.building_blocks.patch_encode_decode import PatchDecode

            self.grid = tuple(grid)
            token = tuple(backbone.down_projection.proj.kernel_size)
            self.head = PatchDecode(token, pooled_width(backbone), channels)
        else:
            self.head = nn.Conv3d(int(backbone.encoder.output_channels[0]), channels, kernel_size=1)

    def forward(self, backbone: nn.Module, features: list[torch.Tensor]) -> torch.Tensor:
        if self.family == "transformer":
            tokens = features[0]
            volume = tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[-1], *self.grid)
            return self.head(volume)
        decoder = backbone.decoder
        x = features[-1]
        for s in range(len(decoder.stages)):
            x = decoder.stages[s](torch.cat((decoder.transpconvs[s](x), features[-(s + 2)]), 1))
        return self.head(x)


def mlp(dims: Sequence[int], norm_last: bool = False) -> nn.Sequential:
    """Linear layers of widths `dims` (dims[0] = input), each hidden one followed by a per-sample
    normalisation (nnssl: InstanceNorm1d on (B, C), which normalises each row: LayerNorm without
    affine) and ReLU. Per-sample, so a batch split over DDP ranks projects as one process."""
    layers: list[nn.Module] = []
    for i in range(len(dims) - 1):
        layers.append(nn.Linear(int(dims[i]), int(dims[i + 1])))
        if i < len(dims) - 2 or norm_last:
            layers += [nn.LayerNorm(int(dims[i + 1]), elementwise_affine=False), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


def gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenation of `x` over all DDP ranks in rank order, with gradient flowing back to every
    rank's own part (torch.distributed.nn's all_gather); `x` itself when not distributed.

    Under DDP (which averages gradients over W ranks) a loss computed on the gathered batch on every
    rank then gives exactly the gradient of the one-process loss on the whole batch."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x.contiguous()), dim=0)


def full_precision(loss):
    """Run a loss body on float32 embeddings with autocast off. `.float()` alone does not leave
    autocast: its matmuls would cast back to half precision (the logits, the cross-correlation and the
    covariance lose the digits these losses live on)."""

    @functools.wraps(loss)
    def in_float32(z1: torch.Tensor, z2: torch.Tensor, *args, **kwargs):
        with torch.autocast(z1.device.type, enabled=False):
            return loss(z1.float(), z2.float(), *args, **kwargs)

    return in_float32


@full_precision
def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float, gather_ranks: bool = False) -> torch.Tensor:
    """NT-Xent (SimCLR): sample i's two views are positives, the other 2N - 2 views negatives; mean
    over the 2N anchors. By default N is this rank's batch, as nnssl's NTXentLoss and SwinUNETR
    ContrastLoss compute it; `gather_ranks` takes the views of all DDP ranks (gathered with
    gradient), which gives more negatives and makes a DDP run equal the one-process run."""
    if gather_ranks:
        z1, z2 = gather(z1), gather(z2)
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n = z.shape[0] // 2
    logits = z @ z.t() / float(temperature)
    logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(logits, targets)


@full_precision
def barlow_twins(z1: torch.Tensor, z2: torch.Tensor, off_diagonal_weight: float) -> torch.Tensor:
    """Zbontar et al.: the cross-correlation of the batch-standardised embeddings pushed to identity."""
    a, b = gather(z1), gather(z2)
    n = a.shape[0]
    a = (a - a.mean(0)) / a.std(0, unbiased=False).clamp_min(1e-6)
    b = (b - b.mean(0)) / b.std(0, unbiased=False).clamp_min(1e-6)
    c = a.t() @ b / n
    on = (torch.diagonal(c) - 1).pow(2).sum()
    off = (c - torch.diag(torch.diagonal(c))).pow(2).sum()
    return on + float(off_diagonal_weight) * off


@full_precision
def vicreg(z1: torch.Tensor, z2: torch.Tensor, sim_weight: float, var_weight: float,
           cov_weight: float) -> torch.Tensor:
    """Bardes et al.: invariance (MSE) + variance (hinge on the per-dimension std, 1) + covariance
    (squared off-diagonal covariance / D), on the embeddings of all ranks."""
    a, b = gather(z1), gather(z2)
    n, d = a.shape
    invariance = F.mse_loss(a, b)
    variance, covariance = 0.0, 0.0
    for z in (a, b):
        z = z - z.mean(0)
        std = torch.sqrt(z.var(0) + 1e-4)
        variance = variance + F.relu(1.0 - std).mean() / 2
        cov = z.t() @ z / (n - 1)
        covariance = covariance + (cov - torch.diag(torch.diagonal(cov))).pow(2).sum() / d
    return float(sim_weight) * invariance + float(var_weight) * variance + float(cov_weight) * covariance
