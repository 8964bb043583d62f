"""One schema for metadata that every OpenNeuro dataset codes its own way.

Participants: age in years, sex F/M/O/unknown, handedness R/L/A/unknown, health status
healthy/patient/unknown (+ the raw diagnosis). Acquisition: manufacturer, model, field strength
(T), TR and TE (s), phase encoding direction. Codes are resolved with the dataset's own
`participants.json` (BIDS `Levels` and `Units`) before any name-based rule.
"""

from __future__ import annotations

import math
import re

import pandas as pd

AGE_COLUMNS = ("age", "age_years", "ageyears", "age_at_scan", "age_at_scan_years", "age_months",
               "agemonths", "age_in_months", "age_weeks", "age_days", "age_yrs", "age (years)")
SEX_COLUMNS = ("sex", "gender", "biological_sex", "sex_assigned_at_birth")
HAND_COLUMNS = ("handedness", "hand", "handed", "dominant_hand", "handedness_score", "ehi", "edinburgh")
HEALTH_COLUMNS = ("group", "diagnosis", "dx", "health_status", "condition", "clinical_status",
                  "status", "patient", "participant_type", "disease")

_UNIT_DIVISOR = {"years": 1.0, "months": 12.0, "weeks": 52.1775, "days": 365.25}
_SEX = {
    "m": "M", "male": "M", "man": "M", "boy": "M",
    "f": "F", "female": "F", "woman": "F", "girl": "F",
    "o": "O", "other": "O", "non-binary": "O", "nonbinary": "O", "nb": "O", "x": "O",
}
_HAND = {
    "r": "R", "right": "R", "rh": "R", "right-handed": "R", "righthanded": "R",
    "l": "L", "left": "L", "lh": "L", "left-handed": "L", "lefthanded": "L",
    "a": "A", "ambidextrous": "A", "ambi": "A", "both": "A", "mixed": "A", "b": "A",
}
_HEALTHY = {"control", "controls", "hc", "healthy", "healthy control", "healthy_control", "ctrl",
            "nc", "normal", "typical", "td", "typically developing", "con", "cn", "healthy volunteer"}
_NA = {"", "n/a", "na", "nan", "none", "unknown", "?", "-", "missing", "not available", "null"}


def _norm(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value).strip()


def find_column(columns, candidates) -> str | None:
    lower = {c.lower().strip(): c for c in columns}
    for cand in candidates:
        if cand in lower:
            return lower[cand]
    return None


def age_unit(column: str, column_info: dict | None) -> str:
    """Unit of an age column: `Units` from participants.json first, then the column name."""
    units = _norm((column_info or {}).get("Units")).lower()
    for unit in ("month", "week", "day", "year"):
        if units.startswith(unit) or units in {"mo", "mos", "wk", "d", "y", "yr", "yrs"}:
            if units in {"mo", "mos"}:
                return "months"
            if units == "wk":
                return "weeks"
            if units == "d":
                return "days"
            if units in {"y", "yr", "yrs"}:
                return "years"
            return unit + "s"
    name = column.lower()
    for unit in ("month", "week", "day"):
        if unit in name:
            return unit + "s"
    return "years"


def harmonise_age(value, unit: str = "years") -> float:
    """Age in years; NaN if not given. Accepts numbers, '89+', '20-25' (mid-point), '25y', '300m'."""
    text = _norm(value).lower().replace(",", ".")
    if text in _NA:
        return math.nan
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(y|yr|yrs|years?|m|mo|mos|months?|w|wk|weeks?|d|days?)?\s*\+?", text)
    if m:
        number = float(m.group(1))
        suffix = m.group(2)
        if suffix:
            unit = {"y": "years", "m": "months", "w": "weeks", "d": "days"}[suffix[0]]
        return round(number / _UNIT_DIVISOR[unit], 3)
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(?:-|to)\s*(\d+(?:\.\d+)?)", text)
    if m:
        return round((float(m.group(1)) + float(m.group(2))) / 2 / _UNIT_DIVISOR[unit], 3)
    return math.nan


def _decoded(value, levels: dict | None) -> str:
    """The value as text, through the dataset's own `Levels` coding where it has one."""
    text = _norm(value)
    return _norm(levels[text]) if levels and text in levels else text


def harmonise_sex(value, levels: dict | None = None) -> str:
    key = _decoded(value, levels).lower()
    if key in _SEX:
        return _SEX[key]
    # a bare number without Levels is ambiguous across datasets (1 = male or female?)
    return "unknown"


def harmonise_handedness(value, levels: dict | None = None) -> str:
    key = _decoded(value, levels).lower()
    if key in _HAND:
        return _HAND[key]
    try:
        score = float(key)  # Edinburgh laterality quotient, -100..100
    except ValueError:
        return "unknown"
    if -100 <= score <= 100 and key not in {"0", "1", "2"}:
        return "R" if score > 40 else "L" if score < -40 else "A"
    return "unknown"


def harmonise_health(value, levels: dict | None = None) -> tuple[str, str]:
    """(healthy|patient|unknown, raw diagnosis text)."""
    text = _decoded(value, levels)
    key = text.lower().replace("-", " ").strip()
    if key in _NA:
        return "unknown", ""
    if key in _HEALTHY or key.replace("_", " ") in _HEALTHY:
        return "healthy", text
    return "patient", text


def _row_lines(tsv_text: str) -> list[int]:
    """1-based file line of each data row as pandas reads them (blank lines skipped)."""
    lines = [n for n, line in enumerate(tsv_text.splitlines(), 1) if line.strip(" \r")]
    return lines[1:]


