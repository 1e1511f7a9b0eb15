"""Readers: legacy Spatial Transcriptomics folders, whole-slide scans, thin helpers over spatialdata-io, builders.

Everything comes out in stpredict's layout (``images["he"]``, a shapes element of the measured units,
``tables["table"]`` with raw counts) and calibrated in micrometres where the scale is known.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import lazy_loader

if TYPE_CHECKING:
    from ._memory import from_image_and_table
    from ._metadata import infer_um_per_px
    from ._spatialdata_io import read_visium, read_visium_hd, read_xenium
    from ._st import read_st
    from ._wsi import read_wsi

__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submod_attrs={
        "_memory": ["from_image_and_table"],
        "_metadata": ["infer_um_per_px"],
        "_spatialdata_io": ["read_visium", "read_visium_hd", "read_xenium"],
        "_st": ["read_st"],
        "_wsi": ["read_wsi"],
    },
)
