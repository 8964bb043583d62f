"""The embedded demo: a small local mirror in the OpenNeuro layout, from real template images.

Three datasets, thirteen subjects, T1w/T2w/FLAIR/DWI, with the variation OpenMind meets on
OpenNeuro: oblique affines, anisotropic voxels, other axis orders, bias fields, noise, defaced,
face-blurred and skull-stripped anatomy, sidecar fields missing or in the wrong unit, and the
participants table coded differently in every dataset. With `inject_faults` a few files are
broken on purpose (truncated data, missing bvec, malformed JSON, non-BIDS name).

Everything the builder applied is written to `ROOT/ground_truth/` (anonymisation, anatomy and
brain masks per image, transforms, the harmonised participant values, the expected rejections)
so later stages are tested against what is known to be true. Deterministic under `seed`.
"""

from __future__ import annotations

import json
import logging
import zlib
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from openmind_bench import atomic
from openmind_bench.demo.phantom import (Head, build_head, contrast_image, dwi_signal, lesion_map, subject_head,
                                         tensor_fields)

log = logging.getLogger(__name__)

SNAPSHOT = "1.0.0"


@dataclass
class Subject:
    id: str
    sessions: list[str]
    anat: list[str]  # modalities
    dwi: str | None  # "synthetic", a dipy data name, or None
    participant: dict  # raw participants.tsv values (as the dataset codes them)
    truth: dict  # harmonised values the index must produce


@dataclass
class DatasetSpec:
    id: str
    name: str
    anonymisation: str  # defaced | skull_stripped | face_blurred
    participants_columns: list[str]
    participants_json: dict
    sidecar: dict  # acquisition fields; where they are written is per dataset
    sidecar_mode: str  # per_file | inherited | partial
    subjects: list[Subject] = field(default_factory=list)


