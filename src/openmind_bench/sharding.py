"""Stable image ids and their shards (docs/architecture.md, "Scale").

Shard k of dataset d holds the images whose id hashes to k modulo K_d. The hash is sha1 rather
than Python's hash() so it is the same in every process, platform and run.
"""

from __future__ import annotations

import hashlib
import re

_NIFTI = re.compile(r"\.nii(\.gz)?$")


def image_id(dataset: str, relpath: str) -> str:
    """`{dataset}__{file stem}`; a BIDS file name already carries sub/ses/acq/run/suffix.

    Files in derived trees (`derived_from` set) keep their own stems, which carry `desc-*`.
    """
    name = relpath.replace("\\", "/").rsplit("/", 1)[-1]
    return f"{dataset}__{_NIFTI.sub('', name)}"


def shard_of(image: str, n_shards: int) -> int:
    digest = hashlib.sha1(image.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % int(n_shards)


def read_shard(tables, dataset: str, shard: int, *, columns: list[str] | None = None,
               modality: str | None = None):
    """The rows of one (dataset, shard) of one or more image tables (the index's columns), read with a
    row filter so a shard job never loads the whole index; sorted by image id. An image id listed in
    two tables is an error naming them."""
    import pandas as pd
    import pyarrow.dataset as pads

    frames = []
    for table in tables:
        where = (pads.field("dataset") == dataset) & (pads.field("shard") == int(shard))
        if modality is not None:
            where = where & (pads.field("modality") == modality)
        frames.append(pads.dataset(str(table), format="parquet").to_table(columns=columns, filter=where).to_pandas())
    rows = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns or [])
    dup = rows.image_id[rows.image_id.duplicated()].tolist()
    if dup:
        raise ValueError(f"index tables {list(map(str, tables))} list image id(s) twice: {dup[:5]}")
    return rows.sort_values("image_id", kind="stable").reset_index(drop=True)


class NotRemade(Exception):
    """A per-image output of a shard job (store file, mask, DWI map) that cannot be re-made on its own;
    the message names the command that runs its shard again (`rerun_shard_hint`)."""


def rerun_shard_hint(table_path, rule: str) -> str:
    """The command that runs the shard job owning `table_path` (its manifest or table) again."""
    from pathlib import Path

    return f"snakemake {Path(table_path).as_posix()} --forcerun {rule}"


def source_row(rows, image_id: str, target: str, tables, hint: str):
    """The row of `image_id` among a shard's index `rows` (a DataFrame), as a named tuple; NotRemade
    naming `target` and `hint` when the index no longer holds it."""
    hit = rows[rows.image_id == image_id]
    if hit.empty:
        raise NotRemade(f"{target}: its source image {image_id} is no longer in {tables}; run the shard "
                        f"again: {hint}")
    return next(hit.itertuples(index=False))
