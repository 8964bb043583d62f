# Helpers of the curate rules (rules/curate.smk): input functions, run lists, targets.

from openmind_bench.registry import downstream_test_subjects  # noqa: E402

SELECTIONS = omb_config.named_selections(config)
# (OpenNeuro dataset, subject) pairs of downstream test sets (registry field `openneuro`), never selected
EXCLUDED_SUBJECTS = sorted(downstream_test_subjects(config["downstream_registry"]))


def selection_settings(wildcards):
    return SELECTIONS[wildcards.selection]


def selection_collection_index(wildcards):
    """Position of the selection in the config list, nnssl's collection_index (1-based)."""
    return list(SELECTIONS).index(wildcards.selection) + 1


def selection_excluded_subjects(wildcards):
    return [list(pair) for pair in EXCLUDED_SUBJECTS]


def selection_targets():
    return [
        *expand("results/selections/{selection}/pretrain_data.json", selection=SELECTIONS),
        *expand("results/selections/{selection}/pretrain_data__preprocessed.json", selection=SELECTIONS),
    ]
