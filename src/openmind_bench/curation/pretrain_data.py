"""nnssl's `pretrain_data.json`: write one from a table of images, read any back as flat rows.

Schema (nnssl `Collection.to_dict()`, documented in nnssl's README):

    {"collection_index": int, "collection_name": str,
     "datasets": {dataset_index: {"dataset_index", "name", "dataset_info",
       "subjects": {subject_id: {"subject_id", "subject_info",
         "sessions": {session_id: {"session_id", "session_info",
           "images": [{"name", "modality", "image_path", "image_info",
                       "associated_masks": {"anatomy_mask", "anonymization_mask"}}]}}}}}}}

Subject and session ids are BIDS folder names (`sub-01`, `ses-01`; `ses-DEFAULT` without
sessions, as nnssl's OpenMind conversion writes). An image's `name` is our image id, so nnssl's
preprocessing of the raw file names its outputs exactly as ours are named. Paths may start
with `$VARIABLE/` (nnssl's portable form), be absolute, or be relative to a root directory.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Iterator

import pandas as pd

from openmind_bench.store.files import session_folder, subject_folder

# the preprocessed twin of a selection's pretrain_data.json (nnssl: pretrain_data__{configuration}.json)
PREPROCESSED_TWIN = "pretrain_data__preprocessed.json"
SUBJECT_INFO = {"sex": "sex", "handedness": "handedness", "health_status": "health_status", "diagnosis": "diagnosis"}
# index column -> nnssl image_info key (the keys nnssl's OpenMind conversion uses, where one exists)
IMAGE_INFO = {
    "image_id": "image_id", "derived_from": "derived_from", "quality_score": "image_quality_score",
    "manufacturer": "manufacturer", "model": "model_name", "field_strength": "magnetic_field_strength",
    "repetition_time": "repetition_time", "echo_time": "echo_time", "inversion_time": "inversion_time",
    "phase_encoding_direction": "phase_encoding_direction", "shape": "shape", "spacing": "spacing",
    "properties": "properties", "anatomy_mask_source": "anatomy_mask_source",
    "anonymization_mask_source": "anonymization_mask_source",
}


def _present(value) -> bool:
    if value is None or value is pd.NA:
        return False
    if isinstance(value, float) and math.isnan(value):
        return False
    return not (isinstance(value, str) and value == "")


def _plain(value):
    """JSON-friendly scalar (numpy and pandas scalars to Python)."""
    return value.item() if hasattr(value, "item") else value


def build_collection(
    images: pd.DataFrame,
    collection_index: int,
    collection_name: str,
    image_column: str,
    anon_column: str | None,
    anat_column: str | None,
) -> dict:
    """A pretrain_data dict over `images` (one row per image, columns of the index and manifest).

    `image_column`, `anon_column` and `anat_column` name the columns holding the paths to write
    (raw NIfTI for the raw collection, the .b2nd files for the preprocessed twin); an empty
    mask path is written as null, nnssl's "no such mask".
    """
    datasets: dict = {}
    for row in images.sort_values(["dataset", "subject", "session", "image_id"], kind="stable").to_dict("records"):
        ds = datasets.setdefault(row["dataset"], {
            "dataset_index": row["dataset"], "name": row["dataset"],
            "dataset_info": {k: row[c] for k, c in (("doi", "dataset_doi"), ("version", "dataset_version"))
                             if c in row and _present(row[c])},
            "subjects": {},
        })
        sub_id = subject_folder(str(row["subject"]))
        subject = ds["subjects"].setdefault(sub_id, {
            "subject_id": sub_id,
            "subject_info": {k: _plain(row[c]) for k, c in SUBJECT_INFO.items() if c in row and _present(row[c])},
            "sessions": {},
        })
        ses_id = session_folder(str(row.get("session") or ""))
        session = subject["sessions"].setdefault(ses_id, {
            "session_id": ses_id,
            "session_info": {"age": _plain(row["age"])} if "age" in row and _present(row["age"]) else {},
            "images": [],
        })
        masks = {}
        for key, column in (("anatomy_mask", anat_column), ("anonymization_mask", anon_column)):
            value = row.get(column) if column else None
            masks[key] = str(value) if _present(value) else None
        session["images"].append({
            "name": row["image_id"],
            "modality": row["modality"],
            "image_path": str(row[image_column]),
            "image_info": {key: _plain(row[c]) for c, key in IMAGE_INFO.items() if c in row and _present(row[c])},
            "associated_masks": masks,
        })
    for ds in datasets.values():  # nnssl keeps the subject's age; ours is per session, the first one here
        for subject in ds["subjects"].values():
            ages = [s["session_info"]["age"] for s in subject["sessions"].values() if "age" in s["session_info"]]
            if ages:
                subject["subject_info"]["age"] = ages[0]
    return {"collection_index": int(collection_index), "collection_name": collection_name, "datasets": datasets}


def resolve_path(path: str | None, root: str | Path | None = None) -> Path | None:
    """A collection path on this machine: `$VAR/...` expanded from the environment (nnssl's
    portable paths), relative paths taken under `root` (default: the working directory)."""
    if not path:
        return None
    head = path.split("/", 1)[0]
    if head.startswith("$"):
        name = head[1:]
        if name not in os.environ:
            raise KeyError(f"path {path!r} needs the environment variable {name}, which is not set")
        return Path(os.environ[name].rstrip("/") + path[len(head):])
    p = Path(path)
    return p if p.is_absolute() or root is None else Path(root) / p


def iter_images(collection: dict) -> Iterator[dict]:
    """Every image of a pretrain_data dict as a flat row (paths as written, unresolved)."""
    for key in ("collection_name", "datasets"):
        if key not in collection:
            raise ValueError(f"not a pretrain_data collection: no {key!r} key")
    for ds_key, ds in collection["datasets"].items():
        for sub_key, subject in (ds.get("subjects") or {}).items():
            for ses_key, session in (subject.get("sessions") or {}).items():
                for image in session.get("images") or []:
                    masks = image.get("associated_masks") or {}
                    info = image.get("image_info") or {}
                    yield {
                        "collection_name": collection["collection_name"],
                        "dataset": str(ds.get("dataset_index", ds_key)),
                        "subject": str(subject.get("subject_id", sub_key)),
                        "session": str(session.get("session_id", ses_key)),
                        "name": str(image["name"]),
                        "modality": image.get("modality"),
                        "image_path": image.get("image_path"),
                        "anatomy_mask": masks.get("anatomy_mask"),
                        "anonymization_mask": masks.get("anonymization_mask"),
                        "image_info": info,
                    }


def read_collection(path: str | Path) -> dict:
    path = Path(path)
    try:
        collection = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such pretrain_data file") from None
    except ValueError as e:
        raise ValueError(f"{path}: malformed JSON: {e}") from e
    if not isinstance(collection, dict) or "datasets" not in collection:
        raise ValueError(f"{path}: not an nnssl pretrain_data collection (no 'datasets' key)")
    return collection
