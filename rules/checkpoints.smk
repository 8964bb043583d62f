# External checkpoints (config `checkpoints`): one fetch job per checkpoint into
# results/checkpoints/{name}/ (source.json), then a CPU check of it (check.json) before any GPU hour,
# and its scorecard against the scratch baseline of its architecture once its runs are fine-tuned.
# The check is a Snakemake checkpoint: the architecture (hence the scratch baseline) and the provenance
# its fine-tuning jobs record are read from check.json. Logic lives in openmind_bench.checkpoints;
# `openmind-bench check-checkpoint` / `scorecard` are the same steps outside Snakemake.


rule fetch_checkpoint:
    input:
        hub=checkpoint_hub_input,
    output:
        record=f"{omb_checkpoints.CHECKPOINTS_DIR}/{{checkpoint}}/{omb_checkpoints.SOURCE_RECORD}",
    params:
        entry=checkpoint_entry,
        dest=subpath(output.record, parent=True),
    resources:
        mem_mb=config["resources"]["checkpoint"]["mem_mb"],
        runtime=config["resources"]["checkpoint"]["runtime"],
    log:
        "logs/checkpoints/{checkpoint}/fetch.log",
    benchmark:
        "logs/benchmarks/checkpoints/{checkpoint}/fetch.tsv"
    conda:
        CONDA_ENV
    script:
        "../workflow_scripts/fetch_checkpoint.py"


checkpoint check_checkpoint:
    input:
        record=rules.fetch_checkpoint.output.record,
    output:
        report=f"{omb_checkpoints.CHECKPOINTS_DIR}/{{checkpoint}}/{omb_checkpoints.CHECK_REPORT}",
    params:
        architecture=checkpoint_architecture,
        channels=CHECKPOINT_CHANNELS,
        # the config's presets: the scratch baseline is the preset whose network is the checkpoint's
        presets=config["pretrain"]["architecture_presets"],
    resources:
        mem_mb=config["resources"]["checkpoint"]["mem_mb"],
        runtime=config["resources"]["checkpoint"]["runtime"],
    log:
        "logs/checkpoints/{checkpoint}/check.log",
    benchmark:
        "logs/benchmarks/checkpoints/{checkpoint}/check.tsv"
    conda:
        CONDA_ENV
    script:
        "../workflow_scripts/check_checkpoint.py"


rule checkpoint_scores:
    input:
        metrics=checkpoint_scorecard_metrics,
        registry=registry_if_present,
    output:
        csv=f"{omb_checkpoints.CHECKPOINTS_DIR}/{{checkpoint}}/{omb_checkpoints.SCORECARD[0]}",
        md=f"{omb_checkpoints.CHECKPOINTS_DIR}/{{checkpoint}}/{omb_checkpoints.SCORECARD[1]}",
    resources:
        mem_mb=config["resources"]["aggregate"]["mem_mb"],
        runtime=config["resources"]["aggregate"]["runtime"],
    log:
        "logs/checkpoints/{checkpoint}/scores.log",
    benchmark:
        "logs/benchmarks/checkpoints/{checkpoint}/scores.tsv"
    conda:
        CONDA_ENV
    script:
        "../workflow_scripts/checkpoint_scores.py"


# The demo's hub (config demo.hub): one of its own pre-training runs exported in the published layout
# into a local Hugging Face cache folder, which a `checkpoints` entry then reads through hf:// offline.
if DEMO_HUB:

    rule demo_hub:
        input:
            checkpoint=omb_names.pretrain_checkpoint(DEMO_HUB["run"]),
        output:
            ref=omb_checkpoints.hub_ref(DEMO_HUB),
        params:
            run_dir=subpath(input.checkpoint, parent=True),
            cache_dir=subpath(output.ref, ancestor=3),  # {cache_dir}/models--{org}--{repo}/refs/main
            repo_id=DEMO_HUB["repo_id"],
        resources:
            mem_mb=config["resources"]["checkpoint"]["mem_mb"],
            runtime=config["resources"]["checkpoint"]["runtime"],
        log:
            "logs/demo/demo_hub.log",
        benchmark:
            "logs/benchmarks/demo/demo_hub.tsv"
        conda:
            CONDA_ENV
        script:
            "../workflow_scripts/demo_hub.py"
