"""MRIQC's no-reference image quality metrics of a structural image, implemented here.

The `mriqc` package does not install beside this project's pins (mriqc 24.0.2, the newest
resolvable here, would downgrade numpy 2.x to 1.26.4 and pandas, and brings niworkflows/templateflow,
whose templates are downloaded on first use), so the definitions of `mriqc.qc.anatomical` are
implemented with the same formulas (Esteban et al. 2017, PLoS ONE):

- snr:   mean(fg) / (std(fg) * sqrt(n / (n - 1))) over the anatomy (MRIQC `snr`, its `snr_total`
         averaged over tissue classes; here over the two brightest tissue classes);
- snrd:  Dietrich's SNR, mean(fg) / (std(air) * sqrt(2 / (4 - pi)));
- cnr:   |mu_wm - mu_gm| / sqrt(sigma_air^2 + sigma_gm^2 + sigma_wm^2);
- cjv:   (sigma_wm + sigma_gm) / |mu_wm - mu_gm|;
- efc:   entropy focus criterion, (1 / E_max) * sum((x / b_max) * ln(x / b_max)), b_max = sqrt(sum x^2);
- fber:  median(|fg|^2) / median(|air|^2);
- inu:   spread (95th - 5th percentile) of the N4 bias field inside the anatomy (MRIQC `inu_range`),
         N4 from SimpleITK;
- fwhm:  smoothness (AFNI 3dFWHMx's first-difference estimate, MRIQC `fwhm_avg`), in voxels.

Tissue classes come from a 3-class multi-Otsu split of the anatomy ("gm" the middle class, "wm" the
brightest); MRIQC uses FSL FAST, which is not packaged here. Anonymised voxels never count.
Metrics that need air (snrd, cnr's air term, fber) use air outside the head; where there is none
(skull-stripped images, masked maps) they are NaN, except cnr which drops the air term.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage as ndi

METRICS = ("snr", "snrd", "cnr", "cjv", "efc", "fber", "inu", "fwhm")


def snr(values: np.ndarray) -> float:
    n = values.size
    if n < 3:
        return math.nan
    sd = float(values.std()) * math.sqrt(n / (n - 1))
    return float(values.mean()) / sd if sd > 0 else math.nan


def efc(image: np.ndarray, frame: np.ndarray | None = None) -> float:
    x = np.abs(image[frame] if frame is not None else image.ravel()).astype(np.float64)
    n = x.size
    efc_max = 1.0 * n * (1.0 / math.sqrt(n)) * math.log(1.0 / math.sqrt(n))
    b_max = math.sqrt(float((x ** 2).sum()))
    if b_max == 0:
        return math.nan
    return float((1.0 / efc_max) * np.sum((x / b_max) * np.log((x + 1e-16) / b_max)))


def fber(image: np.ndarray, head: np.ndarray, air: np.ndarray) -> float:
    if not air.any() or not head.any():
        return math.nan
    fg = float(np.median(np.abs(image[head]) ** 2))
    bg = float(np.median(np.abs(image[air]) ** 2))
    return fg / bg if bg > 1e-12 else math.nan


def cjv(mu_wm, mu_gm, sigma_wm, sigma_gm) -> float:
    diff = abs(mu_wm - mu_gm)
    return float((sigma_wm + sigma_gm) / diff) if diff > 0 else math.nan


def cnr(mu_wm, mu_gm, sigma_air, sigma_wm, sigma_gm) -> float:
    den = math.sqrt((0.0 if math.isnan(sigma_air) else sigma_air ** 2) + sigma_wm ** 2 + sigma_gm ** 2)
    return float(abs(mu_wm - mu_gm) / den) if den > 0 else math.nan


def fwhm(image: np.ndarray, mask: np.ndarray, noise_sd: float = 0.0) -> float:
    """Mean over axes of the first-difference FWHM estimate (voxels), inside `mask`; with the
    white noise's standard deviation given, its share of both variances is taken out first, so
    that the estimate measures the anatomy's sharpness rather than the noise's."""
    values = []
    total = float(image[mask].var())
    if total <= 0:
        return math.nan
    # the noise cannot explain more than 90% of the variance (air may hold ghosts, not only noise)
    noise_var = min(noise_sd ** 2 if math.isfinite(noise_sd) else 0.0, 0.9 * total)
    var = total - noise_var
    for axis in range(3):
        diff = np.diff(image, axis=axis)
        both = np.take(mask, range(1, mask.shape[axis]), axis=axis) & np.take(mask, range(mask.shape[axis] - 1), axis=axis)
        if both.sum() < 10:
            continue
        ratio = min(1.0 - max(float(diff[both].var()) - 2.0 * noise_var, 0.0) / (2.0 * var), 0.999)
        if ratio <= 0:  # neighbours uncorrelated (white noise): no smoothness
            values.append(0.0)
        elif ratio < 1:
            values.append(math.sqrt(-2.0 * math.log(2.0) / math.log(ratio)))
    return float(np.mean(values)) if values else math.nan


def inu_range(image: np.ndarray, mask: np.ndarray, shrink: int = 4, iterations: int = 20) -> float:
    """95th - 5th percentile of the N4 bias field (normalised to median 1) inside `mask`."""
    import SimpleITK as sitk

    if mask.sum() < 27:
        return math.nan
    data = np.clip(image, 0, None).astype(np.float32) + 1e-3
    img = sitk.GetImageFromArray(data)
    msk = sitk.GetImageFromArray(mask.astype(np.uint8))
    small = sitk.Shrink(img, [shrink] * 3)
    small_mask = sitk.Shrink(msk, [shrink] * 3)
    if sitk.GetArrayViewFromImage(small_mask).sum() < 8:
        return math.nan
    n4 = sitk.N4BiasFieldCorrectionImageFilter()
    n4.SetMaximumNumberOfIterations([iterations] * 3)
    n4.Execute(small, small_mask)
    log_field = n4.GetLogBiasFieldAsImage(img)
    field = np.exp(sitk.GetArrayFromImage(log_field))[mask]
    field = field / float(np.median(field))
    return float(np.percentile(field, 95) - np.percentile(field, 5))


def tissue_classes(image: np.ndarray, anatomy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(gm, wm): the middle and brightest of three Otsu classes inside the anatomy, drawn on the
    smoothed image so that noise widens the classes' spread instead of moving their bounds."""
    from skimage.filters import threshold_multiotsu

    image = ndi.gaussian_filter(image, 1.0)
    values = image[anatomy]
    try:
        t1, t2 = threshold_multiotsu(values, classes=3)
    except ValueError:
        return np.zeros_like(anatomy), np.zeros_like(anatomy)
    return anatomy & (image > t1) & (image <= t2), anatomy & (image > t2)


