"""Helpers the workflow's rules call at DAG time (torch- and nnunetv2-free)."""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=8)
def _registry(path: str, root: str | None):
    from openmind_bench.registry import load_registry

    return load_registry(path, root)


def zero_shot_source_metrics(registry: str, root: str | None, dataset: str, run: str) -> list[str]:
    """`[results/downstream/{source}/{run}/fold_test/metrics.json]` when `dataset` is scored zero-shot
    from `source`, else `[]`."""
    registry_doc = _registry(str(registry), None if root is None else str(root))
    if dataset not in registry_doc.datasets:
        return []
    source = registry_doc.get(dataset).zero_shot_from
    from openmind_bench.names import finetune_metrics

    return [finetune_metrics(source, run, "test")] if source else []
