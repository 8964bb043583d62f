"""The preprocessed image store: blosc2 `.b2nd` arrays in nnssl's per-image layout.

One image is `{stem}.b2nd` (float32, shape (1, X, Y, Z)), `{stem}__anon.b2nd` and
`{stem}__anat.b2nd` (uint8 0/1, same shape), `{stem}.json` (our properties) and `{stem}.pkl`
(the properties under nnssl's key names, so nnssl's own dataset class can open the files too).
"""

from openmind_bench.store.b2nd import StoreSettings, open_array, read_region, write_array
from openmind_bench.store.files import ImageFiles, image_files, read_properties, write_image

__all__ = [
    "ImageFiles",
    "StoreSettings",
    "image_files",
    "open_array",
    "read_properties",
    "read_region",
    "write_array",
    "write_image",
]
