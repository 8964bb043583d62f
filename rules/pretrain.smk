# Pre-training: one job per method x architecture x selection of `pretrain` in the config (pairs
# without an implementation, e.g. spark3d on Primus, are left out), torchrun inside the job.
# Logic: openmind_bench.pretrain on the shared engine (openmind_bench.engine);
# `openmind-bench pretrain` is the same stage outside Snakemake.
from openmind_bench.pretrain import settings as omb_pretrain  # noqa: E402  (torch-free)

PRETRAIN = config["pretrain"]
PRETRAIN_RUNS = omb_pretrain.run_names(PRETRAIN, list(SELECTIONS))


def pretrain_targets():
    return [omb_names.pretrain_checkpoint(run) for run in PRETRAIN_RUNS]


def pretrain_settings(wildcards):
    """The run's resolved settings, from config and wildcards alone: a plain param, so a change of
    any setting re-runs this run (Snakemake's params trigger) and no other."""
    run = omb_names.pretrain_run(wildcards.method, wildcards.arch, wildcards.selection)
    selection = f"results/selections/{wildcards.selection}"
    return omb_pretrain.resolve(
        PRETRAIN,
        wildcards.method,
        wildcards.arch,
        out_dir=omb_names.PRETRAIN_DIR.format(run=run),
        train_data=f"{selection}/pretrain_data__preprocessed_train.json",
        val_data=f"{selection}/pretrain_data__preprocessed_val.json",
        selection=wildcards.selection,
    ).to_dict()


def pretrain_threads(wildcards):
    """CPU threads of the job: cpus_per_gpu per process (one process on a CPU)."""
    return max(1, PRETRAIN["resources"]["gpu"]) * PRETRAIN["resources"]["cpus_per_gpu"]


rule pretrain:
    input:
        # The preprocessing stage's training subjects and held-out subjects (validation loss).
        train=rules.select_pretrain_data.output.train,
        val=rules.select_pretrain_data.output.val,
    output:
        checkpoint=omb_names.PRETRAIN_CHECKPOINT,
    params:
        settings=pretrain_settings,
    threads: pretrain_threads
    resources:
        gpu=PRETRAIN["resources"]["gpu"],
        cpus_per_gpu=PRETRAIN["resources"]["cpus_per_gpu"],
        mem_mb=PRETRAIN["resources"]["mem_mb"],
        runtime=PRETRAIN["resources"]["runtime"],
    log:
        "logs/pretrain/{method}__{arch}__{selection}.log",
    benchmark:
        "logs/benchmarks/pretrain/{method}__{arch}__{selection}.tsv"
    conda:
        CONDA_ENV
    script:
        "../workflow_scripts/pretrain.py"