def compute_iqms(image: np.ndarray, anat: np.ndarray, anon: np.ndarray, inu: bool = True) -> dict[str, float]:
    """Every metric of METRICS for one image (NaN where undefined)."""
    image = np.nan_to_num(np.asarray(image, np.float32))
    anat = anat & ~anon
    out = dict.fromkeys(METRICS, math.nan)
    if anat.sum() < 27:
        return out
    head = ndi.binary_fill_holes(anat | anon)
    air = ~ndi.binary_dilation(head, iterations=3) & (np.abs(image) > 0)
    # air next to the field-of-view border only when the image has a real background
    if air.sum() < 100:
        air = np.zeros_like(air)
    fg = image[anat]
    out["snr"] = snr(fg)
    gm, wm = tissue_classes(image, anat)
    if gm.sum() > 2 and wm.sum() > 2:
        mu_gm, mu_wm = float(image[gm].mean()), float(image[wm].mean())
        sd_gm, sd_wm = float(image[gm].std()), float(image[wm].std())
        sd_air = float(image[air].std()) if air.any() else math.nan
        out["cnr"] = cnr(mu_wm, mu_gm, sd_air, sd_wm, sd_gm)
        out["cjv"] = cjv(mu_wm, mu_gm, sd_wm, sd_gm)
        out["snr"] = float(np.nanmean([snr(image[gm]), snr(image[wm])]))
    if air.any():
        sd_air = float(image[air].std())
        out["snrd"] = float(fg.mean()) / (sd_air * math.sqrt(2.0 / (4.0 - math.pi))) if sd_air > 0 else math.nan
    out["efc"] = efc(image, ~anon)
    out["fber"] = fber(image, anat, air)
    # Gaussian noise sd from the air's (Rayleigh) spread; none without air
    noise_sd = float(image[air].std()) / math.sqrt(2.0 - math.pi / 2.0) if air.any() else 0.0
    out["fwhm"] = fwhm(image, anat, noise_sd)
    if inu:
        out["inu"] = inu_range(image, anat)
    return out
