# Config loading and validation, the dataset table, shards, and the final target list.
# Top-level code here reads config and small tables only; it never walks the file system.
import sys
from pathlib import Path

from snakemake.utils import min_version

min_version("9.0")

# The package is importable even when snakemake runs outside the project's venv (--sdm conda).
sys.path.insert(0, str(Path(workflow.basedir) / "src"))

from openmind_bench import config as omb_config  # noqa: E402

omb_config.validate(config, Path(workflow.basedir) / "config" / "schema.yaml")

DATASET_TABLE = omb_config.read_datasets_table(config["datasets_table"])
DATASETS = omb_config.selected_datasets(config, DATASET_TABLE)
SOURCE = config["source"]["kind"]
N_SHARDS = {
    d: omb_config.num_shards(DATASET_TABLE.loc[d, "expected_images"], config["shard_size"])
    for d in DATASETS
}
CONDA_ENV = "../envs/openmind.yaml"


wildcard_constraints:
    dataset=r"ds\d{6}",
    source=r"[a-z_]+",
    shard=r"\d+",


def snapshot_of(wildcards):
    return DATASET_TABLE.loc[wildcards.dataset, "snapshot"]


def n_shards_of(wildcards):
    return N_SHARDS[wildcards.dataset]


def raw_manifest(wildcards):
    return f"data/raw/{SOURCE}/{wildcards.dataset}/download_manifest.json"


def fetch_inputs(wildcards):
    """The demo mirror must exist before a local fetch from it."""
    if config["source"]["build_demo"]:
        return {"demo": f"{config['source']['root']}/ground_truth/ground_truth.json"}
    return {}


def rejection_parts():
    """Every per-job rejection record of the stages in this run (known from config alone)."""
    parts = [f"results/qc/parts/fetch/{SOURCE}/{d}.tsv" for d in DATASETS]
    parts += [f"results/qc/parts/index/{d}.tsv" for d in DATASETS]
    parts += [f"results/qc/parts/preprocess/{d}/{k}.tsv" for d in DATASETS for k in range(N_SHARDS[d])]
    return parts


# ---- preprocessing and curation
PREPROCESS_ROOT = "results/preprocessed"


def preprocess_index_tables(wildcards):
    """Index tables whose rows are preprocessed (stages that add rows or mask paths extend this)."""
    return ["results/index/images.parquet"]


def preprocess_manifests(wildcards=None):
    """Every shard manifest of the run (known from config alone)."""
    return [f"{PREPROCESS_ROOT}/{d}/shard-{k}.tsv" for d in DATASETS for k in range(N_SHARDS[d])]


SELECTIONS = {s["name"]: s for s in config["selections"]}


def selection_settings(wildcards):
    return SELECTIONS[wildcards.selection]


def selection_collection_index(wildcards):
    """Position of the selection in the config list, nnssl's collection_index (1-based)."""
    return list(SELECTIONS).index(wildcards.selection) + 1


def quality_tables(wildcards):
    """Tables of image quality scores (image_id, quality_score) overriding the index's; none yet."""
    return []


def get_final_output():
    """What `all` builds; each stage adds its outputs here as it lands."""
    return [
        "results/index/images.parquet",
        "results/index/shards.tsv",
        "results/qc/rejected.tsv",
        *expand("results/selections/{selection}/pretrain_data.json", selection=SELECTIONS),
        *expand("results/selections/{selection}/pretrain_data__preprocessed.json", selection=SELECTIONS),
    ]
