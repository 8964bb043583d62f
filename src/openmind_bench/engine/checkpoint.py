"""Checkpoints in nnssl's layout, written atomically, readable with `torch.load(weights_only=True)`.

Keys: `network_weights` (the architecture's own state dict: loads into a fresh ResidualEncoderUNet /
Primus), `pretext_weights` (pre-training-only parts: mask tokens, MAE decoder, densifiers),
`optimizer_state`, `grad_scaler_state`, `current_epoch` (epochs completed), `step_in_epoch` (steps of
the next epoch already done, after a preemption), `nnssl_adaptation_plan` (always, for every method:
nnssl omits it for Spark), `trainer_settings`, `method_settings` (resolved), `history`, `partial_epoch`
(loss sum and step count of the interrupted epoch, over all ranks), `rng_states` (the process-wide
generators of every rank, so a resumed run draws what the uninterrupted one would have). Only tensors, numbers, strings, lists and
dicts, so no pickled code runs on load.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from openmind_bench import atomic, nets

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger(__name__)

FINAL = "checkpoint_final.pt"
LATEST = "checkpoint_latest.pt"
PREEMPTED = "preempted.json"
CONFIGURATION = "onemmiso"

# torch is imported inside the functions: the launcher uses the file names without loading torch.

# Settings that must match for a run to continue from a checkpoint.
_MUST_MATCH = ("method", "architecture", "patch_size", "total_batch_size", "seed", "architecture_presets",
               "method_settings")


def pretrain_plan(settings, patch_size=None) -> dict:
    """nnssl's `Plan` of the pre-training data (spacing, normalisation, patch size: the network's input,
    `patch_size` when given, e.g. the 64^3 crops of SimCLR and VoCo)."""
    plan = settings.pretrain_plan
    spacing = [float(s) for s in plan["spacing"]]
    return {
        "dataset_name": settings.selection or "openmind",
        "plans_name": "openmind_bench",
        "original_median_spacing_after_transp": spacing,
        "image_reader_writer": "NibabelReaderWriter",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "experiment_planner_used": "openmind_bench",
        "configurations": {
            CONFIGURATION: {
                "data_identifier": plan["data_identifier"],
                "preprocessor_name": "openmind_bench",
                "spacing_style": CONFIGURATION,
                "normalization_schemes": list(plan["normalization_schemes"]),
                "use_mask_for_norm": [False],
                "resampling_fn_data": "resample_data_or_seg_to_shape",
                "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
                "resampling_fn_mask": "resample_data_or_seg_to_shape",
                "resampling_fn_mask_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
                "spacing": spacing,
                "patch_size": [int(p) for p in (patch_size or settings.patch_size)],
            }
        },
    }


def adaptation_plan(arch: nets.Architecture, backbone: "nn.Module", settings, patch_size=None) -> dict:
    return {
        "architecture_plans": nets.nnssl_architecture_plans(arch),
        "pretrain_plan": pretrain_plan(settings, patch_size),
        "pretrain_num_input_channels": 1,
        "recommended_downstream_patchsize": [int(p) for p in settings.recommended_downstream_patch_size],
        **nets.adaptation_keys(backbone),
    }


def pretrain_patch_size(plan: dict) -> list[int]:
    configurations = plan["pretrain_plan"]["configurations"]
    return list(configurations[CONFIGURATION if CONFIGURATION in configurations else next(iter(configurations))]
                ["patch_size"])


def save(path: str | Path, *, method: "nn.Module", optimizer, grad_scaler, current_epoch: int, step_in_epoch: int,
         plan: dict, settings, history: list, partial_epoch: list | None = None,
         method_settings: dict | None = None, rng_states: list | None = None) -> None:
    import torch

    full = method.state_dict()
    state = {
        "network_weights": method.backbone.state_dict(),
        "pretext_weights": {k: v for k, v in full.items() if not k.startswith("backbone.")},
        "optimizer_state": optimizer.state_dict(),
        "grad_scaler_state": grad_scaler.state_dict() if grad_scaler is not None else None,
        "current_epoch": int(current_epoch),
        "step_in_epoch": int(step_in_epoch),
        "partial_epoch": list(partial_epoch or [0.0, 0]),
        "nnssl_adaptation_plan": plan,
        "trainer_settings": settings.to_dict(),
        "method_settings": dict(method_settings or {}),  # the implementation's DEFAULTS + overrides
        "trainer_name": f"openmind_bench:{settings.method}",
        "history": list(history),
        "rng_states": list(rng_states or []),
    }
    with atomic.atomic_path(path) as tmp:
        torch.save(state, tmp)


def load(path: str | Path, map_location="cpu") -> dict:
    import torch

    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # a torn or foreign file: say which one
        raise ValueError(f"cannot read checkpoint {path}: {e}") from e


def check_resumable(state: dict, settings, path: str | Path) -> None:
    saved = state.get("trainer_settings", {})
    current = settings.to_dict()
    diff = [k for k in _MUST_MATCH if saved.get(k) != current.get(k)]
    if diff:
        raise ValueError(
            f"checkpoint {path} was written by a run with other settings ({', '.join(diff)}): "
            "delete it or restore those settings to continue"
        )
    for key in ("epochs", "steps_per_epoch", "optimisation"):
        if saved.get(key) != current.get(key):
            log.warning("resuming %s with a changed %s: %s -> %s", path, key, saved.get(key), current.get(key))


def restore(state: dict, method: "nn.Module", optimizer=None, grad_scaler=None) -> None:
    weights = {f"backbone.{k}": v for k, v in state["network_weights"].items()}
    weights.update(state["pretext_weights"])
    method.load_state_dict(weights, strict=True)
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer_state"])
    if grad_scaler is not None and state.get("grad_scaler_state"):
        grad_scaler.load_state_dict(state["grad_scaler_state"])


def load_backbone(path: str | Path, patch_size=None) -> tuple["nn.Module", dict]:
    """A fresh network of the checkpoint's architecture with its pre-trained weights, and the plan.

    Built at the pre-training patch size unless told otherwise (a Primus position embedding has one
    entry per token of that patch)."""
    state = load(path)
    plan = state.get("nnssl_adaptation_plan")
    if not plan:
        raise ValueError(f"checkpoint {path} has no nnssl_adaptation_plan")
    net = nets.build_from_adaptation_plan(plan, patch_size=patch_size or pretrain_patch_size(plan))
    net.load_state_dict(state["network_weights"], strict=True)
    return net, plan
