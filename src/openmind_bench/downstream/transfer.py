"""Weight transfer from a pre-training checkpoint into a fresh fine-tuning network.

What moves (nnssl's adaptation plan, docs/architecture.md, "Reference protocol"): the encoder (`key_to_encoder`) and the stem
(`key_to_stem`) only; every other tensor (the decoder, pretext heads, mask tokens) stays as freshly
initialised. Two adaptations:

- input channels: a checkpoint pre-trained on one channel fine-tuned on C channels gets the stem's
  input-projection weights (`keys_to_in_proj`) repeated C times along the input axis and divided by
  C, so the first layer's response to C copies of one image is the pre-trained response;
- Primus position embedding (`key_to_lpe`): trilinearly interpolated from the pre-training token
  grid to the fine-tuning one when the patch size changes (VoCo and SimCLR pre-train on 64^3).

Checkpoints in nnssl's own layout load too: the weights under `network_weights` (optionally with
`module.` / `_orig_mod.` prefixes from DDP or torch.compile), the misspelt `key_to_in_proj` of some
public Primus trainers, and Spark checkpoints without an adaptation plan (the target network's own
keys are used then; the caller must name the architecture).

The published repository layout (the `openmind-models` collection on Hugging Face, e.g.
`AnonRes/ResEncL-OpenMind-MAE`) reads as well, from the folder or from its `checkpoint_final.pth`.
What the folder holds, from nnssl (`utilities/add_adaptation_plan.py`, `AdaptationPlan.serialize`)
and nnU-Net's reader (`experiment_planning/like_nnssl.py`, branch `nnssl_finetuning_inclusion`):

- `checkpoint_final.pth`: nnssl's `save_checkpoint` dict less the optimiser, grad scaler, EMA,
  epoch and logging entries, i.e. `network_weights`, `nnssl_adaptation_plan`, `trainer_name`;
  it loads with `weights_only=True` (nnssl converts numpy values to plain ones for that);
- `adaptation_plan.json`: the same adaptation plan (`architecture_plans`, `pretrain_plan`,
  `pretrain_num_input_channels`, `recommended_downstream_patchsize`, `key_to_encoder`, `key_to_stem`,
  `keys_to_in_proj`, `key_to_lpe`) plus `trainer_name`; used here when the checkpoint has no plan;
- `config.json`: downloaded by nnU-Net's reader but never read; assumed to be free-form model
  metadata, so it is not read here either.

Only `torch.load(weights_only=True)`: a checkpoint whose pickle needs other classes (it would run
code from the file) is refused with a message saying so, never loaded another way.
"""

from __future__ import annotations

import json
import logging
import math
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from openmind_bench import nets
from openmind_bench.downstream.schedules import GROUPS
from openmind_bench.engine import checkpoint

log = logging.getLogger(__name__)

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
PUBLISHED_CHECKPOINT = "checkpoint_final.pth"  # the published repositories' file names
PUBLISHED_PLAN = "adaptation_plan.json"


class TransferError(ValueError):
    """A checkpoint that cannot be transferred into the requested network; the message names it."""


@dataclass(frozen=True)
class Pretrained:
    """A pre-training checkpoint as fine-tuning needs it."""

    path: Path
    weights: dict  # state dict of the pre-trained network (wrapper prefixes removed)
    plan: dict | None  # nnssl_adaptation_plan (None: nnssl Spark checkpoints)
    keys: dict = field(default_factory=dict)  # key_to_encoder, key_to_stem, keys_to_in_proj, key_to_lpe
    architecture: nets.Architecture | None = None  # named by the caller, for checkpoints without a plan
    plan_path: Path | None = None  # the adaptation_plan.json the plan came from, when not the checkpoint
    trainer_name: str | None = None

    @property
    def patch_size(self) -> list[int] | None:
        return checkpoint.pretrain_patch_size(self.plan) if self.plan else None

    @property
    def spacing(self) -> list[float] | None:
        if not self.plan:
            return None
        configurations = self.plan["pretrain_plan"]["configurations"]
        conf = configurations.get(checkpoint.CONFIGURATION) or next(iter(configurations.values()))
        return [float(s) for s in conf.get("spacing", [])] or None

    @property
    def recommended_patch_size(self) -> list[int] | None:
        return [int(p) for p in self.plan["recommended_downstream_patchsize"]] if self.plan else None


