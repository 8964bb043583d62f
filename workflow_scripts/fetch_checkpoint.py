"""Snakemake adapter: rule fetch_checkpoint -> openmind_bench.checkpoints.sources.fetch_checkpoint."""

from openmind_bench.checkpoints.sources import fetch_checkpoint
from openmind_bench.logs import log_to

with log_to(snakemake.log[0]):  # noqa: F821 (injected by Snakemake)
    entry = dict(snakemake.params.entry)  # noqa: F821
    fetch_checkpoint(entry["name"], entry["source"], snakemake.params.dest, revision=entry.get("revision"),  # noqa: F821
                     sha256=entry.get("sha256"), cache_dir=entry.get("cache_dir"),
                     offline=bool(entry.get("offline")))
