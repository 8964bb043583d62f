"""Blosc2 `.b2nd` arrays laid out for random 3D patch reads.

A b2nd array is split into chunks (the unit of storage) and chunks into blocks (the unit of
compression). A patch read decompresses only the blocks it touches, so blocks are kept small
(32^3 float32 = 128 KiB, about one core's L2 cache, nnU-Net 2.8.1's block cap) and chunks 128^3
(8 MiB), as wide as nnU-Net's `comp_blosc2_params` makes them for a 160^3 patch (96x128x128 on a
1 mm head). Arrays are opened memory-mapped, as nnU-Net's `nnUNetDatasetBlosc2.load_case` opens
them: a read maps the blocks it needs instead of reading them through file calls. nnssl sizes
blocks for a 32 KiB L1 cache and compresses with ZSTD level 8; the default codec is nnU-Net
2.8.1's (LZ4HC level 5). `benchmarks/patch_reads.py` times our layout with our reader against
nnU-Net's layout with nnU-Net's reader (docs/benchmarks.md has the figures; the codec, level and
shapes are config values).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import blosc2
import numpy as np

from openmind_bench import atomic, config

_DEFAULTS = config.section("preprocess")["store"]  # the schema's, read once

CODECS = {
    "zstd": blosc2.Codec.ZSTD,
    "lz4": blosc2.Codec.LZ4,
    "lz4hc": blosc2.Codec.LZ4HC,
    "blosclz": blosc2.Codec.BLOSCLZ,
    "zlib": blosc2.Codec.ZLIB,
}


@dataclass(frozen=True)
class StoreSettings:
    """Compression and layout of every array the preprocessing writes."""

    codec: str = _DEFAULTS["codec"]
    clevel: int = _DEFAULTS["clevel"]
    chunk_shape: tuple[int, int, int] = tuple(_DEFAULTS["chunk_shape"])
    block_shape: tuple[int, int, int] = tuple(_DEFAULTS["block_shape"])

    def __post_init__(self):
        if self.codec not in CODECS:
            raise ValueError(f"unknown blosc2 codec {self.codec!r}; choose one of {sorted(CODECS)}")
        if not 0 <= int(self.clevel) <= 9:
            raise ValueError(f"blosc2 clevel must be in 0..9, got {self.clevel}")
        for name, shape in (("chunk_shape", self.chunk_shape), ("block_shape", self.block_shape)):
            if len(shape) != 3 or any(int(s) < 1 for s in shape):
                raise ValueError(f"store {name} must be three positive integers, got {shape}")
        if any(b > c for b, c in zip(self.block_shape, self.chunk_shape)):
            raise ValueError(f"store block_shape {self.block_shape} exceeds chunk_shape {self.chunk_shape}")

    @classmethod
    def from_config(cls, cfg: dict | None) -> "StoreSettings":
        cfg = dict(cfg or {})
        for key in ("chunk_shape", "block_shape"):
            if key in cfg:
                cfg[key] = tuple(int(v) for v in cfg[key])
        return cls(**cfg)

    def layout(self, shape: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(chunks, blocks) for an array of `shape` ((C, X, Y, Z) or (X, Y, Z)), clipped to it."""
        spatial = tuple(int(s) for s in shape[-3:])
        lead = tuple(int(s) for s in shape[:-3])
        chunks = tuple(min(c, s) for c, s in zip(self.chunk_shape, spatial))
        blocks = tuple(min(b, c) for b, c in zip(self.block_shape, chunks))
        return lead + chunks, lead + blocks


def write_array(path: str | os.PathLike, array: np.ndarray, settings: StoreSettings) -> None:
    """Write `array` to `path` (.b2nd), atomically: readers never see a partial file."""
    array = np.ascontiguousarray(array)
    chunks, blocks = settings.layout(array.shape)
    cparams = {"codec": CODECS[settings.codec], "clevel": int(settings.clevel), "nthreads": 1}
    with atomic.atomic_path(path) as tmp:
        blosc2.asarray(array, urlpath=str(tmp), mode="w", chunks=chunks, blocks=blocks, cparams=cparams)


# Memory-mapped reads, as nnU-Net 2.8.1 (not on Windows, where it found mmap broken: nnU-Net #2723).
_MMAP = {} if os.name == "nt" else {"mmap_mode": "r"}


def open_array(path: str | os.PathLike) -> blosc2.NDArray:
    """Open a .b2nd read-only and memory-mapped, one decompression thread (loader workers are the
    parallelism)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such .b2nd file")
    return blosc2.open(str(path), mode="r", dparams={"nthreads": 1}, **_MMAP)


def spatial_shape(array) -> tuple[int, int, int]:
    """(X, Y, Z) of a stored array of shape (X, Y, Z) or (1, X, Y, Z)."""
    shape = tuple(int(s) for s in array.shape)
    if len(shape) == 4 and shape[0] == 1:
        return shape[1:]
    if len(shape) == 3:
        return shape
    raise ValueError(f"expected a (1, X, Y, Z) or (X, Y, Z) array, got shape {shape}")


def read_region(array, lower: Sequence[int], size: Sequence[int], fill=0) -> np.ndarray:
    """The box [lower, lower + size) of a 3D (or single-channel 4D) array, padded with `fill`.

    The box may reach past the array on any side (negative `lower` included); only the part
    inside is read from the store.
    """
    shape = spatial_shape(array)
    lower = [int(v) for v in lower]
    size = [int(v) for v in size]
    src_lo = [max(0, lo) for lo in lower]
    src_hi = [min(s, lo + n) for s, lo, n in zip(shape, lower, size)]
    out = None
    if all(h > l for l, h in zip(src_lo, src_hi)):
        box = tuple(slice(l, h) for l, h in zip(src_lo, src_hi))
        inner = np.asarray(array[(0, *box)] if len(array.shape) == 4 else array[box])
        if list(inner.shape) == size:
            return inner
        out = np.full(size, fill, dtype=inner.dtype)
        dst = tuple(slice(l - lo, h - lo) for l, h, lo in zip(src_lo, src_hi, lower))
        out[dst] = inner
        return out
    return np.full(size, fill, dtype=array.dtype)
