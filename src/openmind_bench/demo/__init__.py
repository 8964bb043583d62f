"""The embedded demo: a local OpenNeuro-layout mirror built from real images in PyPI packages."""

from openmind_bench.demo.builder import build_demo, dataset_ids

__all__ = ["build_demo", "dataset_ids"]
