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


def demo_leak_split(wildcards):
    """The split whose first test case the demo plants in the mirror (config demo.plant_leak), if any."""
    name = config["demo"]["plant_leak"]
    return [omb_finetune.split_path(config, name)] if name else []


def demo_leak_settings(wildcards):
    """Dataset, folder and channel-0 modality of the downstream set planted in the mirror (or None)."""
    name = config["demo"]["plant_leak"]
    if not name:
        return None
    spec = omb_finetune.cached_registry(config).get(name)
    return {"dataset": name, "source": str(spec.source), "modality": spec.modalities[0]}
