"""Settings of one pre-training run, resolved once from the `pretrain` config section.

`resolve` takes the section (its defaults come from config/schema.yaml, the only place they are
written) and narrows it to one method x architecture x selection run. The result is written next to
the checkpoints (`settings.json`) and inside every checkpoint. Every field comes from the config
except `threads` (the job's share of CPU threads, set by the launcher).
"""

from __future__ import annotations

from dataclasses import dataclass

from openmind_bench import config, names, nets, ssl
from openmind_bench.engine import checkpoint
from openmind_bench.engine.record import RunRecord
from openmind_bench.engine.settings import JsonSettings

# Keys of the config section that describe the workflow (which runs exist, on what resources),
# not one run.
_WORKFLOW_KEYS = ("methods", "architectures", "selections", "resources", "probe_datasets", "probes")
# Settings that do not shape the trained weights: a run differing only in these continues from its state.
# (The probes run on a copy of the weights under saved random states: they shape nothing.)
_NOT_SHAPING = ("out_dir", "threads", "num_workers", "log_every_steps", "checkpoint_every", "preemption_exit_code",
                "max_nonfinite_steps", "probe_every", "probe")
# What a run leaves in its folder besides the final checkpoint (removed when the record differs).
STATE = (checkpoint.LATEST, checkpoint.PREEMPTED, "progress.csv", "tensorboard", "settings.json", "compute.json",
         "probe_curve.png", "reconstruction.png")


def merged(config_section: dict | None) -> dict:
    """The `pretrain` section with the schema's defaults under `config_section` (validated)."""
    return config.section("pretrain", config_section)


@dataclass
class PretrainSettings(JsonSettings):
    LABEL = "pre-training settings"

    method: str
    architecture: str
    out_dir: str
    train_data: str | None
    val_data: str | None
    selection: str
    epochs: int
    steps_per_epoch: int
    val_steps: int
    total_batch_size: int
    patch_size: list
    seed: int
    checkpoint_every: int
    num_workers: int
    amp: bool
    amp_dtype: str
    compile: bool
    log_every_steps: int
    max_nonfinite_steps: int
    recommended_downstream_patch_size: list
    preemption_exit_code: int
    optimisation: dict  # the architecture family's entry
    method_settings: dict  # overrides of the method implementation's DEFAULTS
    architecture_presets: dict
    pretrain_plan: dict
    # "module:callable" taking these settings and returning the batch source (see pretrain.batches).
    batch_source: str
    probe_every: int | None  # epochs between probe passes (0 / None: none)
    probe: dict | None  # the probes' datasets and settings (downstream.probes.training_probe_config)
    threads: int = 0  # torch threads per process on CPU, set by the launcher; 0 = torch's default

    def arch(self) -> nets.Architecture:
        return nets.resolve(self.architecture, self.architecture_presets)

    @property
    def loader_patch_size(self) -> list[int]:
        """What the batch source crops: `patch_size`, or the method's region (SimCLR, VoCo)."""
        return ssl.patch_sizes(self.method, self.arch().family, self.patch_size, self.method_settings)[0]

    @property
    def loader_augmentation(self) -> bool:
        return ssl.loader_augmentation(self.method, self.arch().family)

    @property
    def loader_sampling(self) -> str:
        """"random" or "centre" (see ssl.loader_sampling)."""
        return ssl.loader_sampling(self.method, self.arch().family)

    @property
    def anatomy_aware(self) -> bool:
        return ssl.parse(self.method).anatomy_aware


def run_record(settings: PretrainSettings) -> RunRecord:
    """The run's record: its result-shaping settings and the sha256 of its data lists."""
    return RunRecord.of(settings.to_dict(), ignore=_NOT_SHAPING,
                        files={"train_data": settings.train_data, "val_data": settings.val_data})


def resolve(config_section: dict | None, method: str, architecture: str, *, out_dir: str,
            train_data: str | None = None, val_data: str | None = None, selection: str = "",
            probe: dict | None = None) -> PretrainSettings:
    """One run's settings; raises ValueError naming the problem (unknown method or architecture, a
    method without an implementation for the architecture's family, a patch the network cannot take).
    `probe`: the probes' datasets and settings (`downstream.probes.training_probe_config` of the whole
    config; None: no probes). Imports no torch: the workflow calls it for every job when it builds the DAG."""
    cfg = merged(config_section)
    arch = nets.resolve(architecture, cfg["architecture_presets"])
    arch.check_patch_size(cfg["patch_size"])
    family = arch.family
    if family not in cfg["optimisation"]:
        raise ValueError(f"pretrain.optimisation has no entry for the {family!r} family")
    run = {k: v for k, v in cfg.items() if k not in _WORKFLOW_KEYS}
    run.update(
        method=method,
        architecture=architecture,
        out_dir=str(out_dir),
        train_data=None if train_data is None else str(train_data),
        val_data=None if val_data is None else str(val_data),
        selection=selection,
        optimisation=cfg["optimisation"][family],
        method_settings=dict(cfg["method_settings"].get(ssl.implementation(method, family), {})),
        probe=probe if cfg["probe_every"] else None,
    )
    return PretrainSettings.from_dict(run)


