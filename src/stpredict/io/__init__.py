"""Readers: legacy Spatial Transcriptomics folders, thin helpers over spatialdata-io, in-memory builders.

Everything comes out in stpredict's layout (``images["he"]``, a shapes element of the measured units,
``tables["table"]`` with raw counts) and calibrated in micrometres where the scale is known.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from stpredict._lazy import lazy_getattr

if TYPE_CHECKING:
    from ._memory import from_image_and_table as from_image_and_table
    from ._metadata import infer_um_per_px as infer_um_per_px
    from ._spatialdata_io import read_visium as read_visium
    from ._spatialdata_io import read_visium_hd as read_visium_hd
    from ._spatialdata_io import read_xenium as read_xenium
    from ._st import read_st as read_st

_LAZY = {
    "from_image_and_table": "._memory",
    "infer_um_per_px": "._metadata",
    "read_st": "._st",
    "read_visium": "._spatialdata_io",
    "read_visium_hd": "._spatialdata_io",
    "read_xenium": "._spatialdata_io",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    return lazy_getattr(__name__, globals(), _LAZY, name)


def __dir__() -> list[str]:
    return __all__
