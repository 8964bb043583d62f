"""Image quality: MRIQC's no-reference metrics per image, a 1-5 score (1 best) per image and per
dataset x modality x derivation group, manual overrides (openmind_bench.quality.iqms, .score, .shard)."""
