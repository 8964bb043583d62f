"""Pre-training data: stored images, random patches, augmentations, the multi-worker loader."""

from openmind_bench.data.augment import Augmentation, AugmentationParams
from openmind_bench.data.images import StoredImage, load_pretrain_images, read_nnssl_preprocessed
from openmind_bench.data.loader import RandomPatchBatches, batch_rng, make_pretrain_loader
from openmind_bench.data.sampler import PatchSampler

__all__ = [
    "Augmentation",
    "AugmentationParams",
    "PatchSampler",
    "RandomPatchBatches",
    "StoredImage",
    "batch_rng",
    "load_pretrain_images",
    "make_pretrain_loader",
    "read_nnssl_preprocessed",
]