def _specs(leak: bool = False) -> list[DatasetSpec]:
    """The demo's datasets. Values are coded as their real counterparts on OpenNeuro are. With
    `leak`, ds990003 has a fifth subject that holds nothing but a planted downstream test case."""
    ds1 = DatasetSpec(
        id="ds990001",
        name="Demo: multi-contrast adult cohort with sessions (defaced)",
        anonymisation="defaced",
        participants_columns=["participant_id", "age", "sex", "handedness", "group"],
        participants_json={
            "age": {"Description": "age at first scan", "Units": "years"},
            "sex": {"Description": "sex", "Levels": {"M": "male", "F": "female"}},
            "group": {"Description": "cohort", "Levels": {"control": "healthy control", "MS": "multiple sclerosis"}},
        },
        sidecar={"Manufacturer": "Siemens", "ManufacturersModelName": "Prisma_fit",
                 "MagneticFieldStrength": 3, "RepetitionTime": 2.3, "EchoTime": 0.00298,
                 "PhaseEncodingDirection": "j-"},
        sidecar_mode="per_file",
    )
    ds1.subjects = [
        Subject("01", ["01", "02"], ["T1w", "T2w", "FLAIR"], "synthetic",
                {"age": "34", "sex": "M", "handedness": "R", "group": "control"},
                {"age": 34.0, "sex": "M", "handedness": "R", "health_status": "healthy"}),
        Subject("02", ["01", "02"], ["T1w", "T2w", "FLAIR"], "synthetic",
                {"age": "41.5", "sex": "F", "handedness": "L", "group": "MS"},
                {"age": 41.5, "sex": "F", "handedness": "L", "health_status": "patient"}),
        Subject("03", ["01"], ["T1w", "T2w", "FLAIR"], None,
                {"age": "27", "sex": "F", "handedness": "R", "group": "control"},
                {"age": 27.0, "sex": "F", "handedness": "R", "health_status": "healthy"}),
        Subject("04", ["01"], ["T1w", "FLAIR"], None,
                {"age": "89+", "sex": "M", "handedness": "n/a", "group": "MS"},
                {"age": 89.0, "sex": "M", "handedness": "unknown", "health_status": "patient"}),
        Subject("05", ["01"], ["T1w", "T2w"], "synthetic",
                {"age": "n/a", "sex": "F", "handedness": "R", "group": "control"},
                {"age": None, "sex": "F", "handedness": "R", "health_status": "healthy"}),
    ]
    ds2 = DatasetSpec(
        id="ds990002",
        name="Demo: skull-stripped infant and child anatomy",
        anonymisation="skull_stripped",
        participants_columns=["participant_id", "age", "gender", "hand"],
        participants_json={"age": {"Description": "age at scan", "Units": "months"}},
        # inherited from a top-level sidecar; TR in ms (a common sidecar mistake), no Manufacturer
        sidecar={"MagneticFieldStrength": 1.5, "RepetitionTime": 1900, "EchoTime": 0.0025},
        sidecar_mode="inherited",
    )
    ds2.subjects = [
        Subject("01", [], ["T1w", "FLAIR"], None, {"age": "18", "gender": "male", "hand": "right"},
                {"age": 1.5, "sex": "M", "handedness": "R", "health_status": "unknown"}),
        Subject("02", [], ["T1w", "FLAIR"], None, {"age": "30", "gender": "female", "hand": "left"},
                {"age": 2.5, "sex": "F", "handedness": "L", "health_status": "unknown"}),
        Subject("03", [], ["T1w"], None, {"age": "96", "gender": "Female", "hand": "ambidextrous"},
                {"age": 8.0, "sex": "F", "handedness": "A", "health_status": "unknown"}),
        Subject("04", [], ["T1w", "FLAIR"], None, {"age": "144", "gender": "MALE", "hand": "R"},
                {"age": 12.0, "sex": "M", "handedness": "R", "health_status": "unknown"}),
    ]
    ds3 = DatasetSpec(
        id="ds990003",
        name="Demo: diffusion cohort with real dipy DWI (face-blurred)",
        anonymisation="face_blurred",
        participants_columns=["participant_id", "age_months", "sex", "diagnosis"],
        participants_json={"sex": {"Description": "sex", "Levels": {"1": "male", "2": "female", "3": "not reported"}},
                           "diagnosis": {"Description": "clinical group", "Levels": {"HC": "healthy control", "TBI": "traumatic brain injury"}}},
        sidecar={"Manufacturer": "GE MEDICAL SYSTEMS", "ManufacturersModelName": "DISCOVERY MR750",
                 "MagneticFieldStrength": 3, "RepetitionTime": 8.2, "EchoTime": 3.2,
                 "PhaseEncodingDirection": "j"},
        sidecar_mode="partial",  # EchoTime in ms; some files have no sidecar at all
    )
    ds3.subjects = [
        Subject("01", [], ["T1w", "T2w"], "small_64D", {"age_months": "240", "sex": "1", "diagnosis": "HC"},
                {"age": 20.0, "sex": "M", "handedness": "unknown", "health_status": "healthy"}),
        Subject("02", [], ["T1w", "T2w"], "small_101D", {"age_months": "300", "sex": "2", "diagnosis": "TBI"},
                {"age": 25.0, "sex": "F", "handedness": "unknown", "health_status": "patient"}),
        Subject("03", [], ["T1w"], "synthetic", {"age_months": "n/a", "sex": "2", "diagnosis": "HC"},
                {"age": None, "sex": "F", "handedness": "unknown", "health_status": "healthy"}),
        Subject("04", [], ["T1w", "T2w"], None, {"age_months": "420", "sex": "3", "diagnosis": "TBI"},
                {"age": 35.0, "sex": "unknown", "handedness": "unknown", "health_status": "patient"}),
    ]
    if leak:
        ds3.subjects.append(Subject("05", [], [], None, {"age_months": "n/a", "sex": "3", "diagnosis": "HC"},
                                    {"age": None, "sex": "unknown", "handedness": "unknown",
                                     "health_status": "healthy"}))
    return [ds1, ds2, ds3]


# Near-duplicates planted in the mirror (kind, original, BIDS `acq` label of the copy): the same scan
# re-saved as OpenNeuro re-uploads and conversions make them. The curation stage must find each pair and
# nothing else (docs/stages.md, Curation by content: precision and recall).
PLANTED_DUPLICATES = [
    ("affine", "ds990001/sub-01/ses-01/anat/sub-01_ses-01_T1w.nii.gz", "resaved"),
    ("axis_order", "ds990001/sub-02/ses-01/anat/sub-02_ses-01_FLAIR.nii.gz", "reordered"),
    ("gzip_level", "ds990002/sub-02/anat/sub-02_T1w.nii.gz", "regzip"),
    ("crop", "ds990003/sub-02/anat/sub-02_T1w.nii.gz", "cropped"),
    ("noise", "ds990001/sub-03/ses-01/anat/sub-03_ses-01_T2w.nii.gz", "noisy"),
]
# Where the planted downstream test case goes (the fifth subject of ds990003).
LEAK_SUBJECT = ("ds990003", "05")


