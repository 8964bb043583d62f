"""SimCLR (Chen et al.; nnssl `simCLRTrainer`): two 64^3 crops overlapping by at least half per axis,
from one (192, 192, 64) region, each augmented on its own; projector = every encoder stage pooled
and concatenated, then an MLP 2048-2048-2048; NT-Xent at temperature 0.5 with the negatives of all
DDP ranks (gathered with gradient); gradient clipping 0.1 on the CNN, as nnssl's CNN trainer.

The network sees 64^3 crops, so the checkpoint's plan records 64^3 as the pre-training patch size and
fine-tuning interpolates Primus position embeddings from that grid.
"""

from __future__ import annotations

from typing import Sequence

from torch import nn

from openmind_bench.ssl import features, views

# The method makes its own views: no spatial augmentation in the loader.
LOADER_AUGMENTATION = False

DEFAULTS = {
    **views.TWO_VIEW_DEFAULTS,
    "temperature": 0.5,
}

sizes = views.sizes


class SimCLR(views.TwoViewMethod):
    def __init__(self, backbone: nn.Module, *, temperature: float, **kwargs):
        super().__init__(backbone, name="simclr", **kwargs)
        self.temperature = float(temperature)

    def pair_loss(self, z1, z2):
        return features.nt_xent(z1, z2, self.temperature)


def build(backbone: nn.Module, arch_kwargs: dict, patch_size: Sequence[int], *, anon_aware: bool,
          grad_clip=None, **settings) -> SimCLR:
    return SimCLR(backbone, anon_aware=anon_aware, **settings)
