"""Our pre-training run in the published repository layout (`openmind-bench export-checkpoint`).

`results/pretrain/{run}/checkpoint_final.pt` becomes a folder that `huggingface_hub.upload_folder`
takes as it is, laid out like the `openmind-models` repositories (see `downstream.transfer`):

- `checkpoint_final.pth`: `network_weights`, `nnssl_adaptation_plan`, `trainer_name` (nnssl's keys;
  optimiser, pretext heads and history stay behind), loadable with `weights_only=True`;
- `adaptation_plan.json`: the plan plus `trainer_name`, as nnssl writes it;
- `config.json`: what the published file is assumed to be (model metadata nobody's reader parses):
  file names, architecture class and family, pre-training patch and spacing, recommended
  downstream patch, and our method, architecture preset, data selection, epochs and steps;
- `README.md`: a model card with the same facts and the run's benchmark rows when
  `results/benchmark/results_long.csv` has them.

The folder is written beside OUT_DIR under a temporary name and renamed into place.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from openmind_bench import __version__, atomic
from openmind_bench.checkpoints.check import CheckpointError, plan_architecture
from openmind_bench.downstream.transfer import PUBLISHED_CHECKPOINT, PUBLISHED_PLAN
from openmind_bench.engine import checkpoint

log = logging.getLogger(__name__)

CONFIG = "config.json"
MODEL_CARD = "README.md"


def benchmark_results(run_dir: Path) -> Path:
    """`results/benchmark/results_long.csv` of the results tree `results/pretrain/{run}/` lies in."""
    return Path(run_dir).resolve().parents[1] / "benchmark" / "results_long.csv"


def run_rows(results_long: Path, method: str, architecture: str, selection: str):
    """The run's rows of the long results, averaged per schedule, dataset and metric (None: no file
    or no rows). Labels as `aggregate.collect` writes them: the method may carry ` [selection]` and
    the architecture ` (N ep)` when the benchmark mixes selections or epoch counts."""
    if not results_long.is_file():
        return None
    import pandas as pd

    rows = pd.read_csv(results_long)
    methods = {method, f"{method} [{selection or 'default'}]"}
    mine = rows[rows["method"].isin(methods)
                & ((rows["architecture"] == architecture) | rows["architecture"].str.startswith(f"{architecture} ("))]
    if mine.empty:
        return None
    return (mine.groupby(["architecture", "schedule", "dataset", "metric"], sort=True)["value"]
            .agg(["mean", "count"]).reset_index())


def _rows_markdown(table) -> str:
    lines = ["| architecture | schedule | dataset | metric | mean | values |", "|---|---|---|---|---|---|"]
    for r in table.itertuples(index=False):
        lines.append(f"| {r.architecture} | {r.schedule} | {r.dataset} | {r.metric} | {r.mean:.4f} | {r.count} |")
    return "\n".join(lines)


def model_card(config: dict, rows) -> str:
    arch = config["architecture"]
    lines = [
        "---",
        "tags:",
        "- medical-imaging",
        "- self-supervised-learning",
        "- 3d",
        "- nnssl",
        f"- {config['method']}",
        "library_name: pytorch",
        "---",
        "",
        f"# {config['architecture_preset']} pre-trained with {config['method']} "
        f"({config['selection'] or 'default'} data)",
        "",
        f"A {arch['class']} ({arch['family']}) backbone pre-trained by openmind-bench {config['exported_by_version']} "
        f"with `{config['method']}` on the `{config['selection'] or 'default'}` selection of the pre-training data, "
        f"for {config['epochs_completed']} of {config['epochs']} epochs x {config['steps_per_epoch']} steps "
        f"(total batch {config['total_batch_size']}), patch {config['pretrain_patch_size']} at spacing "
        f"{config['pretrain_spacing']} mm.",
        "",
        "## Files",
        "",
        f"- `{PUBLISHED_CHECKPOINT}`: `network_weights` and `nnssl_adaptation_plan` (nnssl's layout; "
        "`torch.load(..., weights_only=True)` reads it)",
        f"- `{PUBLISHED_PLAN}`: the adaptation plan (encoder, stem, input projection and position embedding keys, "
        "pre-training plan)",
        f"- `{CONFIG}`: these facts as JSON",
        "",
        "## Fine-tuning",
        "",
        f"Recommended downstream patch: {config['recommended_downstream_patch_size']}. Only the encoder and the stem "
        "transfer; the decoder starts fresh. Check it before fine-tuning: "
        "`openmind-bench check-checkpoint <this folder>`.",
        "",
        "## Benchmark",
        "",
    ]
    if rows is None:
        lines.append("No benchmark rows for this run (results/benchmark/results_long.csv has none).")
    else:
        lines += ["Mean over folds and cases of the run's fine-tuning results (results_long.csv):", "",
                  _rows_markdown(rows)]
    return "\n".join(lines) + "\n"


def export_checkpoint(run_dir: str | Path, out_dir: str | Path, *, results_long: str | Path | None = None,
                      overwrite: bool = False) -> Path:
    """Write the run's final checkpoint in the published layout to `out_dir` (see the module doc)."""
    import torch

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    source = run_dir / checkpoint.FINAL
    if not source.is_file():
        raise CheckpointError(f"{run_dir} has no {checkpoint.FINAL} (not a finished pre-training run)")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise CheckpointError(f"{out_dir} exists and is not empty: choose another folder or overwrite it")
    try:
        state = checkpoint.load(source)
    except ValueError as e:
        raise CheckpointError(str(e)) from e
    plan = state.get("nnssl_adaptation_plan")
    settings = state.get("trainer_settings") or {}
    if not plan or not settings:
        raise CheckpointError(f"checkpoint {source} has no adaptation plan or trainer settings "
                              "(not written by openmind-bench pre-training)")
    arch = plan_architecture(plan, source)
    trainer_name = state.get("trainer_name") or f"openmind_bench:{settings['method']}"
    pretrain_conf = plan["pretrain_plan"]["configurations"]
    conf = pretrain_conf.get(checkpoint.CONFIGURATION) or next(iter(pretrain_conf.values()))
    config = {
        "format": "nnssl",
        "checkpoint": PUBLISHED_CHECKPOINT,
        "adaptation_plan": PUBLISHED_PLAN,
        "trainer_name": trainer_name,
        "architecture": arch,
        "pretrain_patch_size": [int(p) for p in conf["patch_size"]],
        "pretrain_spacing": [float(s) for s in conf["spacing"]],
        "recommended_downstream_patch_size": [int(p) for p in plan["recommended_downstream_patchsize"]],
        "pretrain_num_input_channels": int(plan["pretrain_num_input_channels"]),
        "method": settings["method"],
        "architecture_preset": settings["architecture"],
        "selection": settings.get("selection") or "",
        "run": run_dir.resolve().name,
        "epochs": int(settings["epochs"]),
        "epochs_completed": int(state.get("current_epoch", 0)),
        "steps_per_epoch": int(settings["steps_per_epoch"]),
        "total_batch_size": int(settings["total_batch_size"]),
        "method_settings": state.get("method_settings") or {},
        "exported_by": "openmind_bench",
        "exported_by_version": __version__,
    }
    results = Path(results_long) if results_long else benchmark_results(run_dir)
    rows = run_rows(results, config["method"], config["architecture_preset"], config["selection"])

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        torch.save({"network_weights": state["network_weights"], "nnssl_adaptation_plan": plan,
                    "trainer_name": trainer_name}, tmp / PUBLISHED_CHECKPOINT)
        (tmp / PUBLISHED_PLAN).write_text(json.dumps({**plan, "trainer_name": trainer_name}, indent=4) + "\n")
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        (tmp / MODEL_CARD).write_text(model_card(config, rows))
        atomic.replace_directory(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("exported %s to %s (%s rows of benchmark results)", source, out_dir,
             0 if rows is None else len(rows))
    return out_dir


__all__ = ["export_checkpoint", "model_card", "run_rows", "benchmark_results"]
