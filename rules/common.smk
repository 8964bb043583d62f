# Config loading and validation, the dataset table, and the final target list. Each stage's own
# helpers (input functions, run lists) live in its rules file. Top-level code reads config and small
# tables only; it never walks the file system.
import os
import sys
from pathlib import Path

from snakemake.utils import min_version

min_version("9.0")

# The package comes from this checkout, for snakemake itself and for every job it starts (jobs
# inherit the environment, SLURM jobs too), also under --sdm conda where the job's Python is the
# env's: envs/openmind.yaml brings the dependencies, this path the package.
_SRC = str(Path(workflow.basedir) / "src")
sys.path.insert(0, _SRC)
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_SRC, os.environ.get("PYTHONPATH")) if p)


envvars:
    "PYTHONPATH",


from openmind_bench import config as omb_config  # noqa: E402
from openmind_bench import names as omb_names  # noqa: E402
from openmind_bench import sharding as omb_sharding  # noqa: E402

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
    **omb_names.WILDCARDS,


OPENMIND_DATA = config["stages"]["openmind_data"]


def get_final_output():
    """What `all` builds: every stage's outputs for the runs the config asks for, ending in the
    benchmark tables (each stage's helpers file defines its target list). `stages` turns the OpenMind
    data stages and pre-training off (config/evaluate.yaml)."""
    data = ["results/index/images.parquet", "results/index/shards.tsv", *quality_targets(), *selection_targets()]
    return [
        *(data if OPENMIND_DATA else []),
        "results/qc/rejected.tsv",
        *pretrain_targets(),
        *checkpoint_targets(),
        *finetune_targets(),
        *benchmark_targets(),
    ]


def finished_shard_outputs(checkpoint, output_name):
    """The named output of every (dataset, shard) job of a shard checkpoint, once all of them have run in
    an earlier invocation or this one; raises Snakemake's IncompleteCheckpointException (the caller is
    evaluated again when the shard is done) while any has not. Nothing is read here."""
    return [getattr(checkpoint.get(dataset=d, shard=k).output, output_name)
            for d in DATASETS for k in range(N_SHARDS[d])]


def missing_per_image_files(wildcards):
    """Per-image files of finished shard jobs that were deleted since (DWI maps, masks, store files):
    `all` asks for them, so exactly those are re-made (rules dwi_file, masks_image, preprocess_image) and
    nothing that read them runs again. Read only once every shard job of a stage has run (a checkpoint
    each)."""
    if not OPENMIND_DATA:
        return []
    return [*missing_dwi_files(wildcards), *missing_mask_files(wildcards), *missing_store_files(wildcards)]
