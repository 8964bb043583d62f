# Helpers of the DWI rules (rules/dwi.smk): per-shard tables, QC parts, the derived images' table.

DWI_ROOT = "results/derivatives/dwi"
DWI_ENABLED = config["dwi"]["enabled"]


DWI_SHARD_TABLES = [f"results/dwi/tables/{d}/shard-{k}.parquet" for d in DATASETS for k in range(N_SHARDS[d])]
# the QC parts of the shard jobs and the derived images' table (empty when the stage is off); the table
# joins IMAGE_TABLES (rules/helpers/masks.smk), so its maps get masks, scores and preprocessing
DWI_REJECTION_PARTS = (
    [f"results/qc/parts/dwi/{d}/{k}.tsv" for d in DATASETS for k in range(N_SHARDS[d])] if DWI_ENABLED else []
)
DWI_INDEX_TABLES = ["results/index/dwi.parquet"] if DWI_ENABLED else []


def dwi_table_of_file(wildcards):
    """The shard table of the scan a derived file comes from (a derived file keeps its scan's stem
    without `_dwi`, so the scan's image id and shard follow from it)."""
    scan = f"{wildcards.dataset}__{wildcards.dwi_stem}_dwi"
    shard = omb_sharding.shard_of(scan, N_SHARDS[wildcards.dataset])
    return f"results/dwi/tables/{wildcards.dataset}/shard-{shard}.parquet"


def missing_dwi_files(wildcards):
    """Derived files that finished DWI shards listed but that no longer exist (`all` asks for them, so
    rule dwi_file re-makes exactly those)."""
    if not DWI_ENABLED:
        return []
    from openmind_bench.dwi.shard import missing_outputs  # numerical stack: only when needed

    return missing_outputs(finished_shard_outputs(checkpoints.dwi_shard, "table"))
