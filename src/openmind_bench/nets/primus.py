"""Primus (EVA ViT on 8^3 tokens) from dynamic-network-architectures, plus the token-level forward
passes the masked-image-modelling methods need (token dropping, mask tokens).

Primus-M as in the papers: embed 864, depth 16, 12 heads, SwiGLU MLP (ratio 4*2/3), LayerScale 0.1,
drop-path 0.2, RoPE plus a learned absolute position embedding; the model is built for one input
shape (the position embedding has one entry per token), so the patch size is part of the build.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    import torch
    from dynamic_network_architectures.architectures.primus import Primus

# torch, timm and dynamic-network-architectures are imported where used: config checks at workflow
# start stay light.
DNA_CLASS = "Primus"

REQUIRED = ("embed_dim", "eva_depth", "eva_numheads", "patch_embed_size")
OPTIONAL = {"drop_path_rate": 0.0, "init_values": None, "scale_attn_inner": False}

# nnssl's own Primus presets (`PrimusS/B/M/L`): a checkpoint of one of these is written under that
# name so nnssl's downstream code rebuilds it without our kwargs.
NNSSL_PRESETS = {
    "PrimusS": {"embed_dim": 396, "eva_depth": 12, "eva_numheads": 6},
    "PrimusB": {"embed_dim": 792, "eva_depth": 12, "eva_numheads": 12},
    "PrimusM": {"embed_dim": 864, "eva_depth": 16, "eva_numheads": 12},
    "PrimusL": {"embed_dim": 1056, "eva_depth": 24, "eva_numheads": 16},
}


def normalised_kwargs(kwargs: dict) -> dict:
    missing = [k for k in REQUIRED if k not in kwargs]
    unknown = sorted(set(kwargs) - set(REQUIRED) - set(OPTIONAL))
    if missing or unknown:
        raise ValueError(f"Primus kwargs: missing {missing}, unknown {unknown}")
    out = {k: kwargs.get(k, default) for k, default in OPTIONAL.items()}
    out.update(
        embed_dim=int(kwargs["embed_dim"]),
        eva_depth=int(kwargs["eva_depth"]),
        eva_numheads=int(kwargs["eva_numheads"]),
        patch_embed_size=[int(v) for v in kwargs["patch_embed_size"]],
    )
    return out


def check_patch_size(kwargs: dict, patch_size: Sequence[int]) -> None:
    token = normalised_kwargs(kwargs)["patch_embed_size"]
    if len(patch_size) != 3 or any(p % t for p, t in zip(patch_size, token)):
        raise ValueError(f"patch size {list(patch_size)} is not a multiple of the Primus token size {token}")


def build(kwargs: dict, patch_size: Sequence[int], input_channels: int = 1, output_channels: int = 1):
    from dynamic_network_architectures.architectures.primus import Primus

    check_patch_size(kwargs, patch_size)
    k = normalised_kwargs(kwargs)
    return Primus(
        input_channels=input_channels,
        embed_dim=k["embed_dim"],
        patch_embed_size=tuple(k["patch_embed_size"]),
        num_classes=output_channels,
        eva_depth=k["eva_depth"],
        eva_numheads=k["eva_numheads"],
        input_shape=tuple(int(p) for p in patch_size),
        drop_path_rate=k["drop_path_rate"],
        init_values=k["init_values"],
        scale_attn_inner=k["scale_attn_inner"],
    )


def nnssl_architecture_plans(preset_name: str, kwargs: dict) -> dict:
    k = normalised_kwargs(kwargs)
    nnssl_preset = NNSSL_PRESETS.get(preset_name)
    matches_nnssl = (
        nnssl_preset is not None
        and all(k[key] == value for key, value in nnssl_preset.items())
        and k["patch_embed_size"] == [8, 8, 8]
    )
    # nnssl only knows Primus by preset name (its arch_kwargs field holds ResEnc kwargs only).
    return {
        "arch_class_name": preset_name if matches_nnssl else DNA_CLASS,
        "arch_kwargs": None,
        "arch_kwargs_requiring_import": None,
    }


def embed_tokens(net: Primus, image: torch.Tensor) -> torch.Tensor:
    """(B, N, C) patch tokens, flattened in the order Primus.forward uses ('b c w h d -> b (w h d) c')."""
    tokens = net.down_projection(image)
    return tokens.flatten(2).transpose(1, 2)


def run_eva(eva, tokens: torch.Tensor, keep_index: torch.Tensor | None = None) -> torch.Tensor:
    """The EVA encoder on a full token sequence, or (MAE) on the kept tokens only: position embeddings
    are added before dropping so every kept token keeps its own absolute and rotary position."""
    import torch
    from timm.layers import apply_keep_indices_nlc

    if eva.pos_embed is not None:
        tokens = tokens + eva.pos_embed
    tokens = eva.pos_drop(tokens)
    rope = eva.rope.get_embed() if eva.rope is not None else None
    if keep_index is not None:
        tokens = torch.gather(tokens, 1, keep_index[..., None].expand(-1, -1, tokens.shape[-1]))
        if rope is not None:
            # (B, N_keep, D) per-sample rotary embedding, broadcast over the heads.
            rope = apply_keep_indices_nlc(tokens, rope, keep_index)[:, None]
    for block in eva.blocks:
        tokens = block(tokens, rope=rope)
    return eva.norm(tokens)


def decode_tokens(net: Primus, tokens: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """(B, N, C) tokens -> (B, out, *patch) through Primus' own patch decoder."""
    volume = tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[-1], *grid)
    return net.up_projection(volume)
