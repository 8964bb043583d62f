"""Named selections of pre-training images, written as nnssl `pretrain_data.json` files.

A selection filters the preprocessed images (every image a shard manifest lists) by dataset,
modality and image quality score (OpenMind's 1-5 scale, lower is better). Each selection gets:

- `pretrain_data.json`: the raw images (index paths, NIfTI) and their index masks, as nnssl's
  own preprocessing would take them;
- `pretrain_data__preprocessed.json`: its preprocessed twin, the same collection pointing at our
  `.b2nd` files (nnssl names its twin `pretrain_data__{configuration}.json`);
- `images.tsv`: one row per selected image, for people and plots.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import pandas as pd

from openmind_bench import atomic, config
from openmind_bench.curation.budget import drop_test_subjects, image_costs, solve_budget, weights
from openmind_bench.curation.pretrain_data import build_collection
from openmind_bench.curation.split import split_images
from openmind_bench.preprocess.shard import read_manifests
from openmind_bench.spreadsheet import neutralise_frame

log = logging.getLogger(__name__)

INDEX_COLUMNS = ["image_id", "path", "derived_from", "age", "sex", "handedness", "health_status", "diagnosis",
                 "manufacturer", "model", "field_strength", "repetition_time", "echo_time", "inversion_time",
                 "phase_encoding_direction", "dataset_doi", "dataset_version", "anat_mask", "anon_mask",
                 "quality_score"]


# The schema's defaults of a `selections` entry, read once.
_DEFAULTS = config.validate({"selections": [{"name": "x"}]}, config.SCHEMA_PATH)["selections"][0]


@dataclass(frozen=True)
class Selection:
    """One entry of the config list `selections`."""

    name: str
    modalities: tuple[str, ...] = tuple(_DEFAULTS["modalities"])
    datasets: tuple[str, ...] = tuple(_DEFAULTS["datasets"])
    max_quality_score: float | None = _DEFAULTS["max_quality_score"]
    keep_unscored: bool = _DEFAULTS["keep_unscored"]
    budget: dict | None = _DEFAULTS.get("budget")

    @classmethod
    def from_config(cls, cfg: dict) -> "Selection":
        if "name" not in cfg:
            raise ValueError(f"selection {cfg!r} has no name")
        unknown = set(cfg) - {"name", "modalities", "datasets", "max_quality_score", "keep_unscored", "validation",
                            "budget"}
        if unknown:
            raise ValueError(f"selection {cfg['name']!r}: unknown key(s) {sorted(unknown)}")
        mqs = cfg.get("max_quality_score")
        return cls(name=str(cfg["name"]), modalities=tuple(cfg.get("modalities") or ()),
                   datasets=tuple(cfg.get("datasets") or ()),
                   max_quality_score=None if mqs is None else float(mqs),
                   keep_unscored=bool(cfg.get("keep_unscored", True)), budget=cfg.get("budget") or None)

    def apply(self, images: pd.DataFrame) -> pd.DataFrame:
        keep = pd.Series(True, index=images.index)
        if self.datasets:
            keep &= images.dataset.isin(self.datasets)
        if self.modalities:
            keep &= images.modality.isin(self.modalities)
        if self.max_quality_score is not None:
            score = pd.to_numeric(images.quality_score, errors="coerce")
            keep &= (score <= self.max_quality_score) | (score.isna() & self.keep_unscored)
        chosen = images[keep]
        if self.budget:
            b = self.budget
            chosen = solve_budget(chosen, image_costs(chosen, b["unit"]), weights(chosen.quality_score, b["unscored_weight"]),
                                  b["limit"], b.get("max_per_dataset"), b.get("max_per_modality"))
        return chosen


def load_images(index_tables: Sequence[str | Path], manifests: Sequence[str | Path],
                quality_tables: Sequence[str | Path] = ()) -> pd.DataFrame:
    """Every preprocessed image (the manifests) with its index fields; quality tables
    (columns image_id, quality_score) override the index's scores."""
    written = read_manifests(manifests)
    index = pd.concat([pd.read_parquet(t, columns=INDEX_COLUMNS) for t in index_tables], ignore_index=True)
    index = index.drop_duplicates("image_id", keep="last")
    images = written.merge(index, on="image_id", how="left", validate="one_to_one")
    missing = images.path.isna()
    if missing.any():
        raise ValueError(f"preprocessed image(s) not in the index tables: {images.image_id[missing].tolist()[:5]}")
    for table in quality_tables:
        scores = pd.read_parquet(table) if str(table).endswith(".parquet") else pd.read_csv(table, sep="\t")
        if not {"image_id", "quality_score"} <= set(scores.columns):
            raise ValueError(f"quality table {table} needs columns image_id and quality_score")
        override = scores.set_index("image_id").quality_score
        hit = images.image_id.isin(override.index)
        images.loc[hit, "quality_score"] = images.loc[hit, "image_id"].map(override)
    return images


def run_selection(
    selection_cfg: dict,
    collection_index: int,
    index_tables: Sequence[str | Path],
    manifests: Sequence[str | Path],
    out_raw: str | Path,
    out_preprocessed: str | Path,
    out_table: str | Path,
    quality_tables: Sequence[str | Path] = (),
    out_train: str | Path | None = None,
    out_val: str | Path | None = None,
    excluded_subjects: Iterable[Sequence[str]] = (),
) -> pd.DataFrame:
    """Write one selection's raw pretrain_data.json, its preprocessed twin and images.tsv.

    With `out_train`/`out_val`, also the preprocessed twin split into training and held-out
    validation subjects (`validation` settings of the selection, see curation.split).
    `excluded_subjects`: (OpenNeuro dataset, subject or "*") pairs never selected, the downstream test
    subjects (`registry.downstream_test_subjects` of the registry; the workflow passes them as a param,
    so a registry edit re-makes the selection).
    """
    selection = Selection.from_config(selection_cfg)
    images = load_images(index_tables, manifests, quality_tables)
    excluded = {(str(d), str(sub)) for d, sub in excluded_subjects}
    before = len(images)
    images = drop_test_subjects(images, excluded)
    if len(images) < before:
        log.info("selection %s: %d image(s) of downstream test subjects left out (no leakage)", selection.name,
                 before - len(images))
    chosen = selection.apply(images).sort_values(["dataset", "subject", "session", "image_id"], kind="stable")
    if chosen.empty:
        raise ValueError(
            f"selection {selection.name!r} matches none of the {len(images)} preprocessed images "
            f"(datasets {list(selection.datasets) or 'all'}, modalities {list(selection.modalities) or 'all'}, "
            f"max_quality_score {selection.max_quality_score})"
        )
    raw = build_collection(chosen, collection_index, selection.name, "path", "anon_mask", "anat_mask")
    twin = build_collection(chosen, collection_index, selection.name, "image", "anon", "anat")
    atomic.write_json(out_raw, raw)
    atomic.write_json(out_preprocessed, twin)
    atomic.write_tsv(out_table, neutralise_frame(chosen))  # for people: spreadsheet-safe text
    if out_train is not None and out_val is not None:
        train, val = split_images(chosen, selection_cfg.get("validation"))
        atomic.write_json(out_train, build_collection(train, collection_index, selection.name, "image", "anon", "anat"))
        atomic.write_json(out_val, build_collection(val, collection_index, selection.name, "image", "anon", "anat"))
    log.info("selection %s: %d of %d preprocessed images (%s)", selection.name, len(chosen), len(images),
             ", ".join(f"{m}: {n}" for m, n in chosen.modality.value_counts().sort_index().items()))
    return chosen
