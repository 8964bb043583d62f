# Helpers of the masks rules (rules/masks.smk): the image tables, mask tables, the masked index.

MASKS_ENABLED = config["masks"]["enabled"]
# Every table of images (the columns of results/index/images.parquet). A stage that adds images (the
# DWI stage's derived maps) appends its table here: they then get masks, scores and preprocessing.
IMAGE_TABLES = ["results/index/images.parquet", *DWI_INDEX_TABLES]
MASKED_INDEX = "results/index/images_masked.parquet"


def image_tables(wildcards=None):
    return list(IMAGE_TABLES)


def mask_tables(wildcards=None):
    return [f"results/masks/{d}/shard-{k}.parquet" for d in DATASETS for k in range(N_SHARDS[d])]


def masks_rejection_parts():
    if not MASKS_ENABLED:
        return []
    return [f"results/qc/parts/{stage}/{d}/{k}.tsv" for stage in ("masks", "quality")
            for d in DATASETS for k in range(N_SHARDS[d])]
