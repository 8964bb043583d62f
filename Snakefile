# The OpenMind benchmark as one workflow: a table of contents.
#   snakemake --configfile config/demo.yaml all      # embedded demo, CPU, minutes
#   snakemake --profile profiles/slurm all           # full benchmark on a SLURM cluster
#   snakemake benchmark_table                        # rebuild the tables from existing results

configfile: "config/config.yaml"


include: "rules/common.smk"
include: "rules/download.smk"
include: "rules/index.smk"
include: "rules/dwi.smk"
include: "rules/preprocess.smk"
include: "rules/curate.smk"
include: "rules/pretrain.smk"
include: "rules/finetune.smk"
include: "rules/qc.smk"
include: "rules/aggregate.smk"


rule all:
    default_target: True
    input:
        get_final_output(),
