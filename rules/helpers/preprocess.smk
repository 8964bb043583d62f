# Helpers of the preprocess rules (rules/preprocess.smk): input functions, run lists, targets.

PREPROCESS_ROOT = "results/preprocessed"
# The store files of one image (openmind_bench.store.files.image_files), for rule preprocess_image.
PREPROCESS_IMAGE_STEM = f"{PREPROCESS_ROOT}/{{dataset}}/{{subject_dir}}/{{session_dir}}/{{image_id}}"


def preprocess_index_tables(wildcards):
    """Index tables whose rows are preprocessed: the image tables with their masks (rules/masks.smk)."""
    return [MASKED_INDEX] if MASKS_ENABLED else image_tables()


def preprocess_manifests(wildcards=None):
    """Every shard manifest of the run (known from config alone)."""
    return [f"{PREPROCESS_ROOT}/{d}/shard-{k}.tsv" for d in DATASETS for k in range(N_SHARDS[d])]


def preprocess_rejection_parts():
    return [f"results/qc/parts/preprocess/{d}/{k}.tsv" for d in DATASETS for k in range(N_SHARDS[d])]


def preprocess_manifest_of_image(wildcards):
    """The manifest of the shard that holds the image (its shard from the image id, as the index assigns it)."""
    shard = omb_sharding.shard_of(wildcards.image_id, N_SHARDS[wildcards.dataset])
    return f"{PREPROCESS_ROOT}/{wildcards.dataset}/shard-{shard}.tsv"


def preprocess_masks_of_image(wildcards):
    """The mask files the image's shard preprocessed it with, from its manifest once the shard has run (a
    checkpoint): a deleted mask is re-made first (rule masks_image)."""
    from openmind_bench.preprocess.shard import mask_files

    shard = omb_sharding.shard_of(wildcards.image_id, N_SHARDS[wildcards.dataset])
    manifest = checkpoints.preprocess_shard.get(dataset=wildcards.dataset, shard=shard).output.manifest
    return mask_files(manifest, wildcards.image_id)


def missing_store_files(wildcards):
    """Store files that finished preprocessing shards list in their manifests but that no longer exist
    (`all` asks for them, so rule preprocess_image re-makes exactly those)."""
    from openmind_bench.preprocess.shard import missing_outputs  # numerical stack: only when needed

    return missing_outputs(finished_shard_outputs(checkpoints.preprocess_shard, "manifest"))
