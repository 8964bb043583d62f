# Pre-training: one job per method x architecture x selection of `pretrain` in the config (pairs
# without an implementation, e.g. spark3d on Primus, are left out), torchrun inside the job.
# Logic: openmind_bench.pretrain on the shared engine (openmind_bench.engine);
# `openmind-bench pretrain` is the same stage outside Snakemake.


rule pretrain:
    input:
        # The preprocessing stage's training subjects and held-out subjects (validation loss).
        train=rules.select_pretrain_data.output.train,
        val=rules.select_pretrain_data.output.val,
        # the probe datasets' splits and data (pretrain.probe_every; empty without probes)
        probe_data=pretrain_probe_inputs,
    output:
        checkpoint=omb_names.PRETRAIN_CHECKPOINT,
    params:
        settings=pretrain_settings,
    threads: pretrain_threads
    resources:
        # gpu, cpus_per_gpu, mem_mb, runtime; on several nodes the SLURM plugin's nodes / mpi / tasks / gres
        **PRETRAIN_JOB_RESOURCES,
    log:
        "logs/pretrain/{method}__{arch}__{selection}.log",
    benchmark:
        "logs/benchmarks/pretrain/{method}__{arch}__{selection}.tsv"
    conda:
        CONDA_ENV
    script:
        "../workflow_scripts/pretrain.py"
