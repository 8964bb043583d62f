"""The pre-training loader: endless (or `steps` per pass) batches of random patches over a selection.

Batch `k` of rank `r` is drawn from its own numpy stream, `SeedSequence(seed, spawn_key=(r, k))`.
DataLoader worker `w` of `n` produces batches k = w, w + n, w + 2n, ... and the DataLoader hands
them out round-robin, so the sequence of batches is the same for every `num_workers` (0
included) and differs between ranks: deterministic under the seed, independent streams per
DDP rank, nothing shared between workers.

With `steps`, pass `e` over the loader (an epoch) yields batches
[first_batch + e * steps, first_batch + (e + 1) * steps): epochs continue the stream instead of
repeating it, and a resumed run passes `first_batch` = batches already consumed to continue
exactly where it stopped. `same_every_pass` makes every pass yield the same batches instead (a
validation set, read again each epoch by the same persistent workers).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from openmind_bench.data.augment import Augmentation
from openmind_bench.data.images import StoredImage, load_pretrain_images
from openmind_bench.data.sampler import PatchSampler


def batch_rng(seed: int, rank: int, batch_index: int) -> np.random.Generator:
    """The random stream of one batch of one rank."""
    return np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(int(rank), int(batch_index))))


class RandomPatchBatches(IterableDataset):
    """Batches of random patches (see the module docstring for the streams)."""

    def __init__(
        self,
        images: Sequence[StoredImage],
        patch_size: Sequence[int],
        batch_size: int,
        *,
        seed: int,
        rank: int = 0,
        steps: int | None = None,
        first_batch: int = 0,
        anatomy_aware: bool = False,
        centre_crop: bool = False,
        augmentation: Augmentation | None = None,
        same_every_pass: bool = False,
    ):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.sampler = PatchSampler(images, patch_size, anatomy_aware=anatomy_aware, centre_crop=centre_crop,
                                    augmentation=augmentation)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.rank = int(rank)
        self.steps = steps
        self.first_batch = int(first_batch)
        self.same_every_pass = bool(same_every_pass)
        # passes started on this copy of the dataset; each DataLoader worker keeps its own copy
        # (persistent workers), and every copy sees every pass, so they all agree
        self._passes = 0

    def __len__(self) -> int:
        if self.steps is None:
            raise TypeError("an endless loader (steps=None) has no length")
        return int(self.steps)

    def batch(self, batch_index: int, shared: bool = False) -> dict:
        return self.sampler.batch(batch_rng(self.seed, self.rank, batch_index), self.batch_size, shared=shared)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        start = self.first_batch + (0 if self.same_every_pass else self._passes * (self.steps or 0))
        self._passes += 1
        k = worker
        while self.steps is None or k < self.steps:
            yield self.batch(start + k, shared=info is not None)
            k += n_workers


def make_pretrain_loader(
    pretrain_data_json: str | Path,
    patch_size: tuple[int, int, int],
    batch_size: int,
    *,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    anatomy_aware: bool = False,
    centre_crop: bool = False,
    augment: bool = True,
    steps: int | None = None,
    first_batch: int = 0,
    root: str | Path | None = None,
    augmentation: Augmentation | None = None,
    pin_memory: bool | None = None,
    same_every_pass: bool = False,
) -> Iterable[dict]:
    """Batches of random patches over a selection's preprocessed images.

    Yields dicts: "image" float32 (B, 1, *patch_size); "anon" float32, 1 = anonymised voxel (no
    loss there); "anat" float32, 1 = anatomy; "image_id" list of str. `pretrain_data_json` is a
    selection's `pretrain_data.json` or its preprocessed twin; relative paths in it are taken
    under `root` (default: the working directory). `augment` switches the nnssl augmentations on
    (or pass `augmentation` to change their distributions). Every rank sees the whole selection
    with its own stream (sampling is with replacement, as nnssl's). `steps=None` is endless;
    with `steps` every pass (epoch) continues the stream, from `first_batch` (to resume a run).
    `centre_crop` reads each drawn image's centre crop instead of a random patch; `same_every_pass`
    repeats the first pass's batches on every pass.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    images = load_pretrain_images(pretrain_data_json, root=root)
    if augment and augmentation is None:
        augmentation = Augmentation()
    dataset = RandomPatchBatches(images, patch_size, batch_size, seed=seed, rank=rank, steps=steps,
                                 first_batch=first_batch, anatomy_aware=anatomy_aware, centre_crop=centre_crop,
                                 augmentation=augmentation if augment else None, same_every_pass=same_every_pass)
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    return DataLoader(
        dataset,
        batch_size=None,  # the dataset yields whole batches
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        prefetch_factor=2 if num_workers > 0 else None,
    )
