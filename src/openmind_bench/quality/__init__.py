"""Image quality: MRIQC's no-reference metrics per image, a 1-5 score (1 best) per image and per
dataset x modality x derivation group, manual overrides (openmind_bench.quality.iqms, .score, .shard)."""

# The `quality` config keys each job reads (its params carry these and nothing else, so a manual score
# re-runs the gather only).
SHARD_SETTINGS = ("inu", "references")
GATHER_SETTINGS = ("group_rounding", "manual_scores")


def job_settings(quality_config: dict, keys) -> dict:
    return {k: quality_config[k] for k in keys}
