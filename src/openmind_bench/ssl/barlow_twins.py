"""Barlow Twins (Zbontar et al.), beyond the paper: SimCLR's views and projector, the cross-correlation
of the two batch-standardised embeddings (all DDP ranks' samples, gathered with gradient) pushed to
the identity; off-diagonal weight 5e-3 (the original's lambda)."""

from __future__ import annotations

import functools
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


def build(backbone: nn.Module, arch_kwargs: dict, patch_size: Sequence[int], *, anon_aware: bool, off_diagonal_weight: float,
          grad_clip=None, **settings) -> views.TwoViewMethod:
    loss = functools.partial(features.barlow_twins, off_diagonal_weight=float(off_diagonal_weight))
    return views.TwoViewMethod(backbone, pair_loss=loss, name="barlow_twins", anon_aware=anon_aware, **settings)
