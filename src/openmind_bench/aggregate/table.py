"""The benchmark table: per-dataset means, All/ID/OOD means, average rank, delta to scratch.

`build_table` returns one row per (method, architecture, schedule, metric), unrounded and in the
input's scale (fractions); `render_markdown` and `render_latex` show percentages with two decimals
and the best value of every column in bold, one table per metric, as the papers do.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from typing import Sequence

import numpy as np
import pandas as pd

from openmind_bench.aggregate.ranking import average_rank
from openmind_bench.aggregate.results import RUN_KEY, ResultsFormatError, dataset_values, present_metrics, run_label
from openmind_bench.names import METRIC_TASK, SCRATCH
from openmind_bench.registry import DatasetSpec, ordered_datasets

log = logging.getLogger(__name__)

STAT_COLUMNS = ["mean", "mean_id", "mean_ood", "avg_rank", "delta_scratch"]
METRIC_TITLES = {
    "DSC": "Dice similarity coefficient (DSC, %)",
    "NSD": "Normalised surface distance (NSD, %)",
    "balanced_accuracy": "Balanced accuracy (%)",
    "AUROC": "Area under the ROC curve (AUROC, %)",
}


def run_order(runs: pd.MultiIndex | list) -> list[tuple]:
    """Table order: by architecture, from-scratch first, then method and schedule."""
    return sorted(runs, key=lambda r: (r[1], r[0] != SCRATCH, r[0], r[2]))


def metric_matrix(values: pd.Series, metric: str, datasets: list[str]) -> pd.DataFrame:
    """Runs x datasets of one metric (NaN = missing), rows in table order."""
    wide = values.xs(metric, level="metric").unstack("dataset")
    wide = wide[[d for d in datasets if d in wide.columns]]
    return wide.loc[run_order(wide.index)]


def build_table(frame: pd.DataFrame, registry: dict[str, DatasetSpec]) -> pd.DataFrame:
    """The benchmark table from a validated results frame (see `results.validate`)."""
    values = dataset_values(frame)
    datasets = ordered_datasets(frame.dataset.unique(), registry)
    clash = sorted(set(datasets) & {*RUN_KEY, "metric", *STAT_COLUMNS})
    if clash:
        raise ResultsFormatError(f"dataset name(s) {clash} clash with benchmark table column names")

    blocks = []
    for metric in present_metrics(frame):
        wide = metric_matrix(values, metric, datasets)
        _warn_missing(metric, wide)
        _warn_task(metric, list(wide.columns), registry)
        block = wide.copy()
        block["mean"] = wide.mean(axis=1)
        domains = _domain_columns(metric, list(wide.columns), registry)
        for domain in ("id", "ood"):
            block[f"mean_{domain}"] = wide[domains[domain]].mean(axis=1) if domains else np.nan
        block["avg_rank"] = average_rank(wide.to_numpy())
        block["delta_scratch"] = _delta_scratch(metric, block["mean"])
        block.insert(0, "metric", metric)
        blocks.append(block.reset_index())
    table = pd.concat(blocks, ignore_index=True)
    return table.reindex(columns=[*RUN_KEY, "metric", *datasets, *STAT_COLUMNS])


def _warn_missing(metric: str, wide: pd.DataFrame) -> None:
    gaps = []
    for run, row in wide.iterrows():
        absent = [str(d) for d, v in row.items() if pd.isna(v)]
        if absent:
            gaps.append(f"{run_label(run)} on {', '.join(absent)}")
    if gaps:
        log.warning(
            "%s: missing results, shown as missing and left out of their row's mean and rank: %s",
            metric,
            "; ".join(gaps),
        )


def _warn_task(metric: str, datasets: list[str], registry: dict[str, DatasetSpec]) -> None:
    wrong = [d for d in datasets if d in registry and registry[d].task not in (None, METRIC_TASK[metric])]
    if wrong:
        log.warning("%s is a %s metric but the registry lists %s as another task", metric, METRIC_TASK[metric], wrong)


def _domain_columns(metric: str, datasets: list[str], registry: dict[str, DatasetSpec]) -> dict | None:
    """ID and OOD datasets of this metric, or None when any dataset's domain is unknown."""
    if not registry:
        return None
    unknown = [d for d in datasets if d not in registry or registry[d].domain is None]
    if unknown:
        log.warning("%s: no domain in the registry for %s, so mean_id and mean_ood stay empty", metric, unknown)
        return None
    return {dom: [d for d in datasets if registry[d].domain == dom] for dom in ("id", "ood")}


