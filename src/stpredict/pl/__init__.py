"""Plotting: dense maps over H&E, predicted vs measured, metric distributions, scale curves.

Every function returns its matplotlib Figure or Axes and imports matplotlib only when called.
"""

from __future__ import annotations

from typing import Any

from stpredict._lazy import lazy_getattr

_LAZY = {
    "dense_maps": "._dense",
    "metrics": "._evaluation",
    "predicted_vs_measured": "._evaluation",
    "scale_curve": "._evaluation",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    return lazy_getattr(__name__, globals(), _LAZY, name)


def __dir__() -> list[str]:
    return __all__
