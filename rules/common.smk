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


def get_final_output():
    """What `all` builds: every stage's outputs for the runs the config asks for, ending in the
    benchmark tables (each stage's helpers file defines its target list)."""
    return [
        "results/index/images.parquet",
        "results/index/shards.tsv",
        "results/qc/rejected.tsv",
        *quality_targets(),
        *selection_targets(),
        *pretrain_targets(),
        *finetune_targets(),
        *benchmark_targets(),
    ]
