"""Logging set-up shared by the CLI and the Snakemake adapters."""

from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@contextlib.contextmanager
def log_to(path: str | Path | None, level: int = logging.INFO):
    """Send package logging (and warnings) to `path`, plus stderr; restore on exit."""
    root = logging.getLogger()
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(path, mode="w"))
    old_level = root.level
    for h in handlers:
        h.setFormatter(logging.Formatter(FORMAT))
        root.addHandler(h)
    root.setLevel(level)
    logging.captureWarnings(True)
    try:
        yield
    except Exception:
        logging.getLogger("openmind_bench").exception("stage failed")
        raise
    finally:
        for h in handlers:
            root.removeHandler(h)
            h.close()
        root.setLevel(old_level)
        logging.captureWarnings(False)
