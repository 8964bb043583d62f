"""Random patches of stored images: the engine of the pre-training loader.

`PatchSampler` draws an image (uniformly, with replacement), a patch centre, reads the box
around it from the blosc2 store (only the chunks it touches; padding with zeros where the box
leaves the image) and applies the augmentations. Method-specific views build on its pieces:
two overlapping crops are two `crop` calls at nearby centres, a crop grid is one `read` split
into tiles.

Centres. Plain sampling follows nnssl: along each axis the patch lies anywhere inside the image
(uniform lower corner), or is centred where the image is smaller than the patch. With
`anatomy_aware` the centre is a uniformly drawn anatomy voxel, so no patch is empty: voxels are
drawn in the anatomy mask's bounding box (stored in the properties) and kept if they lie in the
mask, which reads one small block per draw; an image without an anatomy mask counts as all
anatomy (as our preprocessing writes it), and an empty mask falls back to plain sampling. With
`centre_crop` every patch is the image's centre crop (nnssl's `nnsslCenterCropDataLoader3D`: lower
corner trunc((shape - patch) / 2), zero padding where the image is smaller).

Everything random comes from the numpy Generator passed in, so results depend on the seed only.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from typing import Sequence

import numpy as np
import torch

from openmind_bench.data.augment import Augmentation, AugmentationParams, source_box, warp
from openmind_bench.data.images import StoredImage
from openmind_bench.store.b2nd import open_array, read_region, spatial_shape
from openmind_bench.store.files import read_properties

log = logging.getLogger(__name__)

REJECTION_DRAWS = 64  # anatomy-aware: draws in the bounding box before reading the whole mask


class PatchSampler:
    def __init__(
        self,
        images: Sequence[StoredImage],
        patch_size: Sequence[int],
        *,
        anatomy_aware: bool = False,
        centre_crop: bool = False,
        augmentation: Augmentation | None = None,
        max_open: int = 32,
    ):
        if not images:
            raise ValueError("PatchSampler needs at least one image")
        if len(patch_size) != 3 or any(int(p) < 1 for p in patch_size):
            raise ValueError(f"patch_size must be three positive integers, got {patch_size}")
        self.images = list(images)
        self.patch_size = tuple(int(p) for p in patch_size)
        self.anatomy_aware = anatomy_aware
        if anatomy_aware and centre_crop:
            raise ValueError("PatchSampler: anatomy_aware and centre_crop exclude each other")
        self.centre_crop = centre_crop
        self.augmentation = augmentation
        self.max_open = max_open
        self._open: OrderedDict[int, tuple] = OrderedDict()
        self._anatomy_box: dict[int, list | None] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.images)

    # ------------------------------------------------------------------ reading

    def arrays(self, index: int) -> tuple:
        """(image, anon or None, anat or None) blosc2 arrays of image `index`, opened on first use."""
        if self._pid != os.getpid():  # forked into a loader worker: never share open handles
            self._open.clear()
            self._pid = os.getpid()
        if index in self._open:
            self._open.move_to_end(index)
            return self._open[index]
        im = self.images[index]
        arrays = (open_array(im.image), open_array(im.anon) if im.anon else None,
                  open_array(im.anat) if im.anat else None)
        shape = spatial_shape(arrays[0])
        for name, arr in (("anonymisation mask", arrays[1]), ("anatomy mask", arrays[2])):
            if arr is not None and spatial_shape(arr) != shape:
                raise ValueError(f"{im.image_id}: {name} shape {spatial_shape(arr)} differs from the image's {shape}")
        self._open[index] = arrays
        if len(self._open) > self.max_open:
            self._open.popitem(last=False)
        return arrays

    def shape(self, index: int) -> tuple[int, int, int]:
        return spatial_shape(self.arrays(index)[0])

    def read(self, index: int, lower: Sequence[int], size: Sequence[int]) -> dict[str, np.ndarray]:
        """The box [lower, lower + size) of image `index`: image (float32), anon, anat (uint8),
        each (1, *size), zero outside the image. A missing anatomy mask reads as all ones inside."""
        image, anon, anat = self.arrays(index)
        size = tuple(int(s) for s in size)
        out = {"image": read_region(image, lower, size).astype(np.float32, copy=False)}
        # masks are binarised on read: nnssl writes some with -1 outside the non-zero region
        out["anon"] = (read_region(anon, lower, size) > 0).view(np.uint8) if anon is not None \
            else np.zeros(size, np.uint8)
        out["anat"] = (read_region(anat, lower, size) > 0).view(np.uint8) if anat is not None \
            else self._inside(index, lower, size)
        return {k: np.asarray(v)[None] for k, v in out.items()}

    def _inside(self, index: int, lower: Sequence[int], size: Sequence[int]) -> np.ndarray:
        """1 where the box [lower, lower + size) lies inside image `index`, else 0."""
        inside = np.zeros(size, np.uint8)
        lo = [max(0, l) for l in lower]
        hi = [min(s, l + n) for s, l, n in zip(self.shape(index), lower, size)]
        if all(h > l for l, h in zip(lo, hi)):
            inside[tuple(slice(l - o, h - o) for l, h, o in zip(lo, hi, lower))] = 1
        return inside

    # ------------------------------------------------------------------ centres

    def anatomy_box(self, index: int) -> list | None:
        """Half-open box [[lo, hi]] * 3 of the anatomy mask, None if it is empty."""
        if index not in self._anatomy_box:
            shape = self.shape(index)
            box = [[0, s] for s in shape]
            im = self.images[index]
            if im.anat is not None and im.properties is not None:
                try:
                    box = read_properties(im.properties).get("anatomy_bbox", box)
                except (OSError, ValueError) as e:
                    log.warning("%s: unreadable properties (%s); anatomy box = whole image", im.image_id, e)
            self._anatomy_box[index] = box
        return self._anatomy_box[index]

    def sample_centre(self, index: int, rng: np.random.Generator, size: Sequence[int] | None = None) -> np.ndarray:
        """A patch centre (integer voxel; the patch is [centre - size // 2, + size))."""
        size = np.asarray(size or self.patch_size)
        shape = np.asarray(self.shape(index))
        if self.anatomy_aware:
            centre = self._anatomy_centre(index, rng)
            if centre is not None:
                return centre
        if self.centre_crop:
            return np.trunc((shape - size) / 2).astype(int) + size // 2
        lower = np.where(shape >= size, [rng.integers(0, max(s - p, 0) + 1) for s, p in zip(shape, size)],
                         (shape - size) // 2)
        return lower + size // 2

    def _anatomy_centre(self, index: int, rng: np.random.Generator) -> np.ndarray | None:
        box = self.anatomy_box(index)
        if box is None:
            return None
        anat = self.arrays(index)[2]
        lo, hi = np.array([b[0] for b in box]), np.array([b[1] for b in box])
        if anat is None:
            return rng.integers(lo, hi)
        lead = (0,) if len(anat.shape) == 4 else ()
        for _ in range(REJECTION_DRAWS):
            voxel = rng.integers(lo, hi)
            if anat[lead + tuple(voxel.tolist())] > 0:  # > 0: nnssl's masks may hold -1 outside the image
                return voxel
        # sparse anatomy in a large box: read the mask once and draw among its voxels
        mask = read_region(anat, lo, hi - lo) > 0
        hits = np.flatnonzero(mask)
        if hits.size == 0:
            log.warning("%s: empty anatomy mask; plain centre sampling", self.images[index].image_id)
            self._anatomy_box[index] = None
            return None
        return lo + np.array(np.unravel_index(hits[rng.integers(hits.size)], mask.shape))

    # ------------------------------------------------------------------ patches

    def crop(
        self,
        index: int,
        centre: Sequence[int],
        rng: np.random.Generator | None = None,
        size: Sequence[int] | None = None,
        augment: bool = True,
        params: AugmentationParams | None = None,
    ) -> dict[str, torch.Tensor]:
        """The patch of `size` (default: patch_size) centred at `centre`, augmented when the
        sampler has an augmentation, `augment` is true and `rng` is given, or with the given
        `params` (e.g. the same augmentation for two views). Returns float32 tensors image,
        anon, anat of shape (1, *size)."""
        size = tuple(int(s) for s in (size or self.patch_size))
        lower = np.asarray(centre, dtype=int) - np.asarray(size) // 2
        if params is None and self.augmentation is not None and augment and rng is not None:
            params = self.augmentation.sample(rng)
        if params is not None and params.spatial:
            matrix = params.matrix()
            exact_centre = lower + (np.asarray(size) - 1) / 2
            lo, hi = source_box(exact_centre, size, matrix)
            lo, hi = np.maximum(lo, 0), np.minimum(hi, self.shape(index))
            if np.all(hi > lo):
                box = self.read(index, lo, hi - lo)
                stacked = torch.from_numpy(np.concatenate(
                    [box["image"], box["anon"].astype(np.float32), box["anat"].astype(np.float32)]))
                warped = warp(stacked, lo, exact_centre, size, matrix)
                patch = {"image": warped[0:1].contiguous(), "anon": (warped[1:2] >= 0.5).float(),
                         "anat": (warped[2:3] >= 0.5).float()}
            else:  # the transformed patch misses the image entirely
                patch = {k: torch.zeros((1, *size)) for k in ("image", "anon", "anat")}
        else:
            box = self.read(index, lower, size)
            patch = {"image": torch.from_numpy(box["image"]), "anon": torch.from_numpy(box["anon"]).float(),
                     "anat": torch.from_numpy(box["anat"]).float()}
        if params is not None and params.flips:
            dims = [a + 1 for a in params.flips]
            patch = {k: torch.flip(v, dims) for k, v in patch.items()}
        return patch

    def sample(self, rng: np.random.Generator, index: int | None = None) -> dict:
        """One random patch: image index (uniform with replacement unless given), centre, crop."""
        if index is None:
            index = int(rng.integers(len(self.images)))
        centre = self.sample_centre(index, rng)
        patch = self.crop(index, centre, rng)
        patch["image_id"] = self.images[index].image_id
        return patch

    def batch(self, rng: np.random.Generator, batch_size: int, shared: bool = False) -> dict:
        """`batch_size` random patches stacked: image/anat/anon (B, 1, *patch_size), image_id list.

        `shared` stacks straight into shared memory, as a DataLoader worker should: the batch
        then crosses to the main process without the extra copy `share_memory_` would make.
        """
        patches = [self.sample(rng) for _ in range(int(batch_size))]
        out = {}
        for key in ("image", "anon", "anat"):
            buffer = torch.empty((len(patches), *patches[0][key].shape), dtype=torch.float32)
            out[key] = torch.stack([p[key] for p in patches], out=buffer.share_memory_() if shared else buffer)
        out["image_id"] = [p["image_id"] for p in patches]
        return out
