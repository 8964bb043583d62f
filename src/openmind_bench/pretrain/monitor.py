"""Evaluation while pre-training runs (`pretrain.probe_every`): the main rank's probes of the
current encoder on the training cases of a downstream classification set (the downstream stage's
`linear_probe` / `knn`, `openmind_bench.downstream.probes`), under every process-wide generator
kept as it was, and for reconstruction methods an image of one fixed validation patch, its masked
input and the reconstruction; at the end `probe_curve.png`. See docs/methods.md, "Probes"."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from openmind_bench import atomic
from openmind_bench.downstream.probes import extract, out_of_fold
from openmind_bench.names import parse_probe_column, probe_column

log = logging.getLogger(__name__)

PROBE_CURVE = "probe_curve.png"
RECONSTRUCTION = "reconstruction.png"


@contextlib.contextmanager
def preserved_random_state():
    """Every process-wide generator (python, numpy, torch CPU and CUDA) as it was on entry, on exit."""
    import torch

    from openmind_bench.engine.step import global_rng_state, set_global_rng_state

    state = global_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        set_global_rng_state(state)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


class TrainingProbe:
    """The probes of a pre-training run (its main rank): `due(epochs_done)`, then `(method, epochs_done,
    val_patch)` -> ({progress column: value}, reconstruction panels or None). `config`:
    `training_probe_config`'s dict; `val_patch`: () -> (batch, seeds) of one fixed validation patch,
    or None (no reconstruction panels)."""

    def __init__(self, config: dict, build_network, patch_size: Sequence[int], device, out_dir: str | Path):
        self.config = config
        self.build_network = build_network  # () -> a fresh backbone of the run's architecture
        self.patch_size = [int(p) for p in patch_size]  # the network's input (a Primus' position grid)
        self.device = device
        self.out_dir = Path(out_dir)
        self._network = None

    def due(self, epochs_done: int) -> bool:
        return epochs_done % self.config["every"] == 0

    def __call__(self, method, epochs_done: int, val_patch=None) -> tuple[dict, np.ndarray | None]:
        started = time.time()
        row: dict = {}
        panels = None
        with preserved_random_state():
            for dataset in self.config["datasets"]:
                try:
                    if self._network is None:
                        self._network = self.build_network().to(self.device)
                    self._network.load_state_dict(method.backbone.state_dict())
                    row.update(self._score(dataset))
                except Exception as e:  # noqa: BLE001 - a failed probe must not end the pre-training
                    log.warning("epoch %d: probe of %s skipped: %s: %s", epochs_done, dataset["name"],
                                type(e).__name__, e, exc_info=log.isEnabledFor(logging.DEBUG))
            if val_patch is not None and hasattr(method, "reconstruct"):
                try:
                    patch = val_patch()
                    panels = None if patch is None else reconstruction_panels(method, *patch, self.device)
                except Exception as e:  # noqa: BLE001 - a picture must not end the pre-training either
                    log.warning("epoch %d: reconstruction image skipped: %s: %s", epochs_done, type(e).__name__, e)
        row["probe_seconds"] = round(time.time() - started, 3)
        if panels is not None:
            write_image(panels, self.out_dir / RECONSTRUCTION)
        return row, panels

    def _cases(self, dataset: dict) -> tuple[list, object]:
        from openmind_bench.downstream import splits
        from openmind_bench.downstream.readers import read_dataset
        from openmind_bench.registry import load_registry

        spec = load_registry(self.config["registry"], self.config["root"]).get(dataset["name"])
        by_id = {c.case_id: c for c in read_dataset(spec, verify_files=False).cases}
        train_ids = splits.partition(splits.read_split(dataset["split"]), "test")[0]  # never the test cases
        missing = [c for c in train_ids if c not in by_id]
        if missing:
            raise ValueError(f"split {dataset['split']} names cases dataset {spec.name} does not have: {missing[:3]}")
        return [by_id[c] for c in train_ids], spec

    def _score(self, dataset: dict) -> dict:
        from openmind_bench.metrics.classification import classification_metrics

        cases, spec = self._cases(dataset)
        features = extract(self._network, cases, self.patch_size, self.config["spacing"], self.device)
        labels = np.array([int(c.target) for c in cases])
        row = {}
        for probe in self.config["probes"]:
            probabilities = out_of_fold(probe, features, labels, len(spec.labels), self.config["settings"],
                                        self.config["seed"], where=f"probe dataset {spec.name}")
            scores = classification_metrics(labels, probabilities, n_classes=len(spec.labels))
            for metric in ("balanced_accuracy", "AUROC"):
                value = scores.get(metric)
                row[probe_column(spec.name, probe, metric)] = math.nan if value is None else float(value)
        return row


def reconstruction_panels(method, batch: dict, seeds, device) -> np.ndarray | None:
    """(3 * H, 3 * W) grey image: rows input, masked input and reconstruction of the patch, columns its
    three mid slices; None for a method that does not reconstruct. Runs in eval mode without
    gradients (the caller keeps the random state)."""
    import torch

    from openmind_bench.pretrain.trainer import make_view  # here: the trainer imports this module

    if not hasattr(method, "reconstruct"):
        return None
    was_training = method.training
    method.eval()
    try:
        with torch.no_grad():
            view = make_view(method, batch, seeds, device)
            reconstruction = method.reconstruct(view)
    finally:
        method.train(was_training)
    target = view["target"][0, 0].float().cpu()
    shown = view["input"][0, 0].float().cpu()
    if torch.equal(shown, target) and "loss_weight" in view:  # masked inside the network (Primus tokens)
        weight = view["loss_weight"][0].float().cpu()
        shown = target * (weight.reshape(-1, *weight.shape[-3:])[0] == 0)
    volumes = [target, shown, reconstruction[0, 0].float().cpu()]
    low, high = float(target.min()), float(target.max())
    rows = []
    for volume in volumes:
        x, y, z = (s // 2 for s in volume.shape)
        slices = [volume[x], volume[:, y], volume[:, :, z]]
        height = max(s.shape[0] for s in slices)
        padded = [torch.nn.functional.pad(s, (0, 0, 0, height - s.shape[0])) for s in slices]
        rows.append(torch.cat(padded, dim=1))
    width = max(r.shape[1] for r in rows)
    image = torch.cat([torch.nn.functional.pad(r, (0, width - r.shape[1])) for r in rows], dim=0)
    return ((image - low) / max(high - low, 1e-8)).clamp(0, 1).numpy()


def write_image(panels: np.ndarray, path: Path) -> None:
    from matplotlib import image

    scale = max(1, 384 // panels.shape[1])  # small patches (the demo's 32^3) enlarged, pixels kept square
    panels = panels.repeat(scale, axis=0).repeat(scale, axis=1)
    with atomic.atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            image.imsave(f, panels, cmap="gray", vmin=0.0, vmax=1.0, format="png")


def write_probe_curve(history: list[dict], out_dir: str | Path) -> Path | None:
    """probe_curve.png of a finished pre-training run (None when no epoch was probed)."""
    from openmind_bench.aggregate import plots

    if not any(parse_probe_column(k) for row in history for k in row):
        return None
    path = Path(out_dir) / PROBE_CURVE
    with atomic.atomic_path(path) as tmp:
        plots.probe_curve(history, {}, tmp, title=Path(out_dir).name)
    return path

