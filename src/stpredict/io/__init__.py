"""Readers: legacy Spatial Transcriptomics folders, thin helpers over spatialdata-io, in-memory builders.

Everything comes out in stpredict's layout (``images["he"]``, a shapes element of the measured units,
``tables["table"]`` with raw counts) and calibrated in micrometres where the scale is known.
"""

from __future__ import annotations

from typing import Any

from stpredict._lazy import lazy_getattr

_LAZY = {
    "infer_um_per_px": "._metadata",
    "read_st": "._st",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    return lazy_getattr(__name__, globals(), _LAZY, name)


def __dir__() -> list[str]:
    return __all__