def finetuning_patch(patch_size, scratch_patch_size, pretrained: "Pretrained | None") -> list[int]:
    """The fine-tuning patch: the configured one, else the checkpoint's recommended downstream patch,
    else (scratch runs, checkpoints without an adaptation plan) the scratch patch."""
    if patch_size:
        return [int(p) for p in patch_size]
    if pretrained is not None and pretrained.recommended_patch_size:
        return pretrained.recommended_patch_size
    return [int(p) for p in scratch_patch_size]


def _strip_wrappers(weights: dict) -> dict:
    """Keys without the wrappers' prefixes, in whatever order they nest (DDP of a compiled network
    saves `module._orig_mod.`, a compiled DDP module `_orig_mod.module.`)."""
    out = {}
    for key, value in weights.items():
        stripped = None
        while stripped != key:
            stripped = key
            for prefix in _WRAPPER_PREFIXES:
                key = key.removeprefix(prefix)
        out[key] = value
    return out


def _plan_keys(plan: dict | None) -> dict:
    if not plan:
        return {}
    in_proj = plan.get("keys_to_in_proj", plan.get("key_to_in_proj"))  # the public Primus trainers' spelling
    if isinstance(in_proj, str):
        in_proj = [in_proj]
    return {"key_to_encoder": plan.get("key_to_encoder"), "key_to_stem": plan.get("key_to_stem"),
            "keys_to_in_proj": list(in_proj or []), "key_to_lpe": plan.get("key_to_lpe")}


def checkpoint_file(path: str | Path) -> Path:
    """The checkpoint file of `path`: the file itself, or a published repository folder's
    `checkpoint_final.pth` (our `checkpoint_final.pt` in a run folder)."""
    path = Path(path)
    if path.is_dir():
        for name in (PUBLISHED_CHECKPOINT, checkpoint.FINAL):
            if (path / name).is_file():
                return path / name
        raise TransferError(f"{path} is a folder without {PUBLISHED_CHECKPOINT} or {checkpoint.FINAL}")
    if not path.is_file():
        raise TransferError(f"pre-training checkpoint {path} does not exist")
    return path


