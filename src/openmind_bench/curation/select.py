"""Named selections of pre-training images, written as nnssl `pretrain_data.json` files.

A selection filters the preprocessed images (every image a shard manifest lists) by dataset,
modality and image quality score (OpenMind's 1-5 scale, lower is better). Each selection gets:

- `pretrain_data.json`: the raw images (index paths, NIfTI) and their index masks, as nnssl's
  own preprocessing would take them;
- `pretrain_data__preprocessed.json`: its preprocessed twin, the same collection pointing at our
  `.b2nd` files (nnssl names its twin `pretrain_data__{configuration}.json`);
- `images.tsv`: one row per selected image, for people and plots;
- with `out_dropped` / `out_summary` / `out_plot`: every image a step left out with the step and
  why (`dropped.tsv`), and what the selection holds (`summary.json`, `summary.png`; curation.report).

Steps, in order, each recorded in `dropped.tsv` under its name: `dataset`, `modality`, `quality`
(the filters), `test_subject` (downstream test subjects by OpenNeuro id), `fingerprint` (images
without a fingerprint, recorded in rejected.tsv by the curation stage), `leakage` (copies of
downstream test cases by content, results/curation/leakage.tsv), `duplicate` (`dedup: true`: one image
per near-duplicate cluster of results/curation/duplicates.parquet, the best quality score, then the
finest original voxels, then the first image id), `budget`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from openmind_bench import atomic, config
from openmind_bench.curation.budget import image_costs, solve_budget, test_subject_mask, weights
from openmind_bench.curation.pretrain_data import build_collection
from openmind_bench.curation.split import split_images
from openmind_bench.preprocess.shard import read_manifests
from openmind_bench.spreadsheet import neutralise_frame

log = logging.getLogger(__name__)

INDEX_COLUMNS = ["image_id", "path", "derived_from", "age", "sex", "handedness", "health_status", "diagnosis",
                 "manufacturer", "model", "field_strength", "repetition_time", "echo_time", "inversion_time",
                 "phase_encoding_direction", "dataset_doi", "dataset_version", "anat_mask", "anon_mask",
                 "quality_score", "voxel_x", "voxel_y", "voxel_z"]
DROPPED_COLUMNS = ["image_id", "dataset", "subject", "session", "modality", "step", "reason"]
STEPS = ("dataset", "modality", "quality", "test_subject", "fingerprint", "leakage", "duplicate", "budget")


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
    dedup: bool = _DEFAULTS["dedup"]

    @classmethod
    def from_config(cls, cfg: dict) -> "Selection":
        if "name" not in cfg:
            raise ValueError(f"selection {cfg!r} has no name")
        unknown = set(cfg) - {"name", "modalities", "datasets", "max_quality_score", "keep_unscored", "validation",
                            "budget", "dedup"}
        if unknown:
            raise ValueError(f"selection {cfg['name']!r}: unknown key(s) {sorted(unknown)}")
        mqs = cfg.get("max_quality_score")
        return cls(name=str(cfg["name"]), modalities=tuple(cfg.get("modalities") or ()),
                   datasets=tuple(cfg.get("datasets") or ()),
                   max_quality_score=None if mqs is None else float(mqs),
                   keep_unscored=bool(cfg.get("keep_unscored", True)), budget=cfg.get("budget") or None,
                   dedup=bool(cfg.get("dedup", _DEFAULTS["dedup"])))

    def apply(self, images: pd.DataFrame, excluded_subjects: set[tuple[str, str]] = frozenset(),
              leakage: pd.DataFrame | None = None, duplicates: pd.DataFrame | None = None,
              unfingerprinted: pd.DataFrame | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
        """(chosen images, dropped images with the step and reason), the steps in STEPS order."""
        dropped: list[pd.DataFrame] = []

        def drop(frame: pd.DataFrame, out, step: str, reason) -> pd.DataFrame:
            out = (out.reindex(frame.index, fill_value=False) if isinstance(out, pd.Series)
                   else pd.Series(np.asarray(out), index=frame.index)).astype(bool)
            if out.any():
                gone = frame.loc[out, ["image_id", "dataset", "subject", "session", "modality"]].copy()
                gone["step"] = step
                gone["reason"] = reason[out].to_numpy() if isinstance(reason, pd.Series) else reason
                dropped.append(gone)
            return frame[~out]

        chosen = images
        if self.datasets:
            chosen = drop(chosen, ~chosen.dataset.isin(self.datasets), "dataset", "dataset not in the selection")
        if self.modalities:
            chosen = drop(chosen, ~chosen.modality.isin(self.modalities), "modality",
                          "modality " + chosen.modality.astype(str) + " not in the selection")
        if self.max_quality_score is not None:
            score = pd.to_numeric(chosen.quality_score, errors="coerce")
            bad = (score > self.max_quality_score) | (score.isna() & ~self.keep_unscored)
            chosen = drop(chosen, bad, "quality", ("quality score " + score.astype(str)
                                                   + f" above {self.max_quality_score}").where(score.notna(),
                                                                                               "no quality score"))
        if excluded_subjects:
            chosen = drop(chosen, pd.Series(test_subject_mask(chosen, excluded_subjects), index=chosen.index),
                          "test_subject", "subject of a downstream test set (registry `openneuro`)")
        if unfingerprinted is not None and len(unfingerprinted):
            why = unfingerprinted.drop_duplicates("image").set_index("image").reason
            chosen = drop(chosen, chosen.image_id.isin(why.index), "fingerprint",
                          "not checked for leakage or duplicates: " + chosen.image_id.map(why).fillna(""))
        if leakage is not None and len(leakage):
            first = (leakage.assign(distance=pd.to_numeric(leakage.distance)).sort_values("distance", kind="stable")
                     .drop_duplicates("image_id").set_index("image_id"))
            detail = ("copy of downstream test case " + first.downstream_dataset + "/" + first.case
                      + " (distance " + pd.to_numeric(first.distance).map("{:.3f}".format) + ")")
            chosen = drop(chosen, chosen.image_id.isin(first.index), "leakage", chosen.image_id.map(detail))
        if self.dedup and duplicates is not None and len(duplicates):
            chosen = drop(chosen, *_duplicates_to_drop(chosen, duplicates))
        if self.budget:
            b = self.budget
            picked = solve_budget(chosen, image_costs(chosen, b["unit"]),
                                  weights(chosen.quality_score, b["unscored_weight"]), b["limit"],
                                  b.get("max_per_dataset"), b.get("max_per_modality"), balance=b.get("balance"),
                                  what=f"selection {self.name!r}")
            chosen = drop(chosen, ~chosen.index.isin(picked.index), "budget", f"left out by the {b['unit']} budget")
        frame = pd.concat(dropped, ignore_index=True) if dropped else pd.DataFrame(columns=DROPPED_COLUMNS)
        return chosen, frame[DROPPED_COLUMNS]


def _duplicates_to_drop(chosen: pd.DataFrame, duplicates: pd.DataFrame) -> tuple[pd.Series, str, pd.Series]:
    """Within each near-duplicate cluster, the selection's images other than the one kept: the best
    (lowest) quality score, then the finest original voxels, then the first image id."""
    cluster = chosen.image_id.map(duplicates.set_index("image_id").cluster)
    members = chosen[cluster.notna()].assign(_cluster=cluster[cluster.notna()])
    if members.empty:
        return pd.Series(False, index=chosen.index), "duplicate", pd.Series("", index=chosen.index)
    voxel = 1.0
    for c in ("voxel_x", "voxel_y", "voxel_z"):
        voxel = voxel * pd.to_numeric(members[c], errors="coerce") if c in members else voxel
    members = members.assign(_score=pd.to_numeric(members.quality_score, errors="coerce").fillna(np.inf),
                             _voxel=pd.Series(voxel, index=members.index).fillna(np.inf))
    ranked = members.sort_values(["_cluster", "_score", "_voxel", "image_id"], kind="stable")
    kept = ranked.drop_duplicates("_cluster").set_index("_cluster").image_id
    out = members.image_id != members._cluster.map(kept)
    reason = ("near-duplicate of " + members._cluster.map(kept) + " (cluster "
              + members._cluster.astype(int).astype(str) + ", kept for its quality score / resolution)")
    return out.reindex(chosen.index, fill_value=False), "duplicate", reason.reindex(chosen.index, fill_value="")


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
    leakage: str | Path | None = None,
    duplicates: str | Path | None = None,
    fingerprint_rejections: Sequence[str | Path] = (),
    out_dropped: str | Path | None = None,
    out_summary: str | Path | None = None,
    out_plot: str | Path | None = None,
) -> pd.DataFrame:
    """Write one selection's raw pretrain_data.json, its preprocessed twin and images.tsv.

    With `out_train`/`out_val`, also the preprocessed twin split into training and held-out
    validation subjects (`validation` settings of the selection, see curation.split).
    `excluded_subjects`: (OpenNeuro dataset, subject or "*") pairs never selected, the downstream test
    subjects (`registry.downstream_test_subjects` of the registry; the workflow passes them as a param,
    so a registry edit re-makes the selection). `leakage`: results/curation/leakage.tsv, whose images
    are never selected; `duplicates`: results/curation/duplicates.parquet, needed by `dedup: true`;
    `fingerprint_rejections`: the fingerprint jobs' rejection parts, whose images (no fingerprint, so
    neither checked for leakage nor for duplicates) are never selected.
    """
    from openmind_bench.curation.content import read_leakage

    selection = Selection.from_config(selection_cfg)
    if selection.dedup and duplicates is None:
        raise ValueError(f"selection {selection.name!r} has dedup: true but no duplicates table was given")
    images = load_images(index_tables, manifests, quality_tables)
    excluded = {(str(d), str(sub)) for d, sub in excluded_subjects}
    clusters = pd.read_parquet(duplicates) if duplicates is not None else None
    from openmind_bench.qc import read_parts

    chosen, dropped = selection.apply(images, excluded, read_leakage(leakage), clusters,
                                      read_parts(fingerprint_rejections))
    chosen = chosen.sort_values(["dataset", "subject", "session", "image_id"], kind="stable")
    if chosen.empty:
        steps = ", ".join(f"{k}: {v}" for k, v in dropped.step.value_counts().items()) or "nothing dropped"
        raise ValueError(
            f"selection {selection.name!r} is empty: none of the {len(images)} preprocessed images is left "
            f"(dropped by step: {steps}; datasets {list(selection.datasets) or 'all'}, modalities "
            f"{list(selection.modalities) or 'all'}, max_quality_score {selection.max_quality_score}, "
            f"dedup {selection.dedup})"
        )
    for step, n in dropped.step.value_counts().items():
        log.info("selection %s: %d image(s) dropped by %s", selection.name, n, step)
    raw = build_collection(chosen, collection_index, selection.name, "path", "anon_mask", "anat_mask")
    twin = build_collection(chosen, collection_index, selection.name, "image", "anon", "anat")
    atomic.write_json(out_raw, raw)
    atomic.write_json(out_preprocessed, twin)
    atomic.write_tsv(out_table, neutralise_frame(chosen))  # for people: spreadsheet-safe text
    if out_train is not None and out_val is not None:
        train, val = split_images(chosen, selection_cfg.get("validation"))
        atomic.write_json(out_train, build_collection(train, collection_index, selection.name, "image", "anon", "anat"))
        atomic.write_json(out_val, build_collection(val, collection_index, selection.name, "image", "anon", "anat"))
    if out_dropped is not None:
        atomic.write_tsv(out_dropped, neutralise_frame(dropped))
    if out_summary is not None or out_plot is not None:
        from openmind_bench.curation.report import selection_summary, summary_plot

        summary = selection_summary(selection.name, chosen, dropped, len(images))
        if out_summary is not None:
            atomic.write_json(out_summary, summary)
        if out_plot is not None:
            summary_plot(summary, out_plot)
    log.info("selection %s: %d of %d preprocessed images (%s)", selection.name, len(chosen), len(images),
             ", ".join(f"{m}: {n}" for m, n in chosen.modality.value_counts().sort_index().items()))
    return chosen
