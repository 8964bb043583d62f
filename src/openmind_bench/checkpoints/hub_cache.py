"""A folder placed into a Hugging Face hub cache, in the hub's own layout, so `hf://` sources read it
offline (`HF_HUB_OFFLINE=1`, or the entry's `offline`) with `huggingface_hub` itself: the demo serves
an exported run this way, and a site without internet can serve the published models the same way.

The layout (`huggingface_hub`'s cache, "models" repos): `models--{org}--{repo}/blobs/{digest}` holds
each file's content, `snapshots/{commit}/{path}` is a relative symlink to its blob, and
`refs/{branch}` holds the commit hash (no newline). The commit here is a digest of the snapshot's
file list and contents, so placing the same folder twice gives the same commit.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

from openmind_bench import atomic
from openmind_bench.digests import file_digest

log = logging.getLogger(__name__)


def repo_folder(cache_dir: str | Path, repo_id: str) -> Path:
    return Path(cache_dir) / f"models--{repo_id.replace('/', '--')}"


def snapshot_commit(digests: dict[str, str]) -> str:
    """A 40-hex commit id of a snapshot's files (path -> sha256), the form the hub's commits take."""
    listing = "".join(f"{path}\0{digest}\n" for path, digest in sorted(digests.items()))
    return hashlib.sha1(listing.encode()).hexdigest()


def place_in_cache(folder: str | Path, cache_dir: str | Path, repo_id: str, branch: str = "main") -> str:
    """Put every file below `folder` into `cache_dir` as one commit of model repo `repo_id`, pointed
    to by `branch`; returns the commit. Blobs and links are written beside their final names and
    renamed in (`atomic`); `refs/{branch}` last, so a reader sees the old commit or the whole new one."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    if not files:
        raise ValueError(f"{folder} holds no files to place in the hub cache")
    digests = {p.relative_to(folder).as_posix(): file_digest(p) for p in files}
    commit = snapshot_commit(digests)
    repo = repo_folder(cache_dir, repo_id)
    for path, digest in digests.items():
        blob = repo / "blobs" / digest  # content-addressed: an existing blob holds these bytes already
        if not blob.exists():
            atomic.copy_file(folder / path, blob)
        link = repo / "snapshots" / commit / path
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(os.path.relpath(blob, link.parent))
    atomic.write_text(repo / "refs" / branch, commit)  # the hash without a newline, as the hub writes it
    log.info("placed %d files of %s into the hub cache %s as %s@%s (%s)", len(files), folder, cache_dir,
             repo_id, branch, commit)
    return commit


def publish_run(run_dir: str | Path, cache_dir: str | Path, repo_id: str, branch: str = "main") -> str:
    """Export a pre-training run in the published layout (`export.export_checkpoint`) and place it in
    the hub cache as `repo_id`@`branch`; returns the commit."""
    import tempfile

    from openmind_bench.checkpoints.export import export_checkpoint

    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".export-") as tmp:
        folder = export_checkpoint(run_dir, Path(tmp) / "repo")
        return place_in_cache(folder, cache_dir, repo_id, branch)


__all__ = ["place_in_cache", "publish_run", "repo_folder", "snapshot_commit"]
