"""Preprocessing: every indexed 3D image into the blosc2 store, one Snakemake job per shard.

Order of operations, following nnssl's public `DefaultPreprocessor` (`preprocess_case`):

1. read; reject NaN/Inf, empty (all zero), constant, degenerate and unreadable images with a
   reason (nnssl only checks NaN/Inf and lets the rest crash the worker);
2. reorient to RAS (nnssl does not reorient: its SimpleITK reader keeps the stored voxel order).
   We do, so that every stored array has the same anatomical axis order: methods that predict or
   augment along anatomical axes (rotation pretext tasks, crop grids of 256x256x64) and the
   anatomy-aware sampler then see the same axes for every scan. Reorienting permutes and flips
   voxel axes only; no interpolation, and oblique scans keep their obliquity in the affine;
3. crop to the bounding box of the non-zero voxels (nnssl: `crop_to_nonzero`);
4. z-score over the whole cropped image (nnssl: `ZScoreNormalization`, `use_mask_for_norm`
   false), before resampling as in nnssl, so the resampled background stays where it was;
5. resample to the target spacing (1 mm isotropic in the full run): images cubic, masks linear
   then binarised at 0.5, a strongly anisotropic axis separately (nnssl's `order_z`), on
   edge-aligned grids (see `resample.py`).

Masks: the index's `anat_mask` / `anon_mask` paths when present (the masks stage fills them),
else an all-ones anatomy mask and an empty anonymisation mask. Unlike nnssl, which with both
masks present writes the anonymisation mask into `__anat.b2nd` and the anatomy mask into
`__anon.b2nd` (it reads them in `AssociatedMasks` field order and takes `masks[0]` as anatomy),
ours are stored under their own names (pinned by tests/test_preprocess.py). We also always write
both mask files (an all-ones mask costs a few hundred bytes) so readers need no special case.

4D images are not preprocessed: DWI series reach the store through the 3D T2w/ADC/FA maps the
DWI stage derives from them (index rows with `derived_from` set).
"""

from openmind_bench.preprocess.image import (
    ImageRejected,
    PreprocessSettings,
    PreprocessedImage,
    preprocess_image,
    to_original_grid,
)

__all__ = ["ImageRejected", "PreprocessSettings", "PreprocessedImage", "preprocess_image", "to_original_grid"]
