"""Snakemake adapter: rule select_pretrain_data -> openmind_bench.curation.select.run_selection."""

from openmind_bench.curation.select import run_selection
from openmind_bench.logs import log_to

with log_to(snakemake.log[0]):  # noqa: F821 (injected by Snakemake)
    run_selection(
        dict(snakemake.params.selection),
        snakemake.params.collection_index,
        list(snakemake.input.index),
        list(snakemake.input.manifests),
        snakemake.output.raw,
        snakemake.output.preprocessed,
        snakemake.output.table,
        quality_tables=list(snakemake.input.quality),
        out_train=snakemake.output.train,
        out_val=snakemake.output.val,
        excluded_subjects=snakemake.params.excluded_subjects,  # noqa: F821
        leakage=snakemake.input.get("leakage"),
        duplicates=snakemake.input.get("duplicates"),
        fingerprint_rejections=[snakemake.input.unchecked],
        out_dropped=snakemake.output.dropped,
        out_summary=snakemake.output.summary,
        out_plot=snakemake.output.plot,
    )
