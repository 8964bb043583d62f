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
