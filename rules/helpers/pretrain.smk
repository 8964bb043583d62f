# Helpers of the pretrain rules (rules/pretrain.smk): input functions, run lists, targets.

from openmind_bench.downstream import probes as omb_probes  # noqa: E402  (torch-free)
from openmind_bench.pretrain import settings as omb_pretrain  # noqa: E402  (torch-free)

PRETRAIN = config["pretrain"]
# stages.pretrain off (config/evaluate.yaml): nothing is pre-trained, nor fine-tuned from this config's runs
PRETRAIN_RUNS = omb_pretrain.run_names(PRETRAIN, list(SELECTIONS)) if config["stages"]["pretrain"] else []
# The probes during pre-training (pretrain.probe_every): datasets, splits and settings, checked here,
# before any job (a probe dataset that is not a usable classification set is an error naming the key)
PRETRAIN_PROBE = omb_probes.training_probe_config(config) if PRETRAIN_RUNS else None
# The job's resources (one node, or several through the SLURM plugin); a bad shape is a ConfigError here.
PRETRAIN_JOB_RESOURCES = omb_pretrain.job_resources(PRETRAIN["resources"])


onstart:
    # The executor is known only once the workflow starts (not while the Snakefile is read): several
    # nodes without SLURM stop here, before any job. Dry runs skip onstart.
    if PRETRAIN_RUNS:
        omb_pretrain.check_executor(PRETRAIN["resources"], workflow.executor_plugin.name)


def pretrain_targets():
    return [omb_names.pretrain_checkpoint(run) for run in PRETRAIN_RUNS]


def pretrain_settings(wildcards):
    """The run's resolved settings, from config and wildcards alone: a plain param, so a change of
    any setting re-runs this run (Snakemake's params trigger) and no other."""
    run = omb_names.pretrain_run(wildcards.method, wildcards.arch, wildcards.selection)
    selection_output = rules.select_pretrain_data.output
    return omb_pretrain.resolve(
        PRETRAIN,
        wildcards.method,
        wildcards.arch,
        out_dir=omb_names.PRETRAIN_DIR.format(run=run),
        train_data=expand(selection_output.train, selection=wildcards.selection)[0],
        val_data=expand(selection_output.val, selection=wildcards.selection)[0],
        selection=wildcards.selection,
        probe=PRETRAIN_PROBE,
    ).to_dict()


def pretrain_probe_inputs(wildcards):
    """The split files of the probe datasets (rule downstream_split), and the demo's downstream sets
    when the config builds them; nothing without probes."""
    if PRETRAIN_PROBE is None:
        return []
    return [d["split"] for d in PRETRAIN_PROBE["datasets"]] + downstream_data(wildcards)


def pretrain_threads(wildcards):
    """CPU threads of the job: cpus_per_gpu per process (one process on a CPU)."""
    return max(1, PRETRAIN["resources"]["gpu"]) * PRETRAIN["resources"]["cpus_per_gpu"]
