# Helper functions and constants of the masks and quality stages (rules/masks.smk, rules/quality.smk).

MASKS_ENABLED = config["masks"]["enabled"]


def mask_tables(wildcards=None):
    return [f"results/masks/{d}/shard-{k}.parquet" for d in DATASETS for k in range(N_SHARDS[d])]


def masks_rejection_parts():
    if not MASKS_ENABLED:
        return []
    return [f"results/qc/parts/{stage}/{d}/{k}.tsv" for stage in ("masks", "quality")
            for d in DATASETS for k in range(N_SHARDS[d])]


MASKED_INDEX = "results/index/images_masked.parquet"


def quality_parts(wildcards=None):
    return [f"results/quality/parts/{d}/shard-{k}.parquet" for d in DATASETS for k in range(N_SHARDS[d])]
