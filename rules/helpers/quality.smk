# Helpers of the quality rules (rules/quality.smk): per-shard parts and the gathered score table.

QUALITY_TABLE = "results/quality/iqs.parquet"


def quality_parts(wildcards=None):
    return [f"results/quality/parts/{d}/shard-{k}.parquet" for d in DATASETS for k in range(N_SHARDS[d])]


def quality_tables(wildcards=None):
    """Tables of image quality scores (image_id, quality_score) overriding the index's."""
    return [QUALITY_TABLE] if MASKS_ENABLED else []


def quality_targets():
    return quality_tables()
