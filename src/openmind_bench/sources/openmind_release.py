"""`openmind_release` source: the OpenMind release (Hugging Face `AnonRes/OpenMind`) already on disk.

Users who downloaded the release can skip re-deriving 114k images: this source turns one
dataset of it into a raw tree the index reads like any other, with the release's masks and
image quality scores carried along.

The release layout (from the dataset repository and nnssl's `Dataset001_OpenMind.py`):

    RELEASE_ROOT/openneuro_metadata.csv           one row per image
    RELEASE_ROOT/OpenMind/dsNNNNNN/sub-*/[ses-*/]anat/<name>.nii[.gz]
    RELEASE_ROOT/OpenMind/dsNNNNNN/.../<name>__Data/deface_mask.nii.gz   (anonymisation mask)
    RELEASE_ROOT/OpenMind/dsNNNNNN/.../<name>__Data/fb_mask.nii.gz       (anatomy, fore/background)
    DWI-derived maps: .../dwi/<dwi name>__Data/<MAP>.nii.gz (e.g. FA.nii.gz), `derived_from` set

The CSV's `image_path`, `anat_mask_path` and `anon_mask_path` are relative to `OpenMind/` and
start with the dataset id; `modality`, `image_quality_score` (1 best .. 5 worst), `unique_id`,
`derived_from`, subject fields (age, sex, handedness, race, weight, bmi, health_status) and
acquisition fields (manufacturer, model_name, magnetic_field_strength, repetition_time,
echo_time, phase_encoding_direction) come with each row.

What the raw tree gets (`data/raw/openmind_release/dsNNNNNN/`):
- every selected image, under its release path when that is a BIDS name; DWI-derived maps and
  non-BIDS names get a BIDS name built from the owner's entities with the CSV modality as suffix
  (`dwi/sub-1_run-3_dwi__Data/FA.nii.gz` -> `dwi/sub-1_run-3_FA.nii.gz`);
- its masks beside it as `<entities>_mod-<suffix>_label-anatomy_mask.nii.gz` and
  `..._label-anonymization_mask.nii.gz` (the `mask` suffix keeps them out of the image index);
- `openmind_release.tsv`: raw path, anat_mask, anon_mask, quality_score, modality, derived_from,
  unique_id and the release's own paths, which the index joins onto its rows;
- the release carries no dataset-level BIDS files, so `dataset_description.json` is synthesised
  (naming the release as its source; no OpenNeuro version is claimed, so the snapshot stays
  unchecked), `participants.tsv`/`.json` and per-subject `sessions.tsv` are written from the
  CSV's subject fields, and a JSON sidecar per image from its acquisition fields. Dataset files
  the release does hold (dataset_description.json, participants.tsv, ...) are copied instead.

Images and masks are copied (or hard-linked, `link: hardlink`), each through a temporary name;
an unchanged file from an earlier run is not copied again. Symlinks in the release (the Hugging
Face cache keeps files as links into `blobs/`) are followed when they stay inside the release or
its cache repository folder.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import re
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from openmind_bench import __version__, atomic
from openmind_bench.bids_names import parse_name
from openmind_bench.download_manifest import FileRecord, Manifest
from openmind_bench.qc import Rejections
from openmind_bench.sources.base import SourceError, inside, md5_of, selected, unsafe_reason
from openmind_bench.sources.state import FetchState, remove_stale_temporaries

log = logging.getLogger(__name__)

METADATA_CSV = "openneuro_metadata.csv"
IMAGES_DIR = "OpenMind"
RELEASE_TABLE = "openmind_release.tsv"  # read by bids/index.py
DERIVED_DIR_SUFFIX = "__Data"
REQUIRED_COLUMNS = ("image_path", "modality")
RELEASE_URL = "https://huggingface.co/datasets/AnonRes/OpenMind"
# CSV column -> BIDS sidecar key
SIDECAR_FIELDS = {
    "manufacturer": "Manufacturer",
    "model_name": "ManufacturersModelName",
    "magnetic_field_strength": "MagneticFieldStrength",
    "repetition_time": "RepetitionTime",
    "echo_time": "EchoTime",
    "phase_encoding_direction": "PhaseEncodingDirection",
}
PARTICIPANT_FIELDS = {
    "age": {"Description": "age at the first scan (per-session ages in sub-*_sessions.tsv)", "Units": "years"},
    "sex": {"Description": "sex as given in openneuro_metadata.csv"},
    "handedness": {"Description": "handedness as given in openneuro_metadata.csv"},
    "health_status": {"Description": "health status as given in openneuro_metadata.csv"},
    "race": {"Description": "race as given in openneuro_metadata.csv"},
    "weight": {"Description": "weight as given in openneuro_metadata.csv"},
    "bmi": {"Description": "body mass index as given in openneuro_metadata.csv"},
}
MASK_COLUMNS = {"anat_mask_path": "anatomy", "anon_mask_path": "anonymization"}
_NIFTI_EXT = re.compile(r"(\.nii(?:\.gz)?)$")
_NA = {"", "nan", "none", "n/a", "na"}


def _value(row: dict, column: str) -> str:
    text = str(row.get(column, "") or "").strip()
    return "" if text.lower() in _NA else text


def _label(text: str) -> str:
    """A BIDS label/suffix: letters and digits only."""
    return re.sub(r"[^A-Za-z0-9]", "", text)


def raw_name(release_rel: str, modality: str) -> str | None:
    """Dataset-relative raw path for a release image (path relative to its dataset folder);
    None if no BIDS name can be built."""
    folder, _, filename = release_rel.rpartition("/")
    m = _NIFTI_EXT.search(filename)
    if not m:
        return None
    ext = m.group(1)
    derived = folder.endswith(DERIVED_DIR_SUFFIX)
    if not derived:
        parsed = parse_name(filename)
        if parsed is not None and parsed.subject:
            return release_rel  # already a BIDS name: keep the release path
    if derived:
        owner_dir, _, owner = folder.rpartition("/")
        owner_stem = owner[: -len(DERIVED_DIR_SUFFIX)]
        leftover = filename[: -len(ext)]
    else:
        owner_dir, owner_stem = folder, filename[: -len(ext)]
        leftover = "".join(t for t in owner_stem.split("_") if "-" not in t)
    entities = [t for t in owner_stem.split("_") if re.fullmatch(r"[A-Za-z0-9]+-[A-Za-z0-9]+", t)]
    suffix = _label(modality)
    label = _label(leftover)
    if not suffix or not entities:
        return None
    tokens = entities + ([f"desc-{label}"] if label and label != suffix else []) + [suffix]
    name = "_".join(tokens) + ext
    parsed = parse_name(name)
    if parsed is None or not parsed.subject:
        return None
    return f"{owner_dir}/{name}" if owner_dir else name


def mask_name(image_raw: str, kind: str, mask_filename: str) -> str | None:
    """`<entities>_mod-<suffix>_label-<kind>_mask.nii.gz` beside the image; None if impossible."""
    folder, _, filename = image_raw.rpartition("/")
    parsed = parse_name(filename)
    ext = _NIFTI_EXT.search(mask_filename)
    if parsed is None or ext is None or {"mod", "label"} & set(parsed.entities):
        return None
    tokens = [f"{k}-{v}" for k, v in parsed.entities.items()]
    name = "_".join(tokens + [f"mod-{parsed.suffix}", f"label-{kind}", "mask"]) + ext.group(1)
    return f"{folder}/{name}" if folder else name


def _allowed_roots(release_root: Path) -> list[Path]:
    """Where the release's files may really live: the release itself and, for a Hugging Face
    cache snapshot (`.../datasets--AnonRes--OpenMind/snapshots/<rev>`), its repository folder."""
    roots = [release_root]
    if release_root.parent.name == "snapshots":
        roots.append(release_root.parent.parent)
    return roots


def _copy_with_md5(src: Path, tmp: Path) -> str:
    h = hashlib.md5()
    with open(src, "rb") as fin, open(tmp, "wb") as fout:
        while block := fin.read(1 << 20):
            h.update(block)
            fout.write(block)
    st = src.stat()
    os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))  # same mtime: a re-run sees it unchanged
    return h.hexdigest()


class _Placer:
    """Copies or hard-links release files into the raw tree, skipping unchanged ones."""

    def __init__(self, dest: Path, link: str, state: FetchState):
        self.dest, self.link, self.state = dest, link, state
        self.copied = self.linked = self.reused = 0

    def place(self, src: Path, rel: str) -> FileRecord:
        target = self.dest / rel
        st = src.stat()
        identity = {"src_size": st.st_size, "src_mtime_ns": st.st_mtime_ns}
        known = self.state.trusted(rel, target, **identity)
        if known:
            self.reused += 1
            return FileRecord(path=rel, size=st.st_size, md5=known["md5"])
        if target.is_file() and not target.is_symlink():
            tst = target.stat()
            same_inode = (tst.st_ino, tst.st_dev) == (st.st_ino, st.st_dev)
            if same_inode or (tst.st_size == st.st_size and tst.st_mtime_ns == st.st_mtime_ns):
                md5 = md5_of(target)  # in place from a run that stopped before saving its state
                self.state.record(rel, target, md5=md5, **identity)
                self.reused += 1
                return FileRecord(path=rel, size=st.st_size, md5=md5)
        md5 = None
        if self.link == "hardlink":
            try:
                with atomic.atomic_path(target) as tmp:
                    os.link(src.resolve(), tmp)
                self.linked += 1
                md5 = md5_of(target)
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                    raise
                log.debug("%s: cannot hard-link (%s); copying", rel, e)
        if md5 is None:
            with atomic.atomic_path(target) as tmp:
                md5 = _copy_with_md5(src, tmp)
            self.copied += 1
        self.state.record(rel, target, md5=md5, **identity)
        return FileRecord(path=rel, size=st.st_size, md5=md5)

    def write(self, rel: str, data: bytes) -> FileRecord:
        """A file this source generates; rewritten only when its content changes."""
        target = self.dest / rel
        if not (target.is_file() and target.stat().st_size == len(data) and target.read_bytes() == data):
            with atomic.atomic_path(target) as tmp:
                tmp.write_bytes(data)
        return FileRecord(path=rel, size=len(data), md5=hashlib.md5(data).hexdigest())


def read_metadata(release_root: Path, dataset: str) -> pd.DataFrame:
    """The CSV rows of one dataset (all values as text)."""
    csv = release_root / METADATA_CSV
    if not csv.is_file():
        raise SourceError(f"{csv}: the release's metadata table is missing (release_root = {release_root})")
    try:
        table = pd.read_csv(csv, dtype=str, keep_default_na=False)
    except (ValueError, pd.errors.ParserError) as e:
        raise SourceError(f"{csv}: not a readable CSV ({e})") from e
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        raise SourceError(f"{csv}: missing column(s) {missing}")
    return table[table.image_path.str.startswith(f"{dataset}/")].reset_index(drop=True)


def _number(text: str):
    try:
        value = float(text)
    except ValueError:
        return text
    return int(value) if value.is_integer() and "." not in text else value


def _tsv(frame: pd.DataFrame) -> bytes:
    return frame.to_csv(sep="\t", index=False, lineterminator="\n").encode()


def _participant_files(rows: list[dict]) -> dict[str, bytes]:
    """participants.tsv/.json and sub-*_sessions.tsv from the CSV's subject fields."""
    columns = [c for c in PARTICIPANT_FIELDS if any(_value(r, c) for r in rows)]
    by_subject: dict[str, list[dict]] = {}
    for r in rows:
        by_subject.setdefault(r["_subject"], []).append(r)
    table, files = [], {}
    for subject in sorted(by_subject):
        images = by_subject[subject]
        entry = {"participant_id": f"sub-{subject}"}
        for c in columns:
            values = [_value(r, c) for r in images if _value(r, c)]
            if c == "age" and values:
                ages = [float(v) for v in values if _is_number(v)]
                entry[c] = f"{min(ages):g}" if ages else values[0]
            else:
                entry[c] = values[0] if values else "n/a"
        table.append(entry)
        session_ages = {}
        for r in images:
            age = _value(r, "age")
            if r["_session"] and _is_number(age):
                session_ages.setdefault(r["_session"], float(age))
        if session_ages and len(set(session_ages.values())) > 1:
            sessions = pd.DataFrame([{"session_id": f"ses-{s}", "age": f"{a:g}"} for s, a in sorted(session_ages.items())])
            files[f"sub-{subject}/sub-{subject}_sessions.tsv"] = _tsv(sessions)
            files[f"sub-{subject}/sub-{subject}_sessions.json"] = json.dumps(
                {"age": {"Description": "age at the session", "Units": "years"}}, indent=2).encode()
    files["participants.tsv"] = _tsv(pd.DataFrame(table, columns=["participant_id", *columns]))
    files["participants.json"] = json.dumps(
        {"participant_id": {"Description": "participant label"},
         **{c: PARTICIPANT_FIELDS[c] for c in columns}}, indent=2).encode()
    return files


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def _description(dataset: str) -> bytes:
    return json.dumps({
        "Name": f"{dataset} (from the OpenMind release)",
        "BIDSVersion": "1.9.0",
        "DatasetType": "raw",
        "GeneratedBy": [{
            "Name": "openmind-bench openmind_release source",
            "Version": __version__,
            "Description": ("Images, anonymisation and anatomy masks, quality scores and metadata "
                            "ingested from the OpenMind release. The release holds no "
                            "dataset_description.json, so the OpenNeuro snapshot it was built "
                            "from is not recorded here."),
        }],
        "SourceDatasets": [{"URL": f"https://openneuro.org/datasets/{dataset}"}, {"URL": RELEASE_URL}],
    }, indent=2).encode()


