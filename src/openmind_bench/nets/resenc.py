"""Residual-encoder U-Net (ResEnc) from dynamic-network-architectures, configured as in the papers.

Fixed for the whole family (docs/architecture.md, "Reference protocol"): 3D convolutions with bias, InstanceNorm (eps 1e-5,
affine), LeakyReLU, no deep supervision. What varies between presets (stages, features, blocks,
strides) is a plain dict of JSON values, so presets live in config and in checkpoints.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

DNA_CLASS = "ResidualEncoderUNet"

# Fixed for the family; dotted names as nnssl records them (torch is imported when a net is built,
# so config checks at workflow start stay light).
_CONV = "torch.nn.modules.conv.Conv3d"
_NORM = "torch.nn.modules.instancenorm.InstanceNorm3d"
_NORM_KWARGS = {"eps": 1e-5, "affine": True}
_NONLIN = "torch.nn.modules.activation.LeakyReLU"
_NONLIN_KWARGS = {"inplace": True}

REQUIRED = ("n_stages", "features_per_stage", "strides", "n_blocks_per_stage")


def _per_stage(value, n: int, name: str) -> list:
    if isinstance(value, (int, float)):
        return [value] * n
    if len(value) != n:
        raise ValueError(f"ResEnc kwarg {name!r} has {len(value)} entries, n_stages is {n}")
    return list(value)


def _as_3d(value) -> list[int]:
    return [int(value)] * 3 if isinstance(value, (int, float)) else [int(v) for v in value]


def normalised_kwargs(kwargs: dict) -> dict:
    """Every per-stage setting spelled out (the form recorded in the adaptation plan)."""
    missing = [k for k in REQUIRED if k not in kwargs]
    unknown = sorted(set(kwargs) - set(REQUIRED) - {"kernel_sizes", "n_conv_per_stage_decoder", "conv_bias"})
    if missing or unknown:
        raise ValueError(f"ResEnc kwargs: missing {missing}, unknown {unknown}")
    n = int(kwargs["n_stages"])
    return {
        "n_stages": n,
        "features_per_stage": [int(f) for f in _per_stage(kwargs["features_per_stage"], n, "features_per_stage")],
        "kernel_sizes": [_as_3d(k) for k in _per_stage(kwargs.get("kernel_sizes", 3), n, "kernel_sizes")],
        "strides": [_as_3d(s) for s in _per_stage(kwargs["strides"], n, "strides")],
        "n_blocks_per_stage": [int(b) for b in _per_stage(kwargs["n_blocks_per_stage"], n, "n_blocks_per_stage")],
        "n_conv_per_stage_decoder": [
            int(c) for c in _per_stage(kwargs.get("n_conv_per_stage_decoder", 1), n - 1, "n_conv_per_stage_decoder")
        ],
        "conv_bias": bool(kwargs.get("conv_bias", True)),
    }


def total_stride(kwargs: dict) -> list[int]:
    strides = np.array(normalised_kwargs(kwargs)["strides"])
    return [int(v) for v in strides.prod(axis=0)]


def check_patch_size(kwargs: dict, patch_size: Sequence[int]) -> None:
    stride = total_stride(kwargs)
    bad = [(p, s) for p, s in zip(patch_size, stride) if p % s]
    if len(patch_size) != 3 or bad:
        raise ValueError(
            f"patch size {list(patch_size)} is not a multiple of the ResEnc total stride {stride} on every axis"
        )


def build(kwargs: dict, patch_size: Sequence[int], input_channels: int = 1, output_channels: int = 1):
    from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet
    from torch import nn

    check_patch_size(kwargs, patch_size)
    k = normalised_kwargs(kwargs)
    return ResidualEncoderUNet(
        input_channels=input_channels,
        n_stages=k["n_stages"],
        features_per_stage=k["features_per_stage"],
        conv_op=nn.Conv3d,
        kernel_sizes=k["kernel_sizes"],
        strides=k["strides"],
        n_blocks_per_stage=k["n_blocks_per_stage"],
        num_classes=output_channels,
        n_conv_per_stage_decoder=k["n_conv_per_stage_decoder"],
        conv_bias=k["conv_bias"],
        norm_op=nn.InstanceNorm3d,
        norm_op_kwargs=dict(_NORM_KWARGS),
        nonlin=nn.LeakyReLU,
        nonlin_kwargs=dict(_NONLIN_KWARGS),
        deep_supervision=False,
    )


def nnssl_architecture_plans(preset_name: str, kwargs: dict) -> dict:
    """nnssl's `architecture_plans`: the dynamic `ResidualEncoderUNet` form with every kwarg, so any
    ResEnc variant (not only the ResEncL preset) can be rebuilt downstream."""
    k = normalised_kwargs(kwargs)
    arch_kwargs = {
        "n_stages": k["n_stages"],
        "features_per_stage": k["features_per_stage"],
        "conv_op": _CONV,
        "kernel_sizes": k["kernel_sizes"],
        "strides": k["strides"],
        "n_blocks_per_stage": k["n_blocks_per_stage"],
        "n_conv_per_stage_decoder": k["n_conv_per_stage_decoder"],
        "conv_bias": k["conv_bias"],
        "norm_op": _NORM,
        "norm_op_kwargs": dict(_NORM_KWARGS),
        "dropout_op": None,
        "dropout_op_kwargs": None,
        "nonlin": _NONLIN,
        "nonlin_kwargs": dict(_NONLIN_KWARGS),
    }
    return {
        "arch_class_name": DNA_CLASS,
        "arch_kwargs": arch_kwargs,
        "arch_kwargs_requiring_import": ["conv_op", "norm_op", "nonlin"],
    }
