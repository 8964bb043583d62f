# Downstream: demo downstream sets, one fixed split per dataset, and one fine-tune + evaluation job per
# dataset x run x fold (torchrun inside the job, like pre-training). The wildcard is `target_dataset`
# because `dataset` is constrained to OpenNeuro ids. Logic: openmind_bench.downstream; run names and
# the results layout: openmind_bench.names; `openmind-bench finetune` is the same stage outside Snakemake.
from openmind_bench.downstream import settings as omb_finetune  # noqa: E402  (torch-free)

FINETUNE = config["finetune"]
DOWNSTREAM = config["downstream"]
# The demo builds its downstream sets where the registry is told to read them.
DOWNSTREAM_DEMO_ROOT = DOWNSTREAM["root"] or "data/demo_downstream"
DOWNSTREAM_DATASET_FOLDS = omb_finetune.dataset_folds(config)
FINETUNE_TARGETS = omb_finetune.targets(config, PRETRAIN_RUNS)


def finetune_targets():
    """results/downstream/{dataset}/{run}/fold_{k}/metrics.json of every run the config asks for."""
    return FINETUNE_TARGETS


def downstream_data(wildcards):
    """The demo downstream sets when the config builds them (downstream.build_demo); real datasets are
    read where they lie."""
    return [rules.demo_downstream.output.truth] if DOWNSTREAM["build_demo"] else []


def finetune_checkpoint(wildcards):
    name = omb_names.parse_run(wildcards.finetune_run)
    return [omb_names.pretrain_checkpoint(name.pretrain_run)] if name.pretrained else []


def finetune_settings(wildcards):
    """The run's resolved settings, from config and wildcards alone: a plain param, so a change of
    any setting re-runs this run (Snakemake's params trigger) and no other."""
    name = omb_names.parse_run(wildcards.finetune_run)
    return omb_finetune.resolve(
        config,
        wildcards.target_dataset,
        wildcards.finetune_run,
        wildcards.fold,
        split=omb_finetune.split_path(config, wildcards.target_dataset),
        pretrained_checkpoint=omb_names.pretrain_checkpoint(name.pretrain_run) if name.pretrained else None,
        low_data_subset=(omb_finetune.split_path(config, wildcards.target_dataset, name.low_data_n)
                         if name.low_data_n else None),
    ).to_dict()


def finetune_threads(wildcards):
    return max(1, FINETUNE["resources"]["gpu"]) * FINETUNE["resources"]["cpus_per_gpu"]


def downstream_rejection_parts():
    """QC parts of the downstream split jobs."""
    return [f"results/qc/parts/downstream/{d}.tsv" for d in DOWNSTREAM_DATASET_FOLDS]


rule demo_downstream:
    output:
        truth=f"{DOWNSTREAM_DEMO_ROOT}/ground_truth/downstream.json",
    params:
        root=subpath(output.truth, ancestor=2),
        seed=config["demo"]["seed"],
        resolution=config["demo"]["resolution"],
    resources:
        mem_mb=config["resources"]["demo"]["mem_mb"],
        runtime=config["resources"]["demo"]["runtime"],
    log:
        "logs/demo/demo_downstream.log",
    benchmark:
        "logs/benchmarks/demo/demo_downstream.tsv"
    conda:
        CONDA_ENV
    script:
        "../workflow_scripts/build_downstream_demo.py"


rule downstream_split:
    input:
        data=downstream_data,
    output:
        split=f"{DOWNSTREAM['splits_dir']}/{{target_dataset}}.json",
        # cases the reader rejected (a channel missing, unreadable header, grids that disagree)
        rejected="results/qc/parts/downstream/{target_dataset}.tsv",
    params:
        registry=config["downstream_registry"],
        root=DOWNSTREAM["root"],
        split_settings=omb_finetune.split_settings(config),
    resources:
        mem_mb=config["resources"]["downstream_split"]["mem_mb"],
        runtime=config["resources"]["downstream_split"]["runtime"],
    log:
        "logs/downstream/split__{target_dataset}.log",
    benchmark:
        "logs/benchmarks/downstream/split__{target_dataset}.tsv"
    conda:
        CONDA_ENV
    script:
        "../workflow_scripts/downstream_split.py"


rule finetune:
    input:
        data=downstream_data,
        split=rules.downstream_split.output.split,
        pretrained=finetune_checkpoint,
    output:
        metrics=omb_names.FINETUNE_METRICS,
    params:
        settings=finetune_settings,
    threads: finetune_threads
    resources:
        gpu=FINETUNE["resources"]["gpu"],
        cpus_per_gpu=FINETUNE["resources"]["cpus_per_gpu"],
        mem_mb=FINETUNE["resources"]["mem_mb"],
        runtime=FINETUNE["resources"]["runtime"],
    log:
        "logs/downstream/{target_dataset}/{finetune_run}__fold_{fold}.log",
    benchmark:
        "logs/benchmarks/downstream/{target_dataset}/{finetune_run}__fold_{fold}.tsv"
    conda:
        CONDA_ENV
    script:
        "../workflow_scripts/finetune.py"
