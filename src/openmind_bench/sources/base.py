"""The pieces every source kind shares: file selection, path safety, checksums, `.bidsignore`, the snapshot
check (the manifest itself lives in `openmind_bench.download_manifest`, which the index reads too)."""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import re
from pathlib import Path

from openmind_bench import atomic
from openmind_bench.digests import file_digest
from openmind_bench.download_manifest import Manifest, snapshot_from_description

log = logging.getLogger(__name__)

REQUIRED_FILES = ("dataset_description.json",)


class SourceError(RuntimeError):
    """The dataset cannot be fetched as a whole (not one bad file: those are recorded)."""


def selected(relpath: str, include: list[str], exclude: list[str]) -> bool:
    """Glob selection on the dataset-relative POSIX path; `*` also crosses `/`."""
    if not any(fnmatch.fnmatchcase(relpath, p) for p in include):
        return False
    return not any(fnmatch.fnmatchcase(relpath, p) for p in exclude)


def unsafe_reason(relpath: str) -> str | None:
    """Why a source-provided path must not be written below the target folder, or None."""
    if not relpath or relpath.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", relpath):
        return "absolute path"
    if "\\" in relpath or "\x00" in relpath:
        return "backslash or NUL in path"
    # split by hand: PurePosixPath would silently drop '.' and empty segments
    if any(p in ("..", ".", "") for p in relpath.split("/")):
        return "path escapes the dataset folder ('..', '.' or an empty segment)"
    return None


def inside(path: Path, root: Path) -> bool:
    """True if `path`, with every symlink resolved, lies below `root`."""
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def md5_of(path: str | os.PathLike) -> str:
    return file_digest(path, "md5")


BIDSIGNORE = ".bidsignore"
_BIDSIGNORE_HEADER = "# openmind-bench: fetch bookkeeping, not part of the dataset"


def keep_out_of_bids(dest: Path, names: list[str]) -> bool:
    """List the fetch's own files (manifest, resume state) in the dataset's `.bidsignore`.

    They sit inside the dataset folder (the manifest is the rule's output there), so without
    this the official BIDS validator reports them as files that are not BIDS. A `.bidsignore`
    the dataset ships keeps its lines; ours are appended once. Returns True if the file changed.
    """
    path = Path(dest) / BIDSIGNORE
    try:
        text = path.read_text()
    except FileNotFoundError:
        text = ""
    present = {line.strip() for line in text.splitlines()}
    missing = [f"/{n}" for n in names if f"/{n}" not in present and n not in present]
    if not missing:
        return False
    if text and not text.endswith("\n"):
        text += "\n"
    if _BIDSIGNORE_HEADER not in present:
        text += _BIDSIGNORE_HEADER + "\n"
    atomic.write_text(path, text + "".join(f"{m}\n" for m in missing))
    return True


def previous_manifest(path: Path) -> Manifest | None:
    try:
        return Manifest.read(path)
    except (OSError, ValueError, TypeError):
        return None


def check_snapshot(manifest: Manifest, dest: Path, on_mismatch: str = "warn") -> None:
    """Compare the configured snapshot with the one the dataset declares; fail if asked to."""
    missing = [f for f in REQUIRED_FILES if not (dest / f).is_file()]
    if missing:
        raise SourceError(f"{manifest.dataset}: required file(s) {missing} missing in {dest}")
    try:
        description = json.loads((dest / "dataset_description.json").read_text())
    except ValueError as e:
        raise SourceError(f"{dest / 'dataset_description.json'}: not valid JSON ({e})") from e
    found, doi = snapshot_from_description(description)
    manifest.snapshot_found, manifest.dataset_doi = found, doi
    manifest.snapshot_match = found == manifest.snapshot if found else None
    if manifest.snapshot_match is False:
        msg = (
            f"{manifest.dataset}: snapshot mismatch: config asks for {manifest.snapshot!r}, "
            f"dataset_description.json declares {found!r} (DatasetDOI {doi!r})"
        )
        if on_mismatch == "fail":
            raise SourceError(msg)
        log.warning(msg)
    elif manifest.snapshot_match is None:
        log.warning("%s: dataset_description.json declares no version; snapshot unchecked", manifest.dataset)
