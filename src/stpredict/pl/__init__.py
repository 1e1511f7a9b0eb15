"""Plotting: gene maps over H&E, tables side by side, predicted vs measured, scores, scale and training curves.

Every function returns its matplotlib Figure or Axes (``None`` when shown) and imports matplotlib only when called.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import lazy_loader

if TYPE_CHECKING:
    from ._compare import compare
    from ._evaluation import gene_scores, predicted_vs_measured, scale_curve
    from ._maps import gene_map
    from ._training import training_curves

__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submod_attrs={
        "_compare": ["compare"],
        "_evaluation": ["gene_scores", "predicted_vs_measured", "scale_curve"],
        "_maps": ["gene_map"],
        "_training": ["training_curves"],
    },
)
