# Helpers of the checkpoint rules (rules/checkpoints.smk): the configured external checkpoints, their
# check (a Snakemake checkpoint: what a run reads from it is known once it has run), the demo's hub.

from openmind_bench.checkpoints import settings as omb_checkpoints  # noqa: E402  (torch-free)

CHECKPOINTS = omb_checkpoints.configured_checkpoints(config)
# the registry's input-channel counts of the fine-tuning datasets: the check transfers into each
CHECKPOINT_CHANNELS = omb_checkpoints.channel_counts(config) if CHECKPOINTS else [1]
DEMO_HUB = config["demo"]["hub"]
omb_checkpoints.check_demo_hub(DEMO_HUB, PRETRAIN_RUNS)


def checkpoint_entry(wildcards):
    return CHECKPOINTS[wildcards.checkpoint]


def checkpoint_architecture(wildcards):
    """The entry's `architecture` (a checkpoint without an adaptation plan), else None."""
    return CHECKPOINTS[wildcards.checkpoint].get("architecture")


def checkpoint_hub_input(wildcards):
    """The demo's hub cache entry when this checkpoint is read from it (config demo.hub), else nothing."""
    entry = CHECKPOINTS[wildcards.checkpoint]
    if DEMO_HUB and omb_checkpoints.reads_demo_hub(entry, DEMO_HUB):
        return [omb_checkpoints.hub_ref(DEMO_HUB)]
    return []


def checked_report(name):
    """check.json of checkpoint `name`; until its check has run, Snakemake holds the asking job back
    and asks again after it (IncompleteCheckpointException)."""
    return checkpoints.check_checkpoint.get(checkpoint=name).output.report


def checkpoint_dir_of(name):
    return omb_checkpoints.checkpoint_dir(name)


def checkpoint_targets():
    """check.json and the scorecard against its scratch baseline of every configured checkpoint."""
    return [f"{omb_checkpoints.checkpoint_dir(name)}/{file}" for name in CHECKPOINTS
            for file in (omb_checkpoints.CHECK_REPORT, *omb_checkpoints.SCORECARD)]
