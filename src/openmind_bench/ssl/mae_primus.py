"""MAE for Primus (He et al.; nnssl `BaseEvaMAETrainer`): 75% of the 8^3 tokens are dropped before the
EVA encoder, a light EVA decoder (2 blocks, same width) sees the encoded tokens plus a learnable mask
token at every dropped position, Primus' patch decoder maps tokens back to voxels, and the MSE is
taken on the voxels of the dropped tokens (the token mask rebuilt at 8^3 voxel resolution).

Deliberate difference from nnssl: nnssl's `create_mask` reads the kept-token indices in (w, h, d)
order while the tokens are flattened as `b c w h d -> b (h w d) c`, so its loss mask is transposed
in two axes and about a quarter of the loss lands on visible tokens. Here the kept indices, the
token order and the loss mask share one raster order (Primus' own `(w h d)`): the loss looks at the
dropped tokens only, as MAE means.
"""

from __future__ import annotations

from typing import Sequence

import torch
from dynamic_network_architectures.building_blocks.eva import Eva
from torch import nn

from openmind_bench.nets import primus
from openmind_bench.ssl import masking

# Every parameter of a Primus gets a gradient (the up-projection decodes the reconstruction): DDP
# needs no search for unused ones.
TRAINS_PRIMUS_UP_PROJECTION = True

DEFAULTS = {"mask_ratio": 0.75, "decoder_depth": 2, "decoder_heads": None}


class MaskedAutoencoderPrimus(nn.Module):
    views_on_device = True  # the token mask drawn at the token grid, expanded to voxels on the device (masking)

    def __init__(self, backbone: nn.Module, arch_kwargs: dict, patch_size: Sequence[int], *, anon_aware: bool,
                 mask_ratio: float, decoder_depth: int, decoder_heads: int | None):
        super().__init__()
        self.backbone = backbone
        self.patch_size = tuple(patch_size)
        self.token_size = tuple(backbone.down_projection.proj.kernel_size)
        self.grid = masking.block_grid(patch_size, self.token_size)
        self.anon_aware = anon_aware
        self.mask_ratio = float(mask_ratio)
        embed_dim = int(arch_kwargs["embed_dim"])
        # Decoder blocks built like the encoder's (nnssl's EvaMAE does the same, drop-path included).
        self.decoder = Eva(
            embed_dim=embed_dim,
            depth=int(decoder_depth),
            num_heads=int(decoder_heads or arch_kwargs["eva_numheads"]),
            ref_feat_shape=self.grid,
            drop_path_rate=arch_kwargs.get("drop_path_rate", 0.0),
            init_values=arch_kwargs.get("init_values"),
            scale_attn_inner=arch_kwargs.get("scale_attn_inner", False),
        )
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        nn.init.normal_(self.mask_token, std=1e-6)

    def make_view(self, batch: dict, seeds: Sequence[int]) -> dict:
        image = batch["image"]
        dropped = masking.random_block_mask(seeds, self.grid, [self.mask_ratio] * len(seeds))
        flat = dropped.flatten(1)
        # Same count per sample, so the kept indices stack; sorted to keep the raster order.
        keep_index = torch.stack([torch.nonzero(~row).squeeze(1) for row in flat]).to(image.device, non_blocking=True)
        masked = masking.upsample(dropped.to(image.device, non_blocking=True), self.patch_size)
        return {
            "input": image,
            "keep_index": keep_index,
            "target": image,
            "loss_weight": masking.loss_weight(masked, batch.get("anon"), self.anon_aware),
        }

    def reconstruct(self, view: dict) -> torch.Tensor:
        tokens = primus.embed_tokens(self.backbone, view["input"])
        keep_index = view["keep_index"]
        encoded = primus.run_eva(self.backbone.eva, tokens, keep_index)
        full = self.mask_token.to(encoded.dtype).expand(tokens.shape[0], tokens.shape[1], -1)
        full = torch.scatter(full, 1, keep_index[..., None].expand(-1, -1, encoded.shape[-1]), encoded)
        decoded, _ = self.decoder(full)
        return primus.decode_tokens(self.backbone, decoded, self.grid)

    def forward(self, view: dict) -> torch.Tensor:
        return masking.weighted_mse(self.reconstruct(view), view["target"], view["loss_weight"])


def build(backbone: nn.Module, arch_kwargs: dict, patch_size: Sequence[int], *, anon_aware: bool,
          **settings) -> MaskedAutoencoderPrimus:
    return MaskedAutoencoderPrimus(backbone, arch_kwargs, patch_size, anon_aware=anon_aware, **settings)
