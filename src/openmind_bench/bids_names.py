"""BIDS file names: entities, suffix, extension, and which suffixes are OpenMind modalities.

The grammar is `key-value` pairs joined by `_`, then `_suffix.ext`
(BIDS specification, "File name structure"); unknown keys are kept rather than dropped.
Its own module below `bids` and `sources`: the index and the release source both read names, and
neither package imports the other (import-linter contract in pyproject.toml).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_EXT = re.compile(r"(\.[A-Za-z0-9]+(?:\.gz)?)$")

# suffix -> modality name used in the index. Anatomical suffixes of BIDS (current and
# deprecated ones that OpenNeuro still holds) plus DWI and PET, which OpenMind also carries.
MODALITY_OF_SUFFIX = {
    "T1w": "T1w",
    "T2w": "T2w",
    "PDw": "PDw",
    "T2starw": "T2starw",
    "T2star": "T2starw",  # deprecated spelling
    "FLAIR": "FLAIR",
    "PD": "PDw",  # deprecated spelling
    "PDT2": "PDT2",
    "inplaneT1": "inplaneT1",
    "inplaneT2": "inplaneT2",
    "angio": "angio",
    "T1map": "T1map",
    "T2map": "T2map",
    "T2starmap": "T2starmap",
    "R1map": "R1map",
    "R2map": "R2map",
    "R2starmap": "R2starmap",
    "PDmap": "PDmap",
    "MTRmap": "MTRmap",
    "MTsat": "MTsat",
    "UNIT1": "UNIT1",
    "T1rho": "T1rho",
    "MP2RAGE": "MP2RAGE",
    "MPM": "MPM",
    "MESE": "MESE",
    "MEGRE": "MEGRE",
    "VFA": "VFA",
    "IRT1": "IRT1",
    "MTS": "MTS",
    "MTR": "MTR",
    "FLASH": "FLASH",
    "SWI": "SWI",
    "minIP": "minIP",
    "UNIT1denoised": "UNIT1",
    # DWI-derived 3D maps, as the OpenMind release ships them (our DWI stage writes desc-* names)
    "FA": "FA",
    "MD": "MD",
    "ADC": "ADC",
    "TRACE": "TRACE",
    "dwi": "DWI",
    "pet": "PET",
}
NIFTI_EXTENSIONS = (".nii", ".nii.gz")


@dataclass
class BidsName:
    entities: dict[str, str] = field(default_factory=dict)
    suffix: str = ""
    extension: str = ""

    @property
    def subject(self) -> str:
        return self.entities.get("sub", "")

    @property
    def session(self) -> str:
        return self.entities.get("ses", "")


def parse_name(filename: str) -> BidsName | None:
    """Parse a BIDS file name; None if it does not follow the grammar."""
    name = filename.rsplit("/", 1)[-1]
    m = _EXT.search(name)
    if not m:
        return None
    ext = m.group(1)
    stem = name[: -len(ext)]
    parts = stem.split("_")
    if len(parts) < 2:
        return None
    entities: dict[str, str] = {}
    for part in parts[:-1]:
        key, sep, value = part.partition("-")
        if not sep or not key or not value or key in entities:
            return None
        entities[key] = value
    suffix = parts[-1]
    if "-" in suffix or not suffix:
        return None
    return BidsName(entities=entities, suffix=suffix, extension=ext)


def datatype_of(relpath: str) -> str:
    """The BIDS datatype folder (`anat`, `dwi`, ...) of a dataset-relative path."""
    parts = relpath.split("/")
    return parts[-2] if len(parts) >= 2 else ""
