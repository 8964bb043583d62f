"""One image through preprocessing (the order and where it differs from nnssl: see the package doc).

`preprocess_image` returns the arrays and properties to store, or raises `ImageRejected` with a
one-line reason for a broken image. `to_original_grid` inverts the geometry (and optionally the
z-score), mapping a stored array or a prediction on it back onto the source image's voxel grid.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
import nibabel as nib
import numpy as np
from nibabel import orientations
from openmind_bench import config
from openmind_bench.nifti import data_size_problem, image_file_problem, memory_problem
from openmind_bench.preprocess.resample import (
    lowres_axis,
    new_shape_for,
    resample,
    resample_mask,
    resampled_affine,
    zoom_to_shape,
)
from openmind_bench.store.b2nd import StoreSettings

ANATOMY_DEFAULT = "default: all ones (no anatomy mask in the index)"
ANONYMIZATION_DEFAULT = "default: empty (no anonymisation mask in the index)"


class ImageRejected(Exception):
    """A broken or unusable image; the message is the one-line reason recorded in the QC table."""


_DEFAULTS = config.section("preprocess")  # the schema's, read once


@dataclass(frozen=True)
class PreprocessSettings:
    """Everything that changes the stored arrays (config key `preprocess`)."""

    spacing: tuple[float, float, float] = tuple(_DEFAULTS["spacing"])
    order: int = _DEFAULTS["order"]
    mask_order: int = _DEFAULTS["mask_order"]
    anisotropy_threshold: float = _DEFAULTS["anisotropy_threshold"]
    anisotropic_axis_order: int = _DEFAULTS["anisotropic_axis_order"]
    max_voxels: int = _DEFAULTS["max_voxels"]
    store: StoreSettings = field(default_factory=StoreSettings)

    def __post_init__(self):
        if len(self.spacing) != 3 or any(not (float(s) > 0) for s in self.spacing):
            raise ValueError(f"preprocess spacing must be three positive numbers (mm), got {self.spacing}")
        for name in ("order", "mask_order", "anisotropic_axis_order"):
            if not 0 <= int(getattr(self, name)) <= 5:
                raise ValueError(f"preprocess {name} must be a spline order in 0..5, got {getattr(self, name)}")

    @classmethod
    def from_config(cls, cfg: dict | None) -> "PreprocessSettings":
        cfg = dict(cfg or {})
        store = StoreSettings.from_config(cfg.pop("store", None))
        if "spacing" in cfg:
            cfg["spacing"] = tuple(float(v) for v in cfg["spacing"])
        return cls(store=store, **cfg)

    def describe(self) -> dict:
        return asdict(self)


@dataclass
class PreprocessedImage:
    image: np.ndarray  # float32 (1, X, Y, Z)
    anon: np.ndarray  # uint8 (1, X, Y, Z), 1 = anonymised (defaced, blurred, stripped) voxel
    anat: np.ndarray  # uint8 (1, X, Y, Z), 1 = anatomy
    properties: dict
    nnssl_properties: dict


def voxel_sizes(affine: np.ndarray) -> np.ndarray:
    return np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))


def _load(path: Path, what: str) -> nib.Nifti1Image:
    try:
        img = nib.load(str(path))
    except FileNotFoundError:
        raise ImageRejected(f"{what} {path} does not exist") from None
    except Exception as e:  # nibabel raises many types for broken headers
        raise ImageRejected(f"{what} {path}: unreadable NIfTI ({type(e).__name__}: {e})") from None
    problem = data_size_problem(path, img)
    if problem:
        raise ImageRejected(f"{what} {path}: {problem}")
    try:
        return nib.funcs.squeeze_image(img)  # (X, Y, Z, 1) -> (X, Y, Z)
    except Exception as e:
        raise ImageRejected(f"{what} {path}: unreadable NIfTI ({type(e).__name__}: {e})") from None


def _voxels(img: nib.Nifti1Image, path: Path, what: str) -> np.ndarray:
    try:
        return np.asarray(img.get_fdata(dtype=np.float32))
    except MemoryError as e:
        raise ImageRejected(f"{what} {path}: {memory_problem(img, e)}") from None
    except Exception as e:  # truncated gzip, short file, ...
        raise ImageRejected(f"{what} {path}: unreadable voxel data ({type(e).__name__}: {e})") from None


def load_image(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Voxels (float32, 3D) and affine of an image, or ImageRejected saying what is wrong."""
    path = Path(path)
    img = _load(path, "image")
    shape = tuple(int(s) for s in img.shape)
    if len(shape) != 3:
        raise ImageRejected(f"image {path}: expected a 3D image, got shape {shape}")
    if any(s < 2 for s in shape):
        raise ImageRejected(f"image {path}: degenerate shape {shape}")
    affine = np.asarray(img.affine, dtype=float)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise ImageRejected(f"image {path}: non-finite or singular affine")
    data = _voxels(img, path, "image")
    # nibabel stops at the last voxel: a bad CRC-32 or length trailer is seen by a full pass only
    problem = image_file_problem(path)
    if problem:
        raise ImageRejected(f"image {problem}")
    finite = np.isfinite(data)
    if not finite.all():
        n_nan, n_inf = int(np.isnan(data).sum()), int(np.isinf(data).sum())
        raise ImageRejected(f"image {path}: {n_nan} NaN and {n_inf} Inf voxels")
    lo, hi = float(data.min()), float(data.max())
    if lo == hi == 0.0:
        raise ImageRejected(f"image {path}: empty (every voxel is 0)")
    if lo == hi:
        raise ImageRejected(f"image {path}: constant (every voxel is {lo:g})")
    return data, affine


