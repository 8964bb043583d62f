# External checkpoints (config `checkpoints`): one fetch job per checkpoint into
# results/checkpoints/{name}/ (source.json), then a CPU check of it (check.json) before any GPU hour.
# Logic lives in openmind_bench.checkpoints; `openmind-bench check-checkpoint` is the check outside Snakemake.


rule fetch_checkpoint:
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


rule check_checkpoint:
    input:
        record=rules.fetch_checkpoint.output.record,
    output:
        report=f"{omb_checkpoints.CHECKPOINTS_DIR}/{{checkpoint}}/{omb_checkpoints.CHECK_REPORT}",
    params:
        architecture=checkpoint_architecture,
        channels=CHECKPOINT_CHANNELS,
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
