"""VICReg (Bardes et al.), beyond the paper: SimCLR's views and projector; invariance 25, variance 25,
covariance 1 on the embeddings of all DDP ranks (gathered with gradient)."""

from __future__ import annotations

import functools
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


def build(backbone: nn.Module, arch_kwargs: dict, patch_size: Sequence[int], *, anon_aware: bool,
          sim_weight: float, var_weight: float, cov_weight: float, grad_clip=None, **settings) -> views.TwoViewMethod:
    loss = functools.partial(features.vicreg, sim_weight=float(sim_weight), var_weight=float(var_weight),
                             cov_weight=float(cov_weight))
    return views.TwoViewMethod(backbone, pair_loss=loss, name="vicreg", anon_aware=anon_aware, **settings)