def participants_table(tsv_text: str | None, json_info: dict | None,
                       problems: list[str] | None = None) -> dict[str, dict]:
    """participant_id (without `sub-`) -> harmonised fields, from participants.tsv/.json.

    What is wrong but not fatal is appended to `problems` (one line each) when given: an empty
    file or one without rows, and a participant listed twice (the first row is kept).
    """
    problems = [] if problems is None else problems
    if not tsv_text or not tsv_text.strip():
        problems.append("participants.tsv is empty: no participant metadata for this dataset")
        return {}
    from io import StringIO

    table = pd.read_csv(StringIO(tsv_text), sep="\t", dtype=str, keep_default_na=False)
    info = json_info or {}
    if "participant_id" not in table.columns:
        raise ValueError("participants.tsv has no participant_id column")
    if table.empty:
        problems.append("participants.tsv has a header but no participant rows")
        return {}
    age_col = find_column(table.columns, AGE_COLUMNS)
    sex_col = find_column(table.columns, SEX_COLUMNS)
    hand_col = find_column(table.columns, HAND_COLUMNS)
    health_col = find_column(table.columns, HEALTH_COLUMNS)

    def levels(col):
        entry = info.get(col) if col else None
        return entry.get("Levels") if isinstance(entry, dict) else None

    unit = age_unit(age_col, info.get(age_col)) if age_col else "years"
    line_of = _row_lines(tsv_text)
    if len(line_of) != len(table):  # quoting or odd blank lines: fall back to row numbers
        line_of = [i + 2 for i in range(len(table))]
    out, first_line = {}, {}
    for i, (_, row) in enumerate(table.iterrows()):
        pid = _norm(row["participant_id"]).removeprefix("sub-")
        if pid in out:
            problems.append(f"participant sub-{pid} listed again on line {line_of[i]} (first on line "
                            f"{first_line[pid]}): the first row is kept, line {line_of[i]} ignored")
            continue
        first_line[pid] = line_of[i]
        health, diagnosis = harmonise_health(row[health_col], levels(health_col)) if health_col else ("unknown", "")
        out[pid] = {
            "age": harmonise_age(row[age_col], unit) if age_col else math.nan,
            "sex": harmonise_sex(row[sex_col], levels(sex_col)) if sex_col else "unknown",
            "handedness": harmonise_handedness(row[hand_col], levels(hand_col)) if hand_col else "unknown",
            "health_status": health,
            "diagnosis": diagnosis,
        }
    return out


def session_ages(tsv_text: str, json_info: dict | None) -> dict[str, float]:
    """session_id (without `ses-`) -> age in years, from a `sub-X_sessions.tsv`."""
    from io import StringIO

    table = pd.read_csv(StringIO(tsv_text), sep="\t", dtype=str, keep_default_na=False)
    age_col = find_column(table.columns, AGE_COLUMNS)
    if "session_id" not in table.columns or not age_col:
        return {}
    unit = age_unit(age_col, (json_info or {}).get(age_col))
    return {
        _norm(r["session_id"]).removeprefix("ses-"): harmonise_age(r[age_col], unit)
        for _, r in table.iterrows()
    }


_MANUFACTURERS = [
    ("siemens", "Siemens"), ("ge ", "GE"), ("ge", "GE"), ("general electric", "GE"),
    ("philips", "Philips"), ("toshiba", "Canon"), ("canon", "Canon"), ("hitachi", "Hitachi"),
    ("bruker", "Bruker"), ("united imaging", "United Imaging"), ("uih", "United Imaging"),
]


def harmonise_manufacturer(value) -> str:
    text = _norm(value)
    key = text.lower()
    if not key or key in _NA:
        return "unknown"
    for prefix, name in _MANUFACTURERS:
        if key == prefix.strip() or key.startswith(prefix):
            return name
    return text


def _number(value) -> float:
    text = _norm(value).lower().replace(",", ".")
    m = re.match(r"^(-?\d+(?:\.\d+)?)", text)
    return float(m.group(1)) if m else math.nan


def harmonise_field_strength(value) -> float:
    """Tesla. Some sidecars give mT or Gauss-like values (e.g. 3000)."""
    number = _number(value)
    if math.isnan(number) or number <= 0:
        return math.nan
    return number / 1000 if number > 20 else number


def seconds(value, ms_above: float) -> float:
    """BIDS wants seconds; values above `ms_above` are read as milliseconds (a common mistake).

    Thresholds sit far above the physical range in seconds: TR < 30 s, TE < 1 s, TI < 10 s.
    """
    number = _number(value)
    if math.isnan(number) or number < 0:
        return math.nan
    return number / 1000 if number > ms_above else number


def acquisition_fields(sidecar: dict) -> dict:
    return {
        "manufacturer": harmonise_manufacturer(sidecar.get("Manufacturer")),
        "model": _norm(sidecar.get("ManufacturersModelName")) or "unknown",
        "field_strength": harmonise_field_strength(sidecar.get("MagneticFieldStrength")),
        "repetition_time": seconds(sidecar.get("RepetitionTime"), ms_above=30),
        "echo_time": seconds(sidecar.get("EchoTime"), ms_above=1),
        "inversion_time": seconds(sidecar.get("InversionTime"), ms_above=10),
        "flip_angle": _number(sidecar.get("FlipAngle")),
        "phase_encoding_direction": _norm(sidecar.get("PhaseEncodingDirection")) or "unknown",
    }
