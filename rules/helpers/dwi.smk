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
