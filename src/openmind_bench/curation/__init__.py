"""Curation: named selections of the preprocessed images as nnssl `pretrain_data.json` files."""

from openmind_bench.curation.pretrain_data import (
    PREPROCESSED_TWIN,
    build_collection,
    iter_images,
    read_collection,
    resolve_path,
)
from openmind_bench.curation.select import Selection, run_selection

__all__ = ["PREPROCESSED_TWIN", "Selection", "build_collection", "iter_images", "read_collection",
           "resolve_path", "run_selection"]
