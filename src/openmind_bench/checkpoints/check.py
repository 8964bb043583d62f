"""The check of a pre-training checkpoint before any GPU hour (`openmind-bench check-checkpoint`).

On CPU: read the checkpoint (any format `downstream.transfer.read_pretrained` reads), build the
architecture from its plan (or the named preset), run the fine-tuning transfer into a fresh network
for each input channel count and verify what moved. A checkpoint that cannot be used raises
`CheckpointError` naming the file and the problem; a usable one gives the report `check.json` holds.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Sequence

from openmind_bench import atomic, nets
from openmind_bench.digests import file_digest
from openmind_bench.downstream import transfer
from openmind_bench.downstream.transfer import TransferError

log = logging.getLogger(__name__)

# The fine-tuning patch of checkpoints without a plan (nnssl Spark) when none is given: nnssl's
# default recommended downstream patch (`add_adaptation_plan.py`).
PLANLESS_PATCH = [160, 160, 160]
OUTPUT_CHANNELS = 2  # any head will do: the decoder is not transferred


class CheckpointError(ValueError):
    """A checkpoint that cannot be used for fine-tuning; the message names the file and the problem."""


def plan_architecture(plan: dict, path: Path) -> dict:
    """The architecture class and family a plan declares (its `architecture_plans`, never a file or run
    name); unknown classes are an error naming the checkpoint."""
    plans = plan.get("architecture_plans") or {}
    class_name = plans.get("arch_class_name")
    ours = plans.get("openmind_bench")
    if ours and ours.get("constructor") in nets.FAMILIES:
        constructor = ours["constructor"]
    elif class_name == "ResidualEncoderUNet" and plans.get("arch_kwargs"):
        constructor = "residual_encoder_unet"
    elif class_name in nets.PRESETS:
        constructor = nets.PRESETS[class_name]["constructor"]
    elif class_name in nets.constructor("primus").NNSSL_PRESETS:
        constructor = "primus"
    else:
        known = sorted({"ResidualEncoderUNet", *nets.PRESETS, *nets.constructor("primus").NNSSL_PRESETS})
        raise CheckpointError(f"checkpoint {path}: its adaptation plan names architecture class {class_name!r}, "
                              f"which cannot be built here (known: {known})")
    return {"class": class_name, "family": nets.FAMILIES[constructor], "constructor": constructor,
            "preset": ours.get("name") if ours else None}


def _shapes(net) -> dict:
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def scratch_architecture(pretrained: transfer.Pretrained, family: str, patch: list[int],
                         presets: dict | None = None) -> str | None:
    """The architecture preset whose network is the checkpoint's, tensor for tensor (same keys and
    shapes at the fine-tuning patch): the from-scratch baseline its rows are compared with. None when
    no preset of its family matches (a plan's own variant): its rows then have no scratch baseline."""
    import torch

    with torch.device("meta"):  # shapes only: no memory, no initialisation of 100+ M parameters
        target = _shapes(transfer.build_network(pretrained, None, patch, 1, OUTPUT_CHANNELS))
        table = {**nets.PRESETS, **(presets or {})}
        for name in table:
            try:
                arch = nets.resolve(name, presets)
            except ValueError:
                continue
            if arch.family != family:
                continue
            try:
                candidate = arch.build(patch, 1, OUTPUT_CHANNELS)
            except (RuntimeError, ValueError):  # a preset that does not fit this patch is not this network
                continue
            if _shapes(candidate) == target:
                return name
    return None


def non_finite(weights: dict) -> list[str]:
    """Keys of floating-point tensors holding NaN or Inf."""
    import torch

    return [k for k, v in weights.items()
            if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())]


def _parameter_count(net) -> int:
    return sum(p.numel() for p in net.parameters())  # shared parameters count once (named_parameters dedups)


def _source_format(pretrained: transfer.Pretrained) -> str:
    if not pretrained.plan:
        return "nnssl, no adaptation plan"
    if pretrained.plan_path is not None or pretrained.path.name == transfer.PUBLISHED_CHECKPOINT:
        return "published repository"
    if (pretrained.trainer_name or "").startswith("openmind_bench:"):
        return "openmind_bench"
    return "nnssl"


