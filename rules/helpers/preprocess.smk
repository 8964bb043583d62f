# Helpers of the preprocess rules (rules/preprocess.smk): input functions, run lists, targets.

PREPROCESS_ROOT = "results/preprocessed"


def preprocess_index_tables(wildcards):
    """Index tables whose rows are preprocessed: the image tables with their masks (rules/masks.smk)."""
    return [MASKED_INDEX] if MASKS_ENABLED else image_tables()


def preprocess_manifests(wildcards=None):
    """Every shard manifest of the run (known from config alone)."""
    return [f"{PREPROCESS_ROOT}/{d}/shard-{k}.tsv" for d in DATASETS for k in range(N_SHARDS[d])]


def preprocess_rejection_parts():
    return [f"results/qc/parts/preprocess/{d}/{k}.tsv" for d in DATASETS for k in range(N_SHARDS[d])]
