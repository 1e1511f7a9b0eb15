"""stpredict: predict spatially resolved gene expression from H&E images.

Submodules are imported lazily, so ``import stpredict as st`` stays cheap: torch, timm,
squidpy and dask.distributed load only when a function that needs them runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import lazy_loader

from ._version import __version__

if TYPE_CHECKING:
    from . import datasets, io, models, pl, pp, tl
    from ._settings import settings

__getattr__, __dir__, _lazy_names = lazy_loader.attach(
    __name__,
    submodules=["datasets", "io", "models", "pl", "pp", "tl"],
    submod_attrs={"_settings": ["settings"]},
)
__all__ = [*_lazy_names, "__version__"]
del _lazy_names