def load_weights_only(path: Path):
    """torch.load with weights_only=True; the error says whether the file is no torch file or a
    pickle that would need (and run) code."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        refused = [line.strip() for line in str(e).splitlines() if "Unsupported global" in line]
        if refused:  # a class or function the pickle would import and call
            raise TransferError(
                f"checkpoint {path} pickles objects other than tensors and plain containers: "
                f"torch.load(weights_only=True) refuses it ({refused[0][:200]}), and loading it otherwise would run "
                f"code from the file; re-save its network_weights and plan with code you trust") from e
        raise TransferError(f"checkpoint {path} is not a readable torch file: {str(e).strip()[-300:]}") from e
    except Exception as e:  # a torn or foreign file
        raise TransferError(f"checkpoint {path} is not a readable torch file: {e}") from e


def read_pretrained(path: str | Path, architecture: "str | nets.Architecture | None" = None) -> Pretrained:
    """Read our checkpoints, nnssl's and the published repositories' (a folder, or its
    `checkpoint_final.pth` with `adaptation_plan.json` beside it); tensors only.

    `architecture` (a preset name) is for checkpoints with no plan anywhere (nnssl Spark)."""
    path = checkpoint_file(path)
    state = load_weights_only(path)
    if not isinstance(state, dict) or not isinstance(state.get("network_weights"), dict):
        raise TransferError(f"checkpoint {path} has no network_weights (not an nnssl/openmind_bench checkpoint)")
    plan = state.get("nnssl_adaptation_plan") or None
    plan_path = None
    beside = path.with_name(PUBLISHED_PLAN)
    if not plan and beside.is_file():
        try:
            plan = json.loads(beside.read_text())
        except (OSError, ValueError) as e:
            raise TransferError(f"{beside} (the adaptation plan of {path}) is not readable JSON: {e}") from e
        if not isinstance(plan, dict) or "architecture_plans" not in plan:
            raise TransferError(f"{beside} (the adaptation plan of {path}) has no architecture_plans")
        plan = {k: v for k, v in plan.items() if k != "trainer_name"}  # nnssl adds it to the JSON only
        plan_path = beside
    if isinstance(architecture, str):
        try:
            architecture = nets.resolve(architecture)
        except ValueError as e:
            raise TransferError(f"checkpoint {path}: {e}") from e
    trainer = state.get("trainer_name")
    return Pretrained(path, _strip_wrappers(state["network_weights"]), plan, _plan_keys(plan), architecture,
                      plan_path, trainer if isinstance(trainer, str) else None)


def build_network(pretrained: Pretrained | None, architecture: nets.Architecture | None, patch_size: Sequence[int],
                  input_channels: int, output_channels: int) -> nn.Module:
    """A fresh network of the checkpoint's architecture (or `architecture`, for scratch and plan-less
    checkpoints) for this patch and these channels."""
    if pretrained is not None and pretrained.plan:
        try:
            return nets.build_from_adaptation_plan(pretrained.plan, patch_size=patch_size,
                                                   input_channels=input_channels, output_channels=output_channels)
        except (KeyError, TypeError, ValueError) as e:
            raise TransferError(f"checkpoint {pretrained.path}: its adaptation plan cannot be built: "
                                f"{e if not isinstance(e, KeyError) else f'no {e} entry'}") from e
    if architecture is None and pretrained is not None:
        architecture = pretrained.architecture
    if architecture is None:
        where = f"checkpoint {pretrained.path} has no adaptation plan" if pretrained else "a from-scratch run"
        raise TransferError(f"{where}: name the architecture")
    return architecture.build(patch_size, input_channels, output_channels)


def _under(key: str, prefix: str | None) -> bool:
    return bool(prefix) and (key == prefix or key.startswith(prefix + "."))


def transferred_keys(state_keys, keys: dict) -> list[str]:
    """The state-dict keys that come from the checkpoint: encoder, stem and position embedding."""
    return [k for k in state_keys
            if _under(k, keys["key_to_encoder"]) or _under(k, keys["key_to_stem"]) or k == keys.get("key_to_lpe")]


def repeat_input_channels(weight: torch.Tensor, channels: int, key: str) -> torch.Tensor:
    """(out, c_pre, ...) -> (out, channels, ...): the pre-trained filters repeated, divided by the
    repeat count (c_pre must divide channels)."""
    c_pre = weight.shape[1]
    if c_pre == channels:
        return weight
    if channels % c_pre:
        raise TransferError(f"{key}: pre-trained on {c_pre} input channel(s), cannot be spread over {channels}")
    factor = channels // c_pre
    return weight.repeat(1, factor, *([1] * (weight.dim() - 2))) / factor


def token_grid(patch_size: Sequence[int], token_size: Sequence[int]) -> list[int]:
    return [int(p) // int(t) for p, t in zip(patch_size, token_size)]


def pretrain_token_grid(pretrained: Pretrained, tokens: int, token_size: Sequence[int]) -> list[int] | None:
    """The token grid the checkpoint's position embedding of `tokens` entries was learnt on: the plan's
    pre-training patch over the token size, when that many tokens (prefix tokens aside) are there. A
    plan whose patch is the loader's region rather than the network's input (SimCLR's (192, 192, 64)
    region of 64^3 crops) disagrees with the embedding: then a cube of `tokens` is taken, the crops'
    grid, and the log says so. None when neither fits."""
    patch = pretrained.patch_size
    if patch:
        grid = token_grid(patch, token_size)
        if 0 <= tokens - math.prod(grid) <= MAX_PREFIX_TOKENS:
            return grid
    side = round(tokens ** (1 / 3))
    if side ** 3 == tokens:
        log.warning("checkpoint %s: its plan's pre-training patch %s does not give the position embedding's %d "
                    "tokens; taking the %d^3 grid of the network's input (the crops of a region)", pretrained.path,
                    patch, tokens, side)
        return [side] * 3
    return None


# class and register tokens before the grid's in a position embedding (Primus has none; Eva may have some)
MAX_PREFIX_TOKENS = 8


def interpolate_position_embedding(embedding: torch.Tensor, old_grid: Sequence[int],
                                   new_grid: Sequence[int]) -> torch.Tensor:
    """(1, prefix + prod(old_grid), C) -> (1, prefix + prod(new_grid), C), trilinear over the grid;
    prefix (class/register) tokens are kept as they are. Token order is Primus' (w h d) flattening."""
    n_old = math.prod(old_grid)
    prefix = embedding.shape[1] - n_old
    if prefix < 0:
        raise TransferError(f"position embedding has {embedding.shape[1]} tokens, "
                            f"the grid {list(old_grid)} needs {n_old}")
    if list(old_grid) == list(new_grid):
        return embedding
    head, grid_tokens = embedding[:, :prefix], embedding[:, prefix:]
    channels = grid_tokens.shape[-1]
    volume = grid_tokens.reshape(1, *old_grid, channels).permute(0, 4, 1, 2, 3).float()
    resized = torch.nn.functional.interpolate(volume, size=tuple(int(g) for g in new_grid), mode="trilinear",
                                              align_corners=False)
    resized = resized.permute(0, 2, 3, 4, 1).reshape(1, math.prod(new_grid), channels).to(embedding.dtype)
    return torch.cat([head, resized], dim=1)


