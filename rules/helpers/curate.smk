# Helpers of the curate rules (rules/curate.smk): input functions, run lists, targets.

from openmind_bench.registry import downstream_test_subjects  # noqa: E402

SELECTIONS = omb_config.named_selections(config)
# (OpenNeuro dataset, subject) pairs of downstream test sets (registry field `openneuro`), never selected
EXCLUDED_SUBJECTS = sorted(downstream_test_subjects(config["downstream_registry"]))
CURATION = config["curation"]
CURATION_ROOT = "results/curation"
DUPLICATES = f"{CURATION_ROOT}/duplicates.parquet"
LEAKAGE = f"{CURATION_ROOT}/leakage.tsv"
UNCHECKED = f"{CURATION_ROOT}/unchecked.tsv"


def fingerprint_tables(wildcards=None):
    """One fingerprint table per preprocessing shard (known from config alone)."""
    return [f"{CURATION_ROOT}/fingerprints/{d}/shard-{k}.parquet" for d in DATASETS for k in range(N_SHARDS[d])]


def leakage_datasets():
    """The downstream datasets whose test cases no selection may hold: every registry dataset whose data
    is present, fine-tuned on or not (openmind_bench.downstream.settings.leakage_datasets)."""
    return omb_finetune.leakage_datasets(config)


def downstream_fingerprint_tables(wildcards=None):
    """The downstream test cases' fingerprint tables (none when curation.leakage is off: leakage.tsv is empty)."""
    return [f"{CURATION_ROOT}/downstream/{d}.parquet" for d in leakage_datasets()]


def fingerprint_rejection_parts(wildcards=None):
    """The fingerprint jobs' rejection parts: their images go into no selection."""
    return [f"results/qc/parts/curation/{d}/{k}.tsv" for d in DATASETS for k in range(N_SHARDS[d])]


def curation_rejection_parts():
    return [
        *fingerprint_rejection_parts(),
        *(f"results/qc/parts/curation/downstream/{d}.tsv" for d in leakage_datasets()),
    ]


def downstream_split_of(wildcards):
    return omb_finetune.split_path(config, wildcards.target_dataset)


def downstream_source_of(wildcards):
    """The dataset's folder (registry `source` under downstream.root)."""
    return str(omb_finetune.cached_registry(config).get(wildcards.target_dataset).source)


def selection_settings(wildcards):
    return SELECTIONS[wildcards.selection]


def selection_collection_index(wildcards):
    """Position of the selection in the config list, nnssl's collection_index (1-based)."""
    return list(SELECTIONS).index(wildcards.selection) + 1


def selection_excluded_subjects(wildcards):
    return [list(pair) for pair in EXCLUDED_SUBJECTS]


def selection_curation_inputs(wildcards):
    """unchecked.tsv (images without a fingerprint), leakage.tsv (when curation.leakage is on) and
    duplicates.parquet (for a `dedup: true` selection)."""
    out = {"unchecked": UNCHECKED}
    if CURATION["leakage"]:
        out["leakage"] = LEAKAGE
    if SELECTIONS[wildcards.selection].get("dedup"):
        out["duplicates"] = DUPLICATES
    return out


def selection_targets():
    return [
        *expand("results/selections/{selection}/pretrain_data.json", selection=SELECTIONS),
        *expand("results/selections/{selection}/pretrain_data__preprocessed.json", selection=SELECTIONS),
        *expand("results/selections/{selection}/summary.json", selection=SELECTIONS),
        DUPLICATES,
        LEAKAGE,
    ]
