# Helpers of the download rules (rules/download.smk): input functions, run lists, targets.

def snapshot_of(wildcards):
    return DATASET_TABLE.loc[wildcards.dataset, "snapshot"]


def raw_manifest(wildcards):
    return f"data/raw/{SOURCE}/{wildcards.dataset}/download_manifest.json"


def fetch_inputs(wildcards):
    """The demo mirror must exist before a local fetch from it."""
    if config["source"]["build_demo"]:
        return {"demo": f"{config['source']['root']}/ground_truth/ground_truth.json"}
    return {}


def fetch_rejection_parts():
    return [f"results/qc/parts/fetch/{SOURCE}/{d}.tsv" for d in DATASETS]
