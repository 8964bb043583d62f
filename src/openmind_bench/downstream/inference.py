"""Evaluation of a fine-tuned network on held-out cases.

Segmentation: MONAI's `sliding_window_inference` over the case at the run's spacing with Gaussian
weighting (nnU-Net's), softmax, the probabilities resampled to the file's own grid, argmax; the
prediction is written as NIfTI on the reference's grid and scored with `metrics.evaluate_case_files`
(DSC and NSD per class, the dataset's NSD tolerance, physical spacing from the header).
Classification: the centre patch, softmax probabilities, balanced accuracy and AUROC.
"""

from __future__ import annotations

import gzip
import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from openmind_bench import atomic
from openmind_bench.names import METRICS_FILE
from openmind_bench.metrics import (
    RunIdentity,
    classification_document,
    evaluate_case_files,
    segmentation_document,
    write_metrics,
)
from openmind_bench.downstream import volumes

log = logging.getLogger(__name__)


def identity(dataset: str, name, fold) -> RunIdentity:
    return RunIdentity(dataset=dataset, method=name.method, architecture=name.architecture,
                       fold=int(fold) if str(fold).isdigit() else str(fold), run=str(name),
                       schedule=name.schedule if name.pretrained else None, selection=name.selection,
                       epochs=name.epochs)


@torch.no_grad()
def segment(net: torch.nn.Module, volume: volumes.Volume, patch_size: Sequence[int], device: torch.device,
            overlap: float = 0.5) -> np.ndarray:
    """Label map of one case on its native grid."""
    from monai.inferers import sliding_window_inference

    image = torch.as_tensor(volume.image)[None].to(device)
    logits = sliding_window_inference(image, roi_size=tuple(int(p) for p in patch_size), sw_batch_size=2,
                                      predictor=net, overlap=overlap, mode="gaussian", padding_mode="constant")
    probabilities = torch.softmax(logits.float(), dim=1)[0].cpu()
    probabilities = volumes.resize(probabilities, volume.native_shape, "trilinear")
    return probabilities.argmax(dim=0).numpy().astype(np.uint8)


def _write_prediction(prediction: np.ndarray, reference: Path, path: Path) -> None:
    import nibabel as nib

    ref = nib.load(str(reference))
    img = nib.Nifti1Image(prediction, ref.affine)
    img.set_qform(ref.get_qform(), code=int(ref.header["qform_code"]))
    img.set_sform(ref.get_sform(), code=int(ref.header["sform_code"]))
    payload = img.to_bytes()  # the temporary name hides the extension from nibabel: encode here
    if path.name.endswith(".gz"):
        payload = gzip.compress(payload, compresslevel=1)
    with atomic.atomic_path(path) as tmp:
        tmp.write_bytes(payload)


def evaluate(net: torch.nn.Module, spec, cases: list, run: RunIdentity, patch_size: Sequence[int],
             spacing: Sequence[float] | None, device: torch.device, out_dir: Path, overlap: float = 0.5,
             save_predictions: bool = True) -> dict:
    """The metrics document of `cases` (see metrics.report)."""
    net.eval()
    if spec.task == "cls":
        probabilities, labels, ids = [], [], []
        with torch.no_grad():
            for case in cases:
                volume = volumes.load_case(case, spacing)
                image = volumes.centre_crop(volume.image, patch_size)[None].float().to(device)
                probabilities.append(torch.softmax(net(image).float(), dim=1)[0].cpu().numpy())
                labels.append(int(case.target))
                ids.append(case.case_id)
        return classification_document(run, ids, labels, np.stack(probabilities), spec.class_names)
    scored = {}
    predictions = Path(out_dir) / "predictions"
    for case in cases:
        volume = volumes.load_case(case, spacing)
        prediction = segment(net, volume, patch_size, device, overlap)
        path = predictions / f"{case.case_id}{spec.file_ending}"
        _write_prediction(prediction, case.label, path)
        scored[case.case_id] = evaluate_case_files(case.label, path, spec.labels, float(spec.nsd_tolerance_mm))
        if not save_predictions:
            path.unlink()
        log.info("%s: DSC %.3f NSD %.3f", case.case_id, scored[case.case_id]["DSC"], scored[case.case_id]["NSD"])
    return segmentation_document(run, scored, float(spec.nsd_tolerance_mm))


def write(doc: dict, out_dir: str | Path) -> None:
    out_dir = Path(out_dir)
    write_metrics(doc, out_dir / METRICS_FILE, out_dir / "metrics.csv")
