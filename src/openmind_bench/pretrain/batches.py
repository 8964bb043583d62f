"""Where the engine's batches come from: an injected source, by default the preprocessing stage's
loader (`openmind_bench.data.make_pretrain_loader`).

A batch source has two methods returning iterables of batch dicts on the CPU:
`"image"` float32 (B, 1, *patch), optionally `"anon"` (1 = anonymised) and `"anat"` (1 = anatomy):

- `train(epoch, first_step, steps, rank, world_size, batch_size, seed)`: the `steps` batches of
  this process for steps `first_step..` of `epoch`; `seed` is the epoch's (derived by the engine
  from the run seed and the epoch), so an epoch restarted after a crash sees the original data;
- `val(steps, rank, world_size, batch_size, seed)`: held-out batches, or None for no validation.

`batch_size` is per process. Both sources here seek: an epoch interrupted at `first_step` continues
exactly with the batches the uninterrupted run would have had.
"""

from __future__ import annotations

import importlib
import itertools
from typing import Iterable, Protocol

import numpy as np


class BatchSource(Protocol):
    def train(self, *, epoch: int, first_step: int, steps: int, rank: int, world_size: int, batch_size: int,
              seed: int) -> Iterable[dict]: ...

    def val(self, *, steps: int, rank: int, world_size: int, batch_size: int, seed: int) -> Iterable[dict] | None: ...


class LoaderBatches:
    """Batches of `make_pretrain_loader` on the preprocessed selection (train) and its held-out part (val).

    Training reads one endless stream per run: the batch of (epoch, step) is the stream's batch
    `epoch * steps_per_epoch + step`, so a run resumed at any step seeks to it. One DataLoader serves
    all epochs (its workers, and the batches they prefetched, carry over from one epoch to the next),
    and one persistent DataLoader serves every validation with the same batches."""

    def __init__(self, settings):
        if not settings.train_data:
            raise ValueError("pre-training needs train_data (the preprocessed pretrain_data json)")
        self.settings = settings
        self._train = None  # (key, iterator) of the training stream
        self._next = 0  # the stream's index of the iterator's next batch
        self._val = None  # (key, DataLoader)

    def _loader(self, path, *, steps, rank, world_size, batch_size, seed, augment, first_batch=0,
                same_every_pass=False):
        from openmind_bench.data import make_pretrain_loader

        s = self.settings
        return make_pretrain_loader(path, tuple(s.loader_patch_size), batch_size, seed=seed, rank=rank,
                                    world_size=world_size, num_workers=s.num_workers,
                                    anatomy_aware=s.anatomy_aware, centre_crop=s.loader_sampling == "centre",
                                    augment=augment, steps=steps, first_batch=first_batch,
                                    same_every_pass=same_every_pass)

    def train(self, *, epoch, first_step, steps, rank, world_size, batch_size, seed):
        # `seed` is the epoch's; the stream's seed is the run's, its position the global step.
        first = epoch * self.settings.steps_per_epoch + first_step
        key = (rank, world_size, batch_size)
        if self._train is None or self._train[0] != key or self._next != first:
            stream_seed = int(np.random.SeedSequence([int(self.settings.seed), 0x10AD]).generate_state(1)[0])
            loader = self._loader(self.settings.train_data, steps=None, rank=rank, world_size=world_size,
                                  batch_size=batch_size, seed=stream_seed, augment=self.settings.loader_augmentation,
                                  first_batch=first)
            self._train, self._next = (key, iter(loader)), first
        return self._take(self._train[1], steps)

    def _take(self, iterator, steps):
        for batch in itertools.islice(iterator, steps):
            self._next += 1
            yield batch

    def val(self, *, steps, rank, world_size, batch_size, seed):
        if not self.settings.val_data:
            return None
        key = (steps, rank, world_size, batch_size, seed)
        if self._val is None or self._val[0] != key:
            self._val = (key, self._loader(self.settings.val_data, steps=steps, rank=rank, world_size=world_size,
                                           batch_size=batch_size, seed=seed, augment=False, same_every_pass=True))
        return self._val[1]


def loader_batches(settings) -> LoaderBatches:
    return LoaderBatches(settings)