def _transfer_into(pretrained: transfer.Pretrained, patch: list[int], channels: int) -> dict:
    """One fine-tuning network of `channels` input channels: transfer, then verify and count."""
    import torch

    # built on the meta device and given empty memory: the check needs the network's structure and the
    # moved tensors, not an initialisation of the rest (seconds for 100+ M parameters)
    with torch.device("meta"):
        net = transfer.build_network(pretrained, None, patch, channels, OUTPUT_CHANNELS)
    net.to_empty(device="cpu")
    moved = transfer.transfer(pretrained, net, patch)
    state = net.state_dict()
    keys = nets.adaptation_keys(net)
    weights = transfer.network_named_weights(pretrained, net)  # the checkpoint's tensors, the network's names
    adapted = {f"{k}.weight" for k in keys["keys_to_in_proj"]}
    lpe = keys.get("key_to_lpe")
    changed = [k for k in moved if k not in adapted and k != lpe and not torch.equal(state[k], weights[k])]
    if changed:  # transfer() copies these unchanged; anything else is a bug, not a checkpoint problem
        raise RuntimeError(f"transfer of {pretrained.path} altered {changed[:3]}")
    moved_storage = {state[k].data_ptr() for k in moved}
    # The ResEnc decoder holds a reference to the encoder: its aliases of moved tensors are not "new".
    left_new = [k for k in state if k not in moved and state[k].data_ptr() not in moved_storage]
    prefixes = [p for p in (keys.get("key_to_encoder"), keys.get("key_to_stem")) if p]
    unexpected = [k for k in weights
                  if k not in state and any(k == p or k.startswith(p + ".") for p in prefixes)]
    moved_set = set(moved)
    result = {"input_channels": channels, "patch_size": list(patch), "parameters": _parameter_count(net),
              "moved": len(moved), "left_new": len(left_new),
              "not_transferred": len([k for k in weights if k not in moved_set]),
              "unexpected": len(unexpected), "unexpected_examples": unexpected[:5],
              "in_proj_repeated": channels != 1 and any(k in adapted for k in moved)}
    if lpe and lpe in moved:
        token = transfer.patch_embed_size(net)
        old = transfer.pretrain_token_grid(pretrained, weights[lpe].shape[1], token) if token else None
        new = transfer.token_grid(patch, token) if token else None
        result["position_embedding"] = {
            "key": lpe, "pretrain_grid": old, "finetune_grid": new,
            "interpolated": bool(old and new and old != new),
            "how": "trilinear over the token grid, prefix tokens kept" if old and new and old != new else "copied"}
    return result


def check_checkpoint(source_path: str | Path, *, architecture: str | None = None,
                     channel_counts: Sequence[int] = (1,), patch_size: Sequence[int] | None = None,
                     presets: dict | None = None) -> dict:
    """Check that `source_path` (a checkpoint file or a published repository folder) can be fine-tuned.
    `presets` are the config's architecture presets (`pretrain.architecture_presets`), among which the
    checkpoint's scratch baseline architecture is looked up.

    Raises CheckpointError naming the file and the problem; returns the report (see module doc)."""
    source = Path(source_path)
    started = time.perf_counter()
    try:
        pretrained = transfer.read_pretrained(source, architecture)
    except TransferError as e:
        raise CheckpointError(str(e)) from e
    path = pretrained.path
    if pretrained.plan:
        arch = plan_architecture(pretrained.plan, path)
    elif pretrained.architecture is not None:
        arch = {"class": pretrained.architecture.name, "family": pretrained.architecture.family,
                "constructor": pretrained.architecture.constructor, "preset": pretrained.architecture.name}
    else:
        raise CheckpointError(f"checkpoint {path} has no adaptation plan (neither in the file nor an "
                              f"{transfer.PUBLISHED_PLAN} beside it): name its architecture (--architecture)")
    bad = non_finite(pretrained.weights)
    if bad:
        raise CheckpointError(f"checkpoint {path} has {len(bad)} tensor(s) with NaN or Inf values, e.g. {bad[:3]}")
    if pretrained.plan:
        patch = transfer.finetuning_patch(patch_size, PLANLESS_PATCH, pretrained)
    else:
        patch = [int(p) for p in (patch_size or PLANLESS_PATCH)]
    transfers = []
    for channels in channel_counts:
        try:
            transfers.append(_transfer_into(pretrained, patch, int(channels)))
        except TransferError as e:
            raise CheckpointError(f"{e} (fine-tuning with {channels} input channel(s), patch {patch})") from e
        except (RuntimeError, ValueError) as e:  # a plan whose kwargs do not build, a patch that does not fit
            raise CheckpointError(f"checkpoint {path}: fine-tuning network with {channels} input channel(s), "
                                  f"patch {patch}: {e}") from e
    arch["scratch_architecture"] = (arch["preset"] if not pretrained.plan else
                                    scratch_architecture(pretrained, arch["family"], patch, presets))
    files = [path] + ([pretrained.plan_path] if pretrained.plan_path else [])
    report = {
        "source": str(source),
        "format": _source_format(pretrained),
        "adaptation_plan": bool(pretrained.plan),
        "trainer_name": pretrained.trainer_name,
        "architecture": arch,
        "parameters": transfers[0]["parameters"] if transfers else None,
        "checkpoint_tensors": len(pretrained.weights),
        "checkpoint_parameters": sum(v.numel() for v in pretrained.weights.values() if hasattr(v, "numel")),
        "pretrain_patch_size": pretrained.patch_size,
        "pretrain_spacing": pretrained.spacing,
        "recommended_downstream_patch_size": pretrained.recommended_patch_size,
        "finetune_patch_size": patch,
        "transfers": transfers,
        "sha256": {str(f): file_digest(f) for f in files},
        "seconds": round(time.perf_counter() - started, 2),
    }
    log.info("checkpoint %s: %s (%s), %d tensors move for %s channel(s), %.1f s", path, arch["class"],
             arch["family"], transfers[0]["moved"] if transfers else 0, list(channel_counts), report["seconds"])
    return report


def write_report(report: dict, out: str | Path) -> Path:
    atomic.write_json(out, report)
    return Path(out)


__all__ = ["CheckpointError", "check_checkpoint", "plan_architecture", "scratch_architecture", "write_report",
           "non_finite"]
