"""The stored images a pretrain_data collection points at.

`load_pretrain_images` reads our selections (the preprocessed twin; given the raw
`pretrain_data.json` it switches to the twin beside it). `read_nnssl_preprocessed` reads a
folder written by nnssl's own preprocessing. Both return `StoredImage` records, which is all the
patch sampler needs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from openmind_bench.curation.pretrain_data import PREPROCESSED_TWIN, iter_images, read_collection, resolve_path

log = logging.getLogger(__name__)

STORE_SUFFIX = ".b2nd"


@dataclass(frozen=True)
class StoredImage:
    """One preprocessed image: its arrays (masks may be absent) and where it comes from."""

    image_id: str
    image: Path
    anon: Path | None
    anat: Path | None
    properties: Path | None
    dataset: str = ""
    subject: str = ""
    session: str = ""
    modality: str = ""


def stem_of(path: Path) -> Path:
    """`x/name.b2nd` -> `x/name` (also strips NIfTI endings, which nnssl's twins sometimes keep)."""
    name = path.name
    for ending in (".b2nd", ".nii.gz", ".nii", ".nrrd", ".mha"):
        if name.endswith(ending):
            return path.with_name(name[: -len(ending)])
    return path


def sibling(stem: Path, suffix: str) -> Path | None:
    path = stem.with_name(stem.name + suffix)
    return path if path.is_file() else None


def _check_exist(images: Sequence[StoredImage], source: Path) -> None:
    missing = [str(im.image) for im in images if not im.image.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{source}: {len(missing)} of {len(images)} image file(s) do not exist, e.g. {missing[:3]} "
            "(relative paths are taken under `root`, default the working directory). A store file the "
            f"workflow wrote is re-made on its own by naming it: `snakemake {missing[0]}`; `snakemake all` "
            "re-makes every deleted one (rule preprocess_image) without re-running finished jobs"
        )


def load_pretrain_images(pretrain_data_json: str | Path, root: str | Path | None = None) -> list[StoredImage]:
    """The .b2nd images of one of our selections (pretrain_data.json or its preprocessed twin)."""
    path = Path(pretrain_data_json)
    collection = read_collection(path)
    rows = list(iter_images(collection))
    if not rows:
        raise ValueError(f"{path}: the collection lists no images")
    if not str(rows[0]["image_path"]).endswith(STORE_SUFFIX):
        twin = path.with_name(PREPROCESSED_TWIN)
        if not twin.is_file():
            raise ValueError(f"{path} points at raw images ({rows[0]['image_path']}) and has no preprocessed "
                             f"twin {twin.name} beside it; run the preprocessing and selection first")
        log.info("%s lists raw images; reading its preprocessed twin %s", path, twin)
        return load_pretrain_images(twin, root)
    images = []
    for row in rows:
        image = resolve_path(row["image_path"], root)
        if not str(image).endswith(STORE_SUFFIX):
            raise ValueError(f"{path}: image {row['name']} points at {image}, not a .b2nd file")
        stem = stem_of(image)
        images.append(StoredImage(
            image_id=str(row["image_info"].get("image_id", row["name"])),
            image=image,
            anon=resolve_path(row["anonymization_mask"], root),
            anat=resolve_path(row["anatomy_mask"], root),
            properties=sibling(stem, ".json") or sibling(stem, ".pkl"),
            dataset=row["dataset"], subject=row["subject"], session=row["session"],
            modality=str(row["modality"] or ""),
        ))
    _check_exist(images, path)
    return images


def read_nnssl_preprocessed(
    pretrain_json: str | Path,
    data_dir: str | Path | None = None,
    root: str | Path | None = None,
    undo_mask_swap: bool = False,
) -> list[StoredImage]:
    """Images preprocessed by nnssl: `pretrain_data__{configuration}.json` plus its data folder.

    With `data_dir` (nnssl's `{nnssl_preprocessed}/{Dataset}/{data_identifier}`) paths are
    derived as nnssl's dataset class derives them: `{collection_name}/{dataset}/{subject}/
    {session}/{name without extension}.b2nd`; without it the image paths in the JSON are used
    (`$nnssl_preprocessed/...` expanded from the environment). Masks are the `__anon.b2nd` /
    `__anat.b2nd` files beside the image, when present, as nnssl's `load_case` finds them.

    nnssl's preprocessing swaps the two masks of images that have both (the anonymisation mask
    lands in `__anat.b2nd`); `undo_mask_swap=True` reads such images' masks the right way round.
    Images with one mask are not affected. Properties come from the `.pkl` beside each image.
    """
    path = Path(pretrain_json)
    collection = read_collection(path)
    images = []
    swapped = 0
    for row in iter_images(collection):
        if data_dir is not None:
            stem = stem_of(Path(data_dir) / row["collection_name"] / row["dataset"] / row["subject"]
                           / row["session"] / row["name"])
        else:
            stem = stem_of(resolve_path(row["image_path"], root))
        anon, anat = sibling(stem, "__anon.b2nd"), sibling(stem, "__anat.b2nd")
        if row["anatomy_mask"] and row["anonymization_mask"] and anon and anat:
            swapped += 1
            if undo_mask_swap:
                anon, anat = anat, anon
        images.append(StoredImage(
            image_id=f"{row['collection_name']}__{row['dataset']}__{row['subject']}__{row['session']}__{row['name']}",
            image=stem.with_name(stem.name + STORE_SUFFIX), anon=anon, anat=anat,
            properties=sibling(stem, ".pkl") or sibling(stem, ".json"),
            dataset=row["dataset"], subject=row["subject"], session=row["session"],
            modality=str(row["modality"] or ""),
        ))
    if not images:
        raise ValueError(f"{path}: the collection lists no images")
    if swapped and not undo_mask_swap:
        log.warning("%s: %d image(s) have both masks; nnssl's preprocessing stores those swapped "
                    "(__anat holds the anonymisation mask). Pass undo_mask_swap=True to read them straight.",
                    path, swapped)
    _check_exist(images, path)
    return images
