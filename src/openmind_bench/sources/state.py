"""What a fetch has already verified, kept beside the raw tree so a re-run skips finished files.

The manifest is the rule's output, and Snakemake deletes a job's outputs before it runs the job
again, so it cannot carry resume information. This small JSON file (`.fetch_state.json`, hidden,
never listed in the manifest) does: for every file the fetcher finished, the size, the remote
identity (ETag, version id) and the MD5 it verified, with the local size and mtime at that moment.
A file whose size and mtime are unchanged since is trusted without re-reading it; anything else
is checked again. The file is rewritten atomically every few seconds and at the end, so a killed
run loses at most the last few seconds of bookkeeping, never a file.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

from openmind_bench import atomic

STATE_FILE = ".fetch_state.json"
SAVE_EVERY_S = 5.0


class FetchState:
    def __init__(self, dest: Path, source: str):
        self.path = Path(dest) / STATE_FILE
        self.source = source
        self.files: dict[str, dict] = {}
        self._lock = threading.Lock()
        self._last_save = time.monotonic()
        try:
            raw = json.loads(self.path.read_text())
            if raw.get("source") == source and isinstance(raw.get("files"), dict):
                self.files = raw["files"]
        except (OSError, ValueError, AttributeError):
            pass  # no state (first run) or a torn file: everything is checked again

    def trusted(self, rel: str, target: Path, **identity) -> dict | None:
        """The record of `rel` if the local file is unchanged since it was verified and the
        remote identity (size, etag, version_id, ...) is the same; else None."""
        with self._lock:
            record = self.files.get(rel)
        if not record:
            return None
        try:
            st = target.lstat()
        except OSError:
            return None
        if not target.is_file() or target.is_symlink():
            return None
        if st.st_size != record.get("size") or st.st_mtime_ns != record.get("mtime_ns"):
            return None
        if any(record.get(k) != v for k, v in identity.items()):
            return None
        return record

    def record(self, rel: str, target: Path, **fields) -> None:
        st = target.stat()
        with self._lock:
            self.files[rel] = {**fields, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
            due = time.monotonic() - self._last_save > SAVE_EVERY_S
        if due:
            self.save()

    def save(self) -> None:
        with self._lock:
            snapshot = {"source": self.source, "files": dict(self.files)}
            self._last_save = time.monotonic()
        atomic.write_json(self.path, snapshot, indent=None)


def remove_stale_temporaries(dest: Path) -> int:
    """Delete temporary files a killed run left behind (`.name.tmp-PID[.xxxx]`)."""
    removed = 0
    if not dest.is_dir():
        return 0
    for dirpath, _, filenames in os.walk(dest):
        for name in filenames:
            if name.startswith(".") and ".tmp-" in name:
                try:
                    os.unlink(os.path.join(dirpath, name))
                    removed += 1
                except OSError:
                    pass
    return removed
