# Helpers of the quality rules (rules/quality.smk): per-shard parts and the gathered score table.

from openmind_bench import quality as omb_quality  # noqa: E402

QUALITY_TABLE = "results/quality/iqs.parquet"
QUALITY_SHARD_SETTINGS = omb_quality.job_settings(config["quality"], omb_quality.SHARD_SETTINGS)
QUALITY_GATHER_SETTINGS = omb_quality.job_settings(config["quality"], omb_quality.GATHER_SETTINGS)


def quality_parts(wildcards=None):
    return [f"results/quality/parts/{d}/shard-{k}.parquet" for d in DATASETS for k in range(N_SHARDS[d])]


def quality_tables(wildcards=None):
    """Tables of image quality scores (image_id, quality_score) overriding the index's."""
    return [QUALITY_TABLE] if MASKS_ENABLED else []


def quality_targets():
    return quality_tables()