def patch_embed_size(net: nn.Module) -> list[int] | None:
    proj = getattr(getattr(net, "down_projection", None), "proj", None)
    return [int(k) for k in proj.kernel_size] if proj is not None else None


def network_named_weights(pretrained: Pretrained, net: nn.Module) -> dict:
    """The checkpoint's tensors under the fine-tuning network's names: what lies under the plan's
    `key_to_encoder`, `key_to_stem`, `key_to_lpe` and `keys_to_in_proj` is renamed to lie under the
    network's own (as the fine-tuning branch loads them). nnssl's SimCLR and VoCo Primus checkpoints
    wrap the backbone (`encoder.eva`, `encoder.down_projection`), the fine-tuning Primus has `eva`,
    `down_projection`; most plans name the network's own keys, and nothing moves."""
    plan = pretrained.keys
    if not plan:
        return pretrained.weights  # plan-less (nnssl Spark): the network's names
    own = nets.adaptation_keys(net)
    pairs = [(plan[k], own[k]) for k in ("key_to_encoder", "key_to_stem", "key_to_lpe") if plan.get(k) and own.get(k)]
    pairs += list(zip(plan.get("keys_to_in_proj") or [], own["keys_to_in_proj"]))
    pairs.sort(key=lambda pair: len(pair[0]), reverse=True)  # the most specific prefix names a key
    renamed = {}
    for key, value in pretrained.weights.items():
        for old, new in pairs:
            if _under(key, old):
                key = new + key[len(old):]
                break
        if key in renamed:
            raise TransferError(f"checkpoint {pretrained.path}: two tensors map onto the network's {key} "
                                "(its adaptation plan's keys overlap)")
        renamed[key] = value
    return renamed


