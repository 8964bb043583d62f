"""The rejection record: one broken scan is written down and skipped, never a crashed run.

Each job writes its own part file (parallel jobs never share a file); the `qc_rejected` rule
concatenates the parts into `results/qc/rejected.tsv`.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from openmind_bench import atomic
from openmind_bench.spreadsheet import neutralise_frame

COLUMNS = ["image", "dataset", "stage", "reason", "time"]


@dataclass
class Rejections:
    stage: str
    rows: list[dict] = field(default_factory=list)

    def add(self, image: str, reason: str, dataset: str = "") -> None:
        self.rows.append(
            {
                "image": str(image),
                "dataset": dataset,
                "stage": self.stage,
                "reason": " ".join(str(reason).split()),  # one line per record
                "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            }
        )

    def __len__(self) -> int:
        return len(self.rows)

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows, columns=COLUMNS)

    def write(self, path: str | Path) -> None:
        atomic.write_tsv(path, neutralise_frame(self.frame()))


def read_parts(paths) -> pd.DataFrame:
    frames = [pd.read_csv(p, sep="\t", dtype=str, keep_default_na=False) for p in paths]
    frames = [f for f in frames if len(f)]
    if not frames:
        return pd.DataFrame(columns=COLUMNS)
    return pd.concat(frames, ignore_index=True)[COLUMNS]


def gather(parts, out: str | Path) -> pd.DataFrame:
    table = read_parts(parts).sort_values(["stage", "dataset", "image"], kind="stable")
    atomic.write_tsv(out, neutralise_frame(table))
    return table
