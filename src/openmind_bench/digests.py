"""Digests of files, read in chunks (checkpoints of a GB, downloads): the one place the package hashes
a file's bytes."""

from __future__ import annotations

import hashlib
import os

CHUNK = 1 << 20


def file_digest(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    """Hex digest of the file's bytes (`algorithm`: a hashlib name, e.g. sha256, md5)."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        while block := handle.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()
