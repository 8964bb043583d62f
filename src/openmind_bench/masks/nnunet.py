"""The nnU-Net backend: a trained anatomy/anonymisation segmenter run through nnU-Net v2's predictor.

OpenMind made its masks with an nnU-Net-based foreground/anonymisation segmenter (arXiv 2501.04361);
its weights are not downloadable here, so this backend runs whatever model folder the config
names (`masks.nnunet.model_folder`: a folder with dataset.json, plans.json and fold_*/checkpoint).
Labels are mapped by config: voxels of `anatomy_labels` form the anatomy mask, voxels of
`anonymized_labels` the anonymisation mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from openmind_bench.masks.classical import Masks, MaskError


@dataclass(frozen=True)
class NnunetSettings:
    model_folder: str
    folds: tuple
    checkpoint: str
    anatomy_labels: tuple
    anonymized_labels: tuple
    device: str

    @classmethod
    def from_config(cls, cfg: dict) -> "NnunetSettings":
        if not cfg.get("model_folder"):
            raise ValueError("config key 'masks.nnunet.model_folder' is empty: the nnU-Net backend needs a model folder")
        return cls(model_folder=str(cfg["model_folder"]), folds=tuple(cfg["folds"]), checkpoint=cfg["checkpoint"],
                   anatomy_labels=tuple(cfg["anatomy_labels"]), anonymized_labels=tuple(cfg["anonymized_labels"]),
                   device=cfg["device"])


class NnunetMasker:
    """Loads the model once per shard job; `__call__` segments one image."""

    def __init__(self, settings: NnunetSettings):
        import torch
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

        folder = Path(settings.model_folder)
        if not (folder / "plans.json").is_file() or not (folder / "dataset.json").is_file():
            raise ValueError(f"nnU-Net model folder {folder} lacks plans.json / dataset.json")
        self.settings = settings
        self.predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                         perform_everything_on_device=False, device=torch.device(settings.device),
                                         verbose=False, verbose_preprocessing=False, allow_tqdm=False)
        self.predictor.initialize_from_trained_model_folder(str(folder), use_folds=settings.folds,
                                                            checkpoint_name=settings.checkpoint)

    def __call__(self, data: np.ndarray, affine: np.ndarray) -> Masks:
        data = np.asarray(data, np.float32)
        if data.ndim != 3 or float(data.max()) <= float(data.min()):
            raise MaskError(f"constant or non-3D image (shape {data.shape}): no head to mask")
        spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
        # nnU-Net's arrays are (c, z, y, x) with spacing in that order
        image = data.transpose(2, 1, 0)[None]
        seg = self.predictor.predict_single_npy_array(image, {"spacing": [float(s) for s in spacing[::-1]]})
        seg = np.asarray(seg).transpose(2, 1, 0)
        anat = np.isin(seg, self.settings.anatomy_labels)
        anon = np.isin(seg, self.settings.anonymized_labels)
        return Masks(anat=anat & ~anon, anon=anon, kind="nnunet")
