"""`local` source: a directory that holds datasets in OpenNeuro layout (`ROOT/dsNNNNNN/...`).

Used by the embedded demo and by sites that keep their own OpenNeuro mirror. Files are copied
(or hard-linked, `source.link: hardlink`) into the raw tree; files already present with the same
size and MD5 are left alone, so a re-run only copies what changed.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from tqdm import tqdm

from openmind_bench import atomic
from openmind_bench.qc import Rejections
from openmind_bench.download_manifest import FileRecord, Manifest
from openmind_bench.sources.base import (
    SourceError,
    inside,
    md5_of,
    selected,
)
from openmind_bench.sources.state import remove_stale_temporaries

log = logging.getLogger(__name__)


def _walk(root: Path):
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith("."):
                yield Path(dirpath) / name


def fetch(dataset: str, snapshot: str, dest: Path, options: dict, rejections: Rejections) -> Manifest:
    root = Path(options["root"]) / dataset
    if not root.is_dir():
        raise SourceError(f"{dataset}: not found in local source {root}")
    manifest = Manifest(dataset=dataset, source="local", snapshot=snapshot)
    stale = remove_stale_temporaries(dest)  # a killed copy's `.name.tmp-PID` files
    if stale:
        log.info("%s: removed %d temporary file(s) left by a killed run", dataset, stale)
    files = [p for p in _walk(root)]
    wanted = []
    for path in files:
        rel = path.relative_to(root).as_posix()
        if not selected(rel, options["include"], options["exclude"]):
            continue
        # git-annex mirrors are symlink farms; a link may point into .git/annex but never out.
        if path.is_symlink() and not inside(path, root):
            manifest.refused.append({"path": rel, "reason": "symlink points outside the dataset"})
            rejections.add(f"{dataset}/{rel}", "refused: symlink points outside the dataset", dataset)
            continue
        wanted.append((path, rel))
    link = options.get("link", "copy")
    for path, rel in tqdm(wanted, desc=f"{dataset} files", unit="file", disable=None):
        target = dest / rel
        try:
            size, md5 = path.stat().st_size, md5_of(path)
            if not (target.is_file() and target.stat().st_size == size and md5_of(target) == md5):
                if link == "hardlink":
                    with atomic.atomic_path(target) as tmp:
                        os.link(path, tmp)
                else:
                    atomic.copy_file(path, target)
            manifest.files.append(FileRecord(path=rel, size=size, md5=md5))
        except OSError as e:
            manifest.failed.append({"path": rel, "reason": f"{type(e).__name__}: {e}"})
            rejections.add(f"{dataset}/{rel}", f"fetch failed: {e}", dataset)
    log.info(
        "%s: %d files (%d bytes), %d failed, %d refused",
        dataset, len(manifest.files), sum(f.size for f in manifest.files),
        len(manifest.failed), len(manifest.refused),
    )
    return manifest
