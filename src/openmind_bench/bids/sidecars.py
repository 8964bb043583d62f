"""JSON sidecars with the BIDS inheritance principle, and DWI companion files.

A metadata file applies to a data file when it sits in the same folder or a parent folder and
its entities are a subset of the data file's, with the same suffix; the file nearer the data
file wins key by key (BIDS specification, "The Inheritance Principle").
"""

from __future__ import annotations

import json
from pathlib import Path

from openmind_bench.bids_names import BidsName, parse_name


class SidecarIndex:
    """All sidecar-like files of one dataset (by relative path), resolved on demand."""

    def __init__(self, root: Path, relpaths: list[str]):
        self.root = root
        self.by_dir: dict[str, list[tuple[str, BidsName | None, str]]] = {}
        for rel in relpaths:
            name = rel.rsplit("/", 1)[-1]
            parent = rel.rsplit("/", 1)[0] if "/" in rel else ""
            if name.endswith((".json", ".bval", ".bvec")):
                parsed = parse_name(name)
                # top-level `T1w.json` or `dwi.bval` have no entities: the grammar needs a
                # key-value part, so parse them as bare suffix files.
                if parsed is None and "_" not in name and "-" not in name:
                    stem, _, ext = name.partition(".")
                    parsed = BidsName(entities={}, suffix=stem, extension="." + ext)
                self.by_dir.setdefault(parent, []).append((rel, parsed, name))
        self._json_cache: dict[str, dict] = {}

    def _applicable(self, relpath: str, target: BidsName, extension: str) -> list[str]:
        """Applicable files from the top level down to the data file's folder."""
        parts = relpath.split("/")[:-1]
        dirs = [""] + ["/".join(parts[: i + 1]) for i in range(len(parts))]
        found = []
        for d in dirs:
            for rel, parsed, _ in self.by_dir.get(d, []):
                if parsed is None or parsed.extension != extension or parsed.suffix != target.suffix:
                    continue
                if all(target.entities.get(k) == v for k, v in parsed.entities.items()):
                    found.append((d.count("/") + (d != ""), len(parsed.entities), rel))
        found.sort()
        return [rel for _, _, rel in found]

    def read_json(self, rel: str) -> dict:
        if rel not in self._json_cache:
            value = json.loads((self.root / rel).read_text())
            if not isinstance(value, dict):
                raise ValueError("sidecar is not a JSON object")
            self._json_cache[rel] = value
        return self._json_cache[rel]

    def metadata(self, relpath: str, target: BidsName) -> tuple[dict, list[tuple[str, str]]]:
        """Merged sidecar metadata and a list of (sidecar, problem) for malformed ones."""
        merged: dict = {}
        problems = []
        for rel in self._applicable(relpath, target, ".json"):
            try:
                merged.update(self.read_json(rel))
            except (OSError, ValueError) as e:
                problems.append((rel, f"malformed sidecar: {e}"))
        return merged, problems

    def companion(self, relpath: str, target: BidsName, extension: str) -> str | None:
        """The nearest .bval/.bvec that applies to a DWI file (inheritance allowed)."""
        found = self._applicable(relpath, target, extension)
        return found[-1] if found else None
