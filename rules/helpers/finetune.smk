# Helpers of the finetune rules (rules/finetune.smk): input functions, run lists, targets.

from openmind_bench.downstream import settings as omb_finetune  # noqa: E402  (torch-free)

FINETUNE = config["finetune"]
DOWNSTREAM = config["downstream"]
# The demo builds its downstream sets where the registry is told to read them.
DOWNSTREAM_DEMO_ROOT = DOWNSTREAM["root"] or "data/demo_downstream"
DOWNSTREAM_DATASET_FOLDS = omb_finetune.dataset_folds(config)
FINETUNE_RUNS = omb_finetune.run_names(config, PRETRAIN_RUNS, CHECKPOINTS)
FINETUNE_TARGETS = omb_finetune.targets(config, PRETRAIN_RUNS, DOWNSTREAM_DATASET_FOLDS, runs=FINETUNE_RUNS)


def finetune_targets():
    """results/downstream/{dataset}/{run}/fold_{k}/metrics.json of every run the config names (the
    scratch baselines of external checkpoints' architectures come after their checks:
    `external_scratch_targets`)."""
    return FINETUNE_TARGETS


def run_targets(runs):
    """metrics.json of `runs` on every dataset and fold the config evaluates."""
    return omb_finetune.targets(config, PRETRAIN_RUNS, DOWNSTREAM_DATASET_FOLDS, runs=runs)


def scratch_baselines_of(checkpoint_names):
    """The scratch-baseline architectures of these checkpoints, each once; each checkpoint's check must
    have run (checked_report)."""
    return omb_checkpoints.scratch_architectures([checked_report(name) for name in checkpoint_names])


def external_scratch_targets(wildcards):
    """metrics.json of the scratch baselines of the external checkpoints' architectures that the config
    does not already run (once per architecture)."""
    extra = [a for a in scratch_baselines_of(CHECKPOINTS) if a not in FINETUNE["scratch_architectures"]]
    return run_targets(omb_finetune.scratch_runs(config, extra))


def checkpoint_scorecard_metrics(wildcards):
    """A checkpoint's own metrics.json and those of the scratch baseline of its architecture."""
    name = wildcards.checkpoint
    own = [run for run in FINETUNE_RUNS if omb_names.parse_run(run).checkpoint == name]
    baseline = omb_finetune.scratch_runs(config, scratch_baselines_of([name]))
    return run_targets(own + baseline)


def downstream_data(wildcards):
    """The demo downstream sets when the config builds them (downstream.build_demo); real datasets are
    read where they lie."""
    return [rules.demo_downstream.output.truth] if DOWNSTREAM["build_demo"] else []


def downstream_data_fingerprint(wildcards):
    """Paths, sizes and mtimes of the dataset's files, digested: a file changed after the split (a
    label rewritten) changes this param, so Snakemake re-runs the split and its checks."""
    return omb_finetune.split_data_fingerprint(config, wildcards.target_dataset)


def finetune_checkpoint(wildcards):
    """The pre-training checkpoint of the run; an external checkpoint's check.json (after its check)."""
    name = omb_names.parse_run(wildcards.finetune_run)
    if name.external:
        return [checked_report(name.checkpoint)]
    return [omb_names.pretrain_checkpoint(name.pretrain_run)] if name.pretrained else []


def external_checkpoint_of(name, dataset):
    """(checkpoint file, provenance) of an external run, read from its fetch and check records."""
    folder = Path(checked_report(name.checkpoint)).parent
    channels = omb_finetune.cached_registry(config).get(dataset).channels
    provenance = omb_checkpoints.provenance(folder, channels)  # names the fetched checkpoint file too
    return str(folder / provenance["checkpoint_file"]), provenance


def finetune_settings(wildcards):
    """The run's resolved settings, from config and wildcards alone (and, for an external checkpoint,
    its fetch and check records): a plain param, so a change of any setting, or another checkpoint
    behind the same name, re-runs this run (Snakemake's params trigger) and no other."""
    name = omb_names.parse_run(wildcards.finetune_run)
    pretrained = omb_names.pretrain_checkpoint(name.pretrain_run) if name.pretrain_run else None
    external = None
    if name.external:
        pretrained, external = external_checkpoint_of(name, wildcards.target_dataset)
    return omb_finetune.resolve(
        config,
        wildcards.target_dataset,
        wildcards.finetune_run,
        wildcards.fold,
        split=omb_finetune.split_path(config, wildcards.target_dataset),
        pretrained_checkpoint=pretrained,
        low_data_subset=(omb_finetune.split_path(config, wildcards.target_dataset, name.low_data_n, name.seed)
                         if name.low_data_n else None),
        external_checkpoint=external,
    ).to_dict()


def split_registry_entry(wildcards):
    return omb_finetune.dataset_entries(config, wildcards.target_dataset)


def finetune_threads(wildcards):
    return max(1, FINETUNE["resources"]["gpu"]) * FINETUNE["resources"]["cpus_per_gpu"]


def downstream_rejection_parts():
    """QC parts of the downstream split jobs (the fine-tuned sets and, with selections to check, those
    only checked for leakage)."""
    checked = leakage_datasets() if OPENMIND_DATA else []
    return [f"results/qc/parts/downstream/{d}.tsv" for d in sorted({*DOWNSTREAM_DATASET_FOLDS, *checked})]


def zero_shot_source(wildcards):
    """A dataset scored zero-shot (`zero_shot_from` in the registry) needs the same run's model
    fine-tuned on its source dataset (fold test); other datasets need nothing."""
    from openmind_bench.downstream.nnunet.workflow import zero_shot_source_metrics

    return zero_shot_source_metrics(config["downstream_registry"], DOWNSTREAM["root"], wildcards.target_dataset,
                                    wildcards.finetune_run)