def _copy_name(rel: str, acq: str) -> str:
    """`sub-01_ses-01_T1w.nii.gz` -> `sub-01_ses-01_acq-<acq>_T1w.nii.gz` (entities in BIDS order)."""
    folder, name = rel.rsplit("/", 1)
    head, suffix = name.rsplit("_", 1)
    return f"{folder}/{head}_acq-{acq}_{suffix}"


def _transform(kind: str, data: np.ndarray, affine: np.ndarray, rng: np.random.Generator | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """The planted copy's voxels and affine (`rng` only for `noise`, which leaves masks alone)."""
    affine = affine.copy()
    if kind == "affine":  # the same voxels, the world origin moved (another converter's header)
        affine[:3, 3] += np.array([23.5, -17.0, 11.0])
    elif kind == "axis_order":  # the voxel axes stored in another order, the same world image
        data = np.ascontiguousarray(np.transpose(data, (2, 0, 1)))
        affine[:, :3] = affine[:, [2, 0, 1]]
    elif kind == "crop":  # a few slices less at two borders
        data = np.ascontiguousarray(data[:, 3:, :-5])
        affine[:3, 3] += affine[:3, :3] @ np.array([0.0, 3.0, 0.0])
    elif kind == "noise" and rng is not None:  # on the acquired voxels: zeroed (defaced) ones stay zero
        sigma = 0.01 * float(np.percentile(data, 99.5))
        noisy = np.round(data + rng.normal(0.0, sigma, data.shape)).clip(np.iinfo(np.int16).min,
                                                                       np.iinfo(np.int16).max).astype(data.dtype)
        data = np.where(data != 0, noisy, data)
    return data, affine


def _save_copy(data: np.ndarray, affine: np.ndarray, path: Path, level: int) -> None:
    """A NIfTI written as another tool would: this gzip level, the header's scaling left at 1."""
    import gzip

    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic.atomic_path(path) as tmp:
        Path(tmp).write_bytes(gzip.compress(img.to_bytes(), compresslevel=level, mtime=0))


def save_leak_copy(leak: dict, root: str | Path) -> str:
    """A downstream test case (`leak_source`) re-saved (origin moved, gzip level 1) under `root` as a
    pre-training image of LEAK_SUBJECT: the curation stage must find it and keep it out of every
    selection. Returns its path relative to `root`."""
    dataset, subject = LEAK_SUBJECT
    src = nib.load(str(leak["image"]))
    data, affine = _transform("affine", np.asarray(src.dataobj), src.affine)
    rel = f"{dataset}/sub-{subject}/anat/sub-{subject}_{leak['modality']}.nii.gz"
    _save_copy(data, affine, Path(root) / rel, level=1)
    return rel


def leak_source(split_path: str | Path, source: str | Path, dataset: str, modality: str) -> dict:
    """The downstream test case the demo plants in the pre-training pool: the first test case of the
    split (sorted), its first channel (`{case}_0000.*`)."""
    import json
    import re

    doc = json.loads(Path(split_path).read_text())
    case = sorted(doc["test"])[0]
    files = sorted(f for f in doc["case_files"][case] if re.match(rf"^{re.escape(case)}_0000\.", Path(f).name))
    if not files:
        raise ValueError(f"split {split_path}: test case {case} has no channel-0 image")
    return {"dataset": dataset, "case": case, "channel": 0, "modality": modality,
            "image": str(Path(source) / files[0])}


def dataset_ids() -> list[str]:
    return [d.id for d in _specs()]


# ---------------------------------------------------------------------------------- geometry


def random_rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    ax, ay, az = np.deg2rad(rng.uniform(-max_deg, max_deg, 3))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def subject_grid(head: Head, rotation: np.ndarray, shift: np.ndarray, spacing) -> tuple[np.ndarray, tuple]:
    """Affine and shape of an oblique grid with `spacing` that covers the whole head."""
    idx = np.argwhere(head.head)
    lo, hi = idx.min(0) - 2, idx.max(0) + 2
    corners = np.array([[a, b, c, 1] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])])
    world = (head.affine @ corners.T)[:3]
    local = rotation.T @ world  # coordinates along the grid's axes
    start, stop = local.min(1), local.max(1)
    spacing = np.asarray(spacing, float)
    shape = tuple(int(np.ceil((stop[i] - start[i]) / spacing[i])) + 1 for i in range(3))
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag(spacing)
    affine[:3, 3] = rotation @ start + shift
    return affine, shape


