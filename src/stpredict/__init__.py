"""stpredict: predict spatially resolved gene expression from H&E images.

Submodules are imported lazily, so ``import stpredict as st`` stays cheap: torch, timm,
squidpy and dask.distributed load only when a function that needs them runs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY_SUBMODULES = ("datasets", "io", "models", "pl", "pp", "tl")
_LAZY_ATTRIBUTES = {"settings": "._settings"}

__all__ = [*_LAZY_SUBMODULES, "settings", "__version__"]

if TYPE_CHECKING:
    from . import datasets, io, models, pl, pp, tl
    from ._settings import settings


def __getattr__(name: str) -> Any:
    if name in _LAZY_SUBMODULES:
        module = importlib.import_module(f".{name}", __name__)
        globals()[name] = module
        return module
    if name in _LAZY_ATTRIBUTES:
        value = getattr(importlib.import_module(_LAZY_ATTRIBUTES[name], __name__), name)
        globals()[name] = value
        return value
    msg = f"module {__name__!r} has no attribute {name!r}"
    raise AttributeError(msg)


def __dir__() -> list[str]:
    return sorted(__all__)