def transfer(pretrained: Pretrained, net: nn.Module, patch_size: Sequence[int]) -> list[str]:
    """Load the checkpoint's encoder and stem into `net` (in place); returns the keys loaded (the
    network's names: `network_named_weights`).

    Raises TransferError when a transferred tensor is missing or has a shape that no rule adapts."""
    keys = nets.adaptation_keys(net)
    weights = network_named_weights(pretrained, net)
    target = net.state_dict()
    wanted = transferred_keys(target, keys)
    if not wanted:
        raise TransferError(f"checkpoint {pretrained.path}: no key of the network lies under encoder "
                            f"{keys['key_to_encoder']!r} or stem {keys['key_to_stem']!r}")
    missing = [k for k in wanted if k not in weights]
    if missing:
        plan = pretrained.keys
        named = (f" (its plan's encoder {plan.get('key_to_encoder')!r}, stem {plan.get('key_to_stem')!r})"
                 if plan else "")
        raise TransferError(f"checkpoint {pretrained.path} lacks {len(missing)} encoder/stem tensor(s) of the "
                            f"target network, e.g. {missing[:3]}{named} (another architecture?)")
    in_proj_weights = {f"{k}.weight" for k in keys["keys_to_in_proj"]}
    new = {}
    for key in wanted:
        value = weights[key]
        if key in in_proj_weights:
            value = repeat_input_channels(value, target[key].shape[1], key)
        elif key == keys.get("key_to_lpe") and value.shape != target[key].shape:
            token = patch_embed_size(net)
            old_grid = pretrain_token_grid(pretrained, value.shape[1], token) if token else None
            if old_grid is None:
                raise TransferError(f"checkpoint {pretrained.path}: {key} has shape {tuple(value.shape)}, the network "
                                    f"{tuple(target[key].shape)}, and the pre-training token grid is unknown")
            value = interpolate_position_embedding(value, old_grid, token_grid(patch_size, token))
            log.info("%s interpolated from the %s to the %s token grid", key, old_grid, token_grid(patch_size, token))
        if value.shape != target[key].shape:
            raise TransferError(f"checkpoint {pretrained.path}: {key} has shape {tuple(value.shape)}, the network "
                                f"{tuple(target[key].shape)}")
        new[key] = value.to(target[key].dtype)
    result = net.load_state_dict(new, strict=False)
    if result.unexpected_keys:
        raise TransferError(f"unexpected keys while transferring {pretrained.path}: {result.unexpected_keys[:3]}")
    log.info("transferred %d encoder/stem tensors from %s; %d tensors stay newly initialised", len(new),
             pretrained.path, len(target) - len(new))
    return wanted


def parameter_groups(net: nn.Module, keys: dict) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """The schedules' groups: `stem`, `encoder` (position embedding included) and `decoder` (all else).

    Shared parameters (the ResEnc decoder keeps a reference to the encoder) count once, under the
    name they are first registered with."""
    groups: dict[str, list] = {"stem": [], "encoder": [], "decoder": []}
    for name, param in net.named_parameters():
        if _under(name, keys["key_to_stem"]):
            groups["stem"].append((name, param))
        elif _under(name, keys["key_to_encoder"]) or name == keys.get("key_to_lpe"):
            groups["encoder"].append((name, param))
        else:
            groups["decoder"].append((name, param))
    return groups


def set_trainable(groups: dict, trainable) -> None:
    """`requires_grad` on for the parameters of the groups named in `trainable`, off for the others
    (frozen parameters get no gradient, so no optimiser moves them)."""
    for name, named in groups.items():
        for _, param in named:
            param.requires_grad_(name in trainable)


def optimiser_groups(groups: dict, names) -> list[dict]:
    """One torch parameter group per schedule group in `names` that has parameters, in the schedules'
    order and named, so a schedule's lr can be set per group."""
    return [{"params": [p for _, p in groups[g]], "name": g} for g in GROUPS if g in names and groups.get(g)]


def add_starting_groups(optimizer, groups: dict, names) -> None:
    """Add to `optimizer` the groups of `names` it does not hold yet (the others keep their state)."""
    present = {g["name"] for g in optimizer.param_groups}
    for group in optimiser_groups(groups, [n for n in names if n not in present]):
        optimizer.add_param_group(group)


def trained_parameters(net: nn.Module, groups: dict, trained) -> dict:
    """How much of `net` the run trains: `count`, the parameters of the groups in `trained` (every
    group some phase trains; under `lora`, the encoder group is its adapters), `total`, the
    network's parameters as trained (adapters included, as peft counts), and `share` = count / total.
    The groups hold each parameter once (`parameter_groups`)."""
    count = sum(p.numel() for g in set(trained) for _, p in groups.get(g, []))
    total = sum(p.numel() for p in net.parameters())
    return {"count": int(count), "total": int(total), "share": count / total if total else 0.0}
