"""Backbones by name: the papers' ResEnc-L and Primus-M and the small variants of the demo and tests.

A preset is a constructor name plus JSON keyword arguments. Variants are entries of `PRESETS`, not
subclasses; a config adds or overrides entries (`pretrain.architecture_presets`) with the same shape.
The adaptation plan of a checkpoint records the preset, so `build_from_adaptation_plan` rebuilds the
exact network for fine-tuning.
"""

from __future__ import annotations

import copy
import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

from openmind_bench import names

if TYPE_CHECKING:
    from torch import nn

# constructor name -> its module; torch is imported when a network is built, never here, so the
# workflow can check architecture names and patch sizes at start-up without loading it.
CONSTRUCTORS = {"residual_encoder_unet": "openmind_bench.nets.resenc", "primus": "openmind_bench.nets.primus"}
# The family picks the optimiser, the schedule and the method implementations.
FAMILIES = {"residual_encoder_unet": names.CNN, "primus": names.TRANSFORMER}


def constructor(name: str):
    if name not in CONSTRUCTORS:
        raise ValueError(f"architecture constructor {name!r} is not one of {sorted(CONSTRUCTORS)}")
    return importlib.import_module(CONSTRUCTORS[name])


PRESETS: dict[str, dict] = {
    # Revisiting MAE (Wald et al.) / nnssl `get_res_enc_l`: 6 stages, 102.35 M parameters.
    "ResEncL": {
        "constructor": "residual_encoder_unet",
        "kwargs": {
            "n_stages": 6,
            "features_per_stage": [32, 64, 128, 256, 320, 320],
            "kernel_sizes": 3,
            "strides": [1, 2, 2, 2, 2, 2],
            "n_blocks_per_stage": [1, 3, 4, 6, 6, 6],
            "n_conv_per_stage_decoder": 1,
            "conv_bias": True,
        },
    },
    # Same code, a few thousand parameters: demo and tests at 32^3.
    "ResEncTiny": {
        "constructor": "residual_encoder_unet",
        "kwargs": {
            "n_stages": 4,
            "features_per_stage": [4, 8, 16, 32],
            "kernel_sizes": 3,
            "strides": [1, 2, 2, 2],
            "n_blocks_per_stage": [1, 1, 1, 1],
            "n_conv_per_stage_decoder": 1,
            "conv_bias": True,
        },
    },
    # Primus paper / nnssl `get_primus("M")`: 8^3 tokens, LayerScale 0.1, drop-path 0.2.
    "PrimusM": {
        "constructor": "primus",
        "kwargs": {
            "embed_dim": 864,
            "eva_depth": 16,
            "eva_numheads": 12,
            "patch_embed_size": [8, 8, 8],
            "drop_path_rate": 0.2,
            "init_values": 0.1,
            "scale_attn_inner": True,
        },
    },
    "PrimusTiny": {
        "constructor": "primus",
        "kwargs": {
            "embed_dim": 96,  # 96 / 4 heads / 1.5 = 16: the 3D RoPE needs a multiple of 4
            "eva_depth": 2,
            "eva_numheads": 4,
            "patch_embed_size": [8, 8, 8],
            "drop_path_rate": 0.0,
            "init_values": 0.1,
            "scale_attn_inner": True,
        },
    },
}


@dataclass(frozen=True)
class Architecture:
    name: str
    constructor: str
    kwargs: dict = field(default_factory=dict)

    @property
    def family(self) -> str:
        """`cnn` or `transformer`."""
        return FAMILIES[self.constructor]

    def build(self, patch_size: Sequence[int], input_channels: int = 1, output_channels: int = 1) -> "nn.Module":
        return constructor(self.constructor).build(self.kwargs, patch_size, input_channels, output_channels)

    def check_patch_size(self, patch_size: Sequence[int]) -> None:
        constructor(self.constructor).check_patch_size(self.kwargs, patch_size)

    def as_dict(self) -> dict:
        kwargs = constructor(self.constructor).normalised_kwargs(self.kwargs)
        return {"name": self.name, "constructor": self.constructor, "kwargs": kwargs}


