# Helpers of the aggregate rules (rules/aggregate.smk): input functions, run lists, targets.

from openmind_bench.aggregate.collect import find_metrics_files  # noqa: E402

BENCHMARK_OUTPUTS = {
    "table_csv": f"{omb_names.BENCHMARK_DIR}/benchmark_table.csv",
    "table_md": f"{omb_names.BENCHMARK_DIR}/benchmark_table.md",
    "table_tex": f"{omb_names.BENCHMARK_DIR}/benchmark_table.tex",
    "ranks": f"{omb_names.BENCHMARK_DIR}/ranks_bootstrap.csv",
    "intervals": f"{omb_names.BENCHMARK_DIR}/bootstrap_intervals.csv",
    "deltas": f"{omb_names.BENCHMARK_DIR}/delta_scratch_intervals.csv",
    "compute": f"{omb_names.BENCHMARK_DIR}/compute.csv",
    "plots": f"{omb_names.BENCHMARK_DIR}/plots",
}


def benchmark_targets():
    return [v for k, v in BENCHMARK_OUTPUTS.items() if k != "plots"]


def metrics_of_config(wildcards):
    """Every run the config asks for, the scratch baselines of external checkpoints included."""
    return [*finetune_targets(), *external_scratch_targets(wildcards)]


def metrics_on_disk(wildcards):
    """The metrics.json files that exist when the DAG is built: the table reports whatever is there."""
    return [str(p) for p in find_metrics_files(omb_names.DOWNSTREAM_ROOT)]


def registry_if_present(wildcards):
    """The dataset registry when it exists (without one the ID/OOD means stay empty)."""
    path = config["downstream_registry"]
    return [path] if Path(path).is_file() else []


def leakage_of_config(wildcards):
    """results/curation/leakage.tsv when this run checks leakage (its counts go into the tables'
    footnote); nothing when the OpenMind data stages are off (config/evaluate.yaml: nothing is selected)."""
    return [LEAKAGE] if CURATION["leakage"] and OPENMIND_DATA else []


def leakage_if_present(wildcards):
    """results/curation/leakage.tsv when leakage is checked and the file exists (its counts go into the
    tables' footnote)."""
    return [LEAKAGE] if CURATION["leakage"] and Path(LEAKAGE).is_file() else []
