"""Where the raw BIDS trees come from.

Every source kind implements one function, `fetch(dataset, snapshot, dest, options, rejections)`
returning a `Manifest`; `fetch_dataset` below picks the kind from config, so the rules never
know which source they run on. Kinds: `local` (a directory in OpenNeuro layout; the demo uses it),
`openneuro` (the public S3 bucket: anonymous, versioned, resumable, fault tolerant) and
`openmind_release` (the OpenMind release from Hugging Face on disk, masks and quality scores included).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from openmind_bench.qc import Rejections
from openmind_bench.sources import local, openmind_release, openneuro
from openmind_bench.download_manifest import Manifest
from openmind_bench.sources.base import check_snapshot, keep_out_of_bids
from openmind_bench.sources.state import STATE_FILE

FETCHERS: dict[str, Callable[..., Manifest]] = {
    "local": local.fetch,
    "openneuro": openneuro.fetch,
    "openmind_release": openmind_release.fetch,
}


def fetch_dataset(
    source: dict,
    dataset: str,
    snapshot: str,
    dest: str | Path,
    manifest_path: str | Path,
    rejections: Rejections,
) -> Manifest:
    kind = source["kind"]
    if kind not in FETCHERS:
        raise ValueError(f"source kind {kind!r} is not available; known: {sorted(FETCHERS)}")
    manifest = FETCHERS[kind](dataset, snapshot, Path(dest), source, rejections)
    check_snapshot(manifest, Path(dest), on_mismatch=source.get("on_snapshot_mismatch", "warn"))
    # the bookkeeping files inside the tree stay out of the BIDS view (validator runs stay clean)
    ours = [STATE_FILE]
    if Path(manifest_path).resolve().parent == Path(dest).resolve():
        ours.insert(0, Path(manifest_path).name)
    keep_out_of_bids(Path(dest), ours)
    manifest.write(manifest_path)
    return manifest
