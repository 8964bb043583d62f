"""A fine-tuning run's identity and results: the metrics document of a classification run (its
centre patch, softmax probabilities, balanced accuracy and AUROC) and the files every run writes
(`metrics.json` + `metrics.csv`; segmentation runs are scored in `downstream.nnunet.run` on nnU-Net's
predictions)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from openmind_bench.downstream import volumes
from openmind_bench.metrics import RunIdentity, classification_document, write_metrics
from openmind_bench.names import METRICS_FILE

log = logging.getLogger(__name__)


def identity(dataset: str, name, fold, external_checkpoint: dict | None = None) -> RunIdentity:
    """Who made the predictions. An external checkpoint's run is labelled with the checkpoint's name and
    the architecture of its scratch baseline (its plan's class when no preset matches), and carries its
    provenance (settings.external_checkpoint) into metrics.json."""
    architecture = name.architecture
    if name.external:
        arch = external_checkpoint["architecture"]
        architecture = arch.get("scratch_architecture") or arch.get("preset") or arch["class"]
    return RunIdentity(dataset=dataset, method=name.method, architecture=architecture,
                       fold=int(fold) if str(fold).isdigit() else str(fold), run=str(name),
                       schedule=name.schedule if name.pretrained else None, selection=name.selection,
                       epochs=name.epochs, low_data_n=name.low_data_n, external_checkpoint=external_checkpoint,
                       seed=name.seed)


@torch.inference_mode()
def classify(net: torch.nn.Module, spec, cases: list, run: RunIdentity, patch_size: Sequence[int],
             spacing: Sequence[float] | None, device: torch.device) -> dict:
    """The metrics document of `cases` (see metrics.report): each case's centre patch (the reference
    protocol's 160^3 centre crop), softmax over the classes."""
    net.eval()
    probabilities, labels, ids = [], [], []
    for case in cases:
        volume = volumes.load_case(case, spacing)
        image = volumes.centre_crop(volume.image, patch_size)[None].float().to(device)
        probabilities.append(torch.softmax(net(image).float(), dim=1)[0].cpu().numpy())
        labels.append(int(case.target))
        ids.append(case.case_id)
    return classification_document(run, ids, labels, np.stack(probabilities), spec.class_names)


def write(doc: dict, out_dir: str | Path) -> None:
    out_dir = Path(out_dir)
    write_metrics(doc, out_dir / METRICS_FILE, out_dir / "metrics.csv")
