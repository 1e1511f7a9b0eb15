"""stpredict: predict spatially resolved gene expression from H&E images.

Submodules are imported lazily, so ``import stpredict as st`` stays cheap: torch, timm,
squidpy and dask.distributed load only when a function that needs them runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import lazy_loader

# Eager and light: it sets the OpenMP wait policy before torch can be imported (see stpredict._settings).
from ._settings import settings
from ._version import __version__

if TYPE_CHECKING:
    from . import datasets, errors, io, models, pl, pp, tl

__getattr__, _, _lazy_names = lazy_loader.attach(
    __name__,
    submodules=["datasets", "errors", "io", "models", "pl", "pp", "tl"],
)
__all__ = [*_lazy_names, "settings", "__version__"]
del _lazy_names


def __dir__() -> list[str]:
    return sorted(__all__)
