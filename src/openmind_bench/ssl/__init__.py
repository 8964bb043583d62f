"""Self-supervised methods, one module each, chosen by name in config.

A method is an `nn.Module` that holds the backbone as `self.backbone` (so the checkpoint's
`network_weights` are exactly the architecture's state dict) plus its pre-training-only parts, and:

- `make_view(batch, seeds) -> dict`: its view of a CPU batch (masks, corruptions, loss weights); all
  randomness comes from the per-sample `seeds`, so DDP and resumed runs draw the same views;
- `forward(view) -> loss`: a scalar; the training loop stays the same for every method.

Optional, per implementation module or class:
- `views_on_device = True` (class): `make_view` gets the batch already on the training device and
  builds its views there in torch (heavy views: crops, mixing, rotations, corruption, full-size
  masks expanded from a block grid);
- `sizes(settings, patch_size) -> (loader patch, network patch)` (module): the loader delivers a
  region and the network sees crops of it (SimCLR-like methods, VoCo); the checkpoint's plan
  records the network patch;
- `LOADER_AUGMENTATION = False` (module): no nnssl MAE spatial augmentation in the loader;
- `LOADER_SAMPLING = "centre"` (module): the loader reads each image's centre crop instead of a
  random patch (nnssl's centre-crop loader; VolumeFusion); an `_anat` name still samples anatomy;
- `grad_clip: {family: value}` in DEFAULTS: the method's own gradient clipping (0 = none).

Method names: a base name of `METHODS` with optional suffixes `_anat` (patches sampled with their
centre inside the anatomy mask; a loader option) and `_anon` (anonymised voxels removed from the
loss), in that order, e.g. `spark3d_anat_anon`. A base name maps per architecture family to an
implementation module; `method_settings.<implementation>` in config overrides its DEFAULTS.

This registry imports no torch (the workflow checks method names at start-up); the implementation
modules do.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from torch import nn

    from openmind_bench.nets import Architecture

# base method -> {architecture family -> implementation module in this package}
METHODS: dict[str, dict[str, str]] = {
    "mae": {"cnn": "mae_cnn", "transformer": "mae_primus"},
    "spark3d": {"cnn": "spark3d"},
    "simmim": {"transformer": "simmim_primus"},
    "models_genesis": {"cnn": "models_genesis", "transformer": "models_genesis"},
    "simclr": {"cnn": "simclr", "transformer": "simclr"},
    "voco": {"cnn": "voco", "transformer": "voco"},
    "volume_fusion": {"cnn": "volume_fusion", "transformer": "volume_fusion"},
    "swinunetr": {"cnn": "swinunetr", "transformer": "swinunetr"},
    "barlow_twins": {"cnn": "barlow_twins", "transformer": "barlow_twins"},
    "vicreg": {"cnn": "vicreg", "transformer": "vicreg"},
}

# Base methods with an anonymisation-aware variant (a voxel-wise reconstruction loss to mask).
ANON_AWARE = ("mae", "spark3d", "simmim", "models_genesis")


@dataclass(frozen=True)
class MethodName:
    base: str
    anatomy_aware: bool
    anon_aware: bool


def parse(name: str) -> MethodName:
    base, anon, anat = name, False, False
    if base.endswith("_anon"):
        base, anon = base[: -len("_anon")], True
    if base.endswith("_anat"):
        base, anat = base[: -len("_anat")], True
    if base not in METHODS:
        raise ValueError(
            f"unknown method {name!r}: a base name of {sorted(METHODS)} with optional '_anat' and '_anon' suffixes"
        )
    if anon and base not in ANON_AWARE:
        raise ValueError(f"method {name!r}: only {list(ANON_AWARE)} have an anonymisation-aware '_anon' variant")
    return MethodName(base, anat, anon)


def implementation(name: str, family: str) -> str:
    parsed = parse(name)
    impl = METHODS[parsed.base].get(family)
    if impl is None:
        raise ValueError(
            f"method {name!r} has no implementation for {family} architectures "
            f"(it has: {sorted(METHODS[parsed.base])})"
        )
    return impl


def compatible(name: str, family: str) -> bool:
    return family in METHODS[parse(name).base]


def _module(impl: str):
    return importlib.import_module(f"openmind_bench.ssl.{impl}")


def settings_for(name: str, family: str, overrides: dict | None = None) -> dict:
    """The implementation's DEFAULTS updated by `overrides` (unknown keys are errors)."""
    impl = implementation(name, family)
    settings = dict(_module(impl).DEFAULTS)
    unknown = sorted(set(overrides or {}) - set(settings))
    if unknown:
        raise ValueError(f"method_settings.{impl}: unknown key(s) {unknown}; known: {sorted(settings)}")
    settings.update(overrides or {})
    return settings


