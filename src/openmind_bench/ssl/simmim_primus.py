"""SimMIM for Primus (Xie et al.; nnssl `EvaSimMIM`): 75% of the 8^3 tokens are replaced by a learnable
mask token right after the patch embedding, the full sequence runs through the EVA encoder (position
embeddings on every token), Primus' patch decoder predicts the voxels, MSE on the masked tokens' voxels.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from openmind_bench.nets import primus
from openmind_bench.ssl import masking

# Every parameter of a Primus gets a gradient (the up-projection decodes the reconstruction): DDP
# needs no search for unused ones.
TRAINS_PRIMUS_UP_PROJECTION = True

DEFAULTS = {"mask_ratio": 0.75}


class SimMIMPrimus(nn.Module):
    views_on_device = True  # the token mask drawn at the token grid, expanded to voxels on the device (masking)

    def __init__(self, backbone: nn.Module, arch_kwargs: dict, patch_size: Sequence[int], *, anon_aware: bool,
                 mask_ratio: float):
        super().__init__()
        self.backbone = backbone
        self.patch_size = tuple(patch_size)
        self.token_size = tuple(backbone.down_projection.proj.kernel_size)
        self.grid = masking.block_grid(patch_size, self.token_size)
        self.anon_aware = anon_aware
        self.mask_ratio = float(mask_ratio)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, int(arch_kwargs["embed_dim"])))
        nn.init.normal_(self.mask_token, std=1e-6)

    def make_view(self, batch: dict, seeds: Sequence[int]) -> dict:
        image = batch["image"]
        masked_tokens = masking.random_block_mask(seeds, self.grid, [self.mask_ratio] * len(seeds), image.device)
        masked = masking.upsample(masked_tokens, self.patch_size)
        return {
            "input": image,
            "token_mask": masked_tokens.flatten(1).float(),
            "target": image,
            "loss_weight": masking.loss_weight(masked, batch.get("anon"), self.anon_aware),
        }

    def reconstruct(self, view: dict) -> torch.Tensor:
        tokens = primus.embed_tokens(self.backbone, view["input"])
        m = view["token_mask"][..., None].to(tokens.dtype)
        tokens = tokens * (1.0 - m) + self.mask_token.to(tokens.dtype) * m
        encoded = primus.run_eva(self.backbone.eva, tokens)
        return primus.decode_tokens(self.backbone, encoded, self.grid)

    def forward(self, view: dict) -> torch.Tensor:
        return masking.weighted_mse(self.reconstruct(view), view["target"], view["loss_weight"])


def build(backbone: nn.Module, arch_kwargs: dict, patch_size: Sequence[int], *, anon_aware: bool,
          **settings) -> SimMIMPrimus:
    return SimMIMPrimus(backbone, arch_kwargs, patch_size, anon_aware=anon_aware, **settings)
