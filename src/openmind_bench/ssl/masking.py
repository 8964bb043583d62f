"""Shared pieces of the reconstruction methods: per-sample random block masks and the masked MSE.

Randomness is drawn per sample from that sample's seed (the engine derives it from the run seed,
epoch, step and the sample's global index), so a batch split over DDP ranks draws exactly the masks
one process would draw for the whole batch, and a resumed run draws the masks of the original one.

The masked methods build their views on the training device (`views_on_device`): the masks are drawn
at the block grid's resolution (10^3 or 20^3 booleans per sample, on the CPU, where the seeded
generators live, so the draws are the same on every device) and only then expanded to voxels, on the
device, next to the batch the loader pinned. The main process never builds a full-size tensor.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def block_grid(patch_size: Sequence[int], block_size: Sequence[int] | int) -> tuple[int, int, int]:
    block = [int(block_size)] * 3 if isinstance(block_size, (int, np.integer)) else [int(b) for b in block_size]
    if any(p % b for p, b in zip(patch_size, block)):
        raise ValueError(f"mask block size {block} does not divide the patch size {list(patch_size)}")
    return tuple(p // b for p, b in zip(patch_size, block))


def random_block_mask(seeds: Sequence[int], grid: Sequence[int], ratios: Sequence[float],
                      device: torch.device | None = None) -> torch.Tensor:
    """(B, *grid) bool on `device`, True = masked: exactly int(ratio * n_blocks) blocks per sample, as nnssl."""
    n = int(np.prod(grid))
    masks = torch.zeros(len(seeds), n, dtype=torch.bool)
    for i, (seed, ratio) in enumerate(zip(seeds, ratios)):
        n_masked = int(ratio * n)
        masks[i, torch.randperm(n, generator=generator(seed))[:n_masked]] = True
    masks = masks.reshape(len(seeds), *grid)
    return masks if device is None else masks.to(device, non_blocking=True)


def upsample(grid_mask: torch.Tensor, patch_size: Sequence[int]) -> torch.Tensor:
    """(B, *grid) -> (B, 1, *patch) float on the mask's device, every block repeated to its voxels
    (one broadcast, one full-size tensor)."""
    b, gx, gy, gz = grid_mask.shape
    (px, py, pz) = (int(p) for p in patch_size)
    blocks = grid_mask[:, None, :, None, :, None, :, None].float()
    return blocks.expand(b, 1, gx, px // gx, gy, py // gy, gz, pz // gz).reshape(b, 1, px, py, pz)


def loss_weight(masked: torch.Tensor, anon: torch.Tensor | None, anon_aware: bool) -> torch.Tensor:
    """Where the loss looks: the masked voxels, minus the anonymised (defaced) ones when anon-aware."""
    if anon_aware:
        if anon is None:
            raise ValueError("an anonymisation-aware method needs the batch's 'anon' mask")
        return masked * (1.0 - anon.float())
    return masked


def weighted_mse(prediction: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Mean over samples of each sample's weighted mean squared error.

    Normalising per sample (not over the whole batch) keeps the loss of a batch split over DDP ranks
    equal to the loss of the whole batch in one process; a sample with no weighted voxel adds zero.
    """
    err = (prediction.float() - target.float()) ** 2 * weight
    dims = tuple(range(1, err.ndim))
    per_sample = err.sum(dims) / weight.sum(dims).clamp_min(1.0)
    return per_sample.mean()
