"""Write-then-rename helpers: a killed job never leaves a file that looks complete."""

from __future__ import annotations

import contextlib
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


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it onto `path` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
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
