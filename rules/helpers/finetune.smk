# Helpers of the finetune rules (rules/finetune.smk): input functions, run lists, targets.

from openmind_bench.downstream import settings as omb_finetune  # noqa: E402  (torch-free)

FINETUNE = config["finetune"]
DOWNSTREAM = config["downstream"]
# The demo builds its downstream sets where the registry is told to read them.
DOWNSTREAM_DEMO_ROOT = DOWNSTREAM["root"] or "data/demo_downstream"
DOWNSTREAM_DATASET_FOLDS = omb_finetune.dataset_folds(config)
FINETUNE_TARGETS = omb_finetune.targets(config, PRETRAIN_RUNS, DOWNSTREAM_DATASET_FOLDS)


def finetune_targets():
    """results/downstream/{dataset}/{run}/fold_{k}/metrics.json of every run the config asks for."""
    return FINETUNE_TARGETS


def downstream_data(wildcards):
    """The demo downstream sets when the config builds them (downstream.build_demo); real datasets are
    read where they lie."""
    return [rules.demo_downstream.output.truth] if DOWNSTREAM["build_demo"] else []


def downstream_data_fingerprint(wildcards):
    """Paths, sizes and mtimes of the dataset's files, digested: a file changed after the split (a
    label rewritten) changes this param, so Snakemake re-runs the split and its checks."""
    return omb_finetune.split_data_fingerprint(config, wildcards.target_dataset)


def finetune_checkpoint(wildcards):
    name = omb_names.parse_run(wildcards.finetune_run)
    return [omb_names.pretrain_checkpoint(name.pretrain_run)] if name.pretrained else []


def finetune_settings(wildcards):
    """The run's resolved settings, from config and wildcards alone: a plain param, so a change of
    any setting re-runs this run (Snakemake's params trigger) and no other."""
    name = omb_names.parse_run(wildcards.finetune_run)
    return omb_finetune.resolve(
        config,
        wildcards.target_dataset,
        wildcards.finetune_run,
        wildcards.fold,
        split=omb_finetune.split_path(config, wildcards.target_dataset),
        pretrained_checkpoint=omb_names.pretrain_checkpoint(name.pretrain_run) if name.pretrained else None,
        low_data_subset=(omb_finetune.split_path(config, wildcards.target_dataset, name.low_data_n)
                         if name.low_data_n else None),
    ).to_dict()


def split_registry_entry(wildcards):
    return omb_finetune.dataset_entries(config, wildcards.target_dataset)


def finetune_threads(wildcards):
    return max(1, FINETUNE["resources"]["gpu"]) * FINETUNE["resources"]["cpus_per_gpu"]


def downstream_rejection_parts():
    """QC parts of the downstream split jobs."""
    return [f"results/qc/parts/downstream/{d}.tsv" for d in DOWNSTREAM_DATASET_FOLDS]


def zero_shot_source(wildcards):
    """A dataset scored zero-shot (`zero_shot_from` in the registry) needs the same run's model
    fine-tuned on its source dataset (fold test); other datasets need nothing."""
    from openmind_bench.downstream.nnunet.workflow import zero_shot_source_metrics

    return zero_shot_source_metrics(config["downstream_registry"], DOWNSTREAM["root"], wildcards.target_dataset,
                                    wildcards.finetune_run)