def resample(volume: np.ndarray, src_affine: np.ndarray, dst_affine: np.ndarray, shape, order: int) -> np.ndarray:
    vox = np.linalg.inv(src_affine) @ dst_affine
    if volume.ndim == 4:
        return np.stack([resample(volume[..., i], src_affine, dst_affine, shape, order)
                         for i in range(volume.shape[-1])], axis=-1)
    return ndimage.affine_transform(volume.astype(np.float32), vox[:3, :3], vox[:3, 3],
                                    output_shape=shape, order=order, mode="constant", cval=0.0)


def flip_axes(data: np.ndarray, affine: np.ndarray, axes) -> tuple[np.ndarray, np.ndarray]:
    """Store the same image with other axis directions (LAS, LPS, ... on disk)."""
    affine = affine.copy()
    for ax in axes:
        data = np.flip(data, ax)
        affine[:3, 3] += affine[:3, ax] * (data.shape[ax] - 1)
        affine[:3, ax] *= -1
    return np.ascontiguousarray(data), affine


def bias_field(shape, rng: np.random.Generator, strength: float) -> np.ndarray:
    """A smooth multiplicative field exp(polynomial of degree 2), mean 1 over the volume."""
    grids = np.meshgrid(*[np.linspace(-1, 1, s, dtype=np.float32) for s in shape], indexing="ij")
    terms = [g for g in grids] + [g * h for i, g in enumerate(grids) for h in grids[i:]]
    coeffs = rng.normal(0, 1, len(terms))
    poly = sum(c * t for c, t in zip(coeffs, terms))
    poly = poly / max(np.abs(poly).max(), 1e-6) * strength
    field_ = np.exp(poly)
    return (field_ / field_.mean()).astype(np.float32)


