"""Demo downstream sets: small labelled datasets from the real MNI152 template, in the formats users have.

Three sets, written under `root` (`config/downstream_demo.yaml` registers them):

- `Dataset901_DemoLesionT1` (nnU-Net raw, 1 channel T1w): labels white matter and lesion. Lesions
  enhance (bright in T1w); controls have none, so the lesion class is absent from their reference (the
  empty-reference path of the metrics runs in every demo).
- `Dataset902_DemoLesionT1FLAIR` (nnU-Net raw, 2 registered channels T1w + FLAIR): label lesion,
  bright in FLAIR.
- `DemoPatientCls` (image folder + labels.csv, 1 channel FLAIR): patient (white-matter lesions)
  vs control.

Each subject is the template's real anatomy under its own head size (scale 0.93-1.07),
position and orientation, with its own lesions (2-5 irregular ellipsoids of radii 8-15 mm in the
deep white matter, 12-40 ml per patient; LESION_RADII_MM, LESIONS_PER_PATIENT); subjects come
from three sites that differ in intensity scale, bias field, noise and slice thickness, and some
have two sessions (new positioning, one lesion more), so splits must group by subject and can
balance site and lesion load. Grids cover the brain plus a margin at 3-4 mm, so volumes are
~45x55x45 voxels. Everything generated is recorded in `root/ground_truth/downstream.json`
(per case: subject, site, session, lesion count and volume, voxel counts per label, grid).
Deterministic under `seed`.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import zlib
from pathlib import Path

import numpy as np
from scipy import ndimage

from openmind_bench import atomic
from openmind_bench.demo.builder import bias_field, random_rotation, resample, rician, save_nifti, subject_grid
from openmind_bench.demo.phantom import Head, build_head, contrast_image

log = logging.getLogger(__name__)

SEG_T1 = "Dataset901_DemoLesionT1"
SEG_T1_FLAIR = "Dataset902_DemoLesionT1FLAIR"
CLS = "DemoPatientCls"

# Acquisition per site: intensity scale, bias strength, noise (fraction of the 99.5th
# percentile), voxel spacing (mm; the last axis is the slice direction).
SITES = {
    "siteA": {"scale": 1.00, "bias": 0.15, "noise": 0.015, "spacing": (3.5, 3.5, 3.5)},
    "siteB": {"scale": 0.70, "bias": 0.30, "noise": 0.030, "spacing": (3.5, 3.5, 4.0)},
    "siteC": {"scale": 1.30, "bias": 0.25, "noise": 0.025, "spacing": (3.2, 3.2, 4.0)},
}

# (subject, site, patient, sessions) per set: 12 cases from 8 subjects for segmentation, 16 cases
# from 12 subjects for classification.
COHORTS = {
    SEG_T1: [("t01", "siteA", True, 2), ("t02", "siteA", False, 1), ("t03", "siteB", True, 1), ("t04", "siteB", True, 2),
             ("t05", "siteB", False, 2), ("t06", "siteC", True, 1), ("t07", "siteC", True, 2), ("t08", "siteC", False, 1)],
    SEG_T1_FLAIR: [("m01", "siteA", True, 2), ("m02", "siteA", True, 1), ("m03", "siteA", False, 1),
                   ("m04", "siteB", True, 2), ("m05", "siteB", False, 1), ("m06", "siteC", True, 2),
                   ("m07", "siteC", True, 1), ("m08", "siteC", False, 2)],
    CLS: [("c01", "siteA", True, 2), ("c02", "siteA", False, 1), ("c03", "siteA", True, 1), ("c04", "siteA", False, 2),
          ("c05", "siteB", True, 1), ("c06", "siteB", False, 2), ("c07", "siteB", True, 2), ("c08", "siteB", False, 1),
          ("c09", "siteC", True, 1), ("c10", "siteC", False, 1), ("c11", "siteC", True, 1), ("c12", "siteC", False, 1)],
}


@dataclasses.dataclass
class _Scan:
    """One session of one subject on its own grid."""

    image: dict  # modality -> array
    labels: dict  # name -> bool array (white_matter, lesion)
    affine: np.ndarray
    spacing: tuple
    n_lesions: int


def _around_brain(head: Head, margin_mm: float = 16.0) -> Head:
    """The template head cut to the brain's bounding box plus a margin (all maps, affine adjusted):
    the demo grids cover only this, and every per-scan step runs on a third of the voxels."""
    vox = float(np.abs(head.affine[0, 0]))
    idx = np.argwhere(head.brain)
    pad = int(np.ceil(margin_mm / vox))
    lo = np.maximum(idx.min(0) - pad, 0)
    hi = np.minimum(idx.max(0) + pad + 1, head.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    affine = head.affine.copy()
    affine[:3, 3] += affine[:3, :3] @ lo
    fields = {f.name: getattr(head, f.name)[box] for f in dataclasses.fields(head) if f.name != "affine"}
    return Head(affine=affine, **fields)


# Lesions: ellipsoids of these radii (mm) with an irregular (noise-modulated) border, centred in deep
# white matter and confined to it, as confluent periventricular / deep white-matter lesions. At the
# demo's 3.2-4 mm voxels they span ~5-9 voxels across; radii of 5-10 mm (1.5-3 voxels, ~100-200
# lesion voxels per case) gave the demo's tiny networks almost no lesion voxels to learn from.
LESION_RADII_MM = (8.0, 15.0)
LESIONS_PER_PATIENT = (2, 5)  # at the first session; each follow-up session adds one
# The T1w set's lesions enhance (bright on T1w, as contrast-enhancing lesions), so its lesion class
# can be told apart by intensity: the demo's tiny networks did not learn T1-dark lesions (GM-like
# intensity inside WM) within 2000 nnU-Net iterations. At intensity 2.0 (white matter ~0.8), scratch
# runs of 600 iterations learnt the lesion class in 4 of 4 (lesion DSC 0.88-0.92); at 1.3, in 2 of 3.
# The T1w + FLAIR set keeps T1-dark lesions; its FLAIR channel shows them bright. At FLAIR's default
# lesion intensity (0.95, white matter 0.42; z ~3.8 against <= 2.3 for 99.9% of other voxels) scratch
# runs learnt no lesion within 600 iterations (test DSC 0.00 in 3 of 3, torch 2.14.1 / nnU-Net 2.8.1;
# a 10 x 100 run found it at ~850, test DSC 0.29); at 1.5 a 6 x 100 run found it within ~200
# (pseudo-Dice 0.87-0.92 from the third epoch, test DSC 0.87). The classification set's patients get
# the same lesions. Both are far more conspicuous than real white-matter lesions: the demo's networks
# are tiny and train for minutes on a CPU.
LESION_INTENSITY = {SEG_T1: {"T1w": 2.0}, SEG_T1_FLAIR: {"FLAIR": 1.5}, CLS: {"FLAIR": 1.5}}


def _lesion_field(head: Head, rng: np.random.Generator, n: int) -> np.ndarray:
    """n lesions (ellipsoids of LESION_RADII_MM, border modulated by smooth noise) centred in deep
    white matter, soft-edged, in [0, 1]."""
    field = np.zeros(head.shape, np.float32)
    if n == 0:
        return field
    vox = float(np.abs(head.affine[0, 0]))
    deep = np.argwhere(ndimage.binary_erosion(head.wm > 0.9, iterations=2))
    grid = np.indices(head.shape, dtype=np.float32)
    for centre in deep[rng.choice(len(deep), size=n, replace=False)]:
        radii = rng.uniform(*LESION_RADII_MM, 3) / vox
        box = tuple(slice(max(int(c - r) - 2, 0), int(c + r) + 3) for c, r in zip(centre, radii))
        dist = sum(((grid[a][box] - centre[a]) / radii[a]) ** 2 for a in range(3))
        border = ndimage.gaussian_filter(rng.standard_normal(dist.shape).astype(np.float32), 1.5)
        border *= 0.35 / max(float(border.std()), 1e-6)
        field[box] = np.maximum(field[box], (dist <= 1.0 + border).astype(np.float32))
    field = ndimage.gaussian_filter(field, 0.7)
    return np.clip(field * (head.wm > 0.3) * 1.6, 0, 1)


def _scan(head: Head, site: str, lesions: np.ndarray, n_lesions: int, modalities: list[str],
          rng: np.random.Generator, head_scale: float, lesion_intensity: dict | None = None) -> _Scan:
    acq = SITES[site]
    scaled = dataclasses.replace(head, affine=np.diag([head_scale] * 3 + [1.0]) @ head.affine)
    # grid over the brain plus ~10 mm, as downstream sets are usually cropped around the anatomy
    cover = dataclasses.replace(scaled, head=ndimage.binary_dilation(head.brain, iterations=5))
    rotation = random_rotation(rng, 6.0)
    affine, shape = subject_grid(cover, rotation, rng.uniform(-4, 4, 3), acq["spacing"])
    images = {}
    for modality in modalities:
        img = resample(contrast_image(head, modality, lesions, rng, (lesion_intensity or {}).get(modality)),
                       scaled.affine, affine, shape, 1)
        img = img * acq["scale"] * bias_field(shape, rng, acq["bias"])
        images[modality] = rician(img, acq["noise"] * float(np.percentile(img, 99.5)), rng)
    lesion = resample(lesions, scaled.affine, affine, shape, 1) > 0.5
    wm = (resample(head.wm, scaled.affine, affine, shape, 1) > 0.5) & ~lesion
    return _Scan(images, {"white_matter": wm, "lesion": lesion}, affine, tuple(acq["spacing"]), n_lesions)


def _cohort(dataset: str, repeats: int) -> list[tuple]:
    """The set's cohort, `repeats` times over: each further copy has new subjects (ids `{id}r{k}`, so
    their own head size, pose, lesions and noise) from the same sites, with the same patient share
    and sessions. One copy is the 12/16-case set the demo ships with."""
    if repeats < 1:
        raise ValueError(f"cohort repeats must be at least 1, got {repeats}")
    return [(subject if k == 1 else f"{subject}r{k}", *rest) for k in range(1, repeats + 1)
            for subject, *rest in COHORTS[dataset]]


def _case_id(subject: str, session: int) -> str:
    return f"{subject}_ses{session}"


def _subject_scans(head: Head, seed: int, dataset: str, subject: str, site: str, patient: bool,
                   sessions: int, modalities: list[str]):
    rng = np.random.default_rng([seed, zlib.crc32(dataset.encode()), zlib.crc32(subject.encode())])
    head_scale = rng.uniform(0.93, 1.07)
    n = int(rng.integers(LESIONS_PER_PATIENT[0], LESIONS_PER_PATIENT[1] + 1)) if patient else 0
    lesions = _lesion_field(head, rng, n)
    for session in range(1, sessions + 1):
        if patient and session > 1:  # follow-up: one new lesion
            lesions = np.maximum(lesions, _lesion_field(head, rng, 1))
            n += 1
        yield session, _scan(head, site, lesions, n, modalities, rng, head_scale, LESION_INTENSITY.get(dataset))


def _image_scale(volume: np.ndarray) -> float:
    return 1000.0 / max(float(np.percentile(volume, 99.5)), 1e-6)


def _csv(rows: list[list]) -> str:
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(rows)
    return out.getvalue()


def _write_segmentation(root: Path, head: Head, seed: int, dataset: str, modalities: list[str],
                        labels: dict[str, int], truth: dict, repeats: int = 1) -> None:
    folder = root / dataset
    meta = [["case", "subject", "site"]]
    cases = {}
    for subject, site, patient, sessions in _cohort(dataset, repeats):
        for session, scan in _subject_scans(head, seed, dataset, subject, site, patient, sessions, modalities):
            case = _case_id(subject, session)
            for channel, modality in enumerate(modalities):
                image = scan.image[modality]
                save_nifti(image, scan.affine, folder / "imagesTr" / f"{case}_{channel:04d}.nii.gz", scale=_image_scale(image))
            seg = np.zeros(scan.labels["lesion"].shape, np.uint8)
            for name, value in labels.items():
                if value:
                    seg[scan.labels[name]] = value
            save_nifti(seg, scan.affine, folder / "labelsTr" / f"{case}.nii.gz", dtype=np.uint8)
            meta.append([case, subject, site])
            voxel_ml = float(np.prod(scan.spacing)) / 1000.0
            cases[case] = {
                "subject": subject, "site": site, "session": session, "patient": patient,
                "n_lesions": scan.n_lesions, "shape": list(seg.shape), "spacing": list(scan.spacing),
                "label_voxels": {name: int(np.count_nonzero(seg == v)) for name, v in labels.items() if v},
                "lesion_volume_ml": round(int(np.count_nonzero(scan.labels["lesion"])) * voxel_ml, 3),
            }
    atomic.write_json(folder / "dataset.json", {
        "channel_names": {str(i): m for i, m in enumerate(modalities)},
        "labels": {"background": 0, **{k: v for k, v in labels.items() if v}},
        "numTraining": len(cases), "file_ending": ".nii.gz",
        "name": dataset, "description": "openmind_bench demo: MNI152 anatomy with synthetic white-matter lesions",
    })
    atomic.write_text(folder / "case_metadata.csv", _csv(meta))
    truth["datasets"][dataset] = {"task": "seg", "modalities": modalities, "labels": labels, "cases": cases}


def _write_classification(root: Path, head: Head, seed: int, truth: dict, repeats: int = 1) -> None:
    folder = root / CLS
    rows = [["case", "label", "subject", "site"]]
    cases = {}
    for subject, site, patient, sessions in _cohort(CLS, repeats):
        for session, scan in _subject_scans(head, seed, CLS, subject, site, patient, sessions, ["FLAIR"]):
            case = _case_id(subject, session)
            image = scan.image["FLAIR"]
            save_nifti(image, scan.affine, folder / "imagesTr" / f"{case}_0000.nii.gz", scale=_image_scale(image))
            label = "patient" if patient else "control"
            rows.append([case, label, subject, site])
            cases[case] = {"subject": subject, "site": site, "session": session, "label": label,
                           "n_lesions": scan.n_lesions, "shape": list(image.shape), "spacing": list(scan.spacing)}
    atomic.write_text(folder / "labels.csv", _csv(rows))
    truth["datasets"][CLS] = {"task": "cls", "modalities": ["FLAIR"], "classes": ["control", "patient"], "cases": cases}


def build_downstream(root: str | Path, seed: int = 0, resolution: int = 2, cohort_repeats: int = 1) -> dict:
    """Write the three demo downstream sets under `root`; returns (and writes) the ground truth.
    `cohort_repeats`: each set's cohort that many times over (`_cohort`), for a test set large
    enough to bound a difference (config/small.yaml)."""
    root = Path(root)
    log.info("building demo downstream sets in %s (seed %d, cohort x%d)", root, seed, cohort_repeats)
    head = _around_brain(build_head(resolution))
    truth = {"seed": seed, "resolution": resolution, "cohort_repeats": cohort_repeats, "datasets": {}}
    _write_segmentation(root, head, seed, SEG_T1, ["T1w"], {"white_matter": 1, "lesion": 2}, truth, cohort_repeats)
    _write_segmentation(root, head, seed, SEG_T1_FLAIR, ["T1w", "FLAIR"], {"lesion": 1}, truth, cohort_repeats)
    _write_classification(root, head, seed, truth, cohort_repeats)
    atomic.write_json(root / "ground_truth" / "downstream.json", truth)
    log.info("demo downstream sets: %s", {k: len(v["cases"]) for k, v in truth["datasets"].items()})
    return truth