def load_mask(path: str | Path, what: str, shape: tuple, affine: np.ndarray) -> np.ndarray:
    """A binary mask on the image's voxel grid (bool), or ImageRejected when it is not on that grid."""
    path = Path(path)
    img = _load(path, what)
    if tuple(img.shape) != tuple(shape):
        raise ImageRejected(f"{what} {path} has shape {tuple(img.shape)}, the image {tuple(shape)}")
    diff = float(np.abs(np.asarray(img.affine) - affine).max())
    if diff > 1e-2:
        raise ImageRejected(f"{what} {path} is not on the image's voxel grid (affines differ by up to {diff:.3g})")
    values = _voxels(img, path, what)
    if not np.all(np.isfinite(values)):
        raise ImageRejected(f"{what} {path} contains NaN or Inf values")
    return values >= 0.5


def reorientation(affine: np.ndarray) -> np.ndarray:
    """nibabel orientation transform from the image's voxel axes to the closest RAS axes."""
    return orientations.io_orientation(affine)


def nonzero_box(data: np.ndarray) -> list[list[int]]:
    """Half-open bounding box [[lo, hi], ...] of the non-zero voxels (nnssl's crop_to_nonzero box;
    nnssl fills holes in the mask first, which never changes the box)."""
    box = []
    for axis in range(data.ndim):
        other = tuple(a for a in range(data.ndim) if a != axis)
        hit = np.flatnonzero(np.any(data != 0, axis=other))
        box.append([int(hit[0]), int(hit[-1]) + 1])
    return box


def _box_of(mask: np.ndarray) -> list[list[int]] | None:
    return nonzero_box(mask) if mask.any() else None


