"""Preprocessing: calibration, tissue masks, gene selection, normalisation, binning, splits."""

from __future__ import annotations

from typing import TYPE_CHECKING

import lazy_loader

if TYPE_CHECKING:
    from ._bin import bin_counts
    from ._calibrate import calibrate
    from ._genes import select_genes, subset_genes
    from ._normalize import inverse_normalize, normalize
    from ._split import make_folds
    from ._tissue import tissue_mask

__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submod_attrs={
        "_bin": ["bin_counts"],
        "_calibrate": ["calibrate"],
        "_genes": ["select_genes", "subset_genes"],
        "_normalize": ["inverse_normalize", "normalize"],
        "_split": ["make_folds"],
        "_tissue": ["tissue_mask"],
    },
)
