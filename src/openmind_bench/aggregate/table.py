"""The benchmark table: per-dataset means, All/ID/OOD means, average rank, delta to scratch.

`build_table` returns one row per (method, architecture, schedule, metric), unrounded and in the
input's scale (fractions); `render_markdown` and `render_latex` show percentages with two decimals
and the best value of every column in bold, one table per metric, as the papers do.

External checkpoints (`collect.Collected.external`, {method label: provenance}) are passed to each
of them: the table's `external` column says which rows are theirs, the renderings put a dagger after
their method and list their sources (name, source, revision and commit, sha256 prefix, format)
below the tables.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from openmind_bench.aggregate.ranking import average_rank
from openmind_bench.aggregate.results import RUN_KEY, ResultsFormatError, dataset_values, present_metrics, run_label
from openmind_bench.names import METRIC_TASK, SCRATCH
from openmind_bench.registry import DatasetSpec, ordered_datasets

log = logging.getLogger(__name__)

STAT_COLUMNS = ["mean", "mean_id", "mean_ood", "avg_rank", "delta_scratch", "delta_scratch_ci_low",
                "delta_scratch_ci_high", "trained_share"]
# The columns before the datasets: the run, whether it is an external checkpoint's, the metric.
ROW_COLUMNS = [*RUN_KEY, "external", "metric"]
SHA256_SHOWN = 12  # hex digits of a checkpoint's sha256 shown below the tables
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


def dataset_columns(table: pd.DataFrame) -> list[str]:
    """The dataset columns of a benchmark table, in table order."""
    return [c for c in table.columns if c not in {*ROW_COLUMNS, *STAT_COLUMNS}]


def build_table(frame: pd.DataFrame, registry: dict[str, DatasetSpec],
                external: Mapping[str, dict] | None = None,
                trained: Mapping[tuple, float] | None = None) -> pd.DataFrame:
    """The benchmark table from a validated results frame (see `results.validate`); `external`: the
    external checkpoints' method labels (their rows get `external` True); `trained`: (method,
    architecture, schedule) -> share of the network its runs trained (`trained_share`; NaN where unknown)."""
    values = dataset_values(frame)
    datasets = ordered_datasets(frame.dataset.unique(), registry)
    clash = sorted(set(datasets) & {*ROW_COLUMNS, *STAT_COLUMNS})
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
    table["external"] = table.method.isin(list(external or {}))
    table["trained_share"] = [(trained or {}).get(tuple(r), np.nan) for r in table[RUN_KEY].itertuples(index=False)]
    return table.reindex(columns=[*ROW_COLUMNS, *datasets, *STAT_COLUMNS])


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


def with_delta_intervals(table: pd.DataFrame, deltas: pd.DataFrame) -> pd.DataFrame:
    """The table with `delta_scratch_ci_low` / `_high` (the bootstrap's `deltas`) beside delta_scratch."""
    bounds = deltas[[*RUN_KEY, "metric", "ci_low", "ci_high"]].rename(
        columns={"ci_low": "delta_scratch_ci_low", "ci_high": "delta_scratch_ci_high"})
    out = table.drop(columns=["delta_scratch_ci_low", "delta_scratch_ci_high"], errors="ignore")
    out = out.merge(bounds, on=[*RUN_KEY, "metric"], how="left", validate="one_to_one")
    return out.reindex(columns=list(table.columns))


def scratch_references(run: tuple, runs) -> list[tuple]:
    """The from-scratch runs `run` (method, architecture, schedule) may be compared with: those of the
    same architecture label (which holds the epochs and low-data N, see `collect`), narrowed to the
    same schedule label when there are several. Exactly one is the reference; none or several: no
    comparison. Scratch runs are the references themselves (none)."""
    if run[0] == SCRATCH:
        return []
    refs = [r for r in runs if r[0] == SCRATCH and r[1] == run[1]]
    if len(refs) > 1:
        refs = [r for r in refs if r[2] == run[2]] or refs
    return refs


def _delta_scratch(metric: str, means: pd.Series) -> pd.Series:
    """mean minus the mean of the from-scratch row of the same architecture (and metric); see
    `scratch_reference`. Without a single reference the delta stays empty."""
    delta = pd.Series(np.nan, index=means.index)
    ambiguous = set()
    for run in means.index:
        refs = scratch_references(run, means.index)
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
    kind: str  # text | value | rank | delta | share (a percentage, never bold)


@dataclass
class _Block:
    metric: str
    columns: list[_Column]
    rows: pd.DataFrame
    cells: list[list[str]]  # formatted text, one list per row
    bold: list[list[bool]]
    external: list[bool]  # per row: an external checkpoint's (marked with a dagger)


def format_value(value, kind: str) -> str:
    if kind == "text":
        return str(value)
    if pd.isna(value):
        return ""
    if kind == "rank":
        return f"{value:.2f}"
    if kind == "delta":
        return f"{100 * value:+.2f}"
    if kind == "share":
        return f"{100 * value:.3g}"
    return f"{100 * value:.2f}"


def _blocks(table: pd.DataFrame, external: Mapping[str, dict], cost: Mapping[tuple, str] | None = None) -> list[_Block]:
    blocks = []
    dataset_cols = dataset_columns(table)
    for metric in [m for m in METRIC_TITLES if (table.metric == m).any()]:
        rows = table[table.metric == metric].reset_index(drop=True)
        columns = [_Column("method", "Method", "text"), _Column("architecture", "Architecture", "text"),
                   _Column("schedule", "Schedule", "text")]
        columns += [_Column(d, d, "value") for d in dataset_cols if rows[d].notna().any()]
        columns.append(_Column("mean", "Mean", "value"))
        if rows["trained_share"].notna().any():
            columns.append(_Column("trained_share", "Trained (%)", "share"))
        columns += [_Column(c, h, "value") for c, h in (("mean_id", "ID mean"), ("mean_ood", "OOD mean"))
                    if rows[c].notna().any()]
        columns.append(_Column("avg_rank", "Avg. rank", "rank"))
        if rows["delta_scratch"].notna().any():
            columns.append(_Column("delta_scratch", "Δ scratch", "delta"))
        if cost:
            rows = rows.assign(cost=[cost.get(tuple(r), "") for r in rows[RUN_KEY].itertuples(index=False)])
            if rows["cost"].astype(bool).any():
                columns.append(_Column("cost", "Cost", "text"))

        cells = [[format_value(row[c.key], c.kind) for c in columns] for _, row in rows.iterrows()]
        bold = [[False] * len(columns) for _ in range(len(rows))]
        for j, col in enumerate(columns):
            if col.kind in ("text", "share") or rows[col.key].isna().all():
                continue
            best = rows[col.key].min() if col.kind == "rank" else rows[col.key].max()
            # Bold every cell that reads the same as the best at two decimals.
            shown_best = format_value(best, col.kind)
            for i in range(len(rows)):
                bold[i][j] = cells[i][j] == shown_best
            if col.kind == "delta" and "delta_scratch_ci_low" in rows:
                for i, (low, high) in enumerate(zip(rows.delta_scratch_ci_low, rows.delta_scratch_ci_high)):
                    if cells[i][j] and pd.notna(low):  # the 95% bootstrap interval, after the value
                        cells[i][j] += f" [{format_value(low, 'delta')}, {format_value(high, 'delta')}]"
        blocks.append(_Block(metric, columns, rows, cells, bold, rows.method.isin(list(external)).tolist()))
    return blocks


def provenance_items(provenance: Mapping) -> list[tuple[str, str]]:
    """(what, value) pairs naming an external checkpoint below a table: source, revision, commit,
    sha256 (its first SHA256_SHOWN digits) and format, those that are known."""
    items = [("source", provenance.get("source")), ("revision", provenance.get("revision")),
             ("commit", provenance.get("commit")),
             ("sha256", provenance["sha256"][:SHA256_SHOWN] if provenance.get("sha256") else None),
             ("format", provenance.get("format"))]
    return [(what, str(value)) for what, value in items if value]


def _present_external(block_or_table, external: Mapping[str, dict]) -> list[str]:
    return [name for name in sorted(external) if (block_or_table.method == name).any()]


def _md_code(text: str) -> str:
    # A code span shows a path or URL as written; a longer fence when the text holds backticks.
    fence = "``" if "`" in text else "`"
    return f"{fence}{text}{fence}" if fence == "`" else f"{fence} {text} {fence}"


def markdown_provenance(name: str, provenance: Mapping) -> str:
    """One external checkpoint as a Markdown list item: its name, then `provenance_items`."""
    parts = [f"{what} {_md_code(value)}" if what != "format" else f"format: {md_escape(value)}"
             for what, value in provenance_items(provenance)]
    return f"- {md_escape(name)}: " + "; ".join(parts)


def md_escape(text: str) -> str:
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


def render_markdown(table: pd.DataFrame, external: Mapping[str, dict] | None = None,
                    cost: Mapping[tuple, str] | None = None, notes: Sequence[str] = ()) -> str:
    """The tables in Markdown; `external`: {method label: provenance} of external checkpoints; `cost`:
    {(method, architecture, schedule): text} for a Cost column (`compute.cost_labels`); `notes`:
    numbered footnotes (the leakage count)."""
    external = external or {}
    out = [
        "# Benchmark table",
        "",
        "Mean over cases, then folds, per dataset, in percent. **Bold**: best per column "
        "(ties at two decimals all bold). Avg. rank: mean over datasets of the rank within each "
        "dataset (1 = best, ties share the mean rank; lower is better). Δ scratch: Mean minus the "
        "from-scratch Mean of the same architecture, in percentage points, with its 95% bootstrap interval "
        "[low, high] (test cases, and seeds where runs have several). Trained: the share of the "
        "network's parameters the row's runs trained (LoRA: the adapters, stem and decoder). –: missing."
        + (" Cost: GPU-hours of the row's fine-tuning runs (every dataset and fold) and of the pre-training "
           "they start from, from the runs' compute.json (CPU-hours for runs without a GPU); "
           "compute.csv lists every run." if cost else ""),
    ]
    for block in _blocks(table, external, cost):
        out += ["", f"## {METRIC_TITLES[block.metric]}", ""]
        out.append("| " + " | ".join(md_escape(c.header) for c in block.columns) + " |")
        out.append("|" + "|".join(":---" if c.kind == "text" else "---:" for c in block.columns) + "|")
        for cells, bold, is_external in zip(block.cells, block.bold, block.external):
            shown = []
            for text, b, column in zip(cells, bold, block.columns):
                text = md_escape(text) if text else "–"
                text = f"**{text}**" if b else text
                shown.append(f"{text}†" if is_external and column.key == "method" else text)
            out.append("| " + " | ".join(shown) + " |")
    present = _present_external(table, external)
    if present:
        out += ["", "## External checkpoints", "",
                "† Rows of checkpoints this workflow did not pre-train (config `checkpoints`), fine-tuned "
                "like its own; sha256: the first 12 hexadecimal digits of the checkpoint file's.", ""]
        out += [markdown_provenance(name, external[name]) for name in present]
    for k, note in enumerate(notes, 1):
        out += ["", f"[{k}] {md_escape(note)}"]
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


def _tex_provenance(name: str, provenance: Mapping) -> str:
    parts = [f"{what} " + (tex_escape(value) if what == "format" else rf"\texttt{{{tex_escape(value)}}}")
             for what, value in provenance_items(provenance)]
    return rf"\textbf{{{tex_escape(name)}}}: " + ", ".join(parts)


def render_latex(table: pd.DataFrame, external: Mapping[str, dict] | None = None, notes: Sequence[str] = ()) -> str:
    """One booktabs `table` per metric; needs \\usepackage{booktabs} in the preamble. `external`:
    {method label: provenance}; their rows get a dagger and their sources a note below the tabular;
    `notes`: footnotes under every tabular (the leakage count)."""
    external = external or {}
    out = ["% Benchmark table, generated by `openmind-bench aggregate`. Needs \\usepackage{booktabs}."]
    for block in _blocks(table, external):
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
            if block.external[i]:
                row[0] += r"$^\dagger$"
            out.append(" & ".join(row) + r" \\")
        out += [r"\bottomrule", r"\end{tabular}"]
        present = _present_external(block.rows, external)
        if present:
            # Inside the float, so the sources stay below their table wherever LaTeX places it.
            out += [r"\par\smallskip", r"\parbox{\linewidth}{\raggedright $^\dagger$External checkpoints "
                    r"(sha256: first 12 hexadecimal digits).\\"]
            out += [_tex_provenance(name, external[name]) + (r"\\" if k < len(present) - 1 else "}")
                    for k, name in enumerate(present)]
        out += [rf"\par\smallskip{{\footnotesize {tex_escape(note)}}}" for note in notes]
        out.append(r"\end{table}")
    return "\n".join(out) + "\n"
