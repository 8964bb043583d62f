"""SimCLR (Chen et al.; nnssl `simCLRTrainer`): two 64^3 crops overlapping by at least half per axis,
from one (192, 192, 64) region, each augmented on its own; projector = every encoder stage pooled
and concatenated, then an MLP 2048-2048-2048; NT-Xent at temperature 0.5 with the negatives of this
DDP rank's batch, as nnssl (`gather_negatives: true` takes those of all ranks, gathered with gradient:
more negatives per anchor, and a DDP run then equals the one-process run); gradient clipping 0.1 on
the CNN, as nnssl's CNN trainer.

The network sees 64^3 crops, so the checkpoint's plan records 64^3 as the pre-training patch size and
fine-tuning interpolates Primus position embeddings from that grid.
"""

from __future__ import annotations

import functools
from typing import Sequence

from torch import nn

from openmind_bench.ssl import features, views

# The method makes its own views: no spatial augmentation in the loader.
LOADER_AUGMENTATION = False

DEFAULTS = {
    **views.TWO_VIEW_DEFAULTS,
    "temperature": 0.5,
    "gather_negatives": False,  # nnssl: negatives from the rank's own batch
}

sizes = views.sizes


def build(backbone: nn.Module, arch_kwargs: dict, patch_size: Sequence[int], *, anon_aware: bool, temperature: float,
          gather_negatives: bool, grad_clip=None, **settings) -> views.TwoViewMethod:
    loss = functools.partial(features.nt_xent, temperature=float(temperature), gather_ranks=bool(gather_negatives))
    return views.TwoViewMethod(backbone, pair_loss=loss, name="simclr", anon_aware=anon_aware, **settings)