def _sidecar(row: dict) -> bytes | None:
    fields = {key: _number(_value(row, col)) for col, key in SIDECAR_FIELDS.items() if _value(row, col)}
    return json.dumps(fields, indent=2).encode() if fields else None


def fetch(dataset: str, snapshot: str, dest: Path, options: dict, rejections: Rejections) -> Manifest:
    release_root = Path(options.get("release_root", "data/OpenMind")).absolute()
    images_dir = release_root / IMAGES_DIR
    source_dir = images_dir / dataset
    rows = read_metadata(release_root, dataset)
    if not source_dir.is_dir():
        raise SourceError(f"{dataset}: {source_dir} does not exist"
                          + (f" ({len(rows)} images listed in {METADATA_CSV})" if len(rows) else ""))
    if rows.empty:
        raise SourceError(f"{dataset}: no rows in {release_root / METADATA_CSV}")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(dest)
    include, exclude = options.get("include", ["*"]), options.get("exclude", [])
    allowed = _allowed_roots(release_root)
    state = FetchState(dest, source=f"openmind_release:{release_root}")
    placer = _Placer(dest, options.get("link", "copy"), state)
    manifest = Manifest(dataset=dataset, source="openmind_release", snapshot=snapshot)
    records: dict[str, FileRecord] = {}

    def refuse(path: str, why: str) -> None:
        manifest.refused.append({"path": path, "reason": why})
        rejections.add(path, f"refused: {why}", dataset)

    def fail(path: str, why: str) -> None:
        manifest.failed.append({"path": path, "reason": why})
        rejections.add(path, f"fetch failed: {why}", dataset)

    def unsafe(release_path: str) -> bool:
        why = unsafe_reason(release_path)
        if why is None and not release_path.startswith(f"{dataset}/"):
            why = "path outside the dataset's folder"
        if why:
            refuse(release_path, why)
        return why is not None

    def readable(release_path: str) -> Path | None:
        """The file behind a CSV path (relative to OpenMind/), or None after recording why not."""
        if unsafe(release_path):
            return None
        src = images_dir / release_path
        if not any(inside(src, r) for r in allowed):
            refuse(release_path, "symlink leads outside the release")
            return None
        if not src.is_file():
            fail(release_path, f"listed in {METADATA_CSV} but missing under {IMAGES_DIR}/")
            return None
        return src

    release_rows, ingested = [], []
    for row in tqdm(rows.to_dict("records"), desc=f"{dataset} images", unit="image", disable=None):
        release_path = row["image_path"].strip()
        rel_in_dataset = release_path[len(dataset) + 1:]
        if unsafe(release_path):  # recorded even where the globs would not select it
            continue
        if not selected(rel_in_dataset, include, exclude):
            continue
        src = readable(release_path)
        if src is None:
            continue
        raw = raw_name(rel_in_dataset, _value(row, "modality"))
        if raw is None:
            fail(release_path, "no BIDS name can be built from the file name and modality")
            continue
        if raw in records:
            fail(release_path, f"maps onto {raw}, already taken by another image")
            continue
        try:
            records[raw] = placer.place(src, raw)
        except OSError as e:
            fail(release_path, f"{type(e).__name__}: {e}")
            continue
        masks = {}
        for column, kind in MASK_COLUMNS.items():
            mask_path = _value(row, column)
            mask_src = readable(mask_path) if mask_path else None
            mask_raw = mask_name(raw, kind, mask_path) if mask_src else None
            if mask_src and mask_raw is None:
                fail(mask_path, f"no mask name can be built for {raw}")
            if mask_src and mask_raw:
                try:
                    records[mask_raw] = placer.place(mask_src, mask_raw)
                    masks[column] = mask_raw
                except OSError as e:
                    fail(mask_path, f"{type(e).__name__}: {e}")
        sidecar = _sidecar(row)
        if sidecar:
            sidecar_rel = _NIFTI_EXT.sub(".json", raw)
            records[sidecar_rel] = placer.write(sidecar_rel, sidecar)
        name = parse_name(raw.rsplit("/", 1)[-1])
        ingested.append({**row, "_subject": name.subject, "_session": name.session})
        release_rows.append({
            "path": raw,
            "anat_mask": masks.get("anat_mask_path", ""),
            "anon_mask": masks.get("anon_mask_path", ""),
            "quality_score": _value(row, "image_quality_score"),
            "modality": _value(row, "modality"),
            "derived_from": _value(row, "derived_from"),
            "unique_id": _value(row, "unique_id"),
            "release_path": release_path,
            "release_anat_mask": _value(row, "anat_mask_path"),
            "release_anon_mask": _value(row, "anon_mask_path"),
        })

    # dataset-level files: the release's own where it has them, else written from the CSV
    generated = _participant_files(ingested) if ingested else {}
    generated["dataset_description.json"] = _description(dataset)
    for rel in list(generated):
        original = source_dir / rel
        if original.is_file() and any(inside(original, r) for r in allowed):
            records[rel] = placer.place(original, rel)
            del generated[rel]
    if "participants.tsv" in records and "participants.json" in generated:
        del generated["participants.json"]  # it describes our columns, not the release's table
    for rel, data in generated.items():
        records[rel] = placer.write(rel, data)
    columns = ["path", "anat_mask", "anon_mask", "quality_score", "modality", "derived_from", "unique_id",
               "release_path", "release_anat_mask", "release_anon_mask"]
    records[RELEASE_TABLE] = placer.write(RELEASE_TABLE, _tsv(pd.DataFrame(release_rows, columns=columns)))
    state.save()

    manifest.files = sorted(records.values(), key=lambda r: r.path)
    log.info(
        "%s: %d images (%d with an anatomy mask, %d with an anonymisation mask) from %s; "
        "files copied %d, linked %d, unchanged %d; %d failed, %d refused",
        dataset, len(release_rows), sum(1 for r in release_rows if r["anat_mask"]),
        sum(1 for r in release_rows if r["anon_mask"]), source_dir, placer.copied, placer.linked,
        placer.reused, len(manifest.failed), len(manifest.refused),
    )
    return manifest
