"""Plotting: dense maps over H&E, predicted vs measured, metric distributions, scale curves.

Every function returns its matplotlib Figure or Axes and imports matplotlib only when called.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import lazy_loader

if TYPE_CHECKING:
    from ._dense import dense_maps
    from ._evaluation import gene_scores, predicted_vs_measured, scale_curve

__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submod_attrs={
        "_dense": ["dense_maps"],
        "_evaluation": ["gene_scores", "predicted_vs_measured", "scale_curve"],
    },
)
