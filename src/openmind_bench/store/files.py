"""The files of one preprocessed image and where they live.

Layout: `{root}/{dataset}/sub-{subject}/ses-{session}/{image_id}` + `.b2nd`, `__anon.b2nd`,
`__anat.b2nd`, `.json`, `.pkl`. Images without a session go to `ses-DEFAULT` (the session id
nnssl's OpenMind conversion uses). Below `{root}` this is nnssl's own
`{dataset_index}/{subject_id}/{session_id}/{name}` layout with `name` = image id, so nnssl's
dataset class finds the files when its collection folder points at `{root}`.
"""

from __future__ import annotations

import json
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from openmind_bench import atomic
from openmind_bench.store.b2nd import StoreSettings, write_array

DEFAULT_SESSION = "ses-DEFAULT"


@dataclass(frozen=True)
class ImageFiles:
    """Paths of one image's arrays and properties (`stem` has no extension)."""

    stem: Path

    @property
    def image(self) -> Path:
        return self.stem.with_name(self.stem.name + ".b2nd")

    @property
    def anon(self) -> Path:
        return self.stem.with_name(self.stem.name + "__anon.b2nd")

    @property
    def anat(self) -> Path:
        return self.stem.with_name(self.stem.name + "__anat.b2nd")

    @property
    def properties(self) -> Path:
        return self.stem.with_name(self.stem.name + ".json")

    @property
    def nnssl_properties(self) -> Path:
        return self.stem.with_name(self.stem.name + ".pkl")

    def all(self) -> tuple[Path, ...]:
        """Every file written for the image."""
        return (self.image, self.anon, self.anat, self.properties, self.nnssl_properties)

    def complete(self) -> bool:
        return all(p.is_file() for p in (self.image, self.anon, self.anat, self.properties))


def subject_folder(subject: str) -> str:
    return subject if subject.startswith("sub-") else f"sub-{subject}"


def session_folder(session: str) -> str:
    if not session:
        return DEFAULT_SESSION
    return session if session.startswith("ses-") else f"ses-{session}"


def image_files(root: str | os.PathLike, dataset: str, subject: str, session: str, image_id: str) -> ImageFiles:
    return ImageFiles(Path(root) / dataset / subject_folder(subject) / session_folder(session) / image_id)


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    return value


def write_image(
    files: ImageFiles,
    image: np.ndarray,
    anon: np.ndarray,
    anat: np.ndarray,
    properties: dict,
    nnssl_properties: dict,
    settings: StoreSettings,
) -> None:
    """Write one image's arrays and properties; the JSON goes last, so its presence marks a
    complete image (each file is itself written atomically)."""
    for name, arr, dtype in (("image", image, np.float32), ("anon", anon, np.uint8), ("anat", anat, np.uint8)):
        if arr.ndim != 4 or arr.shape[0] != 1:
            raise ValueError(f"{files.stem}: {name} array must have shape (1, X, Y, Z), got {arr.shape}")
        if arr.shape != image.shape:
            raise ValueError(f"{files.stem}: {name} shape {arr.shape} differs from the image's {image.shape}")
        if arr.dtype != dtype:
            raise ValueError(f"{files.stem}: {name} array must be {np.dtype(dtype).name}, got {arr.dtype}")
    write_array(files.image, image, settings)
    write_array(files.anon, anon, settings)
    write_array(files.anat, anat, settings)
    with atomic.atomic_path(files.nnssl_properties) as tmp:
        with open(tmp, "wb") as fh:
            pickle.dump(_jsonable(nnssl_properties), fh, protocol=4)
    atomic.write_json(files.properties, _jsonable(properties))


def read_properties(path: str | os.PathLike) -> dict:
    """Properties of a stored image: `path` is the `.json` or `.pkl` file itself, or the image's
    `.b2nd` path or stem, for which our `.json` is preferred over nnssl's `.pkl`.

    Pickles run code when loaded: only read `.pkl` files from a source you trust (your own or
    nnssl's preprocessing).
    """
    path = Path(path)
    if path.suffix in (".json", ".pkl"):
        candidates = [path]
    else:
        stem = path.with_name(path.name[: -len(".b2nd")]) if path.name.endswith(".b2nd") else path
        candidates = [stem.with_name(stem.name + ".json"), stem.with_name(stem.name + ".pkl")]
    for candidate in candidates:
        if not candidate.is_file():
            continue
        if candidate.suffix == ".json":
            try:
                return json.loads(candidate.read_text())
            except ValueError as e:
                raise ValueError(f"{candidate}: malformed properties JSON: {e}") from e
        with open(candidate, "rb") as fh:
            return pickle.load(fh)
    raise FileNotFoundError(f"no properties file: {', '.join(str(c) for c in candidates)}")
