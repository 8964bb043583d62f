"""One nnU-Net trainer for every fine-tuning run, parameterised by the run's schedule table.

`nnUNetTrainer_OpenMind` is nnU-Net's own `nnUNetTrainer` (its data loading, augmentation, Dice +
CE loss with batch Dice and without background, online validation, checkpoints) with what the
public fine-tuning trainers add, read from the plans' `openmind_bench` section:

- the network from the plans (`get_network_from_plans`: ResEnc gets `InitWeights_He(1e-2)` and the
  last norm before each residual add zeroed; Primus its own init, the package's drop-path default),
  no deep supervision; then the checkpoint's encoder + stem (`weights.load_pretrained`);
- the lr and the trainable parameter groups per epoch from `downstream.schedules` (one table per
  schedule, never a class per schedule x epochs); the lr changes once per epoch as nnU-Net's;
- the optimiser (SGD 0.99 Nesterov for CNNs, AdamW (0.9, 0.98) for Primus) is kept across a phase
  change (new rates, the groups that start training added), so momentum / Adam moments carry on, as
  the public trainers keep theirs from warm-up to poly; where the public trainer builds a new one
  (the phase's `fresh_optimizer`: Sawtooth's / Valley's whole-net warm-up, Frozen's poly phase), so
  does this one, over what trains from then on;
- decoder-only phases of `sawtooth` / `valley` (`decoder_stage`): `published` trains what the public
  trainer's `network.decoder.parameters()` holds, i.e. encoder and stem too for ResEnc (whose
  decoder references the encoder), the decoder (+ the input projection when channels were repeated)
  for Primus; `decoder_only` freezes stem and encoder as the papers' text says. `frozen` always
  keeps them bit-identical;
- gradient clipping 12 (CNN) / 1 (Primus), as nnU-Net's trainers;
- the `lora` schedule (`downstream.lora`): adapters attached to the encoder after the checkpoint is
  loaded, the encoder group narrowed to them; at the end of training they are merged into the
  weights before `checkpoint_final.pth` is written, so the model folder holds a plain network
  (`checkpoint_best.pth`, written with the adapters unmerged, is removed);
- `trained_parameters.json` in the fold folder: the parameters some phase trains, the network's
  total and their share (`transfer.trained_parameters`), for metrics.json and the table.

Without an `openmind_bench` section (another nnU-Net plans file) it behaves as nnU-Net's default
trainer minus deep supervision. `nnUNetv2_predict` finds it through `nnUNet_extTrainer` (this
package's folder; see `predict.ext_trainer_path`).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch
from torch import autocast

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from nnunetv2.utilities.helpers import dummy_context

from openmind_bench import atomic
from openmind_bench.downstream import lora, schedules, transfer

CNN_CLIP, TRANSFORMER_CLIP = 12.0, 1.0
TRAINED_PARAMETERS = "trained_parameters.json"  # in the fold folder (transfer.trained_parameters)
DECODER_STAGES = ("published", "decoder_only")


def schedule_from_dict(doc: dict) -> schedules.Schedule:
    """The inverse of `Schedule.to_dict` (the table stored in the plans)."""
    phases = tuple(schedules.Phase(p["name"], int(p["epochs"]), frozenset(p["trainable"]), p["curve"],
                                   float(p["lr_factor"]), bool(p.get("fresh_optimizer", False)))
                   for p in doc["phases"])
    return schedules.Schedule(doc["name"], float(doc["peak_lr"]), int(doc["epochs"]), int(doc["steps_per_epoch"]),
                              phases, float(doc["poly_exponent"]))


def trainable_groups(phase: schedules.Phase, schedule_name: str, decoder_stage: str, decoder_holds_encoder: bool,
                     channels_repeated: bool) -> frozenset:
    """The groups a phase really trains (see the module doc for `decoder_stage`)."""
    if decoder_stage not in DECODER_STAGES:
        raise ValueError(f"decoder_stage {decoder_stage!r} is not one of {list(DECODER_STAGES)}")
    if phase.trainable != schedules.DECODER or schedule_name == "frozen" or decoder_stage == "decoder_only":
        return phase.trainable
    if decoder_holds_encoder:
        return schedules.ALL
    return phase.trainable | {"stem"} if channels_repeated else phase.trainable


def bare_network(network):
    """The module under DDP / torch.compile wrappers."""
    net = getattr(network, "module", network)
    return getattr(net, "_orig_mod", net)


class _ScheduleStepper:
    """nnU-Net calls `lr_scheduler.step(epoch)`; the schedule table answers."""

    def __init__(self, trainer: "nnUNetTrainer_OpenMind"):
        self.trainer = trainer

    def step(self, epoch=None):
        self.trainer.apply_epoch(self.trainer.current_epoch if epoch is None else int(epoch))


class nnUNetTrainer_OpenMind(nnUNetTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.run_settings = dict(plans.get("openmind_bench") or {})
        self.enable_deep_supervision = False
        self.schedule = None
        if self.run_settings:
            rs = self.run_settings
            self.schedule = schedule_from_dict(rs["schedule"])
            self.num_epochs = self.schedule.epochs
            self.num_iterations_per_epoch = self.schedule.steps_per_epoch
            self.num_val_iterations_per_epoch = int(rs.get("val_iterations_per_epoch", 50))
            self.initial_lr = self.schedule.peak_lr
            self.weight_decay = float(rs["optimizer"]["weight_decay"])
            self.save_every = int(rs.get("save_every", 50))
        self.groups: dict = {}
        self.loaded_keys: list[str] = []
        self.channels_repeated = False
        self.current_trainable: frozenset | None = None
        self.current_phase: schedules.Phase | None = None
        self.compute_ledger = None  # engine.ledger.ComputeLedger, set by downstream.nnunet.run
        self.adapters: lora.Adapters | None = None  # the lora schedule's, attached in configure_optimizers
        self.trained_parameters: dict | None = None

    # ---------------------------------------------------------------- network
    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True):
        name = configuration_manager.network_arch_class_name
        primus = name.split(".")[-1].startswith("Primus")
        return get_network_from_plans(name, configuration_manager.network_arch_init_kwargs,
                                      configuration_manager.network_arch_init_kwargs_req_import, num_input_channels,
                                      num_output_channels, allow_init=True,
                                      deep_supervision=None if primus else False)

    def set_deep_supervision_enabled(self, enabled: bool):
        pass  # never on: the fine-tuning trainers train without deep supervision

    def initialize(self):
        # nnU-Net builds the network, then calls configure_optimizers, which loads the checkpoint first
        self._pending_checkpoint = self.run_settings.get("checkpoint")
        super().initialize()
        if self.compute_ledger is not None and self._do_i_compile():
            self.compute_ledger.skip_flop_count("nnU-Net torch.compile's the network (nnUNet_compile=f counts it)")

    def configure_optimizers(self):
        if not self.run_settings:
            return super().configure_optimizers()
        from openmind_bench import nets
        from openmind_bench.downstream.nnunet import weights

        net = bare_network(self.network)
        checkpoint = getattr(self, "_pending_checkpoint", None)
        if checkpoint and not self.loaded_keys:
            self.loaded_keys, self.channels_repeated = weights.load_pretrained(
                net, checkpoint, self.configuration_manager.patch_size)
            self.print_to_log_file(f"loaded {len(self.loaded_keys)} encoder/stem tensors from {checkpoint}")
        keys = nets.adaptation_keys(net)
        if self.run_settings.get("lora") and self.adapters is None:
            self.adapters = lora.attach(net, self.run_settings["family"], self.run_settings["lora"],
                                        keys["key_to_encoder"])
        self.groups = transfer.parameter_groups(net, keys)
        if self.adapters is not None:
            self.groups = lora.adapter_groups(self.groups)
        trained = frozenset().union(*(self.phase_at(e)[2] for e in range(self.schedule.epochs)))
        self.trained_parameters = transfer.trained_parameters(net, self.groups, trained)
        _, _, groups, _ = self.phase_at(self.current_epoch)
        self.optimizer = self.new_optimizer(groups)
        self.current_trainable, self.current_phase = None, None
        self.apply_epoch(self.current_epoch)
        return self.optimizer, _ScheduleStepper(self)

    def new_optimizer(self, groups: frozenset) -> torch.optim.Optimizer:
        """The run's optimiser over the parameter groups `groups`, one named torch group each."""
        param_groups = transfer.optimiser_groups(self.groups, groups)
        cfg = self.run_settings["optimizer"]
        if cfg["name"] == "sgd":
            return torch.optim.SGD(param_groups, lr=self.initial_lr, momentum=float(cfg.get("momentum", 0.99)),
                                   nesterov=True, weight_decay=self.weight_decay)
        return torch.optim.AdamW(param_groups, lr=self.initial_lr,
                                 betas=tuple(float(b) for b in cfg.get("betas", (0.9, 0.98))),
                                 weight_decay=self.weight_decay, fused=self.device.type == "cuda")

    # ---------------------------------------------------------------- schedule
    def decoder_holds_encoder(self) -> bool:
        net = bare_network(self.network)
        decoder, encoder = getattr(net, "decoder", None), getattr(net, "encoder", None)
        return decoder is not None and encoder is not None and getattr(decoder, "encoder", None) is encoder

    def phase_at(self, epoch: int) -> tuple[schedules.Phase, int, frozenset, float]:
        s = self.schedule
        phase, e = s.phase_at(min(epoch, s.epochs - 1) * s.steps_per_epoch)
        groups = trainable_groups(phase, s.name, self.run_settings.get("decoder_stage", "published"),
                                  self.decoder_holds_encoder(), self.channels_repeated)
        return phase, e, groups, s.peak_lr * phase.relative_lr(e, s.poly_exponent)

    def apply_epoch(self, epoch: int) -> float:
        """Freeze / unfreeze for `epoch`'s phase, a new optimiser where the phase starts one (else the
        starting groups added to the current one), set the lr."""
        phase, _, groups, lr = self.phase_at(epoch)
        if phase is not self.current_phase:
            if phase.fresh_optimizer and self.current_phase is not None:
                self.optimizer = self.new_optimizer(groups)
                self.print_to_log_file(f"epoch {epoch}: phase {phase.name} starts a new optimiser")
            self.current_phase = phase
        if groups != self.current_trainable:
            transfer.set_trainable(self.groups, groups)
            transfer.add_starting_groups(self.optimizer, self.groups, groups)
            if self.current_trainable is not None:
                self.print_to_log_file(f"epoch {epoch}: phase {phase.name}, training {sorted(groups)}")
            self.current_trainable = groups
        for group in self.optimizer.param_groups:
            group["lr"] = lr if group["name"] in groups else 0.0
        return lr

    def on_train_epoch_start(self):
        if not self.run_settings:
            return super().on_train_epoch_start()
        self.network.train()
        if self.compute_ledger is not None:
            self.compute_ledger.epoch_start()
        lr = self.apply_epoch(self.current_epoch)
        self.print_to_log_file("")
        self.print_to_log_file(f"Epoch {self.current_epoch}")
        self.print_to_log_file(f"Current learning rate: {np.round(lr, decimals=7)}")
        self.logger.log("lrs", lr, self.current_epoch)

    # ---------------------------------------------------------------- compute ledger hooks
    def get_dataloaders(self):
        train, val = super().get_dataloaders()
        return (train if self.compute_ledger is None else self.compute_ledger.timed_loader(train)), val

    def on_train_start(self):
        super().on_train_start()
        if self.trained_parameters is not None and self.local_rank == 0:
            atomic.write_json(Path(self.output_folder, TRAINED_PARAMETERS), self.trained_parameters)

    def on_train_end(self):
        # nnU-Net shuts its augmenter down only when it sees the augmenter itself
        self.dataloader_train = getattr(self.dataloader_train, "loader", self.dataloader_train)
        if self.adapters is not None:
            self.adapters.merge()
            self.print_to_log_file("LoRA adapters merged into the encoder's weights")
        super().on_train_end()
        if self.adapters is not None and self.local_rank == 0:
            Path(self.output_folder, "checkpoint_best.pth").unlink(missing_ok=True)  # unmerged: not a plain net

    def train_step(self, batch: dict) -> dict:
        with contextlib.nullcontext() if self.compute_ledger is None else self.compute_ledger.step():
            return self.optimisation_step(batch)

    def optimisation_step(self, batch: dict) -> dict:
        clip = float(self.run_settings.get("grad_clip", CNN_CLIP))
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"]
        target = ([t.to(self.device, non_blocking=True) for t in target] if isinstance(target, list)
                  else target.to(self.device, non_blocking=True))
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context():
            loss = self.loss(self.network(data), target)
        params = [p for p in self.network.parameters() if p.requires_grad]
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
            self.grad_scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(params, clip)
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, clip)
            self.optimizer.step()
        return {"loss": loss.detach().cpu().numpy()}

    # ---------------------------------------------------------------- splits and resume
    def do_split(self):
        rs = self.run_settings
        if rs.get("train_cases") is not None:
            return list(rs["train_cases"]), list(rs["val_cases"])
        return super().do_split()

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        if not self.was_initialized:
            self.initialize()
        checkpoint = filename_or_checkpoint
        if isinstance(checkpoint, str):
            checkpoint = torch.load(checkpoint, map_location=self.device, weights_only=False)
        if self.run_settings:  # the optimiser's groups as they were when the checkpoint was written
            for epoch in range(int(checkpoint["current_epoch"])):
                self.apply_epoch(epoch)
        # nnU-Net's own load_checkpoint reads only a file name: given a dict it fails on an unbound
        # name (nnunetv2 2.8.1), so a resume from checkpoint_latest.pth passes the file on.
        super().load_checkpoint(filename_or_checkpoint)
