# Helpers of the masks rules (rules/masks.smk): the image tables, mask tables, the masked index.

MASKS_ENABLED = config["masks"]["enabled"]
# Every table of images (the columns of results/index/images.parquet). A stage that adds images (the
# DWI stage's derived maps) appends its table here: they then get masks, scores and preprocessing.
IMAGE_TABLES = ["results/index/images.parquet", *DWI_INDEX_TABLES]
MASKED_INDEX = "results/index/images_masked.parquet"
MASKS_ROOT = "results/masks"


def image_tables(wildcards=None):
    return list(IMAGE_TABLES)


def mask_tables(wildcards=None):
    return [f"results/masks/{d}/shard-{k}.parquet" for d in DATASETS for k in range(N_SHARDS[d])]


def masks_rejection_parts():
    if not MASKS_ENABLED:
        return []
    return [f"results/qc/parts/{stage}/{d}/{k}.tsv" for stage in ("masks", "quality")
            for d in DATASETS for k in range(N_SHARDS[d])]


def mask_table_of_file(wildcards):
    """The shard table of the image a mask file belongs to (image id `{dataset}__{stem}`, its shard as
    the index assigns it)."""
    shard = omb_sharding.shard_of(f"{wildcards.dataset}__{wildcards.mask_stem}", N_SHARDS[wildcards.dataset])
    return f"{MASKS_ROOT}/{wildcards.dataset}/shard-{shard}.parquet"


def missing_mask_files(wildcards):
    """Mask files that finished masks shards wrote but that no longer exist (`all` asks for them, so rule
    masks_image re-makes exactly those)."""
    if not MASKS_ENABLED:
        return []
    from openmind_bench.masks.shard import missing_outputs  # numerical stack: only when needed

    return missing_outputs(finished_shard_outputs(checkpoints.masks_shard, "table"))
