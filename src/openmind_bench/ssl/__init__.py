"""Self-supervised methods, one module each, chosen by name in config.

A method is an `nn.Module` that holds the backbone as `self.backbone` (so the checkpoint's
`network_weights` are exactly the architecture's state dict) plus its pre-training-only parts, and:

- `make_view(batch, seeds) -> dict`: its view of a CPU batch (masks, corruptions, loss weights); all
  randomness comes from the per-sample `seeds`, so DDP and resumed runs draw the same views;
- `forward(view) -> loss`: a scalar; the training loop stays the same for every method.

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
}


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


def build(name: str, backbone: "nn.Module", arch: "Architecture", patch_size: Sequence[int],
          overrides: dict | None = None) -> "nn.Module":
    """The method `name` around `backbone` (built from `arch`), its settings DEFAULTS + `overrides`."""
    impl = implementation(name, arch.family)
    settings = settings_for(name, arch.family, overrides)
    return _module(impl).build(backbone, dict(arch.kwargs), patch_size, anon_aware=parse(name).anon_aware, **settings)


__all__ = ["METHODS", "MethodName", "parse", "implementation", "compatible", "settings_for", "build"]