def rician(img: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    n1 = rng.normal(0, sigma, img.shape).astype(np.float32)
    n2 = rng.normal(0, sigma, img.shape).astype(np.float32)
    return np.sqrt((img + n1) ** 2 + n2**2)


def save_nifti(data: np.ndarray, affine: np.ndarray, path: Path, dtype=np.int16, scale: float = 1.0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    out = np.round(data * scale).astype(dtype) if dtype != np.uint8 else data.astype(np.uint8)
    img = nib.Nifti1Image(out, affine)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    with atomic.atomic_path(path) as tmp:
        nib.save(img, str(tmp) + ".nii.gz")
        Path(str(tmp) + ".nii.gz").rename(tmp)


# ---------------------------------------------------------------------------------- writer


class DemoBuilder:
    def __init__(self, root: str | Path, seed: int = 0, resolution: int = 2, inject_faults: bool = True,
                 plant_duplicates: bool = True, leak: dict | None = None):
        self.root = Path(root)
        self.seed = seed
        self.inject_faults = inject_faults
        self.plant_duplicates = plant_duplicates
        self.leak = leak
        self.head = build_head(resolution)
        self.truth: dict = {"seed": seed, "snapshot": SNAPSHOT, "images": {}, "participants": {},
                            "expected_rejections": [], "datasets": {}}

    @staticmethod
    def key(text: str) -> int:
        """Stable integer key of a name for seeding (hash() of a str is salted per process)."""
        return zlib.crc32(text.encode())

    def build(self) -> dict:
        self.root.mkdir(parents=True, exist_ok=True)
        for spec in _specs(leak=self.leak is not None):
            self.write_dataset(spec)
        if self.plant_duplicates:
            self.plant()
        if self.leak is not None:
            self.plant_leak(self.leak)
        if self.inject_faults:
            self.inject()
        atomic.write_json(self.root / "ground_truth" / "ground_truth.json", self.truth)
        return self.truth

    def write_dataset(self, spec: DatasetSpec) -> None:
        ds = self.root / spec.id
        if ds.exists():
            shutil.rmtree(ds)
        ds.mkdir(parents=True)
        doi = f"doi:10.18112/openneuro.{spec.id}.v{SNAPSHOT}"
        atomic.write_json(ds / "dataset_description.json", {
            "Name": spec.name, "BIDSVersion": "1.8.0", "DatasetType": "raw", "License": "CC0",
            "Authors": ["OpenMind benchmark demo builder"], "DatasetDOI": doi,
            "GeneratedBy": [{"Name": "openmind_bench demo builder", "Version": "0.1.0"}],
        })
        atomic.write_text(ds / "README", f"{spec.name}\n\nSynthetic demo data built from the MNI152 "
                          "2009a template (nilearn) and dipy's example DWI. Not for research use.\n")
        atomic.write_text(ds / "CHANGES", f"{SNAPSHOT} 2026-01-01\n  - Initial demo snapshot.\n")
        rows = ["\t".join(spec.participants_columns)]
        for s in spec.subjects:
            rows.append("\t".join([f"sub-{s.id}"] + [s.participant[c] for c in spec.participants_columns[1:]]))
            self.truth["participants"][f"{spec.id}/sub-{s.id}"] = s.truth
        atomic.write_text(ds / "participants.tsv", "\n".join(rows) + "\n")
        atomic.write_json(ds / "participants.json", spec.participants_json)
        if spec.sidecar_mode == "inherited":
            for modality in ("T1w", "FLAIR"):
                atomic.write_json(ds / f"{modality}.json", spec.sidecar)
        self.truth["datasets"][spec.id] = {"anonymisation": spec.anonymisation, "doi": doi}
        for s in spec.subjects:
            self.write_subject(spec, s)

    def write_subject(self, spec: DatasetSpec, s: Subject) -> None:
        if not s.anat and not s.dwi:
            return
        sessions = s.sessions or [""]
        # the subject's own anatomy: the template under a per-subject scaling and smooth deformation
        anatomy_rng = np.random.default_rng([self.seed, self.key(spec.id), int(s.id), self.key("anatomy")])
        head, anatomy = subject_head(self.head, anatomy_rng)
        self.truth["participants"][f"{spec.id}/sub-{s.id}"]["anatomy"] = anatomy
        fields = None
        for ses in sessions:
            rng = np.random.default_rng([self.seed, self.key(spec.id), int(s.id), int(ses or 0)])
            rotation = random_rotation(rng, 10.0)
            shift = rng.uniform(-6, 6, 3)
            lesions = lesion_map(head, rng, n=4 if s.truth["health_status"] == "patient" else 0)
            flips = [(), (0,), (0, 1)][rng.integers(0, 3)]
            modalities = s.anat if ses in ("", "01") else ["T1w"]
            for modality in modalities:
                self.write_anat(spec, s, ses, modality, rotation, shift, lesions, flips, rng, head)
            if s.dwi and ses in ("", "01"):
                if s.dwi == "synthetic" and fields is None:
                    fields = tensor_fields(head)
                self.write_dwi(spec, s, ses, rotation, shift, lesions, rng, head, fields)
        if s.sessions and spec.id == "ds990001" and len(s.sessions) > 1:
            # a later session's age overrides the participants.tsv age (baseline)
            base = float(s.participant["age"])
            ages = {ses: base + 1.5 * i for i, ses in enumerate(s.sessions)}
            atomic.write_json(self.root / spec.id / f"sub-{s.id}" / f"sub-{s.id}_sessions.json",
                              {"age": {"Description": "age at the session", "Units": "years"}})
            lines = ["session_id\tage"] + [f"ses-{k}\t{v}" for k, v in ages.items()]
            atomic.write_text(self.root / spec.id / f"sub-{s.id}" / f"sub-{s.id}_sessions.tsv", "\n".join(lines) + "\n")
            self.truth["participants"][f"{spec.id}/sub-{s.id}"]["session_age"] = ages

    def _stem(self, s: Subject, ses: str, suffix: str) -> tuple[str, str]:
        folder = f"sub-{s.id}" + (f"/ses-{ses}" if ses else "")
        name = f"sub-{s.id}" + (f"_ses-{ses}" if ses else "") + f"_{suffix}"
        return folder, name

    def _sidecar(self, spec: DatasetSpec, modality: str, rng) -> dict | None:
        side = dict(spec.sidecar)
        if modality == "FLAIR":
            side.update({"InversionTime": 2.5, "EchoTime": 0.39 if spec.sidecar_mode != "partial" else 390})
        if modality == "T2w":
            side.update({"EchoTime": 0.409 if spec.sidecar_mode != "partial" else 409, "RepetitionTime": 3.2})
        if spec.sidecar_mode == "inherited":
            return None
        if spec.sidecar_mode == "partial" and rng.random() < 0.4:
            return None  # missing sidecar altogether
        if spec.sidecar_mode == "partial":
            side.pop("PhaseEncodingDirection", None)
        return side

    def write_anat(self, spec, s, ses, modality, rotation, shift, lesions, flips, rng, head: Head) -> None:
        img_rng = np.random.default_rng([self.seed, self.key(spec.id), int(s.id), int(ses or 0), self.key(modality)])
        # resolution per contrast as acquired: 3D T1w near-isotropic, 2D T2w/FLAIR thick slices
        if modality == "T1w":
            spacing = [img_rng.uniform(1.8, 2.4)] * 3
        else:
            spacing = [img_rng.uniform(1.8, 2.2), img_rng.uniform(1.8, 2.2), img_rng.uniform(3.0, 4.0)]
        affine, shape = subject_grid(head, rotation, shift, spacing)
        image = resample(contrast_image(head, modality, lesions, img_rng), head.affine, affine, shape, 1)
        head_m = resample(head.head.astype(np.float32), head.affine, affine, shape, 0) > 0.5
        brain_m = resample(head.brain.astype(np.float32), head.affine, affine, shape, 0) > 0.5
        face_m = resample(head.face.astype(np.float32), head.affine, affine, shape, 0) > 0.5
        strength = img_rng.uniform(0.15, 0.45)
        image = image * bias_field(shape, img_rng, strength)
        sigma = img_rng.uniform(0.01, 0.04) * float(image.max())
        image = rician(image, sigma, img_rng)
        if spec.anonymisation == "defaced":
            anon = face_m
            image[anon] = 0.0
        elif spec.anonymisation == "skull_stripped":
            keep = ndimage.binary_dilation(brain_m, iterations=1)
            anon = head_m & ~keep
            image[~keep] = 0.0
        elif spec.anonymisation == "face_blurred" and modality == "T1w":
            anon = face_m
            blurred = ndimage.gaussian_filter(image, 4.0)
            image = np.where(anon, blurred, image)
        else:
            anon = np.zeros(shape, bool)
        anat = (head_m & ~anon) if spec.anonymisation != "skull_stripped" else ndimage.binary_dilation(brain_m, iterations=1)
        image, affine_out = flip_axes(image, affine, flips)
        folder, name = self._stem(s, ses, modality)
        rel = f"{folder}/anat/{name}.nii.gz"
        save_nifti(image, affine_out, self.root / spec.id / rel, scale=1000.0 / max(float(np.percentile(image, 99.5)), 1e-6))
        side = self._sidecar(spec, modality, img_rng)
        if side is not None:
            atomic.write_json(self.root / spec.id / f"{folder}/anat/{name}.json", side)
        gt = self.root / "ground_truth" / spec.id / folder
        masks = {}
        for kind, mask in (("anon", anon), ("anat", anat), ("brain", brain_m)):
            data, aff = flip_axes(mask.astype(np.uint8), affine, flips)
            save_nifti(data, aff, gt / f"{name}_mask-{kind}.nii.gz", dtype=np.uint8)
            masks[kind] = f"ground_truth/{spec.id}/{folder}/{name}_mask-{kind}.nii.gz"
        self.truth["images"][f"{spec.id}/{rel}"] = {
            "modality": modality, "spacing": [round(float(v), 4) for v in spacing], "shape": list(shape),
            "flipped_axes": list(flips), "bias_strength": round(float(strength), 4),
            "noise_sigma": round(float(sigma), 6), "anonymisation": spec.anonymisation if anon.any() else "none",
            "anon_fraction": round(float(anon.mean()), 5), "masks": masks,
        }

    def write_dwi(self, spec, s, ses, rotation, shift, lesions, rng, head: Head, tensors: dict | None) -> None:
        folder, name = self._stem(s, ses, "dwi")
        out = self.root / spec.id / folder / "dwi"
        out.mkdir(parents=True, exist_ok=True)
        if s.dwi == "synthetic":
            from dipy.data import get_fnames

            fbval, fbvec = get_fnames(name="55dir_grad")
            bvals, bvecs = np.loadtxt(fbval), np.loadtxt(fbvec)
            pick = np.r_[0:17]  # b0 + 16 directions keep the demo fast; a real table all the same
            bvals, bvecs = bvals[pick], bvecs[:, pick]
            affine, shape = subject_grid(head, rotation, shift, [3.0, 3.0, 3.0])
            dwi_rng = np.random.default_rng([self.seed, self.key(spec.id), int(s.id), 7])
            # tensor model evaluated on the (coarse) DWI grid, not the template's
            fields = {k: resample(v, head.affine, affine, shape, 1) for k, v in tensors.items()}
            s0 = resample(contrast_image(head, "T2w", lesions, dwi_rng), head.affine, affine, shape, 1)
            data = dwi_signal(s0, fields, bvals, bvecs)
            data = rician(data, 0.02 * float(data[..., 0].max()), dwi_rng)
            save_nifti(data, affine, out / f"{name}.nii.gz", scale=1000.0 / max(float(data.max()), 1e-6))
            origin = "synthetic tensor model on the MNI152 tissue maps, dipy 55dir_grad table"
        else:
            from dipy.data import get_fnames

            fimg, fbval, fbvec = get_fnames(name=s.dwi)
            src = nib.load(str(fimg))
            data, affine = np.asarray(src.dataobj), src.affine
            bvals, bvecs = np.loadtxt(fbval), np.loadtxt(fbvec)
            if bvecs.shape[0] != 3:
                bvecs = bvecs.T  # dipy ships some tables as N x 3; BIDS wants 3 rows
            save_nifti(data.astype(np.float32), affine, out / f"{name}.nii.gz", dtype=np.int16)
            origin = f"real DWI from dipy '{s.dwi}' (its table kept as shipped, NaN rows included)"
        if spec.id == "ds990003" and s.dwi == "synthetic":
            # gradient table kept once at the dataset root and inherited (BIDS inheritance), as
            # many OpenNeuro datasets do; no other scan of ds990003 shares this table
            table_dir, table_stem, table_kind = self.root / spec.id, "dwi", "inherited from dataset-level dwi.bval/dwi.bvec"
        else:
            table_dir, table_stem, table_kind = out, name, "beside the scan"
        np.savetxt(table_dir / f"{table_stem}.bval", bvals[None, :], fmt="%g")
        np.savetxt(table_dir / f"{table_stem}.bvec", bvecs, fmt="%.6f")
        side = dict(spec.sidecar, EchoTime=0.089 if spec.sidecar_mode != "partial" else 89, RepetitionTime=7.5)
        atomic.write_json(out / f"{name}.json", side)
        self.truth["images"][f"{spec.id}/{folder}/dwi/{name}.nii.gz"] = {
            "modality": "DWI", "origin": origin, "n_volumes": int(len(bvals)),
            "nan_in_bvec": bool(np.isnan(bvecs).any()), "gradient_table": table_kind,
            # the DWI stage derives these maps from the scan (a tensor needs >= 6 directions)
            "derived_maps": ["T2w", "ADC", "FA"],
        }

    def plant(self) -> None:
        """The near-duplicates of PLANTED_DUPLICATES, with their masks and sidecars, in the ground truth."""
        planted = []
        for kind, rel, acq in PLANTED_DUPLICATES:
            copy = _copy_name(rel, acq)
            src = nib.load(str(self.root / rel))
            data = np.asarray(src.dataobj)
            rng = np.random.default_rng([self.seed, self.key(copy)])
            new, affine = _transform(kind, data, src.affine, rng)
            _save_copy(new, affine, self.root / copy, level=9 if kind == "gzip_level" else 1)
            sidecar = self.root / rel.replace(".nii.gz", ".json")
            if sidecar.is_file():
                atomic.copy_file(sidecar, self.root / copy.replace(".nii.gz", ".json"))
            truth = json.loads(json.dumps(self.truth["images"][rel]))
            masks = {}
            for mask_kind, mask_rel in truth["masks"].items():
                mask = nib.load(str(self.root / mask_rel))
                m, maff = _transform(kind, np.asarray(mask.dataobj), mask.affine)
                masks[mask_kind] = _copy_name(mask_rel.replace(f"_mask-{mask_kind}", ""), acq).replace(
                    ".nii.gz", f"_mask-{mask_kind}.nii.gz")
                save_nifti(m, maff, self.root / masks[mask_kind], dtype=np.uint8)
            spacing = truth["spacing"]
            truth.update(shape=list(new.shape), masks=masks,
                         spacing=[spacing[2], spacing[0], spacing[1]] if kind == "axis_order" else spacing,
                         planted={"kind": kind, "duplicate_of": rel})
            self.truth["images"][copy] = truth
            planted.append({"kind": kind, "original": rel, "copy": copy})
        self.truth["planted_duplicates"] = planted

    def plant_leak(self, leak: dict) -> None:
        """The downstream test case `leak` in the mirror (save_leak_copy), in the ground truth."""
        rel = save_leak_copy(leak, self.root)
        self.truth["planted_leak"] = {**leak, "image": str(leak["image"]), "copy": rel}

    def inject(self) -> None:
        """Broken files, as OpenNeuro sometimes has them, each with the rejection it must cause."""
        faults = []
        # 1. truncated gzip: header readable, voxel data not
        t2 = self.root / "ds990001/sub-05/ses-01/anat/sub-05_ses-01_T2w.nii.gz"
        raw = t2.read_bytes()
        t2.write_bytes(raw[: max(len(raw) // 3, 400)])
        faults.append({"path": "ds990001/sub-05/ses-01/anat/sub-05_ses-01_T2w.nii.gz", "reason": "unreadable voxel data"})
        # 2. DWI whose bvec never made it
        (self.root / "ds990001/sub-05/ses-01/dwi/sub-05_ses-01_dwi.bvec").unlink()
        faults.append({"path": "ds990001/sub-05/ses-01/dwi/sub-05_ses-01_dwi.nii.gz", "reason": "DWI without .bval/.bvec"})
        # 3. malformed sidecar JSON (the image itself stays indexed)
        bad = self.root / "ds990002/sub-04/anat/sub-04_FLAIR.json"
        bad.write_text('{"EchoTime": 0.1,, }\n')
        faults.append({"path": "ds990002/sub-04/anat/sub-04_FLAIR.json", "reason": "malformed JSON"})
        # 4. a file that does not follow BIDS naming
        src = self.root / "ds990003/sub-04/anat/sub-04_T1w.nii.gz"
        shutil.copyfile(src, src.with_name("sub-04_T1w_final.nii.gz"))
        faults.append({"path": "ds990003/sub-04/anat/sub-04_T1w_final.nii.gz", "reason": "does not follow BIDS"})
        for f in faults:
            self.truth["images"].pop(f["path"], None)
        self.truth["expected_rejections"] = faults
        # the validator must not see the broken files as the dataset's intent
        for ds in ("ds990001", "ds990002", "ds990003"):
            atomic.write_text(self.root / ds / ".bidsignore", "*_final.nii.gz\n")


def build_demo(root: str | Path, seed: int = 0, resolution: int = 2, inject_faults: bool = True,
               plant_duplicates: bool = True, leak: dict | None = None) -> dict:
    """Write the demo mirror under `root` (datasets + ground_truth/); returns the ground truth.

    `leak` (see `leak_source`): a downstream test case to plant in the pre-training pool."""
    log.info("building demo mirror in %s (seed %d)", root, seed)
    truth = DemoBuilder(root, seed=seed, resolution=resolution, inject_faults=inject_faults,
                        plant_duplicates=plant_duplicates, leak=leak).build()
    log.info("demo mirror: %d datasets, %d images", len(truth["datasets"]), len(truth["images"]))
    return truth

