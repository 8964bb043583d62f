# Input functions of rules/finetune.smk that belong to the nnU-Net path (zero-shot transfer).


def zero_shot_source(wildcards):
    """A dataset scored zero-shot (`zero_shot_from` in the registry) needs the same run's model
    fine-tuned on its source dataset (fold test); other datasets need nothing."""
    from openmind_bench.downstream.nnunet.workflow import zero_shot_source_metrics

    return zero_shot_source_metrics(DOWNSTREAM_REGISTRY, DOWNSTREAM_ROOT, wildcards.target_dataset,
                                    wildcards.finetune_run)
