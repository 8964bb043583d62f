# Helpers of the curate rules (rules/curate.smk): input functions, run lists, targets.

SELECTIONS = {
    omb_names.check_name(s["name"], f"selections[{i}].name"): s for i, s in enumerate(config["selections"])
}


def selection_settings(wildcards):
    return SELECTIONS[wildcards.selection]


def selection_collection_index(wildcards):
    """Position of the selection in the config list, nnssl's collection_index (1-based)."""
    return list(SELECTIONS).index(wildcards.selection) + 1


def selection_targets():
    return [
        *expand("results/selections/{selection}/pretrain_data.json", selection=SELECTIONS),
        *expand("results/selections/{selection}/pretrain_data__preprocessed.json", selection=SELECTIONS),
    ]
