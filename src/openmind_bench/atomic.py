"""Write-then-rename helpers: a killed job never leaves a file that looks complete, and a renamed file
is on disk (its data and the folder entry fsynced): after a node crash a path holds the old file or
the new one, never an empty one."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


def _tmp_name(path: Path) -> Path:
    # Same directory so os.replace stays a rename on one file system.
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def temporaries_of(path: str | os.PathLike) -> list[Path]:
    """Temporary names `atomic_path` uses for `path` (any PID) that exist now."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    return sorted(path.parent.glob(f".{glob_escape(path.name)}.tmp-*"))


def glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def remove_temporaries(paths) -> list[Path]:
    """Delete what a killed writer of `paths` left behind (their `.name.tmp-PID` files).

    Only for outputs with a single writer (one Snakemake job owns them): a temporary of its
    own outputs found before the job writes is a leftover of an earlier, killed run, whatever
    its PID (on a cluster the PID may belong to another node). Returns the removed paths.
    """
    removed = []
    for path in paths:
        for tmp in temporaries_of(path):
            if tmp.name.endswith(f".tmp-{os.getpid()}"):
                continue  # this process is writing it
            try:
                if tmp.is_dir() and not tmp.is_symlink():
                    shutil.rmtree(tmp)
                else:
                    tmp.unlink()
                removed.append(tmp)
            except FileNotFoundError:
                pass
    return removed


def replace_directory(new: Path, path: Path, attempts: int = 10) -> None:
    """Put the directory `new` in place of `path` (a directory, or nothing yet).

    The old tree is renamed aside, the new one renamed in, then the old one deleted: a reader finds
    the whole old tree or the whole new one (or, for a moment, none), never a half-deleted one. A
    second writer swapping the same path at the same time (`openmind-bench benchmark-table` beside a
    workflow run) makes the rename in fail with ENOTEMPTY: its tree is moved aside on the next try.
    """
    aside = path.with_name(f".{path.name}.old-{os.getpid()}")
    for _ in range(attempts):
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            pass
        try:
            os.replace(new, path)
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                if aside.exists():
                    os.rename(aside, path)  # put the old tree back rather than lose it
                raise
        else:
            shutil.rmtree(aside, ignore_errors=True)
            return
        shutil.rmtree(aside, ignore_errors=True)  # the tree that was there; the other writer's lands next
    raise OSError(errno.EBUSY, f"{path} kept being replaced by another writer; gave up after {attempts} tries")


def fsync_path(path: Path) -> None:
    """Flush `path` (a file, or every file of a tree) to disk."""
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.is_symlink()) if path.is_dir() else [path]
    for file in files:
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_directory(path: Path) -> None:
    """Flush a folder's entries (a rename in it) to disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a folder
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it onto `path` only on success.

    A directory written there replaces the whole tree at `path` (`replace_directory`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        yield tmp
        # The data reach the disk before the rename does: else a crash can leave `path` renamed but empty.
        if tmp.exists() and not tmp.is_symlink():
            fsync_path(tmp)
        if tmp.is_dir() and not tmp.is_symlink():
            replace_directory(tmp, path)
        else:
            os.replace(tmp, path)
        fsync_directory(path.parent)
    finally:
        if tmp.exists():
            if tmp.is_dir():
                shutil.rmtree(tmp)
            else:
                tmp.unlink()


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj, indent: int = 2) -> None:
    write_text(path, json.dumps(obj, indent=indent, sort_keys=False, default=str) + "\n")


def write_parquet(path: str | os.PathLike, frame) -> None:
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False)


def write_tsv(path: str | os.PathLike, frame) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, sep="\t", index=False)


def copy_file(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def temp_dir_beside(path: str | os.PathLike) -> str:
    """A scratch directory on the same file system as `path` (for tools that write many files)."""
    parent = Path(path).parent
    parent.mkdir(parents=True, exist_ok=True)
    return tempfile.mkdtemp(dir=parent, prefix=".scratch-")