def patch_sizes(name: str, family: str, patch_size: Sequence[int], overrides: dict | None = None
                ) -> tuple[list[int], list[int]]:
    """(loader patch, network patch) of a run: what the batch source crops and what the network sees
    (and the checkpoint's plan records). The same `patch_size` for most methods; SimCLR-like methods and
    VoCo take a larger region from the loader and feed the network smaller crops of it."""
    settings = settings_for(name, family, overrides)
    sizes = getattr(_module(implementation(name, family)), "sizes", None)
    if sizes is None:
        return [int(p) for p in patch_size], [int(p) for p in patch_size]
    loader, network = sizes(settings, patch_size)
    return [int(p) for p in loader], [int(p) for p in network]


def loader_augmentation(name: str, family: str) -> bool:
    """Whether the loader applies nnssl's MAE spatial augmentation (rotation, scaling, mirroring) to
    this method's patches: yes for MAE, Spark3D and SimMIM; no where nnssl applies none (Models
    Genesis) or the method makes its own views (the contrastive and pseudo-segmentation methods).
    A module says no with `LOADER_AUGMENTATION = False`."""
    return bool(getattr(_module(implementation(name, family)), "LOADER_AUGMENTATION", True))


def unused_parameters(name: str, family: str) -> bool:
    """Whether some parameters of the method's model get no gradient, so DDP has to search for them
    every step (`find_unused_parameters`: an extra pass over the autograd graph). A ResEnc always has
    some (the decoder's deep-supervision heads, kept for loadable state dicts); on a Primus only the
    methods that leave its up-projection untrained, i.e. modules without `TRAINS_PRIMUS_UP_PROJECTION`."""
    if family != "transformer":
        return True
    return not getattr(_module(implementation(name, family)), "TRAINS_PRIMUS_UP_PROJECTION", False)


def loader_sampling(name: str, family: str) -> str:
    """Where the loader places a method's patches: "random" (nnssl's default loader; anatomy voxels
    for `_anat` names) or "centre" (the image's centre crop, a module's `LOADER_SAMPLING`)."""
    parsed = parse(name)
    sampling = getattr(_module(implementation(name, family)), "LOADER_SAMPLING", "random")
    if sampling not in ("random", "centre"):
        raise ValueError(f"method {name!r}: LOADER_SAMPLING must be 'random' or 'centre', got {sampling!r}")
    return "random" if parsed.anatomy_aware else sampling


def grad_clip(name: str, family: str, default: float, overrides: dict | None = None) -> float:
    """The gradient-norm clip of a run: the method's own for the family (`grad_clip: {family: value}`
    in its settings, 0 = none) or else the family's optimisation default."""
    per_family = settings_for(name, family, overrides).get("grad_clip") or {}
    value = per_family.get(family)
    if value is None:
        return float(default)
    return float(value) if float(value) > 0 else float("inf")


def build(name: str, backbone: "nn.Module", arch: "Architecture", patch_size: Sequence[int],
          overrides: dict | None = None) -> "nn.Module":
    """The method `name` around `backbone` (built from `arch`), its settings DEFAULTS + `overrides`."""
    impl = implementation(name, arch.family)
    settings = settings_for(name, arch.family, overrides)
    return _module(impl).build(backbone, dict(arch.kwargs), patch_size, anon_aware=parse(name).anon_aware, **settings)


__all__ = ["METHODS", "ANON_AWARE", "MethodName", "parse", "implementation", "compatible", "settings_for",
           "patch_sizes", "loader_augmentation", "loader_sampling", "grad_clip", "build"]
