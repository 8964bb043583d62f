"""Checks on image files shared by the stages that read them (index verification, preprocessing,
the downstream readers)."""

from __future__ import annotations

import io
import math
import os
import zlib
from pathlib import Path

# deflate cannot compress better than about 1032:1, so a .gz of N bytes never holds more
# than ~1032 N bytes: a header claiming more is lying, and is caught before any allocation
MAX_DEFLATE_RATIO = 1032


def _gib(n: int) -> str:
    return f"{n / 2**30:.3g} GiB" if n >= 2**30 else f"{n / 2**20:.3g} MiB" if n >= 2**20 else f"{n} bytes"


def needed_bytes(header) -> int:
    """Bytes a single-file NIfTI with `header` holds: vox_offset + prod(shape) * bytes per voxel."""
    shape = tuple(int(s) for s in header.get_data_shape())
    return int(header.get_data_offset()) + math.prod(shape) * header.get_data_dtype().itemsize


def data_size_problem(path: str | os.PathLike, img) -> str | None:
    """Why the voxel data the header of `img` (a nibabel image loaded from `path`) claims cannot be
    in the file, or None. Header and file size only: cheap, and it runs before the data are read."""
    path = Path(path)
    header = img.header
    if not path.name.endswith((".nii", ".nii.gz")):
        return None  # .hdr/.img pairs: the data are in another file
    try:
        n_bytes = needed_bytes(header)
        shape = tuple(int(s) for s in header.get_data_shape())
    except Exception:  # odd header types: leave the decision to the reader
        return None
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


class ImageFileError(ValueError):
    """An image file that is truncated or corrupt; the message names the file and the problem."""


# Read and inflate in bounded pieces: memory stays at a few MiB whatever the file's size or ratio.
_READ_CHUNK = 1 << 20
_INFLATE_CHUNK = 1 << 20
_GZIP_WBITS = 16 + zlib.MAX_WBITS  # gzip wrapper: zlib itself checks the CRC-32 and length trailer
_NIFTI_HEADER_BYTES = 540  # NIfTI-2's header; NIfTI-1's is 348


def _gzip_stream(path: Path) -> tuple[int, bytes]:
    """(uncompressed length, first header bytes) of a gzip file, every member inflated and its
    CRC-32 and length trailer checked, without holding more than a chunk in memory."""
    length, head = 0, b""
    inflater = zlib.decompressobj(_GZIP_WBITS)
    started = False  # inside a member (its header seen): the file must not end here
    with open(path, "rb") as handle:
        while True:
            pending = handle.read(_READ_CHUNK)
            if not pending:
                break
            while pending:
                if not started:
                    pending = pending.lstrip(b"\0")  # zero padding after a member, as gzip.GzipFile allows
                    if not pending:
                        break
                    started = True
                while True:
                    try:
                        out = inflater.decompress(pending, _INFLATE_CHUNK)
                    except zlib.error as e:
                        raise ImageFileError(f"{path}: corrupt gzip ({_zlib_reason(e)})") from None
                    length += len(out)
                    if len(head) < _NIFTI_HEADER_BYTES:
                        head += out[:_NIFTI_HEADER_BYTES - len(head)]
                    if len(out) < _INFLATE_CHUNK or inflater.eof:
                        break
                    pending = inflater.unconsumed_tail  # a full output chunk: more may wait inside zlib
                if inflater.eof:  # a member ended, its trailer checked; another may follow
                    pending = inflater.unused_data
                    inflater = zlib.decompressobj(_GZIP_WBITS)
                    started = False
                else:
                    pending = inflater.unconsumed_tail
    if started:
        raise ImageFileError(f"{path}: truncated: gzip stream ends after {length} bytes "
                             f"({path.stat().st_size} compressed bytes, no end-of-stream marker)")
    return length, head


def _zlib_reason(error: zlib.error) -> str:
    text = str(error)
    if "incorrect data check" in text:
        return "CRC-32 check failed"
    if "incorrect length check" in text:
        return "length trailer does not match the data"
    if "incorrect header check" in text:
        return "not a gzip stream"
    return text


def _nifti_needs(path: Path, head: bytes) -> int:
    """Bytes a NIfTI file (header bytes `head`) must hold: vox_offset + prod(shape) * bytes per voxel."""
    import nibabel as nib

    for header_class in (nib.Nifti1Header, nib.Nifti2Header):
        size = header_class.sizeof_hdr
        if len(head) < size:
            continue
        try:
            header = header_class.from_fileobj(io.BytesIO(head[:size]), check=False)
            if int(header["sizeof_hdr"]) != size:
                continue
            return needed_bytes(header)
        except Exception:  # noqa: BLE001 - nibabel raises many kinds for a header that is not this one
            continue
    raise ImageFileError(f"{path}: not a NIfTI-1/2 file (no valid header in its first {len(head)} bytes)")


def check_image_file(path: str | os.PathLike) -> None:
    """Raise ImageFileError (naming the file and the problem) unless the image file is whole.

    `.nii.gz`: the gzip stream inflates completely, each member's CRC-32 and length trailer match,
    and the NIfTI data are as long as the header says (vox_offset + prod(shape) * bytes per voxel);
    `.nii`: the same length check on the file; other formats nnU-Net reads (`.nrrd`, `.mha`, ...):
    a full read by SimpleITK. One streaming pass, a few MiB of memory: cheap beside any real read."""
    path = Path(path)
    name = path.name.lower()
    try:
        if name.endswith(".nii.gz"):
            length, head = _gzip_stream(path)
        elif name.endswith(".nii"):
            with open(path, "rb") as handle:
                head = handle.read(_NIFTI_HEADER_BYTES)
            length = path.stat().st_size
        else:
            _read_with_simpleitk(path)
            return
    except OSError as e:
        raise ImageFileError(f"{path}: cannot be read ({type(e).__name__}: {e})") from None
    needs = _nifti_needs(path, head)
    if length < needs:
        raise ImageFileError(f"{path}: truncated: data has {length} bytes, header needs {needs}")


def image_file_problem(path: str | os.PathLike) -> str | None:
    """`check_image_file`'s message, or None for a whole file."""
    try:
        check_image_file(path)
    except ImageFileError as e:
        return str(e)
    return None


def _read_with_simpleitk(path: Path) -> None:
    import SimpleITK as sitk

    try:
        sitk.ReadImage(str(path))
    except RuntimeError as e:  # SimpleITK's one exception type; its text says what ITK found
        reason = " ".join(str(e).split())
        raise ImageFileError(f"{path}: unreadable image ({reason[-300:]})") from None
