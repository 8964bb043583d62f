"""Barlow Twins (Zbontar et al.), beyond the paper: SimCLR's views and projector, the cross-correlation
of the two batch-standardised embeddings (all DDP ranks' samples, gathered with gradient) pushed to
the identity; off-diagonal weight 5e-3 (the original's lambda)."""

from __future__ import annotations

from typing import Sequence

from torch import nn

from openmind_bench.ssl import features, views

# The method makes its own views: no spatial augmentation in the loader.
LOADER_AUGMENTATION = False

DEFAULTS = {
    **views.TWO_VIEW_DEFAULTS,
    "off_diagonal_weight": 5.0e-3,
}

sizes = views.sizes


class BarlowTwins(views.TwoViewMethod):
    def __init__(self, backbone: nn.Module, *, off_diagonal_weight: float, **kwargs):
        super().__init__(backbone, name="barlow_twins", **kwargs)
        self.off_diagonal_weight = float(off_diagonal_weight)

    def pair_loss(self, z1, z2):
        return features.barlow_twins(z1, z2, self.off_diagonal_weight)


def build(backbone: nn.Module, arch_kwargs: dict, patch_size: Sequence[int], *, anon_aware: bool,
          grad_clip=None, **settings) -> BarlowTwins:
    return BarlowTwins(backbone, anon_aware=anon_aware, **settings)