def run_names(section: dict, selections: list[str]) -> list[str]:
    """`{method}__{arch}__{selection}` of every run the `pretrain` section asks for (pairs without an
    implementation, e.g. spark3d on a Primus, are left out). Errors name the config key. No torch."""
    for i, selection in enumerate(section["selections"]):
        names.check_name(selection, f"pretrain.selections[{i}]")
        if selection not in selections:
            raise config.ConfigError(f"config key 'pretrain.selections[{i}]': {selection!r} is not among the "
                                     f"selections {selections} (config key 'selections')")
    families = {}
    for i, arch in enumerate(section["architectures"]):
        try:
            families[arch] = nets.resolve(arch, section["architecture_presets"]).family
        except ValueError as e:
            raise config.ConfigError(f"config key 'pretrain.architectures[{i}]': {e}") from None
    for i, method in enumerate(section["methods"]):
        try:
            ssl.parse(method)
        except ValueError as e:
            raise config.ConfigError(f"config key 'pretrain.methods[{i}]': {e}") from None
        if method == names.SCRATCH:
            raise config.ConfigError(f"config key 'pretrain.methods[{i}]': {names.SCRATCH!r} names the "
                                     "from-scratch baselines, not a method")
    return [names.pretrain_run(m, a, s) for s in section["selections"] for a in section["architectures"]
            for m in section["methods"] if ssl.compatible(m, families[a])]


# ---- the job's shape: nodes x processes (pretrain.resources)
# snakemake-executor-plugin-slurm (2.8) runs a job that is not an "mpi" job inside `srun -n1`, one task
# on one node, and maps `gpu` to sbatch's `--gpus` (the job's total). A multi-node job is the plugin's
# "mpi" job instead: the batch script runs the rule, whose launcher starts the job's step itself
# (`srun --ntasks-per-node=1 ... torchrun`). `tasks` = nodes gives one task per node (`--ntasks`;
# the plugin refuses `tasks_per_node` 1 for mpi jobs), `gres` gpu:G gives G GPUs on every node
# (`--gpus` would be the total, spread as SLURM likes), `tasks_per_gpu` 0 keeps the plugin from
# turning `tasks` into `--ntasks-per-gpu`, and `cpus_per_task` is the node's CPUs (one task per node).
SLURM_EXECUTORS = ("slurm", "slurm-jobstep")


def check_resources(resources: dict) -> None:
    """ConfigError naming the key for a job shape that cannot run: several CPU nodes not opted in."""
    if resources["nodes"] > 1 and resources["gpu"] == 0 and not resources["cpu_multinode"]:
        raise config.ConfigError(
            f"config key 'pretrain.resources.nodes': {resources['nodes']} nodes with pretrain.resources.gpu 0 "
            "would train one CPU process per node; give each node GPUs (pretrain.resources.gpu), use one node, "
            "or set pretrain.resources.cpu_multinode: true to run gloo over CPU nodes on purpose")


def check_executor(resources: dict, executor: str | None) -> None:
    """ConfigError naming the key when a multi-node job would run outside SLURM (`executor`: the
    Snakemake executor plugin's name)."""
    if resources["nodes"] > 1 and executor not in SLURM_EXECUTORS:
        raise config.ConfigError(
            f"config key 'pretrain.resources.nodes': {resources['nodes']} nodes need the SLURM executor "
            f"(snakemake --profile slurm), not {executor or 'the local executor'!r}; set it to 1 to pre-train "
            "on this machine")


def job_resources(resources: dict) -> dict:
    """The pretrain rule's resources for Snakemake and snakemake-executor-plugin-slurm, from the portable
    `pretrain.resources` (only the resources the job has)."""
    check_resources(resources)
    gpu, nodes = resources["gpu"], resources["nodes"]
    threads = max(1, gpu) * resources["cpus_per_gpu"]  # per node
    job = {"mem_mb": resources["mem_mb"], "runtime": resources["runtime"], "gpu": None, "cpus_per_gpu": None,
           "nodes": None, "mpi": None, "tasks": None, "tasks_per_gpu": None, "gres": None, "cpus_per_task": None}
    if nodes == 1:
        job.update(gpu=gpu, cpus_per_gpu=resources["cpus_per_gpu"])
    else:
        job.update(nodes=nodes, mpi="srun", tasks=nodes, tasks_per_gpu=0 if gpu else None,
                   gres=f"gpu:{gpu}" if gpu else None, cpus_per_task=threads)
    return {key: value for key, value in job.items() if value is not None}


def job_shape(resources) -> tuple[int, int, bool]:
    """(nodes, processes per node, on GPUs) of a job from its resources (`job_resources`, as the job sees them)."""
    nodes = int(resources.get("nodes") or 1)
    if nodes == 1:
        gpu = int(resources.get("gpu") or 0)
        return 1, max(1, gpu), gpu > 0
    gres = resources.get("gres") or ""
    gpu = int(gres.rsplit(":", 1)[-1]) if gres.startswith("gpu:") else 0
    return nodes, max(1, gpu), gpu > 0
