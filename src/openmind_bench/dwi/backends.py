"""The two backends of the DWI stage behind one interface.

`dipy`: MP-PCA denoising, Gibbs removal by local subvoxel shifts, median-Otsu mask, weighted
least-squares tensor fit, all in Python. `mrtrix3`: the Debian MRtrix3 binaries (dwidenoise,
mrdegibbs, dwi2mask, dwi2tensor, tensor2metric) driven through `nipype.interfaces.mrtrix3`.
Motion correction (dipy registration) and N4 bias correction (SimpleITK) are shared; they live in
`openmind_bench.dwi.derive`. Every method takes and returns arrays on the scan's own voxel grid.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from openmind_bench.dwi.gradients import DwiRejected, Gradients, fsl_to_world

log = logging.getLogger(__name__)

BACKENDS = ("dipy", "mrtrix3")


@dataclass
class TensorMaps:
    fa: np.ndarray  # [0, 1]
    md: np.ndarray  # mean diffusivity (ADC) in mm^2/s when b is in s/mm^2
    v1: np.ndarray  # principal eigenvector in world (scanner RAS) coordinates, (X, Y, Z, 3)


def _clean(fa: np.ndarray, md: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    fa = np.clip(np.nan_to_num(fa, nan=0.0, posinf=0.0, neginf=0.0), 0.0, 1.0).astype(np.float32)
    md = np.clip(np.nan_to_num(md, nan=0.0, posinf=0.0, neginf=0.0), 0.0, None).astype(np.float32)
    return fa * mask, md * mask


class DipyBackend:
    name = "dipy"

    def __init__(self, settings):
        self.settings = settings

    def denoise(self, data, affine, grad):
        from dipy.denoise.localpca import mppca

        return mppca(data, patch_radius=self.settings.denoise_patch_radius).astype(np.float32)

    def degibbs(self, data, affine, grad):
        from dipy.denoise.gibbs import gibbs_removal

        return gibbs_removal(data.astype(np.float32), slice_axis=2, inplace=False, num_processes=1).astype(np.float32)

    def mask(self, data, affine, grad, mean_b0):
        from dipy.segment.mask import median_otsu

        _, mask = median_otsu(mean_b0, median_radius=self.settings.mask_median_radius,
                              numpass=self.settings.mask_numpass)
        return mask.astype(bool)

    def tensor(self, data, affine, grad, mask) -> TensorMaps:
        from dipy.core.gradients import gradient_table
        from dipy.reconst.dti import TensorModel

        gtab = gradient_table(grad.bvals, bvecs=grad.bvecs, b0_threshold=0.0)
        fit = TensorModel(gtab, fit_method="WLS").fit(data, mask=mask)
        fa, md = _clean(fit.fa, fit.md, mask)
        # dipy fits in the bvec (FSL) frame: bring the eigenvector into world coordinates
        v1 = fsl_to_world(np.nan_to_num(fit.evecs[..., :, 0]), affine) * mask[..., None]
        return TensorMaps(fa, md, v1.astype(np.float32))


class MrtrixBackend:
    """MRtrix3 commands through nipype; inputs and outputs pass as NIfTI files in a scratch folder."""

    name = "mrtrix3"

    def __init__(self, settings, scratch: str | Path | None = None):
        if shutil.which("dwi2tensor") is None:
            raise RuntimeError("backend 'mrtrix3' needs the MRtrix3 binaries on PATH (Debian package mrtrix3)")
        self.settings = settings
        self.scratch = Path(tempfile.mkdtemp(prefix="mrtrix-", dir=scratch))

    def close(self):
        shutil.rmtree(self.scratch, ignore_errors=True)

    def _fresh(self) -> Path:
        """A new folder per call: MRtrix3 will not overwrite, and a stale output must never be read."""
        self._cwd = Path(tempfile.mkdtemp(dir=self.scratch))
        return self._cwd

    def _save(self, name, array, affine) -> str:
        path = self._cwd / f"{name}.nii"
        nib.save(nib.Nifti1Image(np.asarray(array), affine), str(path))
        return str(path)

    def _grad(self, grad: Gradients) -> tuple[str, str]:
        bval, bvec = self._cwd / "grad.bval", self._cwd / "grad.bvec"
        grad.write_fsl(bval, bvec)  # b0s written as exactly 0: MRtrix's own threshold is 10
        return str(bvec), str(bval)

    def _run(self, interface, step: str):
        interface.inputs.nthreads = self.settings.threads
        interface.inputs.args = "-quiet"
        interface.terminal_output = "allatonce"
        try:
            return interface.run(cwd=str(self._cwd))
        except Exception as e:  # nipype wraps the command's failure in several types
            raise DwiRejected(step, f"{interface.cmd} failed: {' '.join(str(e).split())[-400:]}") from e

    def _load(self, path, affine, step) -> np.ndarray:
        img = nib.load(str(path))
        if not np.allclose(img.affine, affine, atol=1e-3):
            raise DwiRejected(step, f"MRtrix3 output {path} is on another voxel grid than its input")
        return np.asarray(img.dataobj, dtype=np.float32)

    def denoise(self, data, affine, grad):
        from nipype.interfaces.mrtrix3 import DWIDenoise

        out = self._fresh() / "denoised.nii"
        # no gradient option: DWIDenoise with grad_fsl adds an option dwidenoise rejects
        self._run(DWIDenoise(in_file=self._save("in_denoise", data, affine), out_file=str(out),
                             noise=str(self._cwd / "noise.nii"),
                             extent=(2 * self.settings.denoise_patch_radius + 1,) * 3), "denoise")
        return self._load(out, affine, "denoise")

    def degibbs(self, data, affine, grad):
        from nipype.interfaces.mrtrix3 import MRDeGibbs

        out = self._fresh() / "degibbs.nii"
        self._run(MRDeGibbs(in_file=self._save("in_degibbs", data, affine), out_file=str(out)), "degibbs")
        return self._load(out, affine, "degibbs")

    def mask(self, data, affine, grad, mean_b0):
        from nipype.interfaces.mrtrix3 import BrainMask

        out = self._fresh() / "mask.nii"
        self._run(BrainMask(in_file=self._save("in_mask", data, affine), grad_fsl=self._grad(grad),
                            out_file=str(out)), "mask")
        return self._load(out, affine, "mask") > 0.5

    def tensor(self, data, affine, grad, mask) -> TensorMaps:
        from nipype.interfaces.mrtrix3 import FitTensor, TensorMetrics

        tensor = self._fresh() / "tensor.nii"
        mask_file = self._save("tensor_mask", mask.astype(np.uint8), affine)
        self._run(FitTensor(in_file=self._save("in_tensor", data, affine), grad_fsl=self._grad(grad),
                            in_mask=mask_file, out_file=str(tensor)), "tensor")
        fa, adc, evec = (self._cwd / n for n in ("fa.nii", "adc.nii", "v1.nii"))
        self._run(TensorMetrics(in_file=str(tensor), in_mask=mask_file, out_fa=str(fa), out_adc=str(adc),
                                out_evec=str(evec), component=[1], modulate="none"), "tensor")
        fa_map, md_map = _clean(self._load(fa, affine, "tensor"), self._load(adc, affine, "tensor"), mask)
        # MRtrix reports eigenvectors in scanner coordinates (its gradients are converted from FSL on load)
        v1 = np.nan_to_num(self._load(evec, affine, "tensor")) * mask[..., None]
        return TensorMaps(fa_map, md_map, v1)


def make_backend(settings, scratch=None):
    if settings.backend == "dipy":
        return DipyBackend(settings)
    if settings.backend == "mrtrix3":
        return MrtrixBackend(settings, scratch)
    raise ValueError(f"unknown DWI backend {settings.backend!r}; choose one of {BACKENDS}")
