"""Text cells a spreadsheet would run as formulas, made plain text (OWASP, "CSV Injection").

Excel, LibreOffice and Google Sheets run a cell that starts with `=`, `+`, `-` or `@` as a formula, and a
leading tab or carriage return can hide one; values from participants.tsv, sidecars or case ids reach
our CSV/TSV files verbatim. Such text cells get a leading `'`, which spreadsheets show as text.

Only for the CSV/TSV files people open (results/benchmark/*.csv, results_long.csv, the selections'
images.tsv, results/qc/rejected.tsv, a run's metrics.csv); parquet and JSON keep the true values.
Numbers, and text that reads as a number (`-0.5`, `+3`, `-inf`), stay as they are: a spreadsheet
takes them as numbers, never as formulas. Applying it twice changes nothing.
"""

from __future__ import annotations

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _reads_as_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def neutralise_cell(value):
    """`value` with a `'` in front if it is text a spreadsheet would take for a formula; otherwise unchanged."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS) and not _reads_as_number(value):
        return "'" + value
    return value


def neutralise_frame(frame):
    """A copy of the pandas `frame` with every formula-like text cell (and column name) neutralised."""
    from pandas.api.types import is_object_dtype, is_string_dtype

    out = frame.rename(columns=neutralise_cell)
    for column in out.columns:
        if is_object_dtype(out[column]) or is_string_dtype(out[column]):  # text columns, whatever pandas calls them
            out[column] = out[column].map(neutralise_cell, na_action="ignore")
    return out
