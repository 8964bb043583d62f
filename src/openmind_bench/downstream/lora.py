"""The `lora` fine-tuning schedule: low-rank adapters (Hu et al. 2021, LoRA) on the frozen
pre-trained encoder, through `peft`; the decoder (or classification head) and the stem train fully.

What trains (both engines, `downstream.nnunet.trainer` and `downstream.classification`):

- the encoder's weights stay as loaded (norms, biases, the Primus position embedding and
  LayerScale included); adapters `lora_A` / `lora_B` wrap the layers that `downstream.lora.
  target_modules.{cnn,transformer}` names (a regular expression over module names, matched in
  full as peft does): by default every 3D convolution of ResEnc's residual blocks and every
  attention projection and MLP linear of Primus' Eva blocks;
- stem and decoder / head train as in full fine-tuning.

The schedule's parameter groups stay `stem` / `encoder` / `decoder`: `adapter_groups` narrows the
`encoder` group to the adapters, so the `lora` template of `downstream.schedules` (all groups, the
`warmup` schedule's warm-up and poly) trains exactly that. After training `Adapters.merge` folds the
adapters into the weights (peft `merge_and_unload`): the saved network is a plain one of the
architecture, which nnU-Net's predictor and our inference load with no peft installed.

Two things peft does not do for these networks, done here:

- aliases: dynamic-network-architectures' `ConvDropoutNormReLU` holds its convolution twice
  (`.conv` and `.all_modules.0`, the one its forward calls). peft wraps the first name it meets
  (`named_modules` lists a module once), so every other reference is pointed at the wrapper too,
  and after the merge at the merged layer;
- peft 0.21 cannot merge a 1x1x1 `Conv3d` (its `get_delta_weight` takes it for a 2D 1x1 kernel and
  fails on the shapes): a target of that kind is refused at model build, naming the key. The
  default CNN pattern leaves out ResEnc's 1x1x1 skip projections for that reason.

peft is imported when adapters are attached, never at import, so the workflow can validate a
config without it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from openmind_bench.config import ConfigError

if TYPE_CHECKING:
    from torch import nn

SCHEDULE = "lora"  # the schedule name that attaches adapters
ADAPTER_NAME = "default"
KEY = "downstream.lora"
# the config keys that shape the adapters (the scope keys only choose where the schedule runs)
ADAPTER_KEYS = ("rank", "alpha", "dropout", "target_modules")


def uses_lora(schedule_name: str | None) -> bool:
    return schedule_name == SCHEDULE


def adapter_config(downstream: dict) -> dict:
    """The adapter settings of config `downstream.lora` (what a `lora` run's record holds)."""
    return {k: downstream["lora"][k] for k in ADAPTER_KEYS}


def check_config(section: dict) -> None:
    """Config `downstream.lora` before any job: the patterns compile (the schema checks rank >= 1,
    alpha > 0, 0 <= dropout < 1)."""
    for family, pattern in (section.get("target_modules") or {}).items():
        try:
            re.compile(pattern)
        except re.error as e:
            raise ConfigError(f"config key '{KEY}.target_modules.{family}': {pattern!r} is not a regular "
                              f"expression ({e})") from None
    rank = section.get("rank")
    if not isinstance(rank, int) or rank < 1:  # the schema says so too; a section built in code may not
        raise ConfigError(f"config key '{KEY}.rank': {rank!r} is not a positive integer")


def is_adapter(parameter_name: str) -> bool:
    return ".lora_A." in parameter_name or ".lora_B." in parameter_name


def target_names(net: "nn.Module", pattern: str, encoder_prefix: str, family: str) -> list[str]:
    """The module names of `net` that `pattern` matches in full: Linear or Conv3d layers inside the
    encoder (`encoder_prefix`); else a ConfigError naming `downstream.lora.target_modules.{family}`."""
    from torch import nn

    key = f"{KEY}.target_modules.{family}"
    modules = dict(net.named_modules())
    matched = [name for name in modules if name and re.fullmatch(pattern, name)]
    if not matched:
        layers = [n for n, m in modules.items() if isinstance(m, (nn.Linear, nn.Conv3d))
                  and n.startswith(encoder_prefix + ".")]
        raise ConfigError(f"config key '{key}': {pattern!r} matches no module of the network; its encoder's "
                          f"layers are named like {layers[:4]}")
    for name in matched:
        module = modules[name]
        if not isinstance(module, (nn.Linear, nn.Conv3d)):
            raise ConfigError(f"config key '{key}': {pattern!r} matches {name}, a {type(module).__name__}; LoRA "
                              "wraps Linear and Conv3d layers only")
        if not name.startswith(encoder_prefix + "."):
            raise ConfigError(f"config key '{key}': {pattern!r} matches {name}, outside the encoder "
                              f"({encoder_prefix!r}); stem and decoder train fully in the lora schedule")
        if isinstance(module, nn.Conv3d) and tuple(module.kernel_size) == (1, 1, 1):
            raise ConfigError(f"config key '{key}': {pattern!r} matches {name}, a 1x1x1 Conv3d, which peft "
                              "cannot merge (it takes the kernel for a 2D 1x1 one); leave it out of the pattern")
    return matched


@dataclass
class Adapters:
    """Adapters attached to a network in place (`attach`); `merge` folds them in."""

    tuner: object  # peft.tuners.lora.LoraModel over the network
    aliases: list[tuple[str, str]]  # (another name of a wrapped layer, the name peft wrapped)
    merged: bool = False

    @property
    def network(self) -> "nn.Module":
        return self.tuner.model

    def merge(self) -> "nn.Module":
        """Fold the adapters into the wrapped weights (peft `merge_and_unload`); the network is a
        plain one again, changed in place and returned."""
        if self.merged:
            return self.network
        net = self.tuner.merge_and_unload()
        _repoint(net, self.aliases)
        self.merged = True
        return net


def _repoint(net: "nn.Module", aliases: list[tuple[str, str]]) -> None:
    """Point every alias at the module now at its canonical name."""
    for alias, canonical in aliases:
        parent, _, leaf = alias.rpartition(".")
        setattr(net.get_submodule(parent), leaf, net.get_submodule(canonical))


def attach(net: "nn.Module", family: str, settings: dict, encoder_prefix: str) -> Adapters:
    """Wrap the target layers of `net` (in place) with LoRA adapters of `settings` (config
    `downstream.lora`: rank, alpha, dropout, target_modules); every parameter is frozen but the
    adapters' (the engines then unfreeze stem and decoder through the schedule)."""
    from peft import LoraConfig
    from peft.tuners.lora import LoraModel

    check_config(settings)
    pattern = settings["target_modules"][family]
    names = target_names(net, pattern, encoder_prefix, family)
    every_name: dict[int, list[str]] = {}
    for name, module in net.named_modules(remove_duplicate=False):
        every_name.setdefault(id(module), []).append(name)
    modules = dict(net.named_modules())
    aliases = [(other, name) for name in names for other in every_name[id(modules[name])] if other != name]
    config = LoraConfig(r=int(settings["rank"]), lora_alpha=float(settings["alpha"]),
                        lora_dropout=float(settings["dropout"]), target_modules=names, bias="none")
    tuner = LoraModel(net, config, ADAPTER_NAME)
    _repoint(net, aliases)
    return Adapters(tuner, aliases)


def adapter_groups(groups: dict) -> dict:
    """The schedule's groups of a network with adapters: the `encoder` group holds the adapters only
    (the encoder's own weights never train in this schedule)."""
    return {**groups, "encoder": [(n, p) for n, p in groups["encoder"] if is_adapter(n)]}
