"""Optimisers and learning-rate schedules, chosen per architecture family from config.

CNN (nnU-Net / nnssl): SGD lr 1e-2, Nesterov momentum 0.99, weight decay 3e-5, poly(0.9), clip 12.
Primus (nnssl `BaseEvaMAETrainer`): AdamW lr 3e-4, weight decay 0.05, betas (0.9, 0.98), 50 epochs of
linear warm-up then poly(0.9) over the remaining epochs, clip 1. The rate changes once per epoch,
as in nnssl.
"""

from __future__ import annotations

from typing import Iterable

import torch


def _sgd(params, cfg: dict, device: torch.device):
    return torch.optim.SGD(params, lr=cfg["lr"], momentum=cfg.get("momentum", 0.0),
                           nesterov=cfg.get("nesterov", False), weight_decay=cfg.get("weight_decay", 0.0))


def _adamw(params, cfg: dict, device: torch.device):
    return torch.optim.AdamW(params, lr=cfg["lr"], betas=tuple(cfg.get("betas", (0.9, 0.999))),
                             weight_decay=cfg.get("weight_decay", 0.01), fused=device.type == "cuda")


OPTIMIZERS = {"sgd": _sgd, "adamw": _adamw}


def poly(epoch: int, epochs: int, cfg: dict) -> float:
    """Linear warm-up to the peak over `warmup_epochs` (nnssl: peak * (e + 1) / W), then
    peak * (1 - (e - W) / (E - W)) ** exponent; without warm-up this is nnU-Net's PolyLR."""
    peak, warmup = float(cfg["lr"]), int(cfg.get("warmup_epochs", 0))
    if epoch < warmup:
        return peak * (epoch + 1) / warmup
    return peak * (1.0 - (epoch - warmup) / max(epochs - warmup, 1)) ** float(cfg.get("poly_exponent", 0.9))


SCHEDULES = {"poly": poly}


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: dict, device: torch.device) -> torch.optim.Optimizer:
    name = cfg.get("optimizer")
    if name not in OPTIMIZERS:
        raise ValueError(f"optimisation.optimizer {name!r} is not one of {sorted(OPTIMIZERS)}")
    return OPTIMIZERS[name]([p for p in params if p.requires_grad], cfg, device)


def learning_rate(cfg: dict, epoch: int, epochs: int) -> float:
    name = cfg.get("schedule", "poly")
    if name not in SCHEDULES:
        raise ValueError(f"optimisation.schedule {name!r} is not one of {sorted(SCHEDULES)}")
    if int(cfg.get("warmup_epochs", 0)) >= epochs:
        raise ValueError(f"optimisation.warmup_epochs ({cfg.get('warmup_epochs')}) must be below epochs ({epochs})")
    return SCHEDULES[name](epoch, epochs, cfg)
