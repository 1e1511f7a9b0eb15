"""Preprocessing: calibration, tissue masks, gene selection, normalisation, binning, splits."""

from __future__ import annotations

from typing import Any

from stpredict._lazy import lazy_getattr

_LAZY = {
    "bin": "._bin",
    "calibrate": "._calibrate",
    "inverse_normalize": "._normalize",
    "normalize": "._normalize",
    "select_genes": "._genes",
    "split": "._split",
    "subset_genes": "._genes",
    "tissue_mask": "._tissue",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    return lazy_getattr(__name__, globals(), _LAZY, name)


def __dir__() -> list[str]:
    return __all__