def _delta_scratch(metric: str, means: pd.Series) -> pd.Series:
    """mean minus the mean of the from-scratch row of the same architecture (and metric).

    With several scratch rows for one architecture, the one with the same schedule label is used;
    without such a row the delta stays empty. Scratch rows are the reference and stay empty.
    """
    delta = pd.Series(np.nan, index=means.index)
    scratch = [r for r in means.index if r[0] == SCRATCH]
    ambiguous = set()
    for run in means.index:
        if run[0] == SCRATCH:
            continue
        refs = [r for r in scratch if r[1] == run[1]]
        if len(refs) > 1:
            refs = [r for r in refs if r[2] == run[2]] or refs
        if len(refs) == 1:
            delta[run] = means[run] - means[refs[0]]
        elif len(refs) > 1:
            ambiguous.add(run[1])
    if ambiguous:
        log.warning(
            "%s: several from-scratch rows for architecture(s) %s and none with the row's schedule: "
            "delta_scratch left empty there",
            metric,
            sorted(ambiguous),
        )
    return delta


# ---------------------------------------------------------------------------------------------
# Rendering


@dataclass
class _Column:
    key: str
    header: str
    kind: str  # text | value | rank | delta


@dataclass
class _Block:
    metric: str
    columns: list[_Column]
    rows: pd.DataFrame
    cells: list[list[str]]  # formatted text, one list per row
    bold: list[list[bool]]


def _format(value, kind: str) -> str:
    if kind == "text":
        return str(value)
    if pd.isna(value):
        return ""
    if kind == "rank":
        return f"{value:.2f}"
    if kind == "delta":
        return f"{100 * value:+.2f}"
    return f"{100 * value:.2f}"


def _blocks(table: pd.DataFrame) -> list[_Block]:
    blocks = []
    dataset_cols = [c for c in table.columns if c not in {*RUN_KEY, "metric", *STAT_COLUMNS}]
    for metric in [m for m in METRIC_TITLES if (table.metric == m).any()]:
        rows = table[table.metric == metric].reset_index(drop=True)
        columns = [_Column("method", "Method", "text"), _Column("architecture", "Architecture", "text"),
                   _Column("schedule", "Schedule", "text")]
        columns += [_Column(d, d, "value") for d in dataset_cols if rows[d].notna().any()]
        columns.append(_Column("mean", "Mean", "value"))
        columns += [_Column(c, h, "value") for c, h in (("mean_id", "ID mean"), ("mean_ood", "OOD mean"))
                    if rows[c].notna().any()]
        columns.append(_Column("avg_rank", "Avg. rank", "rank"))
        if rows["delta_scratch"].notna().any():
            columns.append(_Column("delta_scratch", "Δ scratch", "delta"))

        cells = [[_format(row[c.key], c.kind) for c in columns] for _, row in rows.iterrows()]
        bold = [[False] * len(columns) for _ in range(len(rows))]
        for j, col in enumerate(columns):
            if col.kind == "text" or rows[col.key].isna().all():
                continue
            best = rows[col.key].min() if col.kind == "rank" else rows[col.key].max()
            # Bold every cell that reads the same as the best at two decimals.
            shown_best = _format(best, col.kind)
            for i in range(len(rows)):
                bold[i][j] = cells[i][j] == shown_best
        blocks.append(_Block(metric, columns, rows, cells, bold))
    return blocks


def _md_escape(text: str) -> str:
    # Intra-word underscores are literal in CommonMark, so names like resenc_l stay readable.
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("*", "\\*")


