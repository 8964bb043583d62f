"""Run logs of the main process: `progress.csv` (one row per epoch, rewritten atomically, so it always
matches the checkpoint a run resumes from) and TensorBoard scalars under `tensorboard/`. Columns
beyond `COLUMNS` (the probes' `probe/{dataset}/{probe}/{metric}` and `probe_seconds`, in epochs that
have them) follow in the order they first appear, and go to TensorBoard under their own names."""

from __future__ import annotations

import io
import csv
import math
from pathlib import Path

from openmind_bench import atomic

COLUMNS = ["epoch", "train_loss", "val_loss", "lr", "epoch_seconds", "samples_per_second"]


class RunLogger:
    def __init__(self, out_dir: str | Path, *, enabled: bool, history: list[dict], global_step: int):
        self.out_dir = Path(out_dir)
        self.enabled = enabled
        self.history = list(history)
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events a killed run wrote after the checkpoint it resumes from
            self.writer = SummaryWriter(str(self.out_dir / "tensorboard"), purge_step=global_step)
            self._write_csv()

    def step(self, global_step: int, loss: float) -> None:
        if self.writer is not None:
            self.writer.add_scalar("train/step_loss", loss, global_step)

    def epoch(self, row: dict) -> None:
        self.history.append(row)
        if not self.enabled:
            return
        for key in ("train_loss", "val_loss", "lr", "samples_per_second"):
            value = row.get(key)
            if value is not None and not math.isnan(value):
                self.writer.add_scalar(f"epoch/{key}", value, row["epoch"])
        for key, value in row.items():
            if key not in COLUMNS and isinstance(value, (int, float)) and not math.isnan(value):
                self.writer.add_scalar(key, value, row["epoch"])
        self.writer.flush()
        self._write_csv()

    def image(self, tag: str, image, step: int) -> None:
        """A grey (H, W) image in [0, 1] to TensorBoard."""
        if self.writer is not None:
            self.writer.add_image(tag, image, step, dataformats="HW")
            self.writer.flush()

    def columns(self) -> list[str]:
        extra = [k for row in self.history for k in row if k not in COLUMNS]
        return COLUMNS + list(dict.fromkeys(extra))

    def _write_csv(self) -> None:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=self.columns(), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(self.history)
        atomic.write_text(self.out_dir / "progress.csv", buffer.getvalue())

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
