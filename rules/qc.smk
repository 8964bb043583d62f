# The rejection record of the whole run: every job's part, concatenated.


localrules:
    qc_rejected,


rule qc_rejected:
    input:
        parts=rejection_parts(),
    output:
        table="results/qc/rejected.tsv",
    log:
        "logs/qc/qc_rejected.log",
    conda:
        CONDA_ENV
    script:
        "../workflow_scripts/qc_rejected.py"
