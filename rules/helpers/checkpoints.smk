# Helpers of the checkpoint rules (rules/checkpoints.smk): the configured external checkpoints.

from openmind_bench.checkpoints import settings as omb_checkpoints  # noqa: E402  (torch-free)

CHECKPOINTS = omb_checkpoints.configured_checkpoints(config)
# the registry's input-channel counts of the fine-tuning datasets: the check transfers into each
CHECKPOINT_CHANNELS = omb_checkpoints.channel_counts(config) if CHECKPOINTS else [1]


def checkpoint_entry(wildcards):
    return CHECKPOINTS[wildcards.checkpoint]


def checkpoint_architecture(wildcards):
    """The entry's `architecture` (a checkpoint without an adaptation plan), else None."""
    return CHECKPOINTS[wildcards.checkpoint].get("architecture")


def checkpoint_targets():
    """check.json of every configured checkpoint (each after its fetch)."""
    return [f"{omb_checkpoints.checkpoint_dir(name)}/{omb_checkpoints.CHECK_REPORT}" for name in CHECKPOINTS]