def resolve(name: str, presets: dict | None = None) -> Architecture:
    """The preset `name` from PRESETS updated by `presets` (config): a config entry with the name of a
    built-in one replaces its kwargs key by key; a new name needs `constructor` and `kwargs`."""
    table = copy.deepcopy(PRESETS)
    for key, entry in (presets or {}).items():
        if key in table:
            base = table[key]
            base["kwargs"].update(entry.get("kwargs", {}))
            base["constructor"] = entry.get("constructor", base["constructor"])
        else:
            table[key] = copy.deepcopy(entry)
    if name not in table:
        raise ValueError(f"unknown architecture {name!r}; known: {sorted(table)}")
    entry = table[name]
    if entry.get("constructor") not in CONSTRUCTORS:
        raise ValueError(
            f"architecture {name!r}: constructor {entry.get('constructor')!r} is not one of {sorted(CONSTRUCTORS)}"
        )
    arch = Architecture(name, entry["constructor"], dict(entry.get("kwargs", {})))
    constructor(arch.constructor).normalised_kwargs(arch.kwargs)  # fail early, naming the bad kwarg
    return arch


def adaptation_keys(net: "nn.Module") -> dict:
    """The state-dict keys fine-tuning needs, as dynamic-network-architectures declares them."""
    return {
        "key_to_encoder": net.key_to_encoder,
        "key_to_stem": net.key_to_stem,
        "keys_to_in_proj": list(net.keys_to_in_proj),
        "key_to_lpe": getattr(net, "key_to_lpe", None),
    }


def nnssl_architecture_plans(arch: Architecture) -> dict:
    plans = constructor(arch.constructor).nnssl_architecture_plans(arch.name, arch.kwargs)
    # nnssl readers ignore extra keys; ours rebuild any preset (including the tiny ones) from it.
    plans["openmind_bench"] = arch.as_dict()
    return plans


def _import_dotted(path: str):
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def build_from_adaptation_plan(
    plan: dict, patch_size: Sequence[int] | None = None, input_channels: int | None = None, output_channels: int = 1
) -> "nn.Module":
    """A fresh network of the architecture a checkpoint was pre-trained with."""
    plans = plan["architecture_plans"]
    patch_size = list(patch_size or plan["recommended_downstream_patchsize"])
    input_channels = input_channels or plan["pretrain_num_input_channels"]
    ours = plans.get("openmind_bench")
    if ours:
        arch = Architecture(ours["name"], ours["constructor"], ours["kwargs"])
        return arch.build(patch_size, input_channels, output_channels)
    name = plans["arch_class_name"]
    if name == "ResidualEncoderUNet" and plans.get("arch_kwargs"):
        kwargs = dict(plans["arch_kwargs"])
        for key in plans.get("arch_kwargs_requiring_import") or []:
            kwargs[key] = _import_dotted(kwargs[key])
        from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet

        return ResidualEncoderUNet(input_channels=input_channels, num_classes=output_channels, **kwargs)
    nnssl_primus = constructor("primus").NNSSL_PRESETS
    if name in PRESETS or name in nnssl_primus:
        if name in PRESETS:
            arch = resolve(name)
        else:
            arch = Architecture(name, "primus", {**PRESETS["PrimusM"]["kwargs"], **nnssl_primus[name]})
        return arch.build(patch_size, input_channels, output_channels)
    raise ValueError(f"adaptation plan names architecture {name!r}, which cannot be rebuilt here")


__all__ = [
    "PRESETS",
    "CONSTRUCTORS",
    "constructor",
    "Architecture",
    "resolve",
    "adaptation_keys",
    "nnssl_architecture_plans",
    "build_from_adaptation_plan",
]