def leakage_note(counts: dict[str, int] | None) -> str | None:
    """The footnote on pre-training images left out as copies of downstream test cases (None when
    leakage was not checked: no results/curation/leakage.tsv)."""
    if counts is None:
        return None
    found = ", ".join(f"{d}: {n}" for d, n in sorted(counts.items()) if n)
    return ("Leakage by content: pre-training images within the leakage distance of a downstream test case "
            "were excluded from every selection (results/curation/leakage.tsv); "
            + (f"images excluded per downstream set: {found}." if found else "none was found."))


def render_markdown(table: pd.DataFrame, notes: Sequence[str] = ()) -> str:
    out = [
        "# Benchmark table",
        "",
        "Mean over cases, then folds, per dataset, in percent. **Bold**: best per column "
        "(ties at two decimals all bold). Avg. rank: mean over datasets of the rank within each "
        "dataset (1 = best, ties share the mean rank; lower is better). Δ scratch: Mean minus the "
        "from-scratch Mean of the same architecture, in percentage points. –: missing.",
    ]
    for block in _blocks(table):
        out += ["", f"## {METRIC_TITLES[block.metric]}", ""]
        out.append("| " + " | ".join(_md_escape(c.header) for c in block.columns) + " |")
        out.append("|" + "|".join(":---" if c.kind == "text" else "---:" for c in block.columns) + "|")
        for cells, bold in zip(block.cells, block.bold):
            shown = []
            for text, b in zip(cells, bold):
                text = _md_escape(text) if text else "–"
                shown.append(f"**{text}**" if b else text)
            out.append("| " + " | ".join(shown) + " |")
    for k, note in enumerate(notes, 1):
        out += ["", f"[{k}] {_md_escape(note)}"]
    return "\n".join(out) + "\n"


_TEX_ESCAPES = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
}


def tex_escape(text: str) -> str:
    return "".join(_TEX_ESCAPES.get(ch, ch) for ch in str(text))


def _tex_cell(text: str, kind: str, bold: bool) -> str:
    if not text:
        return "--"
    if kind == "text":
        text = tex_escape(text)
    elif text.startswith("-"):
        text = "$-$" + text[1:]  # a real minus sign, not a hyphen
    return rf"\textbf{{{text}}}" if bold else text


def render_latex(table: pd.DataFrame, notes: Sequence[str] = ()) -> str:
    """One booktabs `table` per metric; needs \\usepackage{booktabs} in the preamble."""
    out = ["% Benchmark table, generated by `openmind-bench aggregate`. Needs \\usepackage{booktabs}."]
    for block in _blocks(table):
        spec = "".join("l" if c.kind == "text" else "r" for c in block.columns)
        headers = [r"$\Delta$ scratch" if c.kind == "delta" else tex_escape(c.header) for c in block.columns]
        title = tex_escape(METRIC_TITLES[block.metric])
        out += [
            "",
            r"\begin{table}[t]",
            r"\centering",
            r"\scriptsize",
            rf"\caption{{{title} per dataset: mean over cases, then folds. Best value per column in "
            r"bold; Avg.\ rank: lower is better; $\Delta$ scratch: percentage points to the "
            r"from-scratch row of the same architecture; --: missing.}",
            rf"\label{{tab:benchmark-{block.metric.lower().replace('_', '-')}}}",
            rf"\begin{{tabular}}{{{spec}}}",
            r"\toprule",
            " & ".join(headers) + r" \\",
            r"\midrule",
        ]
        previous_arch = None
        for i, (cells, bold) in enumerate(zip(block.cells, block.bold)):
            arch = block.rows.architecture.iloc[i]
            if previous_arch is not None and arch != previous_arch:
                out.append(r"\midrule")
            previous_arch = arch
            row = [_tex_cell(t, c.kind, b) for t, c, b in zip(cells, block.columns, bold)]
            out.append(" & ".join(row) + r" \\")
        out += [r"\bottomrule", r"\end{tabular}"]
        out += [rf"\par\smallskip{{\footnotesize {tex_escape(note)}}}" for note in notes]
        out.append(r"\end{table}")
    return "\n".join(out) + "\n"
