"""Models Genesis (Zhou et al.; the official transformation pipeline as nnssl uses it): restore the
original patch from a version with flips (input and target alike), local pixel shuffling, a
non-linear (Bezier) intensity curve and in- or out-painting; MSE over the whole patch, or over the
non-anonymised voxels for the anonymisation-aware variant. Rates as the official code: non-linear
0.9, paint 0.9 (out-paint 0.8 / in-paint 0.2), local shuffle 0.5, flip 0.4.

The official transforms assume intensities in [0, 1]. nnssl applies them to z-scored patches, so
the Bezier curve clamps every value outside [0, 1] and the painted noise is U[0, 1]; that is what
produced the published numbers and is the default (`intensity_space: zscore`). `unit` rescales each
patch to [0, 1] by its min/max for the corruption and maps the input back, as Models Genesis meant.

Flips (up to 3, each while U < flip_rate): ours draw the axis among X, Y, Z. nnssl's
`data_augmentation` (model_genesis_transform.py:102) draws among array axes 0-2 of (C, X, Y, Z), so
one draw in three flips the single channel (nothing happens) and Z is never flipped; we keep the
three spatial axes on purpose (docs/fidelity.md).

The corruption runs in torch on the training device (the engine hands this method its batch there):
the official local shuffle is a Python loop over 10000 windows (about 1.3 CPU-seconds per 160^3
sample, more than the GPU step); here all windows are shuffled at once (one sort over every window's
voxels, later windows overwriting earlier ones as in the loop). Every random parameter (rates,
boxes, windows, curve) comes from the sample's seed on the CPU; the noise and the permutations come
from a generator on the device seeded from it.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from scipy.special import comb
from torch import nn

from openmind_bench.ssl import masking, views

# nnssl's Models Genesis trainer applies no spatial augmentation (its flips are part of the corruption).
LOADER_AUGMENTATION = False

# On a Primus the reconstruction runs through the up-projection: every parameter gets a gradient.
TRAINS_PRIMUS_UP_PROJECTION = True

DEFAULTS = {
    "nonlinear_rate": 0.9,
    "paint_rate": 0.9,
    "outpaint_rate": 0.8,
    "local_rate": 0.5,
    "flip_rate": 0.4,
    "shuffle_windows": 10000,
    "intensity_space": "zscore",
}


def _bezier(points: np.ndarray, n_times: int = 100000) -> tuple[np.ndarray, np.ndarray]:
    t = np.linspace(0.0, 1.0, n_times)
    n = len(points) - 1
    basis = np.array([comb(n, i) * t ** (n - i) * (1 - t) ** i for i in range(n + 1)])
    return points[:, 0] @ basis, points[:, 1] @ basis


def bezier_curve(rng: np.random.Generator, n_points: int = 100000) -> np.ndarray:
    """The official random Bezier intensity curve on [0, 1], sampled on a uniform grid of `n_points`."""
    points = np.array([[0.0, 0.0], rng.random(2), rng.random(2), [1.0, 1.0]])
    xvals, yvals = _bezier(points, n_points)
    if rng.random() < 0.5:
        xvals = np.sort(xvals)  # a decreasing curve: inverts the contrast
    else:
        xvals, yvals = np.sort(xvals), np.sort(yvals)
    # np.interp(x, xvals, yvals) resampled on a uniform grid first: a table lookup instead of a binary
    # search per voxel (differences below 1e-6).
    return np.interp(np.linspace(0.0, 1.0, n_points), xvals, yvals)


def nonlinear_intensity(x: torch.Tensor, rng: np.random.Generator, n_points: int = 100000) -> torch.Tensor:
    """The Bezier curve applied to `x` (values outside [0, 1] clamp to its ends)."""
    curve = torch.as_tensor(bezier_curve(rng, n_points), dtype=torch.float64, device=x.device)
    position = x.double().clamp(0.0, 1.0) * (n_points - 1)
    index = position.long().clamp_max(n_points - 2)
    frac = position - index
    return (curve[index] * (1.0 - frac) + curve[index + 1] * frac).to(x.dtype)


def local_pixel_shuffle(x: torch.Tensor, rng: np.random.Generator, n_windows: int,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """Shuffle the voxels inside many small windows (up to a tenth of the patch per axis), read from
    the original; where windows overlap the later one wins, as in the official loop."""
    shape = np.array(x.shape)
    max_size = np.maximum(shape // 10, 1)
    sizes = rng.integers(1, max_size + 1, size=(n_windows, 3))
    starts = rng.integers(0, shape - sizes + 1)
    device = x.device
    sizes_t = torch.as_tensor(sizes, device=device)
    starts_t = torch.as_tensor(starts, device=device)
    volumes = sizes_t.prod(1)
    window = torch.repeat_interleave(torch.arange(n_windows, device=device), volumes)
    local = torch.arange(window.numel(), device=device) - (torch.cumsum(volumes, 0) - volumes)[window]
    size, start = sizes_t[window], starts_t[window]
    k = local % size[:, 2]
    j = (local // size[:, 2]) % size[:, 1]
    i = local // (size[:, 1] * size[:, 2])
    _, ny, nz = x.shape
    flat = ((start[:, 0] + i) * ny + start[:, 1] + j) * nz + start[:, 2] + k
    # A random order inside every window: sort by (window, random key).
    keys = torch.rand(window.numel(), generator=generator, device=device, dtype=torch.float64)
    source = flat[torch.argsort(window.double() + keys)]
    # Later windows win: keep each voxel's entry of the last window that covers it.
    last = torch.full((x.numel(),), -1, dtype=window.dtype, device=device)
    last = last.scatter_reduce(0, flat, window, reduce="amax")
    keep = window == last[flat]
    out = x.reshape(-1).clone()
    out[flat[keep]] = x.reshape(-1)[source[keep]]
    return out.reshape(x.shape)


def in_paint(x: torch.Tensor, rng: np.random.Generator, generator: torch.Generator | None = None) -> torch.Tensor:
    """Up to 5 boxes (1/6 to 1/3 of each axis) filled with U[0, 1] noise."""
    x = x.clone()
    shape = np.array(x.shape)
    for _ in range(5):
        if rng.random() >= 0.95:
            break
        size = rng.integers(shape // 6, shape // 3 + 1)
        start = rng.integers(3, shape - size - 3 + 1)
        x[tuple(slice(o, o + s) for o, s in zip(start, size))] = torch.rand(
            tuple(int(v) for v in size), generator=generator, device=x.device, dtype=x.dtype)
    return x


def out_paint(x: torch.Tensor, rng: np.random.Generator, generator: torch.Generator | None = None) -> torch.Tensor:
    """U[0, 1] noise everywhere but up to 5 boxes (3/7 to 4/7 of each axis smaller than the patch)."""
    out = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    shape = np.array(x.shape)
    for i in range(5):
        if i > 0 and rng.random() >= 0.95:
            break
        size = shape - rng.integers(3 * shape // 7, 4 * shape // 7 + 1)
        start = rng.integers(3, shape - size - 3 + 1)
        box = tuple(slice(o, o + s) for o, s in zip(start, size))
        out[box] = x[box]
    return out


def corrupt(image: torch.Tensor, anon: torch.Tensor | None, rng: np.random.Generator, settings: dict,
            generator: torch.Generator | None = None):
    """One sample (X, Y, Z): returns (input, target, anon) with the flips applied to all three."""
    target = image
    for _ in range(3):
        if rng.random() >= settings["flip_rate"]:
            break
        axis = int(rng.integers(0, 3))
        target = torch.flip(target, (axis,))
        anon = torch.flip(anon, (axis,)) if anon is not None else None
    x = target.clone()
    low, high = float(x.min()), float(x.max())
    unit = settings["intensity_space"] == "unit"
    if unit:
        x = (x - low) / max(high - low, 1e-8)
    if rng.random() < settings["local_rate"]:
        x = local_pixel_shuffle(x, rng, int(settings["shuffle_windows"]), generator)
    if rng.random() < settings["nonlinear_rate"]:
        x = nonlinear_intensity(x, rng)
    if rng.random() < settings["paint_rate"]:
        inside = rng.random() < 1.0 - settings["outpaint_rate"]
        x = in_paint(x, rng, generator) if inside else out_paint(x, rng, generator)
    if unit:
        x = x * (high - low) + low
    return x.float(), target, anon


class ModelsGenesis(nn.Module):
    views_on_device = True

    def __init__(self, backbone: nn.Module, patch_size: Sequence[int], *, anon_aware: bool, **settings):
        super().__init__()
        if settings["intensity_space"] not in ("zscore", "unit"):
            raise ValueError(f"models_genesis intensity_space must be 'zscore' or 'unit', not {settings['intensity_space']!r}")
        self.backbone = backbone
        self.patch_size = tuple(patch_size)
        self.anon_aware = anon_aware
        self.settings = dict(settings)

    def make_view(self, batch: dict, seeds: Sequence[int]) -> dict:
        images = batch["image"]
        anons = batch.get("anon")
        inputs, targets, weights = [], [], []
        for i, seed in enumerate(seeds):
            rng = np.random.default_rng(int(seed))
            generator = views.device_generator(int(rng.integers(2**62)), images.device)
            x, y, a = corrupt(images[i, 0], None if anons is None else anons[i, 0], rng, self.settings, generator)
            inputs.append(x)
            targets.append(y)
            weights.append(torch.ones_like(y) if a is None else 1.0 - a.float())
        target = torch.stack(targets)[:, None]
        return {
            "input": torch.stack(inputs)[:, None],
            "target": target,
            "loss_weight": torch.stack(weights)[:, None] if self.anon_aware else torch.ones_like(target),
        }

    def reconstruct(self, view: dict) -> torch.Tensor:
        return self.backbone(view["input"])

    def forward(self, view: dict) -> torch.Tensor:
        return masking.weighted_mse(self.reconstruct(view), view["target"], view["loss_weight"])


def build(backbone: nn.Module, arch_kwargs: dict, patch_size: Sequence[int], *, anon_aware: bool,
          **settings) -> ModelsGenesis:
    return ModelsGenesis(backbone, patch_size, anon_aware=anon_aware, **settings)
