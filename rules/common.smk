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
    parts += DWI_REJECTION_PARTS  # rules/dwi.smk
    parts += downstream_rejection_parts()
    return parts


# ---- preprocessing and curation
PREPROCESS_ROOT = "results/preprocessed"


def preprocess_index_tables(wildcards):
    """Index tables whose rows are preprocessed (stages that add rows or mask paths extend this)."""
    return ["results/index/images.parquet", *DWI_INDEX_TABLES]  # rules/dwi.smk


def preprocess_manifests(wildcards=None):
    """Every shard manifest of the run (known from config alone)."""
    return [f"{PREPROCESS_ROOT}/{d}/shard-{k}.tsv" for d in DATASETS for k in range(N_SHARDS[d])]


SELECTIONS = {s["name"]: s for s in config["selections"]}
_unknown = [s for s in config["pretrain"]["selections"] if s not in SELECTIONS]
if _unknown:
    raise omb_config.ConfigError(
        f"config key 'pretrain.selections': {_unknown} are not among the selections {list(SELECTIONS)}"
    )


def selection_settings(wildcards):
    return SELECTIONS[wildcards.selection]


def selection_collection_index(wildcards):
    """Position of the selection in the config list, nnssl's collection_index (1-based)."""
    return list(SELECTIONS).index(wildcards.selection) + 1


def quality_tables(wildcards):
    """Tables of image quality scores (image_id, quality_score) overriding the index's; none yet."""
    return []


# ---- pre-training
from openmind_bench import nets as omb_nets  # noqa: E402
from openmind_bench import ssl as omb_ssl  # noqa: E402
from openmind_bench.train import settings as omb_pretrain  # noqa: E402

PRETRAIN = omb_pretrain.merged(config.get("pretrain"))


def pretrain_runs():
    """`{method}__{arch}__{selection}` of every run the config asks for (torch is not imported)."""
    runs = []
    for selection in PRETRAIN["selections"]:
        for arch in PRETRAIN["architectures"]:
            family = omb_nets.resolve(arch, PRETRAIN["architecture_presets"]).family
            runs += [f"{m}__{arch}__{selection}" for m in PRETRAIN["methods"] if omb_ssl.compatible(m, family)]
    return runs


def pretrain_targets():
    return expand("results/pretrain/{run}/checkpoint_final.pt", run=pretrain_runs())


def pretrain_settings(wildcards, input, output):
    """The run's resolved engine settings: a job reruns when its own settings change, not another's."""
    return omb_pretrain.resolve(
        config.get("pretrain"),
        wildcards.method,
        wildcards.arch,
        out_dir=str(Path(output.checkpoint).parent),
        train_data=input.train,
        val_data=input.val,
        selection=wildcards.selection,
    ).to_dict()


def pretrain_threads(wildcards):
    """CPU threads of the job: cpus_per_gpu per process (one process on a CPU)."""
    resources = PRETRAIN["resources"]
    return max(1, resources["gpu"]) * resources["cpus_per_gpu"]


# ---- downstream (fine-tuning)
from openmind_bench.downstream import settings as omb_finetune  # noqa: E402  (torch-free)

FINETUNE = omb_finetune.merged(config.get("finetune"))
DOWNSTREAM = config.get("downstream") or {}
DOWNSTREAM_REGISTRY = omb_finetune.registry_path(config)
DOWNSTREAM_ROOT = DOWNSTREAM.get("root")
# The demo builds its downstream sets where the registry is told to read them.
DOWNSTREAM_DEMO_ROOT = DOWNSTREAM_ROOT or "data/demo_downstream"
DOWNSTREAM_SPLITS_DIR = DOWNSTREAM.get("splits_dir") or omb_finetune.DEFAULT_SPLITS_DIR
DOWNSTREAM_SPLIT_SETTINGS = omb_finetune.split_settings(config)


def finetune_targets():
    """results/downstream/{dataset}/{run}/fold_{k}/metrics.json of every run the config asks for."""
    return omb_finetune.targets(config, pretrain_runs())


def downstream_data(wildcards):
    """The demo downstream sets when the config builds them (downstream.build_demo); real datasets are
    read where they lie."""
    return [rules.demo_downstream.output.truth] if config["downstream"]["build_demo"] else []


def finetune_checkpoint(wildcards):
    name = omb_finetune.parse_run(wildcards.finetune_run)
    return [f"results/pretrain/{name.pretrain_run}/checkpoint_final.pt"] if name.pretrained else []


def finetune_settings(wildcards, input, output):
    """The run's resolved settings: a job reruns when its own settings change, not another's."""
    name = omb_finetune.parse_run(wildcards.finetune_run)
    return omb_finetune.resolve(
        config,
        wildcards.target_dataset,
        wildcards.finetune_run,
        wildcards.fold,
        out_dir=str(Path(output.metrics).parent),
        split=input.split,
        pretrained_checkpoint=input.pretrained[0] if input.pretrained else None,
        low_data_subset=(omb_finetune.split_path(config, wildcards.target_dataset, name.low_data_n)
                         if name.low_data_n else None),
    ).to_dict()


def finetune_threads(wildcards):
    resources = FINETUNE["resources"]
    return max(1, resources["gpu"]) * resources["cpus_per_gpu"]


def downstream_rejection_parts():
    """QC parts of the downstream split jobs."""
    return [f"results/qc/parts/downstream/{d}.tsv" for d in omb_finetune.dataset_folds(config)]


def get_final_output():
    """What `all` builds; each stage adds its outputs here as it lands."""
    return [
        "results/index/images.parquet",
        "results/index/shards.tsv",
        "results/qc/rejected.tsv",
        *expand("results/selections/{selection}/pretrain_data.json", selection=SELECTIONS),
        *expand("results/selections/{selection}/pretrain_data__preprocessed.json", selection=SELECTIONS),
        *pretrain_targets(),
        *finetune_targets(),
    ]