def preprocess_image(
    path: str | Path,
    settings: PreprocessSettings,
    anat_mask: str | Path | None = None,
    anon_mask: str | Path | None = None,
    image_id: str = "",
) -> PreprocessedImage:
    """Read, check, reorient to RAS, crop to the non-zero box, z-score, resample; masks alike."""
    path = Path(path)
    data, affine0 = load_image(path)
    shape0 = data.shape
    anat = load_mask(anat_mask, "anatomy mask", shape0, affine0) if anat_mask else np.ones(shape0, bool)
    anon = load_mask(anon_mask, "anonymisation mask", shape0, affine0) if anon_mask else np.zeros(shape0, bool)

    ornt = reorientation(affine0)
    data = orientations.apply_orientation(data, ornt)
    anat = orientations.apply_orientation(anat, ornt)
    anon = orientations.apply_orientation(anon, ornt)
    affine_r = affine0 @ orientations.inv_ornt_aff(ornt, shape0)
    spacing_r = voxel_sizes(affine_r)

    box = nonzero_box(data)
    crop = tuple(slice(lo, hi) for lo, hi in box)
    data, anat, anon = data[crop], anat[crop], anon[crop]
    shape_c = data.shape
    if any(s < 2 for s in shape_c):
        raise ImageRejected(f"image {path}: degenerate, its non-zero region spans {shape_c} voxels")
    affine_c = affine_r.copy()
    affine_c[:3, 3] = affine_r[:3, :3] @ np.array([lo for lo, _ in box], dtype=float) + affine_r[:3, 3]

    mean = float(data.mean(dtype=np.float64))
    std = float(data.std(dtype=np.float64))
    if not std > 1e-8 * max(1.0, abs(mean)):
        raise ImageRejected(f"image {path}: constant within its non-zero bounding box")
    data = ((data - mean) / std).astype(np.float32)

    target = tuple(float(s) for s in settings.spacing)
    shape_n = new_shape_for(shape_c, spacing_r, target)
    n_voxels = math.prod(shape_n)
    if n_voxels > settings.max_voxels:
        raise ImageRejected(
            f"image {path}: resampled to {target} mm it would have {shape_n} = {n_voxels} voxels "
            f"(more than preprocess.max_voxels = {settings.max_voxels})"
        )
    data = resample(data, shape_n, spacing_r, settings.order, settings.anisotropy_threshold,
                    settings.anisotropic_axis_order)
    anat = resample_mask(anat, shape_n, spacing_r, settings.mask_order, settings.anisotropy_threshold)
    anon = resample_mask(anon, shape_n, spacing_r, settings.mask_order, settings.anisotropy_threshold)
    affine_n = resampled_affine(affine_c, shape_c, shape_n)

    chunks, blocks = settings.store.layout((1, *shape_n))
    properties = {
        "image_id": image_id,
        "source": path.as_posix(),
        "anatomy_mask_source": Path(anat_mask).as_posix() if anat_mask else ANATOMY_DEFAULT,
        "anonymization_mask_source": Path(anon_mask).as_posix() if anon_mask else ANONYMIZATION_DEFAULT,
        "original": {
            "shape": list(shape0),
            "spacing": voxel_sizes(affine0).tolist(),
            "affine": affine0.tolist(),
            "orientation": "".join(nib.aff2axcodes(affine0)),
        },
        "reoriented": {
            "shape": list(orientations.apply_orientation(np.empty(shape0, bool), ornt).shape),
            "spacing": spacing_r.tolist(),
            "affine": affine_r.tolist(),
            "orientation": "".join(nib.aff2axcodes(affine_r)),
            "ornt": ornt.tolist(),
        },
        "crop_box": box,
        "shape_after_crop": list(shape_c),
        "zscore": {"mean": mean, "std": std},
        "resampling": {
            "target_spacing": list(target),
            "order": settings.order,
            "mask_order": settings.mask_order,
            "anisotropy_threshold": settings.anisotropy_threshold,
            "lowres_axis": lowres_axis(spacing_r, settings.anisotropy_threshold),
            "lowres_axis_order": settings.anisotropic_axis_order,
        },
        "shape": list(shape_n),
        "spacing": voxel_sizes(affine_n).tolist(),
        "affine": affine_n.tolist(),
        "orientation": "".join(nib.aff2axcodes(affine_n)),
        "anatomy_bbox": _box_of(anat),
        "anatomy_fraction": float(anat.mean()),
        "anonymized_fraction": float(anon.mean()),
        "store": {"codec": settings.store.codec, "clevel": settings.store.clevel,
                  "chunks": list(chunks), "blocks": list(blocks)},
    }
    # nnssl's property names (its dataset class unpickles them next to each .b2nd)
    nnssl_properties = {
        "spacing": spacing_r.tolist(),
        "shape_before_cropping": list(properties["reoriented"]["shape"]),
        "bbox_used_for_cropping": box,
        "shape_after_cropping_and_before_resampling": list(shape_c),
        "means": [mean],
        "stds": [std],
        "nibabel_stuff": {"original_affine": affine0.tolist(), "reoriented_affine": affine_r.tolist()},
    }
    return PreprocessedImage(data[None], anon[None], anat[None], properties, nnssl_properties)


def to_original_grid(
    array: np.ndarray,
    properties: dict,
    order: int = 3,
    undo_zscore: bool = False,
    fill: float = 0.0,
) -> np.ndarray:
    """Map a stored array (or anything on its grid) back onto the source image's voxel grid.

    Inverts resampling (same edge-aligned grid convention), cropping (outside the crop box gets
    `fill`) and reorientation. With `undo_zscore` the values are mapped back to the source
    intensity scale. Masks: pass order=0 (or 1 and threshold the result).
    """
    arr = np.asarray(array)
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    if list(arr.shape) != list(properties["shape"]):
        raise ValueError(f"array shape {arr.shape} differs from the stored shape {properties['shape']}")
    arr = arr.astype(np.float32)
    shape_c = [int(s) for s in properties["shape_after_crop"]]
    arr = zoom_to_shape(arr, shape_c, [order] * 3).astype(np.float32)
    if undo_zscore:
        arr = arr * float(properties["zscore"]["std"]) + float(properties["zscore"]["mean"])
    full = np.full(properties["reoriented"]["shape"], fill, dtype=np.float32)
    full[tuple(slice(lo, hi) for lo, hi in properties["crop_box"])] = arr
    # `ornt` took the source axes to RAS; its inverse takes RAS back to the source axes
    restored = orientations.apply_orientation(full, _inverse_ornt(np.asarray(properties["reoriented"]["ornt"])))
    if list(restored.shape) != list(properties["original"]["shape"]):
        raise RuntimeError(f"inverse reorientation gave {restored.shape}, expected {properties['original']['shape']}")
    return restored


def _inverse_ornt(ornt: np.ndarray) -> np.ndarray:
    """Inverse of a nibabel orientation transform (axis permutation with flips)."""
    inverse = np.zeros_like(ornt)
    for source_axis, (target_axis, flip) in enumerate(ornt):
        inverse[int(target_axis)] = [source_axis, flip]
    return inverse

