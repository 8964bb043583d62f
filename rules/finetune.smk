# Downstream: demo downstream sets, one fixed split per dataset, and one fine-tune + evaluation job per
# dataset x run x fold (torchrun inside the job, like pre-training). The wildcard is `target_dataset`
# because `dataset` is constrained to OpenNeuro ids. Logic: openmind_bench.downstream; run names and
# the results layout: openmind_bench.names; `openmind-bench finetune` is the same stage outside Snakemake.


rule demo_downstream:
    output:
        truth=f"{DOWNSTREAM_DEMO_ROOT}/ground_truth/downstream.json",
    params:
        root=subpath(output.truth, ancestor=2),
        seed=config["demo"]["seed"],
        resolution=config["demo"]["resolution"],
        cohort_repeats=config["demo"]["downstream_cohort_repeats"],
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
        # the registry values the split reads (task, role, labels, source...): an edit re-makes the split
        registry_entry=split_registry_entry,
        root=DOWNSTREAM["root"],
        split_settings=omb_finetune.split_settings(config),
        data_fingerprint=downstream_data_fingerprint,
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
        source_model=zero_shot_source,
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
