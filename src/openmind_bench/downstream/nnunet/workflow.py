"""Helpers the workflow's rules call at DAG time (torch- and nnunetv2-free)."""

from __future__ import annotations

from openmind_bench.registry import cached_registry


def zero_shot_source_metrics(registry: str, root: str | None, dataset: str, run: str) -> list[str]:
    """`[results/downstream/{source}/{run}/fold_test/metrics.json]` when `dataset` is scored zero-shot
    from `source`, else `[]`."""
    registry_doc = cached_registry(registry, root)
    if dataset not in registry_doc.datasets:
        return []
    source = registry_doc.get(dataset).zero_shot_from
    from openmind_bench.names import finetune_metrics

    return [finetune_metrics(source, run, "test")] if source else []
