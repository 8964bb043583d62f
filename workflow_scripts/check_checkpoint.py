"""Snakemake adapter: rule check_checkpoint -> openmind_bench.checkpoints.check.check_checkpoint."""

from pathlib import Path

from openmind_bench.checkpoints.check import check_checkpoint, write_report
from openmind_bench.checkpoints.settings import fetched_path
from openmind_bench.logs import log_to

with log_to(snakemake.log[0]):  # noqa: F821 (injected by Snakemake)
    report = check_checkpoint(fetched_path(Path(snakemake.input.record).parent),  # noqa: F821
                              architecture=snakemake.params.architecture,  # noqa: F821
                              channel_counts=list(snakemake.params.channels),  # noqa: F821
                              presets=dict(snakemake.params.presets))  # noqa: F821
    write_report(report, snakemake.output.report)  # noqa: F821
