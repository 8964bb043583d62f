"""Fine-tuning schedules as data: phases that say which parameter groups train and how the lr moves.

A schedule is a tuple of `Phase`s run one after the other. Each phase names the parameter groups
that train during it (the others are frozen), its length in epochs and its lr curve, relative to
the run's peak lr:

- `linear_warmup`: peak * f * (e + 1) / L for epoch e = 0..L-1 of the phase (nnU-Net/nnssl's
  `Lin_incr_LRScheduler`: the last warm-up epoch reaches the peak);
- `poly`: peak * f * (1 - e / L) ** 0.9 (nnU-Net's PolyLR, restarted at the phase's first epoch);
- `cosine`: peak * f * (1 + cos(pi * e / L)) / 2 (the classification protocol's cosine annealing);
- `warmstart`: peak * f * (e + 1) / (L + 1) (SSL3D_classification's `CosineAnnealingLR_Warmstart`:
  its last warm-up epoch stays at L / (L + 1) of the peak, the cosine after it starts at the peak).

`f` is the phase's `lr_factor` (1 except decoder-only phases of Primus, see below). The rate
changes once per epoch, as in nnU-Net: step s is in epoch s // steps_per_epoch.

Parameter groups (the fine-tuning engine maps them onto modules with the checkpoint's adaptation
plan): `stem` (the input projection, `key_to_stem`), `encoder` (`key_to_encoder`, Primus position
embeddings included) and `decoder` (everything new: the segmentation decoder, or the
classification head).

The five schedules of the OpenMind benchmark (`TEMPLATES`), with D the decoder warm-up and W the
whole-network warm-up length from config:

- default: the whole net, poly from the peak over all epochs;
- frozen: only the decoder trains: linear warm-up over D, then poly (the public frozen-encoder
  trainer); stem and encoder stay as loaded;
- warmup: the whole net, linear warm-up over W, then poly;
- valley: the decoder alone with a decreasing (poly) lr over D, then the whole net: linear warm-up
  over W, then poly;
- sawtooth: the decoder alone, linear warm-up over D // 2 then poly decay over the rest of D (the
  public trainer's decoder stage), then the whole net: linear warm-up over W to the full peak,
  then poly. The whole-net warm-up of sawtooth is `sawtooth_whole` epochs where the table names
  it (the public Primus Sawtooth-150 trainer: 50), else W. Every warm-up ends at its peak, as on
  the fine-tuning branch (nnU-Net master's `Lin_incr_offset_LRScheduler` stops at half the peak).

and one beyond the paper's five:

- lora: the `warmup` schedule's phases (linear warm-up over W, then poly, at the pre-trained peak)
  with the encoder's weights frozen and low-rank adapters trained on them (`downstream.lora`): there
  the `encoder` group is the adapters alone; stem and decoder train fully.

and the classification protocol's, which a classification run trains where its name says
`default` (scratch runs included):

- cosine: the whole net, `warmstart` over W (config `downstream.classification.warmup_epochs`, the
  protocol's 20), then cosine over the rest.

In these tables a decoder-only phase trains the `decoder` group alone, and the classification engine
trains exactly that (the head; SSL3D_classification's double warm-start also starts with the head
alone). nnU-Net's trainer widens it where the public trainer does (`downstream.nnunet.decoder_stage:
published`, the default): Sawtooth's decoder stage (and Valley's) optimises
`network.decoder.parameters()`, which for ResEnc holds the encoder, so stem and encoder train in it
too; for Primus the stem joins when extra input channels were made by repeating it. `decoder_only`
keeps stem and encoder frozen, as the papers' text says; `frozen` keeps them frozen always
(`downstream.nnunet.trainer.trainable_groups`).

A phase change keeps the optimiser (momentum / Adam moments carry on) except where the public
trainer builds a new one, marked `fresh_optimizer`: Sawtooth's and Valley's whole-net warm-up and
Frozen's poly phase (see `TEMPLATES`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from openmind_bench import config
from openmind_bench.names import CNN, FAMILIES, TRANSFORMER

GROUPS = ("stem", "encoder", "decoder")
ALL = frozenset(GROUPS)
DECODER = frozenset({"decoder"})
CURVES = ("linear_warmup", "poly", "cosine", "warmstart")
REST = "rest"  # length key of the final phase: whatever the others leave
_DOWNSTREAM = config.section("downstream")  # the schema's defaults, read once
POLY_EXPONENT = float(_DOWNSTREAM["poly_exponent"])
STEPS_PER_EPOCH = int(_DOWNSTREAM["steps_per_epoch"])

# (phase name, trainable groups, curve, length key, lr factor key, new optimiser): a phase marked
# True starts a new optimiser (momentum / Adam moments reset) where the public trainer builds one:
# Sawtooth's whole-net warm-up (`sawtooth_trainer.py`, stage 'warmup_all'), Frozen's poly phase
# (`PretrainedTrainer_Primus_frozenEnc`); the other phase changes keep it (decoder warm-up ->
# decoder poly, warm-up -> poly), so the momentum carries on. Valley (no public trainer) as Sawtooth.
_WHOLE_WARMUP_THEN_POLY = (
    ("warmup", ALL, "linear_warmup", "whole", None, False),
    ("train", ALL, "poly", REST, None, False),
)
TEMPLATES: dict[str, tuple[tuple[str, frozenset, str, str, str | None, bool], ...]] = {
    "default": (("train", ALL, "poly", REST, None, False),),
    "frozen": (
        ("decoder_warmup", DECODER, "linear_warmup", "decoder", None, False),
        ("train_decoder", DECODER, "poly", REST, None, True),
    ),
    "warmup": _WHOLE_WARMUP_THEN_POLY,
    "valley": (
        ("decoder", DECODER, "poly", "decoder", "decoder", False),
        ("warmup", ALL, "linear_warmup", "whole", None, True),
        ("train", ALL, "poly", REST, None, False),
    ),
    # warmup's curve; the encoder trains through LoRA adapters only (downstream.lora narrows its group to them)
    "lora": _WHOLE_WARMUP_THEN_POLY,
    # classification (not a segmentation schedule): the `whole` warm-up is the classification config's
    "cosine": (
        ("warmup", ALL, "warmstart", "whole", None, False),
        ("train", ALL, "cosine", REST, None, False),
    ),
    "sawtooth": (
        ("decoder_warmup", DECODER, "linear_warmup", "decoder_up", "decoder", False),
        ("decoder_decay", DECODER, "poly", "decoder_down", "decoder", False),
        ("warmup", ALL, "linear_warmup", "sawtooth_whole", None, True),
        ("train", ALL, "poly", REST, None, False),
    ),
}
SCHEDULE_NAMES = tuple(TEMPLATES)

# Peak lr per family and the public trainers' warm-up lengths / decoder-phase lr factors live in the
# config (`downstream.peak_lr`, `downstream.warmup_epochs`; their defaults in config/schema.yaml):
# these functions read that table, and the schema's when none is given.


class ScheduleError(ValueError):
    """A schedule that cannot run (unknown name, phases longer than the run, bad phase spec)."""


@dataclass(frozen=True)
class Phase:
    name: str
    epochs: int
    trainable: frozenset
    curve: str
    lr_factor: float = 1.0
    fresh_optimizer: bool = False  # the engine starts a new optimiser at this phase's first epoch

    def relative_lr(self, epoch_in_phase: int, exponent: float = POLY_EXPONENT) -> float:
        """lr / peak at `epoch_in_phase` (0-based) of this phase."""
        length = self.epochs
        if self.curve == "linear_warmup":
            return self.lr_factor * (epoch_in_phase + 1) / length
        if self.curve == "warmstart":
            return self.lr_factor * (epoch_in_phase + 1) / (length + 1)
        if self.curve == "cosine":
            return self.lr_factor * 0.5 * (1.0 + math.cos(math.pi * epoch_in_phase / length))
        return self.lr_factor * (1.0 - epoch_in_phase / length) ** exponent


@dataclass(frozen=True)
class Schedule:
    """A fine-tuning run's lr and freezing plan; `lr(group, step)` and `trainable(step)` are all
    the engine needs."""

    name: str
    peak_lr: float
    epochs: int
    steps_per_epoch: int
    phases: tuple[Phase, ...]
    poly_exponent: float = POLY_EXPONENT
    _starts: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if sum(p.epochs for p in self.phases) != self.epochs:
            raise ScheduleError(f"schedule {self.name!r}: phases last {sum(p.epochs for p in self.phases)} "
                                f"epochs, the run {self.epochs}")
        starts, at = [], 0
        for p in self.phases:
            starts.append(at)
            at += p.epochs
        object.__setattr__(self, "_starts", tuple(starts))

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    def epoch_of(self, step: int) -> int:
        if not 0 <= step < self.total_steps:
            raise ScheduleError(f"schedule {self.name!r}: step {step} outside 0..{self.total_steps - 1}")
        return step // self.steps_per_epoch

    def phase_at(self, step: int) -> tuple[Phase, int]:
        """The phase that holds `step` and the epoch index inside it."""
        epoch = self.epoch_of(step)
        for phase, start in zip(reversed(self.phases), reversed(self._starts)):
            if epoch >= start:
                return phase, epoch - start
        raise AssertionError("unreachable: the first phase starts at epoch 0")

    def trainable(self, step: int) -> frozenset:
        """Parameter groups that train at `step`; the others must stay bit-identical."""
        return self.phase_at(step)[0].trainable

    def lr(self, group: str, step: int) -> float:
        """Learning rate of `group` at `step`; 0.0 while the group is frozen."""
        if group not in GROUPS:
            raise ScheduleError(f"unknown parameter group {group!r}; groups are {list(GROUPS)}")
        phase, e = self.phase_at(step)
        if group not in phase.trainable:
            return 0.0
        return self.peak_lr * phase.relative_lr(e, self.poly_exponent)

    def lrs(self, step: int) -> dict[str, float]:
        return {g: self.lr(g, step) for g in GROUPS}

    def phase_changes(self) -> list[int]:
        """First step of every phase after the first (where an engine changes its optimiser's groups)."""
        return [start * self.steps_per_epoch for start in self._starts[1:]]

    def to_dict(self) -> dict:
        """Plain description, written next to a run's checkpoints."""
        return {
            "name": self.name, "peak_lr": self.peak_lr, "epochs": self.epochs,
            "steps_per_epoch": self.steps_per_epoch, "poly_exponent": self.poly_exponent,
            "phases": [{"name": p.name, "first_epoch": s, "epochs": p.epochs, "trainable": sorted(p.trainable),
                        "curve": p.curve, "lr_factor": p.lr_factor, "fresh_optimizer": p.fresh_optimizer}
                       for p, s in zip(self.phases, self._starts)],
        }


def family_of(architecture: str, presets: dict | None = None) -> str:
    """`cnn` or `transformer` for an architecture preset of `openmind_bench.nets` (ResEncL,
    PrimusM, ...; `presets` as config `pretrain.architecture_presets`), a family name, or a name
    that starts like one (resenc..., primus...)."""
    name = architecture.lower()
    if name in FAMILIES:
        return name
    try:
        from openmind_bench.nets import resolve

        return resolve(architecture, presets).family
    except (ImportError, ValueError):
        pass
    if name.startswith("primus"):
        return TRANSFORMER
    if name.startswith(("resenc", "residual", "plainconv", "unet")):
        return CNN
    raise ScheduleError(f"architecture {architecture!r}: not a preset of openmind_bench.nets and its name tells "
                        "neither a CNN (resenc...) nor a transformer (primus...)")


def peak_lr(family: str, pretrained: bool, table: dict | None = None) -> float:
    """The peak lr of a fine-tuning run from `table` (config `downstream.peak_lr`:
    {family: {pretrained: x, scratch: y}}; None = the schema's)."""
    table = _DOWNSTREAM["peak_lr"] if table is None else table
    key = "pretrained" if pretrained else "scratch"
    try:
        return float(table[family][key])
    except (KeyError, TypeError):
        raise ScheduleError(f"config key 'downstream.peak_lr.{family}.{key}' is missing") from None


def warmup_for(family: str, epochs: int, table: dict | None = None) -> dict:
    """Warm-up lengths (`decoder`, `whole`) and `decoder_lr_factor` for a run of `epochs`.

    `table` is config `downstream.warmup_epochs`, `{family: {epochs: {...}}}` (epoch keys may be
    strings, as YAML gives them; None = the schema's, the public trainers' values). Fine-tuning
    lengths listed nowhere get 10% of the epochs for each warm-up (the public 150-epoch ratio), at
    least one epoch while the run is long enough to keep one epoch for the final phase, and the
    decoder-phase lr factor of the family's 150-epoch entry.
    """
    table = _DOWNSTREAM["warmup_epochs"] if table is None else table
    configured = {int(k): v for k, v in (table.get(family) or {}).items()}
    factor = configured.get(epochs, configured.get(150, {})).get("decoder_lr_factor", 1.0)
    if epochs in configured:
        return {"decoder_lr_factor": factor, **configured[epochs]}
    tenth = max(1, round(0.1 * epochs))
    budget = max(epochs - 1, 0)  # leave the final poly phase at least one epoch
    whole = min(tenth, budget // 2)
    return {"decoder": min(tenth, budget - whole), "whole": whole, "decoder_lr_factor": factor}


def _lengths(decoder: int, whole: int, sawtooth_whole: int | None = None) -> dict[str, int]:
    return {"decoder": decoder, "decoder_up": decoder // 2, "decoder_down": decoder - decoder // 2, "whole": whole,
            "sawtooth_whole": whole if sawtooth_whole is None else sawtooth_whole}


def _parse_groups(value, where: str) -> frozenset:
    if value == "all":
        return ALL
    values = [value] if isinstance(value, str) else list(value or [])
    unknown = [v for v in values if v not in GROUPS]
    if not values or unknown:
        raise ScheduleError(f"{where}: trainable must be 'all' or a list of {list(GROUPS)}, got {value!r}")
    return frozenset(values)


def custom_template(name: str, phases: list[dict]) -> tuple:
    """A schedule from config, e.g. `[{name: dec, trainable: [decoder], curve: poly, epochs: decoder,
    lr_factor: decoder}, {name: train, trainable: all, curve: poly, epochs: rest}]`. `epochs` is an
    int or one of decoder, decoder_up, decoder_down, whole, rest; `lr_factor` a float or `decoder`;
    `fresh_optimizer` true/false (default: true where the trained groups change)."""
    if not isinstance(phases, list) or not phases:
        raise ScheduleError(f"schedule {name!r}: phases must be a non-empty list")
    out = []
    for i, spec in enumerate(phases):
        where = f"schedule {name!r} phase {i}"
        if not isinstance(spec, dict):
            raise ScheduleError(f"{where}: must be a mapping")
        curve = spec.get("curve", "poly")
        if curve not in CURVES:
            raise ScheduleError(f"{where}: curve {curve!r} is not one of {list(CURVES)}")
        length = spec.get("epochs", REST)
        if not isinstance(length, int) and length not in (*_lengths(0, 0), REST):
            raise ScheduleError(f"{where}: epochs {length!r} is not an int or a warm-up name")
        factor = spec.get("lr_factor")
        if factor is not None and factor != "decoder" and not isinstance(factor, (int, float)):
            raise ScheduleError(f"{where}: lr_factor {factor!r} is not a number or 'decoder'")
        groups = _parse_groups(spec.get("trainable", "all"), where)
        fresh = spec.get("fresh_optimizer")
        if fresh is None:  # as the public trainers: a new optimiser where the trained groups change
            fresh = bool(out) and groups != out[-1][1]
        elif not isinstance(fresh, bool):
            raise ScheduleError(f"{where}: fresh_optimizer {fresh!r} is not true or false")
        out.append((str(spec.get("name", f"phase{i}")), groups, curve, length, factor, fresh))
    if sum(1 for p in out if p[3] == REST) > 1:
        raise ScheduleError(f"schedule {name!r}: only one phase may take the rest of the epochs")
    return tuple(out)


def build_schedule(name: str, epochs: int, peak: float, steps_per_epoch: int = STEPS_PER_EPOCH,
                   decoder_warmup: int = 0, whole_warmup: int = 0, decoder_lr_factor: float = 1.0,
                   poly_exponent: float = POLY_EXPONENT, custom: dict | None = None,
                   sawtooth_whole_warmup: int | None = None) -> Schedule:
    """The schedule `name` (one of TEMPLATES, or of `custom`: name -> phase list) for one run.

    Phases whose length comes out as 0 are dropped (e.g. a zero-length warm-up).
    """
    if custom and name in custom:
        template = custom_template(name, custom[name])
    elif name in TEMPLATES:
        template = TEMPLATES[name]
    else:
        known = sorted(set(TEMPLATES) | set(custom or {}))
        raise ScheduleError(f"unknown fine-tuning schedule {name!r}; known: {known}")
    if epochs < 1 or steps_per_epoch < 1:
        raise ScheduleError(f"schedule {name!r}: epochs ({epochs}) and steps_per_epoch ({steps_per_epoch}) must be >= 1")
    if decoder_warmup < 0 or whole_warmup < 0:
        raise ScheduleError(f"schedule {name!r}: warm-up lengths must be >= 0")
    lengths = _lengths(int(decoder_warmup), int(whole_warmup),
                       None if sawtooth_whole_warmup is None else int(sawtooth_whole_warmup))
    fixed = sum(length if isinstance(length, int) else lengths[length]
                for _, _, _, length, _, _ in template if length != REST)
    rest = epochs - fixed
    has_rest = any(length == REST for _, _, _, length, _, _ in template)
    if (has_rest and rest < 1) or (not has_rest and rest != 0):
        raise ScheduleError(
            f"schedule {name!r}: its warm-up phases take {fixed} of {epochs} epochs "
            f"(decoder warm-up {decoder_warmup}, whole-net warm-up {whole_warmup}); "
            + ("the final phase needs at least one" if has_rest else "they must add up to the run")
        )
    phases, pending_fresh = [], False
    for phase_name, groups, curve, length, factor, fresh in template:
        n = rest if length == REST else (length if isinstance(length, int) else lengths[length])
        if n == 0:  # a dropped phase's new optimiser starts with the next phase
            pending_fresh = pending_fresh or fresh
            continue
        f = decoder_lr_factor if factor == "decoder" else (1.0 if factor is None else float(factor))
        phases.append(Phase(phase_name, int(n), groups, curve, float(f), bool(phases) and (fresh or pending_fresh)))
        pending_fresh = False
    return Schedule(name, float(peak), int(epochs), int(steps_per_epoch), tuple(phases), float(poly_exponent))


def schedule_for_run(name: str, architecture: str, pretrained: bool, epochs: int, steps_per_epoch: int = STEPS_PER_EPOCH,
                     config: dict | None = None, presets: dict | None = None) -> Schedule:
    """The schedule of one fine-tuning run from the `downstream` config block (defaults as the papers).

    Reads `peak_lr`, `warmup_epochs`, `poly_exponent` and `custom_schedules` from `config`;
    `presets` are the architecture presets of the pre-training config, if it adds any.
    """
    config = config or {}
    family = family_of(architecture, presets)
    return configured_schedule(name, family, epochs, peak_lr(family, pretrained, config.get("peak_lr")),
                               steps_per_epoch, config)


def configured_schedule(name: str, family: str, epochs: int, peak: float, steps_per_epoch: int,
                        config: dict | None = None) -> Schedule:
    """The schedule `name` at `peak` with the warm-up lengths, decoder-phase lr factor, poly exponent
    and custom schedules of the `downstream` config block (`config`; None = the schema's)."""
    config = config or {}
    warm = warmup_for(family, epochs, config.get("warmup_epochs"))
    return build_schedule(
        name, epochs, peak, steps_per_epoch,
        decoder_warmup=int(warm["decoder"]), whole_warmup=int(warm["whole"]),
        decoder_lr_factor=float(warm.get("decoder_lr_factor", 1.0)),
        poly_exponent=float(config.get("poly_exponent", POLY_EXPONENT)),
        custom=config.get("custom_schedules"), sawtooth_whole_warmup=warm.get("sawtooth_whole"),
    )
