"""VICReg (Bardes et al.), beyond the paper: SimCLR's views and projector; invariance 25, variance 25,
covariance 1 on the embeddings of all DDP ranks (gathered with gradient)."""

from __future__ import annotations

from typing import Sequence

from torch import nn

from openmind_bench.ssl import features, views

# The method makes its own views: no spatial augmentation in the loader.
LOADER_AUGMENTATION = False

DEFAULTS = {
    **views.TWO_VIEW_DEFAULTS,
    "sim_weight": 25.0,
    "var_weight": 25.0,
    "cov_weight": 1.0,
}

sizes = views.sizes


class VICReg(views.TwoViewMethod):
    def __init__(self, backbone: nn.Module, *, sim_weight: float, var_weight: float, cov_weight: float, **kwargs):
        super().__init__(backbone, name="vicreg", **kwargs)
        self.weights = (float(sim_weight), float(var_weight), float(cov_weight))

    def pair_loss(self, z1, z2):
        return features.vicreg(z1, z2, *self.weights)


def build(backbone: nn.Module, arch_kwargs: dict, patch_size: Sequence[int], *, anon_aware: bool,
          grad_clip=None, **settings) -> VICReg:
    return VICReg(backbone, anon_aware=anon_aware, **settings)
