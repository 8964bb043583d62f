# Helpers of the index rules (rules/index.smk): input functions, run lists, targets.

def n_shards_of(wildcards):
    return N_SHARDS[wildcards.dataset]


def index_rejection_parts():
    return [f"results/qc/parts/index/{d}.tsv" for d in DATASETS]
