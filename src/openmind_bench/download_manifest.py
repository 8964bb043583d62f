"""The fetch stage's manifest (`download_manifest.json`): what every source kind writes beside the raw
BIDS tree and what the index (`bids.index`) reads. Its own module below both packages, so neither of
`sources` and `bids` imports the other (import-linter contract in pyproject.toml)."""

from __future__ import annotations

import datetime as _dt
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from openmind_bench import atomic

_DOI_VERSION = re.compile(r"openneuro\.(ds\d{6})\.v?([0-9][\w.\-]*)", re.IGNORECASE)


@dataclass
class FileRecord:
    path: str
    size: int
    md5: str | None = None
    etag: str | None = None
    version_id: str | None = None


@dataclass
class Manifest:
    dataset: str
    source: str
    snapshot: str
    files: list[FileRecord] = field(default_factory=list)
    failed: list[dict] = field(default_factory=list)  # {"path", "reason"}: kept trying, gave up
    refused: list[dict] = field(default_factory=list)  # {"path", "reason"}: never written
    snapshot_found: str | None = None
    dataset_doi: str | None = None
    snapshot_match: bool | None = None
    created: str = field(
        default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    )

    def write(self, path: str | Path) -> None:
        atomic.write_json(path, asdict(self))

    @classmethod
    def read(cls, path: str | Path) -> "Manifest":
        raw = json.loads(Path(path).read_text())
        raw["files"] = [FileRecord(**f) for f in raw.get("files", [])]
        return cls(**raw)

    def record_of(self, relpath: str) -> FileRecord | None:
        for f in self.files:
            if f.path == relpath:
                return f
        return None


def snapshot_from_description(description: dict) -> tuple[str | None, str | None]:
    """(version tag, DOI) from dataset_description.json; the tag comes from the DOI if present."""
    doi = description.get("DatasetDOI")
    if isinstance(doi, str):
        m = _DOI_VERSION.search(doi)
        if m:
            return m.group(2), doi
    version = description.get("DatasetVersion") or description.get("Version")
    return (str(version) if version else None), doi if isinstance(doi, str) else None
