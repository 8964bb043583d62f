"""Checks on NIfTI files shared by the stages that read them (index verification, preprocessing)."""

from __future__ import annotations

import math
import os
from pathlib import Path

# deflate cannot compress better than about 1032:1, so a .gz of N bytes never holds more
# than ~1032 N bytes: a header claiming more is lying, and is caught before any allocation
MAX_DEFLATE_RATIO = 1032


def _gib(n: int) -> str:
    return f"{n / 2**30:.3g} GiB" if n >= 2**30 else f"{n / 2**20:.3g} MiB" if n >= 2**20 else f"{n} bytes"


def data_size_problem(path: str | os.PathLike, img) -> str | None:
    """Why the voxel data the header of `img` (a nibabel image loaded from `path`) claims cannot be
    in the file, or None. Header and file size only: cheap, and it runs before the data are read."""
    path = Path(path)
    header = img.header
    try:
        shape = tuple(int(s) for s in header.get_data_shape())
        itemsize = header.get_data_dtype().itemsize
        offset = int(header.get_data_offset()) if path.name.endswith((".nii", ".nii.gz")) else 0
    except Exception:  # odd header types: leave the decision to the reader
        return None
    if not path.name.endswith((".nii", ".nii.gz")):
        return None  # .hdr/.img pairs: the data are in another file
    n_bytes = offset + math.prod(shape) * itemsize
    size = path.stat().st_size
    claim = (f"header claims {'x'.join(map(str, shape))} voxels of {header.get_data_dtype()} "
             f"({_gib(n_bytes)})")
    if path.name.endswith(".gz"):
        if n_bytes > size * MAX_DEFLATE_RATIO + 4096:
            return (f"{claim} but the file holds only {size} compressed bytes "
                    f"(at most {_gib(size * MAX_DEFLATE_RATIO)} uncompressed)")
    elif n_bytes > size:
        return f"{claim} but the file holds only {size} bytes"
    return None


def memory_problem(img, error: MemoryError) -> str:
    """A MemoryError (often empty) turned into what was asked for."""
    shape = "x".join(str(int(s)) for s in img.header.get_data_shape())
    return f"not enough memory to read {shape} voxels ({type(error).__name__}: {error})"
