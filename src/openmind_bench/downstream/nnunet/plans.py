"""nnU-Net plans "like nnssl": the pre-training spacing, z-score per channel, the pre-trained
architecture (from the checkpoint's adaptation plan, or a preset for scratch baselines), patch and
batch size from config (the papers: 160^3, batch 2), no deep supervision; like the fine-tuning
branch's `like_nnssl.py`, the planner's `use_mask_for_norm` (on for brain-extracted sets, where
cropping to the non-zero region shrinks the image) and axis transposition (the identity at an
isotropic target spacing) are kept.

nnU-Net's own planner runs first (fingerprint + `ExperimentPlanner` with the target spacing forced):
it fills every field nnU-Net's preprocessing, training and inference read; `like_nnssl` then
replaces the `3d_fullres` configuration's spacing, normalisation, patch, batch and architecture.
The run's own settings (schedule table, checkpoint, optimiser) travel in the plans' `openmind_bench`
section, so the model folder alone tells how the model was trained.
"""

from __future__ import annotations

import copy
from typing import Sequence

from openmind_bench import nets

CONFIGURATION = "3d_fullres"
PLANS_NAME = "OpenMindPlans"
RESENC_CLASS = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
PRIMUS_CLASS = "dynamic_network_architectures.architectures.primus.Primus"
_PRIMUS_KEYS = ("embed_dim", "eva_depth", "eva_numheads", "patch_embed_size", "init_values", "scale_attn_inner")


class PlansError(ValueError):
    """Plans that cannot be written for this run (architecture, patch size); the message names it."""


def data_identifier(spacing: Sequence[float]) -> str:
    """Preprocessed data folder name: one per target spacing (shared by every run of a dataset)."""
    return "OpenMind_3d_" + "x".join(f"{float(s):g}" for s in spacing)


def _primus_kwargs(kwargs: dict, patch_size: Sequence[int]) -> dict:
    k = nets.constructor("primus").normalised_kwargs(kwargs)
    # drop_path_rate is left out: the architecture package's default, as nnU-Net's fine-tuning builds Primus
    out = {key: k[key] for key in _PRIMUS_KEYS}
    out["input_shape"] = [int(p) for p in patch_size]
    return out


def architecture(pretrained_plan: dict | None, name: str | None, presets: dict | None,
                 patch_size: Sequence[int]) -> tuple[dict, str]:
    """(nnU-Net `architecture` entry, family) of the checkpoint's adaptation plan or of preset `name`."""
    arch = None
    if pretrained_plan:
        plans = pretrained_plan.get("architecture_plans") or {}
        ours = plans.get("openmind_bench")
        cls = plans.get("arch_class_name")
        if ours:
            arch = nets.Architecture(ours["name"], ours["constructor"], ours["kwargs"])
        elif cls == "ResidualEncoderUNet" and plans.get("arch_kwargs"):
            entry = {"network_class_name": RESENC_CLASS, "arch_kwargs": copy.deepcopy(plans["arch_kwargs"]),
                     "_kw_requires_import": list(plans.get("arch_kwargs_requiring_import") or [])}
            entry["arch_kwargs"].pop("deep_supervision", None)
            return entry, "cnn"
        elif cls in nets.constructor("primus").NNSSL_PRESETS:
            base = nets.PRESETS["PrimusM"]["kwargs"]
            arch = nets.Architecture(cls, "primus", {**base, **nets.constructor("primus").NNSSL_PRESETS[cls]})
        elif cls in nets.PRESETS:
            arch = nets.resolve(cls, presets)
        else:
            raise PlansError(f"adaptation plan names architecture {cls!r}, which nnU-Net plans cannot describe")
    else:
        if not name:
            raise PlansError("a from-scratch run must name its architecture")
        arch = nets.resolve(name, presets)
    try:
        arch.check_patch_size(patch_size)
    except ValueError as e:
        raise PlansError(f"architecture {arch.name}: {e}") from None
    if arch.family == "transformer":
        return {"network_class_name": PRIMUS_CLASS, "arch_kwargs": _primus_kwargs(arch.kwargs, patch_size),
                "_kw_requires_import": []}, "transformer"
    dna = nets.constructor(arch.constructor).nnssl_architecture_plans(arch.name, arch.kwargs)
    return {"network_class_name": RESENC_CLASS, "arch_kwargs": dna["arch_kwargs"],
            "_kw_requires_import": list(dna["arch_kwargs_requiring_import"])}, "cnn"


def _planned_mask_for_norm(conf: dict, channels: int) -> list[bool]:
    """The planner's per-channel `use_mask_for_norm` (z-score inside the non-zero region where it chose
    so), as the branch keeps it; off where the planner gave none for these channels."""
    planned = conf.get("use_mask_for_norm")
    if isinstance(planned, list) and len(planned) == channels:
        return [bool(v) for v in planned]
    return [False] * channels


def like_nnssl(default_plans: dict, *, spacing: Sequence[float], patch_size: Sequence[int], batch_size: int,
               architecture_entry: dict, channels: int, run: dict | None = None) -> dict:
    """nnU-Net plans with one `3d_fullres` configuration as the papers fine-tuned (module doc).

    `default_plans` is what nnU-Net's `ExperimentPlanner` wrote for the dataset; `run` goes into the
    `openmind_bench` section (read by the trainer)."""
    if CONFIGURATION not in default_plans.get("configurations", {}):
        raise PlansError(f"nnU-Net plans of {default_plans.get('dataset_name')} have no {CONFIGURATION} configuration")
    plans = copy.deepcopy(default_plans)
    conf = plans["configurations"][CONFIGURATION]
    conf.pop("inherits_from", None)
    conf.update({
        "data_identifier": data_identifier(spacing),
        "spacing": [float(s) for s in spacing],
        "patch_size": [int(p) for p in patch_size],
        "batch_size": int(batch_size),
        "normalization_schemes": ["ZScoreNormalization"] * int(channels),
        "use_mask_for_norm": _planned_mask_for_norm(conf, int(channels)),
        "architecture": copy.deepcopy(architecture_entry),
        "batch_dice": True,
    })
    plans["configurations"] = {CONFIGURATION: conf}
    plans["plans_name"] = PLANS_NAME
    if run is not None:
        plans["openmind_bench"] = copy.deepcopy(run)
    return plans
