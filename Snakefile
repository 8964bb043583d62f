# The OpenMind benchmark as one workflow: a table of contents.
#   snakemake --configfile config/demo.yaml --cores 2 all   # embedded demo, CPU, minutes, ends in the tables
#   snakemake --profile slurm all                           # full benchmark on a SLURM cluster
#   snakemake benchmark_table                               # rebuild the tables from existing results
# Stages, contracts and config keys: docs/architecture.md.

configfile: "config/config.yaml"


include: "rules/common.smk"
# Each stage's input functions, run lists and targets, then its rules.
include: "rules/helpers/download.smk"
include: "rules/helpers/index.smk"
include: "rules/helpers/dwi.smk"
include: "rules/helpers/masks.smk"
include: "rules/helpers/quality.smk"
include: "rules/helpers/preprocess.smk"
include: "rules/helpers/curate.smk"
include: "rules/helpers/pretrain.smk"
include: "rules/helpers/checkpoints.smk"
include: "rules/helpers/finetune.smk"
include: "rules/helpers/aggregate.smk"
include: "rules/helpers/qc.smk"
include: "rules/download.smk"
include: "rules/index.smk"
include: "rules/dwi.smk"
include: "rules/masks.smk"
include: "rules/quality.smk"
include: "rules/preprocess.smk"
include: "rules/curate.smk"
include: "rules/pretrain.smk"
include: "rules/checkpoints.smk"
include: "rules/finetune.smk"
include: "rules/qc.smk"
include: "rules/aggregate.smk"


rule all:
    default_target: True
    input:
        final=get_final_output(),
        remade=missing_per_image_files,