def resolve(settings) -> BatchSource:
    """Import `settings.batch_source` ("module:callable") and call it with the settings."""
    spec = settings.batch_source
    module_name, _, attr = spec.partition(":")
    if not attr:
        raise ValueError(f"batch_source {spec!r} is not of the form 'module:callable'")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot import batch_source {spec!r}: {e}") from e
    return factory(settings)


class TemplateBatches:
    """Random crops of nilearn's MNI152 T1 template (z-scored) with a defaced box (image 0, anon 1) in
    front of the face: data for benchmarks, smoke runs and tests without a preprocessed selection.

    Each sample's crop depends only on (seed, step, its global index in the batch), so the batches of
    `world_size` processes are exactly the halves, quarters... of the one-process batch. There is one
    subject: `val` draws other crops of it, mirrored left-right. Crops are random for every method (a
    method's centre-crop sampling would give one and the same crop of the one subject).
    """

    def __init__(self, settings):
        self.patch = [int(p) for p in settings.loader_patch_size]
        image, anon, anat = template_volumes()
        if any(p > s for p, s in zip(self.patch, image.shape)):
            raise ValueError(f"patch {self.patch} is larger than the template {list(image.shape)}")
        self.volumes = (image, anon, anat)

    def _batches(self, volumes, *, steps, rank, batch_size, seed, step_offset=0):
        import torch

        image, anon, anat = volumes
        for step in range(step_offset, step_offset + steps):
            crops = {"image": [], "anon": [], "anat": [], "image_id": []}
            for i in range(batch_size):
                rng = np.random.default_rng([int(seed), step, rank * batch_size + i])
                start = [int(rng.integers(0, s - p + 1)) for s, p in zip(image.shape, self.patch)]
                box = tuple(slice(o, o + p) for o, p in zip(start, self.patch))
                for key, volume in (("image", image), ("anon", anon), ("anat", anat)):
                    crops[key].append(torch.from_numpy(np.ascontiguousarray(volume[box]))[None])
                crops["image_id"].append("MNI152_template")
            # pinned on CUDA machines, as the DataLoader's (pin_memory): the copy to the device is asynchronous
            pin = torch.cuda.is_available()
            yield {k: v if k == "image_id" else (torch.stack(v).pin_memory() if pin else torch.stack(v))
                   for k, v in crops.items()}

    def train(self, *, epoch, first_step, steps, rank, world_size, batch_size, seed):
        return self._batches(self.volumes, steps=steps, rank=rank, batch_size=batch_size, seed=seed,
                             step_offset=first_step)

    def val(self, *, steps, rank, world_size, batch_size, seed):
        mirrored = tuple(v[::-1].copy() for v in self.volumes)
        return self._batches(mirrored, steps=steps, rank=rank, batch_size=batch_size, seed=seed)


_TEMPLATE = None


MNI152_T1 = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"


def template_volumes():
    """(image, anon, anat) float32 volumes of the MNI152 T1 template that ships with nilearn, averaged
    to 2 mm, computed once per process (read with nibabel: importing nilearn.datasets takes seconds)."""
    global _TEMPLATE
    if _TEMPLATE is None:
        import importlib.util
        from pathlib import Path

        import nibabel as nib

        spec = importlib.util.find_spec("nilearn")
        if spec is None or not spec.submodule_search_locations:
            raise ValueError("the MNI152 template batches need nilearn installed")
        path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / MNI152_T1
        full = np.asarray(nib.load(path).get_fdata(), dtype=np.float32)
        x, y, z = (s // 2 * 2 for s in full.shape)
        image = full[:x, :y, :z].reshape(x // 2, 2, y // 2, 2, z // 2, 2).mean(axis=(1, 3, 5))
        anat = (image > 0.2 * image.max()).astype(np.float32)
        anon = np.zeros_like(image)
        x, y, z = image.shape
        # The face: anterior (high y), inferior (low z) block, as a defacing tool would remove.
        anon[x // 4: 3 * x // 4, int(0.7 * y):, : int(0.4 * z)] = 1.0
        image = (image - image.mean()) / image.std()
        image[anon > 0] = 0.0
        _TEMPLATE = (image, anon, anat * (1 - anon))
    return _TEMPLATE


def template_batches(settings) -> TemplateBatches:
    return TemplateBatches(settings)
