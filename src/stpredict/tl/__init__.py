"""Tools: dense prediction, ensembles of maps, aggregation into tables, evaluation."""

from __future__ import annotations

from typing import TYPE_CHECKING

import lazy_loader

if TYPE_CHECKING:
    from ._aggregate import aggregate
    from ._ensemble import ensemble_maps
    from ._evaluate import EvaluationResult, evaluate, highly_predictive_genes
    from ._predict_dense import predict_dense
    from ._scales import evaluate_across_scales
    from ._uncertainty import evaluate_uncertainty

__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submod_attrs={
        "_aggregate": ["aggregate"],
        "_ensemble": ["ensemble_maps"],
        "_evaluate": ["EvaluationResult", "evaluate", "highly_predictive_genes"],
        "_predict_dense": ["predict_dense"],
        "_scales": ["evaluate_across_scales"],
        "_uncertainty": ["evaluate_uncertainty"],
    },
)
